#!/usr/bin/env python3
"""match-many on a folder of JPEGs, and the peer pipelines, in one run: a table printed last, JSON written.

    python3 bench/match_many_bench.py --work DIR --out DIR [--images 200] [--pairs swin:10] [--gpu-memory 12]

1. The artifact: ``--work/mast3r-hybrid`` (as bench/gpu_bench.py leaves it) is reused; otherwise it is exported
   in the background (full-size MASt3R, random weights seed 0, hybrid, ONNX only, 512x384) on all cores but two,
   ``--plans DIR`` reusing ``mast3r-hybrid.json`` as gpu_bench does.
2. ``--images`` JPEGs, 800x600, cut from one large synthetic texture along a path (a camera panning over a
   wall: neighbours in name order overlap), written to ``--work/jpegs-N`` once.
3. Meanwhile on the GPU, the peers, on batches of ``--batch`` pairs of the same pair list, files to database
   (images decoded by the same worker pool, matches into the same COLMAP writer): our PyTorch MASt3R in FP16
   under torch.compile reduce-overhead, both images of every pair through the encoder (as upstream runs it),
   then (a) the upstream matching algorithm (``matching_reference``, on the GPU) and (b) FastNN-Lite recorded as
   CUDA graphs. Both on the first ``--peer-pairs`` pairs (the upstream algorithm takes ~40 ms a pair), after
   one warm-up batch; pairs/s are over those pairs.
4. ``export-engine match-many`` itself (the API it calls), all pairs, files to database: pairs/s, seconds per
   stage, GPU busy share (NVML utilisation sampled every 50 ms; nvidia-smi if pynvml is missing), peak device
   memory above the start against ``--gpu-memory``, peak host memory, with its default matcher threads (3 on a
   GPU); again with ``--matchers`` matcher threads (default 1; its database must equal the default run's);
   again with a token pool of ``--small-pool`` images (evictions and re-encodes). Then ``Matcher.match`` on two
   preloaded images with cached tokens and on two files (tokens cached), median ms per pair.
5. ``--variants``: more runs of the default row with settings changed, e.g. ``matchers=3+priority=-1,batch=24``
   (comma-separated runs; ``matchers``, ``batch`` (the decoder's and the encoder's batch) and ``priority``, the
   matcher streams' CUDA priority).

``--tiny`` runs every part on the CPU with the tiny model (no torch.compile, a few images): a smoke test of
this script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from export_engine.families.mast3r.match import MatchConfig  # noqa: E402
from export_engine.sfm.run import MatchManyConfig, match_many  # noqa: E402

GiB = 2**30
WARM_UP_BATCHES = 3  # peers: untimed batches first (torch.compile, then its CUDA graphs are recorded)


# --- inputs ----------------------------------------------------------------------------------------------------


def make_jpegs(folder: Path, count: int, size: tuple[int, int] = (800, 600)) -> Path:
    """``count`` crops of one texture along a panning path, ``img0000.jpg`` ... (kept between runs)."""
    from PIL import Image

    from export_engine.calibration.synthetic import structured_image

    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == count:
        return folder
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".jpegs-"))
    step = 12
    wall_w, wall_h = size[0] + step * count, size[1] + 80
    wall = ((structured_image(wall_h, wall_w, 7).transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)
    for k in range(count):
        x, y = step * k, int(40 + 30 * np.sin(k / 9.0))
        Image.fromarray(wall[y : y + size[1], x : x + size[0]]).save(staging / f"img{k:04d}.jpg", quality=90)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def ensure_artifact(work: Path, plans: Path | None, tiny: bool) -> tuple[Path, subprocess.Popen | None]:
    """The artifact folder and, when it is being exported, the export process (pinned to all cores but two)."""
    name = "mast3r-tiny" if tiny else "mast3r-hybrid"
    artifact = work / name
    if (artifact / "manifest.json").exists():
        return artifact, None
    cmd = [sys.executable, "-m", "export_engine", "--model", "mast3r", "--random-weights", "--backend", "onnx",
           "--out", str(artifact), "--force"]  # fmt: skip
    if tiny:
        from export_engine.exporters.mast3r import TINY_CONFIG

        (work / "tiny.json").write_text(json.dumps(TINY_CONFIG))
        cmd += ["--precision", "fp32", "--config", str(work / "tiny.json"), "--resolution", "96x64"]
    else:
        cmd += ["--precision", "hybrid"]
        plan = plans / "mast3r-hybrid.json" if plans else None
        cmd += ["--precision-plan", str(plan)] if plan and plan.exists() else []
    cores = sorted(os.sched_getaffinity(0))
    export_cores = set(cores[2:]) if len(cores) > 4 else set(cores)
    log = open(work / f"export-{name}.log", "w")  # the child keeps the descriptor
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: os.sched_setaffinity(0, export_cores))  # fmt: skip
    if len(cores) > 4:
        os.sched_setaffinity(0, set(cores[:2]))  # this process (the GPU work) on the other two
    return artifact, proc


# --- GPU busy share ----------------------------------------------------------------------------------------------


class BusySampler:
    """GPU utilisation (% of time a kernel ran) sampled every 50 ms while the block runs."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.samples, self.source = enabled, [], "none"
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> BusySampler:
        if not self.enabled:
            return self
        import torch

        try:
            torch.cuda.utilization()
            self.source = "nvml"
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        except Exception:  # pynvml missing: nvidia-smi's own 50 ms loop
            try:
                self._proc = subprocess.Popen(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "50"],
                    stdout=subprocess.PIPE, text=True)  # fmt: skip
            except OSError:
                return self  # neither: no busy share (the stage seconds remain)
            self.source = "nvidia-smi"
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        import torch

        while not self._stop.wait(0.05):
            self.samples.append(float(torch.cuda.utilization()))

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if self._stop.is_set():
                break
            if line.strip().split(",")[0].strip().isdigit():
                self.samples.append(float(line.split(",")[0]))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()

    @property
    def share(self) -> float | None:
        return round(float(np.mean(self.samples)) / 100.0, 3) if self.samples else None


