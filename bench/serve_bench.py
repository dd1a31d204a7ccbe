#!/usr/bin/env python3
"""export-engine serve under load on one machine, in one run: a table printed last, JSON written to --out.

    python3 bench/serve_bench.py --work DIR [--artifact PATH] [--out DIR] [--clients 8] [--duration 60]

1. The artifact: --artifact, else FastSAM3D hybrid with sparse attention, random weights, exported into --work
   (ONNX only; reused when already there).
2. The public API in this process, next to its peers: ``SegmentSession.set_volume`` of a 160^3 volume already in
   memory (crop/pad + z-normalise on the device + encoder) next to the encoder alone on a device-resident input
   and the numpy pre-processing path; ``SegmentSession.click`` to a device mask next to the decoder alone on
   device-resident inputs, and with the compact mask copied to the host (every timing waits for the GPU).
3. ``export-engine serve`` in a child process on a free localhost port:
   - session creation from a 256^3 NIfTI upload (.nii.gz and .nii, int16);
   - one client alone for --single-s seconds, clicking again as soon as it has its answer (the service's own
     latency); then N client processes for --duration seconds, each with its own volume and click sequence
     (some undos), every click answered with its mask (``?mask=packed``), a pause of --think-ms (0.5-1.5x)
     before each click, as a user looks at the result: latency percentiles, errors; then --saturation-s
     seconds without pauses (each client clicks again as soon as it has its answer), where the one GPU queue
     sets the latency;
   - every client's first --check-actions actions replayed alone, one client at a time, on fresh sessions: any
     mask that differs is counted (a session that received another's mask would differ);
   - server RSS and GPU memory over --cycles session create/delete cycles;
   - malformed requests (truncated NIfTI, NaN volume, click outside, unknown session, oversized upload, bad JSON,
     not a volume) must get 4xx with a message, and the server must serve a click afterwards.
Ends with the targets of the service (p50/p99 click round trip, upload, set_volume, click, memory growth, 4xx)
marked met or missed. On a machine without CUDA it runs the same steps on the CPU (for a smoke test, with a
tiny artifact: --artifact DIR --duration 5 --cycles 20).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
TARGETS = {  # name -> (limit, unit); met when the measured value is at most the limit
    "click round trip p50 (HTTP, mask returned)": (5.0, "ms"),
    "click round trip p99 (HTTP, mask returned)": (15.0, "ms"),
    "load errors": (0, ""),
    "masks differing from the same clicks alone": (0, ""),
    "session from a 256^3 .nii.gz upload, p50": (150.0, "ms"),
    "SegmentSession.set_volume 160^3, p50": (3.0, "ms"),
    "SegmentSession.click to a device mask, p50": (1.2, "ms"),
    "server RSS growth over the cycles": (32.0, "MiB"),
    "GPU memory growth over the cycles": (32.0, "MiB"),
    "malformed requests not answered 4xx": (0, ""),
}


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    a = np.asarray(values) * 1e3
    return {"n": len(values), "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max()), "mean_ms": float(a.mean())}  # fmt: skip


# --------------------------------------------------------------------------------------------- the artifact


def ensure_artifact(args: argparse.Namespace, report: dict[str, Any]) -> Path:
    if args.artifact:
        return Path(args.artifact)
    target = args.work / "fastsam3d-sparse-hybrid"
    if (target / "manifest.json").exists():
        report["export"] = {"reused": str(target)}
        return target
    args.work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "export_engine", "--model", "fastsam3d", "--precision", "hybrid", "--attention",
           "sparse", "--random-weights", "--backend", "onnx", "--out", str(target), "--force"]  # fmt: skip
    start = time.perf_counter()
    with open(args.work / "export-fastsam3d-sparse-hybrid.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    report["export"] = {"seconds": round(time.perf_counter() - start, 1), "command": " ".join(cmd)}
    return target


# --------------------------------------------------------------------------------------------- direct API


def direct_section(artifact: Path, reps: int) -> list[dict[str, Any]]:
    """The public API against device-resident peers (same process, same runners)."""
    import torch

    from export_engine.calibration.synthetic import structured_volume
    from export_engine.families.fastsam3d.preprocess import check_preprocessed, preprocess_tensor, preprocess_volume
    from export_engine.families.fastsam3d.segment import SegmentSession
    from export_engine.runners.host_copy import to_device
    from export_engine.runtime.session import load

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    loaded = load(artifact, cuda_graph=True)
    session = SegmentSession(loaded)
    volume = structured_volume(160, seed=1)

    def timed(fn: Any, n: int, warm: int = 5) -> dict[str, float]:
        for _ in range(warm):
            fn()
        sync()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return percentiles(times)

    rows = []
    how = "device runners (ORT CUDA / engines)" if session.on_device else "CPU runners"
    rows.append({"case": "SegmentSession.set_volume 160^3, p50", "what": f"public API, {how}",
                 **timed(lambda: session.set_volume(volume), reps)})  # fmt: skip
    prepared = preprocess_volume(volume, session.size)
    if session.on_device:
        image = torch.from_numpy(prepared.image).cuda()
        rows.append({"case": "encoder alone, device-resident input", "what": "peer of set_volume",
                     **timed(lambda: session.encoder.run({"image": image}, copy=False), reps)})  # fmt: skip
        # where set_volume's time goes beyond the encoder: the copy up, and the pre-processing on the device
        host_volume = torch.from_numpy(volume)
        rows.append({"case": "  part: the 160^3 volume copied to the device", "what": f"{volume.dtype}, staged",
                     **timed(lambda: to_device(host_volume, "cuda"), reps)})  # fmt: skip
        rows.append({"case": "  the same copy, plain (tensor.to from pageable memory)", "what": "before the staging",
                     **timed(lambda: host_volume.to("cuda"), reps)})  # fmt: skip
        on_device = host_volume.to("cuda")

        def prepare() -> None:
            check_preprocessed(preprocess_tensor(on_device, session.size))

        rows.append({"case": "  part: crop + z-normalise on the device", "what": "preprocess_tensor + its check",
                     **timed(prepare, reps)})  # fmt: skip
    rows.append({"case": "numpy pre-processing + encoder (host arrays)", "what": "the path set_volume replaced",
                 **timed(lambda: session.encoder({"image": preprocess_volume(volume, session.size).image}),
                         max(5, reps // 4))})  # fmt: skip
    session.set_volume(volume)
    points = [(80, 80, 80), (70, 90, 85), (90, 75, 70)]
    counter = iter(range(10**9))

    def click() -> Any:
        return session.click(points[next(counter) % 3], positive=True)

    rows.append({"case": "SegmentSession.click to a device mask, p50", "what": f"public API, {how}",
                 **timed(click, reps * 3)})  # fmt: skip
    rows.append({"case": "SegmentSession.click + compact mask on the host", "what": "packed crop bits + count",
                 **timed(lambda: click().fetch(), reps * 3)})  # fmt: skip
    if session.on_device:
        feed = {"image_embedding": session.embedding,
                "point_coords": torch.tensor([[[64.0, 64.0, 64.0]]], device="cuda"),
                "point_labels": torch.ones((1, 1), dtype=torch.int64, device="cuda"),
                "mask_input": torch.zeros((1, 1, *(session.mask_size,) * 3), device="cuda"),
                "has_mask_input": torch.ones((1,), device="cuda")}  # fmt: skip
        rows.append({"case": "prompt decoder alone, device-resident inputs", "what": "peer of click",
                     **timed(lambda: session.decoder.run(feed, copy=False), reps * 3)})  # fmt: skip
    window = session.window
    assert window is not None
    host_feed = {"image_embedding": session.embedding.cpu().numpy(), "point_coords": np.full((1, 1, 3), 64, np.float32),
                 "point_labels": np.ones((1, 1), np.int64),
                 "mask_input": np.zeros((1, 1, *(session.mask_size,) * 3), np.float32),
                 "has_mask_input": np.ones((1,), np.float32)}  # fmt: skip

    def host_click() -> None:
        out = session.decoder(host_feed)
        window.paste_back(out["masks_upscaled"][0, 0] > 0, fill=False)

    rows.append({"case": "decoder on host arrays + numpy paste-back", "what": "the path click replaced",
                 **timed(host_click, reps)})  # fmt: skip
    return rows  # the session and its runners go with this frame


# --------------------------------------------------------------------------------------------- the server


class Server:
    def __init__(self, artifact: Path, out: Path, max_upload_mb: float, extra: list[str] | None = None) -> None:
        from export_engine.serve.server import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(out / "server.log", "w")
        cmd = [sys.executable, "-m", "export_engine", "serve", str(artifact), "--port", str(self.port),
               "--max-upload-mb", str(max_upload_mb), "--max-sessions", "4096", "--quiet", *(extra or [])]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 300) -> None:
        from export_engine.serve.client import ServeClient

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); see server.log")
            try:
                ServeClient(self.url, timeout=2).health()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start in time; see server.log")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            line = next(x for x in f if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    def gpu_mib(self) -> float | None:
        """This process's GPU memory (nvidia-smi), else the device's used memory; None without a GPU."""
        if shutil.which("nvidia-smi"):
            query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
            out = subprocess.run(query, capture_output=True, text=True).stdout
            for line in out.splitlines():
                pid, _, used = line.partition(",")
                if pid.strip() == str(self.proc.pid):
                    return float(used)
        try:
            import torch

            if torch.cuda.is_available():
                free, total = torch.cuda.mem_get_info()
                return (total - free) / 2**20
        except ImportError:
            pass
        return None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def npy_bytes(volume: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, volume)
    return buffer.getvalue()


def upload_section(url: str, size: int, reps: int) -> list[dict[str, Any]]:
    import nibabel as nib

    from export_engine.calibration.synthetic import structured_volume
    from export_engine.serve.client import ServeClient

    volume = (structured_volume(size, seed=3) * 4).astype(np.int16)
    raw = nib.Nifti1Image(volume, np.diag([0.8, 0.8, 1.0, 1.0])).to_bytes()
    rows = []
    with ServeClient(url) as client:
        for name, body in (("ct.nii.gz", gzip.compress(raw, compresslevel=6)), ("ct.nii", raw)):
            times = []
            for i in range(reps + 2):
                start = time.perf_counter()
                sid = client.create_session(body, name)["id"]
                if i >= 2:  # the first two warm the encoder's shapes
                    times.append(time.perf_counter() - start)
                client.delete(sid)
            label = f"session from a {size}^3 {name[2:]} upload, p50"
            rows.append({"case": label, "what": f"int16, {len(body) / 2**20:.1f} MiB body", **percentiles(times)})
    return rows


def client_actions(seed: int, size: int, crop: int) -> Any:
    """An endless click sequence inside the centred crop; every 10th action is an undo."""
    rng = np.random.default_rng(seed)
    lo = max(0, (size - crop) // 2) + 4
    hi = min(size, lo + crop - 8)
    n = 0
    while True:
        n += 1
        if n % 10 == 0:
            yield ("undo",)
        else:
            point = tuple(int(v) for v in rng.integers(lo, hi, 3))
            yield ("click", point, bool(rng.random() < 0.75))


def run_actions(client: Any, sid: str, actions: Any, count: int | None, deadline: float | None,
                think_s: float = 0.0, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Apply actions until ``count`` are done or the deadline passes; record latency and each mask's hash.
    ``think_s``: a pause before each action, uniform in [0.5, 1.5] x think_s (a user looking at the result)."""
    latencies, hashes, errors = [], [], []
    done = 0
    pauses = np.random.default_rng(seed + 7919)
    for action in actions:
        if (count is not None and done >= count) or (deadline is not None and time.monotonic() > deadline):
            break
        if think_s:
            time.sleep(think_s * pauses.uniform(0.5, 1.5))
        start = time.perf_counter()
        try:
            if action[0] == "undo":
                info = client.undo(sid)
                digest = f"undo:{info['clicks']}:{info['voxels']}"
            else:
                info, packed = client.click_mask(sid, action[1], action[2])
                digest = hashlib.sha1(packed.bits + str(packed.start).encode()).hexdigest()
                latencies.append(time.perf_counter() - start)
        except Exception as err:  # counted and reported: the bench goes on
            errors.append(f"{action}: {type(err).__name__}: {err}"[:300])
            digest = "error"
        hashes.append(digest)
        done += 1
    return {"latencies": latencies, "hashes": hashes, "errors": errors}


