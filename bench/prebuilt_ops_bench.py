#!/usr/bin/env python3
"""The prebuilt operator library on a GPU machine with no nvcc: first load, the pair, torch.compile beside it.

    python3 bench/prebuilt_ops_bench.py --work DIR --prebuilt build/ort-ops/export_engine_ops [--plans DIR]
        [--out DIR] [--repeats 50] [--compile-modes reduce-overhead]

The MASt3R hybrid artifact is ``DIR/mast3r-hybrid`` (exported first, as bench/gpu_bench.py does, when absent).
Each ONNX Runtime measurement runs in a fresh process with a fresh ``$EXPORT_ENGINE_CACHE``, ``nvcc`` off
``PATH``, ``CUDA_HOME`` unset and the runtime's fixed-path lookup of nvcc answered "none", so nothing can be
compiled:

1. ``prebuilt``: ``$EXPORT_ENGINE_OPS_PREBUILT`` names the library built by scripts/build_ort_ops.py. The time to
   choose (check) the library, ``ee.load`` of the artifact (first load in the process), then the pair on ONNX
   Runtime CUDA with the default rewrites and a CUDA graph, as bench/gpu_bench.py's MASt3R section runs it.
2. ``stock``: no library at all: the runner falls back to ONNX Runtime's own operators (one log line); the same
   load and pair: what a machine without nvcc got before the prebuilt library.
3. ``compile``: PyTorch FP16 eager and torch.compile of the same pair, in the same run.

Prints a table and writes ``prebuilt_ops_bench.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _without_nvcc(env: dict[str, str]) -> dict[str, str]:
    """``env`` with every PATH entry that holds an nvcc dropped and CUDA_HOME / CUDA_PATH unset."""
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not (Path(p) / "nvcc").exists()]
    env = {k: v for k, v in env.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    return {**env, "PATH": os.pathsep.join(path)}


def child(kind: str, artifact: Path, warm: int, reps: int, modes: tuple[str, ...]) -> list[dict[str, Any]]:
    """One measurement, in this (fresh) process."""
    import gpu_cases as cases
    import torch

    images = (torch.rand(2, 3, 384, 512, generator=torch.Generator().manual_seed(0)) * 2 - 1).cuda()
    if kind == "compile":
        return cases.compiled_mast3r(images, warm, reps, modes)

    import export_engine as ee
    from export_engine.runners import ort_ops
    from export_engine.runners.ort_cuda import CudaSessionConfig

    assert shutil.which("nvcc") is None, "nvcc is still on PATH"
    ort_ops.build.nvcc = lambda: None  # also /usr/local/cuda/bin/nvcc, which the runtime looks for by path
    label = "export-engine's prebuilt operators" if kind == "prebuilt" else "ONNX Runtime's own operators (no nvcc)"
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    ok, why = ort_ops.available(cuda=True)
    choose_s = time.perf_counter() - start
    rows.append({"case": f"operator library, first use ({kind})", "available": ok, "library": why,
                 "choose_s": round(choose_s, 4), "nvcc": ort_ops.build.nvcc()})  # fmt: skip
    start = time.perf_counter()
    session = ee.load(artifact)
    load_s = time.perf_counter() - start
    rows.append({"case": f"ee.load MASt3R hybrid, first load, {label}", "load_s": round(load_s, 2),
                 "provider": session.provider})  # fmt: skip
    del session
    row, runners = cases.ort_mast3r(artifact, CudaSessionConfig(cuda_graph=True), images, warm, reps,
                                    f"hybrid, default rewrites, CUDA graph, {label}")  # fmt: skip
    rows.append(row)
    del runners
    return rows


def run_child(kind: str, args: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    env = dict(os.environ) if kind == "compile" else _without_nvcc(dict(os.environ))  # inductor keeps its tools
    env["EXPORT_ENGINE_CACHE"] = str(scratch / f"cache-{kind}")  # fresh: nothing built before
    env.pop("EXPORT_ENGINE_OPS_PREBUILT", None)
    if kind == "prebuilt":
        env["EXPORT_ENGINE_OPS_PREBUILT"] = str(args.prebuilt.resolve())
    out = scratch / f"{kind}.json"
    cmd = [sys.executable, __file__, "--child", kind, "--work", str(args.work), "--child-out", str(out),
           "--repeats", str(args.repeats), "--compile-modes", args.compile_modes]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, check=False)
    if done.returncode != 0 or not out.exists():
        took = time.perf_counter() - start
        return [{"case": f"{kind} process", "error": f"exit {done.returncode} after {took:.0f} s"}]
    return json.loads(out.read_text())


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'case':<96} {'median ms':>9} {'min ms':>8}  notes"]
    for row in rows:
        notes = [f"{k}={row[k]}" for k in ("error", "available", "choose_s", "load_s", "session_s", "compile_s",
                                           "nvcc", "library") if k in row]  # fmt: skip
        if "gpu_parity" in row:
            notes.append(f"parity {'ok' if row['gpu_parity']['passed'] else 'FAIL'}")
        if "worst_error_vs_fp32" in row:
            notes.append(f"worst error vs FP32 {row['worst_error_vs_fp32']:.1e}")
        median = f"{row['median_ms']:9.2f} {row['min_ms']:8.2f}" if "median_ms" in row else f"{'':9} {'':8}"
        lines.append(f"{row['case']:<96} {median}  {', '.join(notes)}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="holds (or gets) the mast3r-hybrid artifact")
    parser.add_argument("--prebuilt", type=Path, help="the export_engine_ops folder scripts/build_ort_ops.py wrote")
    parser.add_argument("--plans", type=Path, help="folder with mast3r-hybrid.json, a precision plan to reuse")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--compile-modes", default="reduce-overhead")
    parser.add_argument("--child", choices=("prebuilt", "stock", "compile"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    artifact = args.work / "mast3r-hybrid"
    modes = tuple(m for m in args.compile_modes.split(",") if m)
    if args.child:
        rows = child(args.child, artifact, max(5, args.repeats // 10), args.repeats, modes)
        args.child_out.write_text(json.dumps(rows, default=str))
        return 0
    if args.prebuilt is None or not any(args.prebuilt.glob("cuda*/libexport_engine_ort_ops.so")):
        parser.error("--prebuilt must name a folder with cuda*/libexport_engine_ort_ops.so (scripts/build_ort_ops.py)")
    if not (artifact / "manifest.json").exists():
        from gpu_bench import export_command

        plan = args.plans / "mast3r-hybrid.json" if args.plans else None
        plan = plan if plan and plan.exists() else None
        subprocess.run(export_command(args.work, "mast3r", "hybrid", plan), check=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="prebuilt-ops-bench-") as scratch:
        for kind in ("prebuilt", "stock", "compile"):
            rows += run_child(kind, args, Path(scratch))
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "prebuilt_ops_bench.json").write_text(json.dumps({"rows": rows}, indent=2, default=str))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
