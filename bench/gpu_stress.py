#!/usr/bin/env python3
"""The GPU runtime under real use: aborts, hangs, cross-talk, memory, cache faults, bad inputs, exit with work queued.

    python3 bench/gpu_stress.py --work DIR --out DIR [--scenarios threads,memory,...] [--budget-s 420]

Each scenario runs in a child process of its own (``--child NAME``), so that an abort or a hang is counted
instead of ending the run: the parent records the child's exit status (a signal is an abort), a time-out is a
hang, and the child's JSON says what it checked. Artifacts (exported on this machine's CPUs, random weights,
ONNX only): full-size FastSAM3D with sparse attention, hybrid precision (the encoder and the prompt decoder at
128^3), and a tiny MASt3R hybrid (80x48). A table is printed last; ``DIR/gpu_stress.json`` holds everything.

Scenarios:
  threads-N   one runner of each graph shared by N threads (each on its own stream), CUDA graphs on and off,
              200 calls a thread: errors, hung threads, and calls whose outputs are not those of their own inputs
              run alone (cross-talk)
  memory      20 cycles of ee.load -> 5 runs -> drop (and -> close), device memory (nvidia-smi and CUDA's free
              memory), torch's reserved memory and host RSS after each; growth from cycle 2 to 20
  faults      the operator library cache unwritable, truncated, emptied, corrupt, built for another CUDA, needing
              a newer ONNX Runtime: each load must fall back (or rebuild) and compute the artifact's reference;
              strict must refuse with a BackendError
  bad-inputs  wrong shapes, dtypes, NaN, empty batches, wrong types, missing inputs: a ModelInputError each, and
              the runner still correct after each
  drop        runners without CUDA graphs dropped right after queued runs, 40 times, also from 4 threads
  exit        a process that exits with runs still queued on the GPU (normally, and through an exception)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCENARIOS = ("threads-4", "threads-8", "memory", "faults", "bad-inputs", "drop", "exit")
TIMEOUT_S = {"threads-4": 240, "threads-8": 240, "memory": 240, "faults": 300, "bad-inputs": 120, "drop": 120,
             "exit": 120}  # fmt: skip
ARTIFACTS = {
    "fastsam3d": ["--model", "fastsam3d", "--precision", "hybrid", "--attention", "sparse"],
    "mast3r": ["--model", "mast3r", "--precision", "hybrid", "--resolution", "80x48", "--config", "{tiny}"],
}


# --- parent ------------------------------------------------------------------------------------------------------


def export_artifacts(work: Path) -> dict[str, Path]:
    from export_engine.exporters.mast3r import TINY_CONFIG

    work.mkdir(parents=True, exist_ok=True)
    tiny = work / "mast3r-tiny.json"
    tiny.write_text(json.dumps(TINY_CONFIG))
    found, procs = {}, []
    for name, args in ARTIFACTS.items():
        out = work / f"stress-{name}"
        found[name] = out
        if (out / "manifest.json").exists():
            continue
        cmd = [sys.executable, "-m", "export_engine", *[a.format(tiny=tiny) for a in args], "--random-weights",
               "--backend", "onnx", "--quiet", "--force", "--out", str(out)]  # fmt: skip
        procs.append((name, subprocess.Popen(cmd)))
    for name, proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"exporting the {name} artifact failed (exit {proc.returncode})")
    return found


def run_child(name: str, work: Path, timeout: float) -> dict[str, Any]:
    result = work / f"child-{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--work", str(work), "--result", str(result)]
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, hung, tail = done.returncode, False, (done.stdout + done.stderr)[-3000:]
    except subprocess.TimeoutExpired as err:
        rc, hung = None, True
        tail = ((err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace"))[-3000:]
    row: dict[str, Any] = {"scenario": name, "rc": rc, "hung": hung, "seconds": round(time.monotonic() - start, 1)}
    row["aborted"] = rc is not None and (rc < 0 or rc == 134)
    if result.exists():
        row.update(json.loads(result.read_text()))
    row["ok"] = bool(rc == 0 and not hung and row.get("ok", False))
    if not row["ok"]:
        row["log_tail"] = tail
    return row


def summarise(row: dict[str, Any]) -> str:
    if row["hung"] or row["aborted"] or "summary" not in row:
        return f"rc {row['rc']}, hung {row['hung']}, aborted {row['aborted']}"
    return str(row["summary"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--child")
    parser.add_argument("--result", type=Path)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.work, args.result)
    deadline = time.monotonic() + args.budget_s
    start = time.monotonic()
    artifacts = export_artifacts(args.work)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "device": device_name(), "versions": versions(),
                              "export_s": round(time.monotonic() - start, 1), "artifacts": {k: str(v) for k, v in
                              artifacts.items()}, "rows": []}  # fmt: skip
    out = args.out or args.work
    out.mkdir(parents=True, exist_ok=True)
    for name in args.scenarios.split(","):
        left = deadline - time.monotonic()
        if left < 20:
            report["rows"].append({"scenario": name, "skipped": "out of time budget"})
            continue
        row = run_child(name, args.work, min(TIMEOUT_S.get(name, 180), left))
        report["rows"].append(row)
        print(f"[{name}] {'ok' if row['ok'] else 'FAILED'} in {row['seconds']} s: {summarise(row)}", flush=True)
        (out / "gpu_stress.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\nGPU stress on {report['device']} ({report['versions']})")
    print(f"{'scenario':<12} {'result':<7} {'s':>6}  summary")
    for row in report["rows"]:
        result = "skipped" if "skipped" in row else ("ok" if row["ok"] else "FAILED")
        print(f"{row['scenario']:<12} {result:<7} {row.get('seconds', 0):>6}  {row.get('skipped') or summarise(row)}")
    return 0 if all(r.get("ok") for r in report["rows"]) else 1


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"


def versions() -> str:
    import onnxruntime
    import torch

    return f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"


# --- children ----------------------------------------------------------------------------------------------------


def child(name: str, work: Path, result: Path) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    artifacts = {key: work / f"stress-{key}" for key in ARTIFACTS}
    fn: Callable[[dict[str, Path], Path], dict[str, Any]]
    if name.startswith("threads-"):
        count = int(name.split("-")[1])

        def fn(a: dict[str, Path], w: Path) -> dict[str, Any]:
            return threads(a, count)
    else:
        fn = {"memory": memory, "faults": faults, "bad-inputs": bad_inputs, "drop": drop, "exit": exit_queued}[name]
    outcome = fn(artifacts, work)
    result.write_text(json.dumps(outcome, indent=1, default=str))
    return 0


def graph_meta(artifact: Path, name: str) -> dict[str, Any]:
    manifest = json.loads((artifact / "manifest.json").read_text())
    return next(g for g in manifest["graphs"] if g["name"] == name)


def reference_feed(artifact: Path, name: str) -> dict[str, Any]:
    import numpy as np
    import torch

    with np.load(artifact / graph_meta(artifact, name)["reference_check"]["inputs"]) as data:
        return {k: torch.from_numpy(data[k]).cuda() for k in data.files}


def variants(feed: dict[str, Any], count: int) -> list[dict[str, Any]]:
    return [{k: (v * (1 - 0.04 * i) + 0.02 * i if v.is_floating_point() else v) for k, v in feed.items()}
            for i in range(count)]  # fmt: skip


def threads(artifacts: dict[str, Path], count: int, calls: int = 200) -> dict[str, Any]:
    """Each thread calls a random one of the shared runners ``calls`` times on its own stream."""
    from export_engine.runners.ort_cuda import CudaGraphRunner, CudaSessionConfig

    graphs = [("fastsam3d", "encoder"), ("fastsam3d", "prompt_decoder"), ("mast3r", "encoder"), ("mast3r", "decoder")]
    rows = {}
    for cuda_graph in (True, False):
        runners, feeds, alone = [], [], []
        for model, graph in graphs:
            meta = graph_meta(artifacts[model], graph)
            its = variants(reference_feed(artifacts[model], graph), 5)
            with CudaGraphRunner(artifacts[model] / meta["file"], meta) as single:  # each input run alone
                alone.append([{k: v.float().cpu() for k, v in single.run(f).items()} for f in its])
            # shared runners start fresh: their captures happen while the other threads run
            runners.append(
                CudaGraphRunner(artifacts[model] / meta["file"], meta, CudaSessionConfig(cuda_graph=cuda_graph))
            )
            feeds.append(its)
        start = time.perf_counter()
        completed, errors, crosstalk, hung = hammer(runners, feeds, alone, count, calls)
        seconds = time.perf_counter() - start
        for runner in runners:
            runner.close()
        rows["graph" if cuda_graph else "plain"] = {
            "threads": count, "calls": count * calls, "completed": completed, "errors": dict(errors),
            "crosstalk": crosstalk, "hung_threads": hung, "calls_per_s": round(completed / seconds, 1),
        }  # fmt: skip
    ok = all(not r["errors"] and not r["crosstalk"] and not r["hung_threads"] for r in rows.values())
    summary = "; ".join(f"{k}: {r['completed']}/{r['calls']} calls, {sum(r['errors'].values())} errors, "
                        f"{r['crosstalk']} cross-talk, {r['hung_threads']} hung, {r['calls_per_s']} calls/s"
                        for k, r in rows.items())  # fmt: skip
    return {"ok": ok, "summary": summary, "modes": rows}


def hammer(runners: list[Any], feeds: list[list[dict[str, Any]]], alone: list[list[dict[str, Any]]], count: int,
           calls: int) -> tuple[int, Counter[str], int, int]:  # fmt: skip
    """``count`` threads, each on a stream of its own, call a random runner on a random one of its feeds ``calls``
    times; returns (calls completed, errors by message, calls answered with other inputs' outputs, hung threads)."""
    import random

    import torch

    from export_engine.runners import gpu_gate

    errors: Counter[str] = Counter()
    crosstalk = 0
    lock = threading.Lock()

    def work(seed: int) -> int:
        nonlocal crosstalk
        rng = random.Random(seed)
        with gpu_gate.shared():  # creating a stream is GPU work too: never inside another thread's capture
            stream = torch.cuda.Stream()
        done = 0
        for _ in range(calls):
            g, v = rng.randrange(len(runners)), rng.randrange(len(feeds[0]))
            try:
                with torch.cuda.stream(stream):
                    result = runners[g].run(feeds[g][v])
                    with gpu_gate.shared():  # the caller's own GPU work stays out of other threads' captures
                        out = {k: t.float().cpu() for k, t in result.items()}
            except Exception as err:  # counted, not raised: the point is how many
                with lock:
                    errors[f"{type(err).__name__}: {str(err)[-400:]}"] += 1
                continue
            want = alone[g][v]
            if not all(torch.allclose(out[k], want[k], atol=2e-3, rtol=2e-3) for k in want):
                with lock:
                    crosstalk += 1
            done += 1
        return done

    completed, hung = 0, 0
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(work, seed) for seed in range(count)]
        for future in futures:
            try:
                completed += future.result(timeout=150)
            except TimeoutError:
                hung += 1
    return completed, errors, crosstalk, hung