def load_worker(job: tuple[str, int, int, int, float, int, float]) -> dict[str, Any]:
    """One client process: its own volume and click sequence until the deadline (wall-clock, time.time)."""
    from export_engine.calibration.synthetic import structured_volume
    from export_engine.serve.client import ServeClient

    url, seed, size, crop, end_time, keep, think_s = job
    with ServeClient(url) as client:
        sid = client.create_session(npy_bytes(structured_volume(size, seed=seed)), "v.npy")["id"]
        deadline = time.monotonic() + (end_time - time.time())
        result = run_actions(client, sid, client_actions(seed, size, crop), None, deadline, think_s, seed)
        client.delete(sid)
    result["hashes"] = result["hashes"][:keep]
    result["seed"] = seed
    return result


def run_clients(url: str, args: argparse.Namespace, crop: int, seconds: float, think_s: float,
                seed0: int) -> list[dict[str, Any]]:  # fmt: skip
    end_time = time.time() + seconds + 3  # + the clients' start (spawn, volume, session)
    jobs = [(url, seed0 + i, args.volume, crop, end_time, args.check_actions, think_s) for i in range(args.clients)]
    with mp.get_context("spawn").Pool(args.clients) as pool:
        return pool.map(load_worker, jobs)


def single_client_section(url: str, args: argparse.Namespace, crop: int) -> list[dict[str, Any]]:
    """One client alone, no pauses: the service's own latency, without queueing behind other clients."""
    from export_engine.calibration.synthetic import structured_volume
    from export_engine.serve.client import ServeClient

    with ServeClient(url) as client:
        sid = client.create_session(npy_bytes(structured_volume(args.volume, seed=900)), "v.npy")["id"]
        result = run_actions(client, sid, client_actions(900, args.volume, crop), None,
                             time.monotonic() + args.single_s)  # fmt: skip
        client.delete(sid)
    stats = percentiles(result["latencies"])
    what = f"1 client, no pauses, {stats['n'] / args.single_s:.0f} clicks/s, {len(result['errors'])} errors"
    return [{"case": "click round trip, one client alone", "what": what, **stats}]