class MemorySampler:
    """Device memory in use above the level at entry, at its highest (sampled every 20 ms: torch's allocations,
    ONNX Runtime's, the CUDA graphs'; the CUDA context, created before, is not counted)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.peak = enabled, 0
        self._stop = threading.Event()

    def __enter__(self) -> MemorySampler:
        if self.enabled:
            import torch

            self._base = int(torch.cuda.mem_get_info()[0])
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        import torch

        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._base - int(torch.cuda.mem_get_info()[0]))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()

    @property
    def peak_gib(self) -> float | None:
        return round(self.peak / GiB, 3) if self.enabled else None


# --- peers ---------------------------------------------------------------------------------------------------------


def peer_pipelines(folder: Path, out: Path, pairs: list[tuple[int, int]], total_pairs: int, batch: int, tiny: bool,
                   compile_mode: str | None) -> list[dict[str, Any]]:  # fmt: skip
    """Our PyTorch model (FP16 under torch.compile on CUDA) on batches of pairs, both images encoded per pair,
    with the upstream matching algorithm and with FastNN-Lite; files to database (see the module docstring).
    The up-front decoding of every image counts for its share: the pairs timed over all pairs of the run."""
    import torch

    from export_engine.exporters.registry import get_family
    from export_engine.families.mast3r.fastnn import CapturedMatcher
    from export_engine.families.mast3r.fastnn import MatchConfig as NNConfig
    from export_engine.families.mast3r.images import fit, normalized, read_rgb
    from export_engine.families.mast3r.match import filtered_matches
    from export_engine.families.mast3r.matching_reference import reciprocal_nn_reference
    from export_engine.sfm.collection import list_images
    from export_engine.sfm.database import ColmapDatabase, ImageEntry

    cuda = torch.cuda.is_available() and not tiny
    device = torch.device("cuda" if cuda else "cpu")
    family = get_family("mast3r")
    loaded = family.load(family.tiny_config() if tiny else None, None, 0)
    width, height = (96, 64) if tiny else (512, 384)  # the artifact's resolution (it may still be exporting)
    model = loaded.module.to(device).eval()
    if cuda:
        from export_engine.models.mast3r.model import MASt3R

        with torch.device("meta"):
            half = MASt3R(loaded.config, attn_impl="sdpa")
        half.load_state_dict(model.state_dict(), assign=True)
        model = half.half().eval()
    dtype = torch.float16 if cuda else torch.float32
    forward = torch.compile(model, mode=compile_mode) if compile_mode and cuda else model
    images = list_images([folder])
    config = MatchConfig()
    rows = []
    for label in ("upstream matching algorithm", "FastNN-Lite, recorded"):
        start_all = time.perf_counter()
        read_start = time.perf_counter()
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:  # as match-many: all images decoded by a worker pool, up front
            rgbs = list(pool.map(lambda im: read_rgb(im.path, width, height)[0], images))
        read_s = time.perf_counter() - read_start
        entries = []
        for im in images:
            placed = fit(im.size, width, height)
            entries.append(ImageEntry(im.name, im.size, im.focal_px, (width, height), placed.scale, placed.offset))
        target = out / ("peer-upstream" if label.startswith("upstream") else "peer-fastnn")
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        database = ColmapDatabase.create(target / "database.db", entries, "per-image", {"peer": label})
        nearest = None
        if label.startswith("FastNN") and cuda:
            nearest = CapturedMatcher((height, width, 24), (height, width, 24), config.subsample,
                                      NNConfig(kernel="fused"), device)  # fmt: skip
        elif label.startswith("FastNN"):
            from export_engine.families.mast3r.fastnn import fast_reciprocal_nn

            nearest = lambda d1, d2: fast_reciprocal_nn(d1, d2, subsample=config.subsample)  # noqa: E731

        def upstream(d1: Any, d2: Any) -> tuple[Any, Any]:
            xy1, xy2 = reciprocal_nn_reference(d1, d2, config.subsample, device=device)
            return torch.from_numpy(xy1).to(device), torch.from_numpy(xy2).to(device)

        match = nearest or upstream
        compile_s, timed, matches, network_s, match_s = 0.0, 0, 0, 0.0, 0.0
        batches = [pairs[k : k + batch] for k in range(0, len(pairs), batch)]
        timed_start = time.perf_counter()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        warm = [batches[0]] * WARM_UP_BATCHES  # compile, then CUDA-graph recording (reduce-overhead)
        for number, chunk in enumerate([*warm, *batches]):
            began = time.perf_counter()
            padded = chunk + [chunk[-1]] * (batch - len(chunk))
            img1 = torch.from_numpy(np.concatenate([normalized(rgbs[i]) for i, _ in padded])).to(device, dtype)
            img2 = torch.from_numpy(np.concatenate([normalized(rgbs[j]) for _, j in padded])).to(device, dtype)
            with torch.inference_mode():
                if cuda:
                    torch.compiler.cudagraph_mark_step_begin()  # the previous batch's outputs are done with
                out_pair = forward(img1, img2)
                desc1, desc2 = out_pair["view1_desc"].float(), out_pair["view2_desc"].float()
                conf1, conf2 = out_pair["view1_desc_conf"].float(), out_pair["view2_desc_conf"].float()
                if cuda:
                    torch.cuda.synchronize()
                network_done = time.perf_counter()
                for b, (i, j) in enumerate(chunk):
                    found = filtered_matches(desc1[b].contiguous(), desc2[b].contiguous(), conf1[b], conf2[b],
                                             config, match)  # fmt: skip
                    xy1, xy2 = found["xy1"].cpu().numpy(), found["xy2"].cpu().numpy()
                    database.add_pair(i, j, xy1[:, 1] * width + xy1[:, 0], xy2[:, 1] * width + xy2[:, 0],
                                      found["conf"].float().cpu().numpy())  # fmt: skip
                    if number >= WARM_UP_BATCHES:
                        matches += len(xy1)
            del out_pair, desc1, desc2, conf1, conf2
            database.commit()
            if number < WARM_UP_BATCHES:
                compile_s += time.perf_counter() - began
                timed_start = time.perf_counter()
                continue
            network_s += network_done - began
            match_s += time.perf_counter() - network_done
            timed += len(chunk)
        seconds = time.perf_counter() - timed_start + read_s * timed / total_pairs
        database.close()
        rows.append({
            "case": f"peer: PyTorch FP16 torch.compile {compile_mode} on batches of {batch} pairs + {label}"
                    if cuda and compile_mode else f"peer: PyTorch eager on batches of {batch} pairs + {label}",
            "pairs": timed, "seconds": round(seconds, 3), "pairs_per_s": round(timed / seconds, 2),
            "stages_s": {"read (share)": round(read_s * timed / total_pairs, 3), "network": round(network_s, 3),
                         "match + write": round(match_s, 3)},
            "warm_up_s": round(compile_s, 1), "matches_per_pair": round(matches / max(timed, 1), 1),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / GiB, 3) if cuda else None,
            "total_s": round(time.perf_counter() - start_all, 1),
        })  # fmt: skip
    del forward, model
    if cuda:
        import gc

        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
    return rows


# --- ours --------------------------------------------------------------------------------------------------------


def ours(artifact: Path, folder: Path, out: Path, args: argparse.Namespace, slots: int | None,
         ray: bool = False, matchers: int | None = None, variant: str = "") -> dict[str, Any]:  # fmt: skip
    import torch

    cuda = torch.cuda.is_available() and not args.tiny
    target = out / ("ours" if slots is None else f"ours-{slots}-slots")
    if ray:
        target = out / "ours-ray"
    if matchers is not None:
        target = out / f"ours-{matchers}-matchers"
    if variant:
        target = out / f"ours-{variant.replace('=', '-').replace('+', '_')}"
    shutil.rmtree(target, ignore_errors=True)
    # the database either way; hloc's files too where h5py is installed
    config = MatchManyConfig(pairs=args.pairs, batch=args.batch, encode_batch=args.batch, workers=args.workers,
                             gpu_memory=None if args.tiny else args.gpu_memory, token_slots=slots,
                             hloc=_has("h5py"), ray=args.ray if ray else None,
                             ray_workers=args.ray_workers, matchers=matchers)  # fmt: skip
    with BusySampler(cuda) as busy, MemorySampler(cuda) as memory:
        report = match_many(artifact, [folder], target, config)
    row = report.to_dict()
    gpu_stages = sum(report.stages[k] for k in ("encode", "decode"))
    if ray or matchers is not None or variant:  # the same pairs on Ray workers or other threads: the same database
        row.update(same_database_as_ours=_tables(target) == _tables(out / "ours"))
    case = "ours: export-engine match-many" + (f", token pool of {slots} images" if slots else "")
    case += f", {matchers} matcher thread{'s' * (matchers != 1)}" if matchers is not None else ""
    case += f", --ray ({len(report.workers or {})} workers)" if ray else ""
    case += f", variant {variant}" if variant else ""
    row.update(case=case,
               pairs_per_s=round(report.pairs_per_second, 2), gpu_busy_share=busy.share, busy_source=busy.source,
               network_share_of_wall=round(gpu_stages / report.seconds, 3) if report.seconds else None,
               gpu_memory_budget_gib=args.gpu_memory, peak_gpu_sampled_gib=memory.peak_gib,
               within_budget=max(report.peak_gpu_gib or 0, memory.peak_gib or 0) <= args.gpu_memory)  # fmt: skip
    return row


def _tables(out: Path) -> dict[str, list[Any]]:
    import sqlite3

    with sqlite3.connect(out / "database.db") as db:
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall())
                for t in ("images", "keypoints", "matches", "export_engine_pairs")}  # fmt: skip


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def matcher_rows(artifact: Path, folder: Path, repeats: int) -> list[dict[str, Any]]:
    """Matcher.match: two preloaded images with cached tokens, and two files (tokens cached), median ms."""
    import torch

    from export_engine.families.mast3r.match import Matcher
    from export_engine.runtime.session import load

    files = sorted(folder.glob("*.jpg"))[:2]
    matcher = Matcher(
        load(artifact, cuda_graph=True), MatchConfig(device="cuda" if torch.cuda.is_available() else "cpu")
    )
    a, b = matcher.load(files[0]), matcher.load(files[1])
    rows = []
    for label, call in (("preloaded images, tokens cached", lambda: matcher.match(a, b)),
                        ("two files, tokens cached", lambda: matcher.match(files[0], files[1]))):  # fmt: skip
        for _ in range(5):
            call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        rows.append({"case": f"Matcher.match, {label}", "median_ms": round(times[len(times) // 2], 3),
                     "min_ms": round(times[0], 3), "p90_ms": round(times[(9 * len(times)) // 10], 3)})  # fmt: skip
    matcher.close()
    return rows


def variant_row(artifact: Path, folder: Path, out: Path, args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """The default row again with ``variant``'s settings (``matchers=N+batch=N+priority=N``)."""
    from export_engine.sfm import executor

    parts = variant.split("+")
    if not all("=" in part for part in parts):
        raise ValueError(f"variant {variant!r}: write settings as NAME=VALUE joined by '+' (matchers, batch, priority)")
    settings = dict(part.split("=", 1) for part in parts)
    unknown = set(settings) - {"matchers", "batch", "priority"}
    if unknown:
        raise ValueError(f"variant {variant!r}: unknown settings {sorted(unknown)} (matchers, batch, priority)")
    changed = argparse.Namespace(**{**vars(args), "batch": int(settings.get("batch", args.batch))})
    default_priority = executor.MATCHER_PRIORITY
    executor.MATCHER_PRIORITY = int(settings.get("priority", default_priority))
    try:
        matchers = int(settings["matchers"]) if "matchers" in settings else None
        row = ours(artifact, folder, out, changed, None, matchers=matchers, variant=variant)
    finally:
        executor.MATCHER_PRIORITY = default_priority
    return row