def nvidia_smi_used() -> int | None:
    """This process's device memory in MiB as NVML counts it (None where nvidia-smi cannot say)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    for line in done.stdout.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if fields[0] == str(os.getpid()) and fields[1].isdigit():
            return int(fields[1])
    return None


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory(artifacts: dict[str, Path], work: Path, cycles: int = 20) -> dict[str, Any]:
    import torch

    import export_engine as ee
    from export_engine.families import runtime_family

    artifact = artifacts["fastsam3d"]
    graphs = {g["name"]: g for g in json.loads((artifact / "manifest.json").read_text())["graphs"]}
    sample = runtime_family("fastsam3d").sample_inputs(graphs, 0)
    modes: dict[str, Any] = {}
    for mode, kwargs in (("drop", {}), ("close", {}), ("drop, CUDA graphs", {"cuda_graph": True})):
        levels = []
        for _ in range(cycles):
            session = ee.load(artifact, **kwargs)
            for _ in range(5):
                session.run(sample)
            if mode == "close":
                session.close()
            del session
            gc.collect()
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            levels.append({
                "smi_mib": nvidia_smi_used(), "cuda_used_mib": (total - free) >> 20,
                "torch_reserved_mib": torch.cuda.memory_reserved() >> 20, "rss_mib": round(rss_mib()),
            })  # fmt: skip
        first, last = levels[1], levels[-1]
        growth = {k: (last[k] - first[k]) if last[k] is not None and first[k] is not None else None for k in first}
        modes[mode] = {"growth_cycle2_to_last": growth, "levels": levels}
    # this process's figure where NVML gives one (other processes may share the device), else the device's
    key = (
        "smi_mib" if all(m["growth_cycle2_to_last"]["smi_mib"] is not None for m in modes.values()) else "cuda_used_mib"
    )
    device_growth = max(m["growth_cycle2_to_last"][key] for m in modes.values())
    host_growth = max(m["growth_cycle2_to_last"]["rss_mib"] for m in modes.values())
    summary = "; ".join(f"{mode}: device +{m['growth_cycle2_to_last'][key]} MiB ({key}), host "
                        f"+{m['growth_cycle2_to_last']['rss_mib']} MiB" for mode, m in modes.items())  # fmt: skip
    return {"ok": device_growth < 16 and host_growth < 64, "summary": f"{cycles} cycles, {summary}", "modes": modes}


def faults(artifacts: dict[str, Path], work: Path) -> dict[str, Any]:
    """Each fault of the operator library in a process of its own (a loaded library stays loaded in a process):
    the prebuilt library ($EXPORT_ENGINE_OPS_PREBUILT) damaged in each way, with an empty cache and no nvcc (so
    nothing can be built instead), and an unwritable cache with nvcc found. Each must fall back to ONNX Runtime's
    own operators and still compute the artifact's reference; strict must refuse (exit 8)."""
    from export_engine.runners.ort_ops import faults as provoke

    prebuilt = os.environ.get("EXPORT_ENGINE_OPS_PREBUILT")
    if not prebuilt:
        return {"ok": False, "summary": "set EXPORT_ENGINE_OPS_PREBUILT (scripts/build_ort_ops.py) to test faults"}
    rows = {}
    control = fault_child(artifacts["mast3r"], {"EXPORT_ENGINE_CACHE": str(work / "ops-cache-empty")}, nvcc=False)
    rows["none (control)"] = control
    for kind in provoke.KINDS:
        if kind == "unwritable-cache":
            env = {"EXPORT_ENGINE_CACHE": str(provoke.unwritable_cache(work / "unwritable")),
                   "EXPORT_ENGINE_OPS_PREBUILT": ""}  # fmt: skip
            nvcc = True
        else:
            damaged = work / f"ops-prebuilt-{kind}"
            shutil.rmtree(damaged, ignore_errors=True)
            shutil.copytree(prebuilt, damaged)
            for library in damaged.rglob("libexport_engine_ort_ops.so"):
                if "cpu" not in library.parent.name:  # the CUDA build is the one a GPU session loads
                    provoke.provoke(kind, library)
            env = {"EXPORT_ENGINE_OPS_PREBUILT": str(damaged), "EXPORT_ENGINE_CACHE": str(work / f"ops-cache-{kind}")}
            nvcc = False
        lenient = fault_child(artifacts["mast3r"], env, nvcc=nvcc)
        strict = fault_child(artifacts["mast3r"], env, nvcc=nvcc, strict=True)
        rows[kind] = {**lenient, "strict_rc": strict["rc"], "strict_said": strict["said"]}
    verdict = {k: r["rc"] == 0 and r["parity"] == "passed" for k, r in rows.items()}
    ok = all(verdict.values()) and all(r.get("strict_rc") in (None, 8) for r in rows.values())
    ok = ok and rows["none (control)"]["library"] == "prebuilt"
    summary = "; ".join(
        f"{k}: {'runs' if verdict[k] else 'BROKEN'} on {r['library']} ops"
        + (f", strict exit {r['strict_rc']}" if "strict_rc" in r else "")
        for k, r in rows.items()
    )
    return {"ok": ok, "summary": summary, "faults": rows}