def saturation_section(url: str, args: argparse.Namespace, crop: int) -> list[dict[str, Any]]:
    """Closed loop without pauses: every client sends its next click as soon as the last one is answered."""
    results = run_clients(url, args, crop, args.saturation_s, 0.0, 500)
    stats = percentiles([t for r in results for t in r["latencies"]])
    errors = sum(len(r["errors"]) for r in results)
    what = (f"{args.clients} clients, no pauses, {stats['n'] / args.saturation_s:.0f} clicks/s, {errors} errors: the "
            "GPU's queue (one prompt decoder run at a time) sets it")  # fmt: skip
    return [{"case": "click round trip, closed loop without pauses", "what": what, **stats}]


def load_section(url: str, args: argparse.Namespace, crop: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from export_engine.calibration.synthetic import structured_volume
    from export_engine.serve.client import ServeClient

    results = run_clients(url, args, crop, args.duration, args.think_ms / 1e3, 100)
    latencies = [t for r in results for t in r["latencies"]]
    errors = [e for r in results for e in r["errors"]]
    differing = 0
    checked = 0
    with ServeClient(url) as client:  # the same actions alone, one client at a time
        for r in results:
            sid = client.create_session(npy_bytes(structured_volume(args.volume, seed=r["seed"])), "v.npy")["id"]
            alone = run_actions(client, sid, client_actions(r["seed"], args.volume, crop), len(r["hashes"]), None)
            client.delete(sid)
            checked += len(r["hashes"])
            differing += sum(a != b for a, b in zip(alone["hashes"], r["hashes"], strict=True))
    stats = percentiles(latencies)
    rate = stats["n"] / args.duration
    rows: list[dict[str, Any]] = [
        {"case": "click round trip p50 (HTTP, mask returned)",
         "what": f"{args.clients} clients, {rate:.0f} clicks/s, {args.think_ms:g} ms (0.5-1.5x) between clicks",
         **stats},
        {"case": "click round trip p99 (HTTP, mask returned)", "what": "", "value": stats.get("p99_ms")},
        {"case": "load errors", "what": "; ".join(errors[:3]), "value": len(errors)},
        {"case": "masks differing from the same clicks alone", "what": f"{checked} actions replayed",
         "value": differing},
    ]  # fmt: skip
    return rows, {"errors": errors[:50], "clicks": stats["n"], "checked_actions": checked}


def cycles_section(server: Server, cycles: int, size: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from export_engine.calibration.synthetic import structured_volume
    from export_engine.serve.client import ServeClient

    body = npy_bytes((structured_volume(size, seed=7) * 4).astype(np.int16))
    samples: list[dict[str, Any]] = []
    warm = max(10, cycles // 50)
    with ServeClient(server.url) as client:
        for i in range(warm + cycles):
            sid = client.create_session(body, "v.npy")["id"]
            client.click(sid, (size // 2,) * 3)
            client.delete(sid)
            if (i >= warm and (i - warm) % max(1, cycles // 10) == 0) or i == warm + cycles - 1:
                samples.append({"cycle": i - warm, "rss_mib": server.rss_mib(), "gpu_mib": server.gpu_mib()})
    rss = samples[-1]["rss_mib"] - samples[0]["rss_mib"]
    gpu = None if samples[0]["gpu_mib"] is None else samples[-1]["gpu_mib"] - samples[0]["gpu_mib"]
    what = f"{cycles} create/click/delete, {size}^3"
    rows: list[dict[str, Any]] = [
        {"case": "server RSS growth over the cycles", "what": what, "value": rss},
        {"case": "GPU memory growth over the cycles", "what": "nvidia-smi: the server process", "value": gpu},
    ]
    return rows, {"samples": samples}


def malformed_section(url: str, max_upload_mb: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import nibabel as nib

    from export_engine.calibration.synthetic import structured_volume
    from export_engine.serve.client import ServeClient, ServeError

    client = ServeClient(url)
    volume = structured_volume(64, seed=2)
    good = gzip.compress(nib.Nifti1Image(volume, np.eye(4)).to_bytes())
    nan = volume.copy()
    nan[1, 2, 3] = np.nan
    sid = client.create_session(volume)["id"]
    oversized = b"\0" * int((max_upload_mb + 1) * 2**20)
    json_headers = {"Content-Type": "application/json"}
    cases = {
        "truncated NIfTI": lambda: client.create_session(good[: len(good) // 2], "ct.nii.gz"),
        "NaN volume": lambda: client.create_session(nan),
        "click outside": lambda: client.click(sid, (64, 0, 0)),
        "unknown session": lambda: client.click("no-such-session", (1, 1, 1)),
        "oversized upload": lambda: client.create_session(oversized, "big.npy"),
        "not a volume": lambda: client.create_session(b"hello", "notes.txt"),
        "broken JSON": lambda: client.request("POST", f"/sessions/{sid}/clicks", b'{"point": [1,', json_headers),
    }
    answers: dict[str, dict[str, Any]] = {}
    for name, call in cases.items():
        try:
            call()
            answers[name] = {"status": 200, "detail": "accepted"}
        except ServeError as err:
            answers[name] = {"status": err.status, "detail": err.detail[:200]}
        except OSError as err:
            answers[name] = {"status": None, "detail": f"{type(err).__name__}: {err}"}
    alive = client.health()["status"] == "ok" and client.click(sid, (32, 32, 32))["clicks"] == 1
    client.delete(sid)
    bad = [n for n, a in answers.items() if not (isinstance(a["status"], int) and 400 <= a["status"] < 500)]
    served_on = "served on" if alive else "DID NOT serve on"
    row = {"case": "malformed requests not answered 4xx", "value": len(bad) + (0 if alive else 1),
           "what": f"{len(cases)} kinds; the server {served_on}; not 4xx: {', '.join(bad) or 'none'}"}  # fmt: skip
    return [row], {"answers": answers, "alive": alive}


# --------------------------------------------------------------------------------------------- report


def value_of(row: dict[str, Any]) -> float | None:
    value = row.get("value", row.get("p50_ms"))
    return None if value is None else float(value)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'case':<52} {'p50 ms':>9} {'p99 ms':>9} {'value':>9} {'target':>12}  note", "-" * 120]
    for row in rows:
        target = TARGETS.get(row["case"])
        value = value_of(row)
        mark = ""
        if target is not None:
            verdict = "n/a" if value is None else "met" if value <= target[0] else "MISSED"
            mark = f"<= {target[0]:g} {target[1]} {verdict}"
        p50 = f"{row['p50_ms']:.3f}" if "p50_ms" in row else ""
        p99 = f"{row['p99_ms']:.3f}" if "p99_ms" in row else ""
        shown = "" if "p50_ms" in row else ("n/a" if value is None else f"{value:.1f}")
        lines.append(f"{row['case']:<52} {p50:>9} {p99:>9} {shown:>9} {mark:>12}  {row.get('what', '')}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=HERE / "out" / "serve-work", help="artifacts are exported here")
    parser.add_argument("--artifact", type=Path, help="a FastSAM3D artifact to serve instead of exporting one")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "serve")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument(
        "--think-ms",
        type=float,
        default=100.0,
        help="a client's pause before each click (uniform 0.5-1.5x): a user looking at the mask",
    )
    parser.add_argument("--saturation-s", type=float, default=15.0, help="seconds of load without pauses (0: none)")
    parser.add_argument("--single-s", type=float, default=8.0, help="seconds of one client alone (0: none)")
    parser.add_argument("--volume", type=int, default=160, help="the load clients' volume size (cube)")
    parser.add_argument("--upload", type=int, default=256, help="the upload test's volume size (cube)")
    parser.add_argument("--cycles", type=int, default=1000, help="session create/delete cycles")
    parser.add_argument("--check-actions", type=int, default=150, help="actions per client replayed alone")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--ray", action="store_true",
                        help="serve --ray: a local Ray, one replica per GPU (give --clients 8 per GPU); the RSS row "
                             "is then the Ray driver's, the GPU memory row the whole device's")  # fmt: skip
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    artifact = ensure_artifact(args, report)
    manifest = json.loads((artifact / "manifest.json").read_text())
    encoder = next(g for g in manifest["graphs"] if g["name"] == "encoder")
    crop = int(encoder["inputs"][0]["shape"][-1])
    report["artifact"] = str(artifact)
    rows = direct_section(artifact, args.repeats)
    report["device"] = device_name()
    max_upload_mb = 256.0
    server = Server(artifact, args.out, max_upload_mb, ["--ray"] if args.ray else None)
    try:
        server.wait()
        rows += upload_section(server.url, args.upload, 5)
        if args.single_s > 0:
            rows += single_client_section(server.url, args, crop)
        load_rows, report["load"] = load_section(server.url, args, crop)
        rows += load_rows
        if args.saturation_s > 0:
            rows += saturation_section(server.url, args, crop)
        cycle_rows, report["cycles"] = cycles_section(server, args.cycles, args.volume)
        rows += cycle_rows
        bad_rows, report["malformed"] = malformed_section(server.url, max_upload_mb)
        rows += bad_rows
        from export_engine.serve.client import ServeClient

        (args.out / "metrics.txt").write_text(ServeClient(server.url).metrics())
    finally:
        server.stop()
    report["rows"] = rows
    report["targets"] = {name: {"limit": lim, "unit": unit, "value": next((value_of(r) for r in rows
                                                                           if r["case"] == name), None)}
                         for name, (lim, unit) in TARGETS.items()}  # fmt: skip
    (args.out / "serve_bench.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nexport-engine serve bench on {report['device']} ({artifact.name})")
    print(table(rows))
    print(f"\nJSON: {args.out / 'serve_bench.json'}")
    return 0


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name())
    except ImportError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