# --- report --------------------------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | pairs/s | ms/pair | stages (s) | GPU busy | peak GPU GiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "median_ms" in r:
            lines.append(f"| {r['case']} | | {r['median_ms']:.2f} (min {r['min_ms']:.2f}) | | | |")
            continue
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error']} | | | | |")
            continue
        rate = r["pairs_per_s"]
        stages = r.get("stages_s") or r.get("stages") or {}
        stage_text = ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
        busy = r.get("gpu_busy_share")
        lines.append(f"| {r['case']} | {rate:.1f} | {1000 / rate:.2f} | {stage_text} | "
                     f"{'' if busy is None else f'{100 * busy:.0f} %'} | {r.get('peak_gpu_gib') or ''} |")  # fmt: skip
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    ours_rate = next((r["pairs_per_s"] for r in rows if r["case"] == "ours: export-engine match-many"), None)
    peers = [r["pairs_per_s"] for r in rows if r["case"].startswith("peer") and "pairs_per_s" in r]
    ray = next((r for r in rows if "--ray" in r["case"] and "pairs_per_s" in r), None)
    scaling = {}
    if ours_rate and ray:  # the goal: >= 0.9 N times one worker's pairs/s, the same database
        scaling = {"ray_workers": len(ray["workers"]), "ray_pairs_per_s": ray["pairs_per_s"],
                   "ray_over_one": round(ray["pairs_per_s"] / ours_rate, 2),
                   "ray_same_database": ray["same_database_as_ours"]}  # fmt: skip
    if not ours_rate or not peers:
        return scaling
    return {"ours_pairs_per_s": ours_rate, "fastest_peer_pairs_per_s": max(peers),
            "ours_over_fastest_peer": round(ours_rate / max(peers), 2), **scaling}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="artifact and JPEGs (reused between runs)")
    parser.add_argument("--out", type=Path, required=True, help="match_many_bench.json and the databases")
    parser.add_argument("--plans", type=Path, help="folder with mast3r-hybrid.json (precision plan to reuse)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--pairs", default="swin:10")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--matchers", type=int, default=1,
                        help="matcher threads of a second run next to the default's (0: no such run)")  # fmt: skip
    parser.add_argument("--gpu-memory", type=float, default=16.0, help="GiB given to match-many")
    parser.add_argument("--small-pool", type=int, default=48, help="token slots of the eviction run (0: skip)")
    parser.add_argument("--peer-pairs", type=int, default=320)
    parser.add_argument("--variants", default="", help="more default rows with settings changed, e.g. "
                        "matchers=3+priority=-1,batch=24 (see the module docstring)")  # fmt: skip
    parser.add_argument("--compile-mode", default="reduce-overhead")
    parser.add_argument("--repeats", type=int, default=50, help="Matcher.match calls timed")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with the tiny model")
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="also match-many --ray (a worker per GPU), compared with the one-process run")  # fmt: skip
    parser.add_argument("--ray-workers", type=int, help="Ray workers (default: one per GPU)")
    args = parser.parse_args()
    if args.tiny:
        args.images, args.pairs, args.batch, args.peer_pairs, args.small_pool = 10, "swin:3", 4, 8, 8
        args.repeats, args.workers = 5, 2
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    artifact, export = ensure_artifact(args.work, args.plans, args.tiny)
    folder = make_jpegs(args.work / f"jpegs-{args.images}", args.images)
    from export_engine.sfm.pairs import parse_strategy, select_pairs

    names = sorted(p.name for p in folder.glob("*.jpg"))
    every_pair = select_pairs(parse_strategy(args.pairs), names)
    pairs = every_pair[: args.peer_pairs]
    rows: list[dict[str, Any]] = []
    data: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "args": {k: str(v) for k, v in vars(args).items()}}

    def save() -> None:
        data.update(rows=rows, ratios=ratios(rows), seconds=round(time.perf_counter() - start, 1))
        (args.out / "match_many_bench.json").write_text(json.dumps(data, indent=2, default=str))

    try:
        rows += peer_pipelines(folder, args.out, pairs, len(every_pair), args.batch, args.tiny, args.compile_mode)
    except Exception as err:  # a peer that fails is reported, ours still runs
        rows.append({"case": "peer pipelines", "error": f"{type(err).__name__}: {err}"[:300]})
    save()
    if export is not None:
        code = export.wait()
        data["export"] = {"exit": code, "log_tail": (args.work / f"export-{artifact.name}.log").read_text()[-800:]}
        if code != 0:
            save()
            print(f"export failed ({code}); see {args.work}/export-{artifact.name}.log", file=sys.stderr)
            return 1
    for label, run in (("ours", lambda: [ours(artifact, folder, args.out, args, None)]),
                       ("ours, other matcher threads", lambda: [ours(artifact, folder, args.out, args, None,
                                                                    matchers=args.matchers)]
                        if args.matchers > 0 else []),
                       ("ours, --ray", lambda: [ours(artifact, folder, args.out, args, None, True)]
                        if args.ray else []),
                       ("ours, small pool", lambda: [ours(artifact, folder, args.out, args, args.small_pool)]
                        if args.small_pool else []),
                       *((f"variant {v}", lambda v=v: [variant_row(artifact, folder, args.out, args, v)])
                         for v in filter(None, args.variants.split(","))),
                       ("Matcher.match", lambda: matcher_rows(artifact, folder, args.repeats))):  # fmt: skip
        try:
            rows += run()
        except Exception as err:  # reported in the table; the other rows still run
            rows.append({"case": label, "error": f"{type(err).__name__}: {err}"[:300]})
        save()
    print(table(rows))
    print(json.dumps(ratios(rows)))
    print(f"{args.out / 'match_many_bench.json'} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