FAULT_PROBE = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.WARNING, format="LOG %(name)s: %(message)s")
from export_engine.errors import ExportError
from export_engine.runners import ort_ops
from export_engine.runtime.session import load
from export_engine.runners.self_check import check_runner
artifact, strict, nvcc = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1"
if not nvcc:
    ort_ops.build.nvcc = lambda: None
try:
    session = load(artifact, strict=strict)
    reports = [check_runner(session.runners[g["name"]], artifact, g, "probe") for g in session.manifest["graphs"]]
    own = any(r.outcome.lowerings and "attention_fused" in r.outcome.lowerings for r in session.runners.values())
    print("LIBRARY", ort_ops.choose(True).source if own else "none")
    print("PARITY", "passed" if all(r.passed for r in reports) else "failed")
except ExportError as err:
    print("REFUSED", type(err).__name__, err)
    sys.exit(err.exit_code)
"""


def fault_child(artifact: Path, env: dict[str, str], nvcc: bool, strict: bool = False) -> dict[str, Any]:
    full = {**os.environ, **env}
    full = {k: v for k, v in full.items() if v != ""}
    try:
        args = [str(artifact), "1" if strict else "0", "1" if nvcc else "0"]
        done = subprocess.run([sys.executable, "-c", FAULT_PROBE, *args], env=full, capture_output=True, text=True,
                              timeout=240)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"rc": None, "parity": None, "library": None, "said": "hung"}
    lines = done.stdout.splitlines()
    parity = next((line.split()[1] for line in lines if line.startswith("PARITY")), None)
    library = next((line.split(maxsplit=1)[1] for line in lines if line.startswith("LIBRARY")), None)
    said = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith(("LOG", "REFUSED"))]
    return {"rc": done.returncode, "parity": parity, "library": library, "said": said[-3:],
            "tail": "" if done.returncode == 0 else done.stderr[-800:]}  # fmt: skip


def bad_inputs(artifacts: dict[str, Path], work: Path) -> dict[str, Any]:
    import torch

    from export_engine.errors import ModelInputError
    from export_engine.runners.ort_cuda import CudaGraphRunner, CudaSessionConfig

    rows = {}
    for model, graph in (("fastsam3d", "encoder"), ("fastsam3d", "prompt_decoder"), ("mast3r", "decoder")):
        meta = graph_meta(artifacts[model], graph)
        runner = CudaGraphRunner(artifacts[model] / meta["file"], meta, CudaSessionConfig(cuda_graph=True))
        feed = reference_feed(artifacts[model], graph)
        want = {k: v.float().cpu() for k, v in runner.run(feed).items()}
        first = next(k for k, v in feed.items() if v.is_floating_point())
        nan = feed[first].cpu().clone()
        nan.view(-1)[0] = float("nan")
        cases = {
            "wrong shape": {**feed, first: feed[first][..., :1]},
            "wrong dtype": {**feed, first: feed[first].double()},
            "NaN (host)": {**feed, first: nan},
            "empty batch": {k: v[:0] for k, v in feed.items()},
            "not a tensor": {**feed, first: "volume.nii"},
            "missing input": {k: v for k, v in feed.items() if k != first},
        }
        for label, value in cases.items():
            try:
                runner.run(value)
                raised = "nothing"
            except ModelInputError as err:
                raised = f"ModelInputError: {err}"
            except Exception as err:  # recorded: anything but ModelInputError is a failure of this scenario
                raised = f"{type(err).__name__}: {err}"
            after = {k: v.float().cpu() for k, v in runner.run(feed).items()}
            still = all(torch.equal(after[k], want[k]) for k in want)
            rows[f"{model}/{graph}: {label}"] = {"raised": raised[:240], "correct_after": still}
        runner.close()
    ok = all(r["raised"].startswith("ModelInputError") and r["correct_after"] for r in rows.values())
    clear = sum(r["raised"].startswith("ModelInputError") for r in rows.values())
    return {"ok": ok, "summary": f"{clear}/{len(rows)} clear errors, runner correct after "
            f"{sum(r['correct_after'] for r in rows.values())}/{len(rows)}", "cases": rows}  # fmt: skip


def drop(artifacts: dict[str, Path], work: Path) -> dict[str, Any]:
    """What aborted the process before: a runner without CUDA graphs dropped while its stream still works."""
    import torch

    from export_engine.runners.ort_cuda import CudaGraphRunner, CudaSessionConfig

    meta = graph_meta(artifacts["fastsam3d"], "encoder")
    path = artifacts["fastsam3d"] / meta["file"]
    feed = reference_feed(artifacts["fastsam3d"], "encoder")

    def cycle(_: int) -> None:
        runner = CudaGraphRunner(path, meta, CudaSessionConfig())
        torch.cuda._sleep(20_000_000)
        runner.run(feed, copy=False)
        del runner
        gc.collect()

    for i in range(20):
        cycle(i)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(cycle, range(20), timeout=90))
    torch.cuda.synchronize()
    return {"ok": True, "summary": "40 runners dropped right after queued runs (20 from 4 threads), no abort"}


EXIT_PROBE = """
import sys, torch, json
from pathlib import Path
from export_engine.runners.ort_cuda import CudaGraphRunner, CudaSessionConfig
artifact, how = Path(sys.argv[1]), sys.argv[2]
meta = next(g for g in json.loads((artifact / "manifest.json").read_text())["graphs"] if g["name"] == "encoder")
import numpy as np
with np.load(artifact / meta["reference_check"]["inputs"]) as d:
    feed = {k: torch.from_numpy(d[k]).cuda() for k in d.files}
plain = CudaGraphRunner(artifact / meta["file"], meta, CudaSessionConfig())
graph = CudaGraphRunner(artifact / meta["file"], meta, CudaSessionConfig(cuda_graph=True))
torch.cuda._sleep(200_000_000)
for _ in range(30):
    plain.run(feed, copy=False)
    graph.run(feed, copy=False)
if how == "raise":
    raise RuntimeError("leaving with work queued")
"""


def exit_queued(artifacts: dict[str, Path], work: Path) -> dict[str, Any]:
    rows = {}
    for how in ("return", "raise"):
        done = subprocess.run([sys.executable, "-c", EXIT_PROBE, str(artifacts["fastsam3d"]), how],
                              capture_output=True, text=True, timeout=100)  # fmt: skip
        aborted = done.returncode < 0 or done.returncode == 134 or "terminate called" in done.stderr
        rows[how] = {"rc": done.returncode, "aborted": aborted, "tail": done.stderr[-500:]}
    ok = rows["return"]["rc"] == 0 and rows["raise"]["rc"] == 1 and not any(r["aborted"] for r in rows.values())
    return {"ok": ok, "summary": f"exit with work queued: rc {rows['return']['rc']}; through an exception: rc "
            f"{rows['raise']['rc']}; aborts {sum(r['aborted'] for r in rows.values())}", "exits": rows}  # fmt: skip


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an abort is counted here, not dumped
    sys.exit(main())
