#!/usr/bin/env python3
"""Full-size export benchmark: runs the CLI as a child process, reports stage times and peak memory.

    python3 bench/full_size_export.py --model mast3r [--precision fp32] [--resolution 512x384]
                                      [--calibration-data FOLDER]

Prints a table last and writes bench/out/full_size_<model>_<precision>.json. Peak resident memory is the
child's maximum RSS (getrusage of the finished child, the same figure GNU time -v reports).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mast3r")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--resolution")
    parser.add_argument("--keep", type=Path, help="keep the artifact here instead of a temporary folder")
    parser.add_argument("--backend", default="auto", help="auto | tensorrt | tensorrt-rtx | onnx")
    parser.add_argument("--calibration-data", type=Path, help="folder of images / volumes for hybrid calibration")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ee-bench-"))
    out = args.keep or work / "artifact"
    cmd = [sys.executable, "-m", "export_engine.cli", "--model", args.model, "--precision", args.precision,
           "--random-weights", "--out", str(out), "--force", "--backend", args.backend]  # fmt: skip
    if args.resolution:
        cmd += ["--resolution", args.resolution]
    if args.calibration_data:
        cmd += ["--calibration-data", str(args.calibration_data)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, text=True, capture_output=True)
    wall = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # KiB -> GiB
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        print(f"export failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode
    manifest = json.loads((out / "manifest.json").read_text())
    timings = manifest["timings_seconds"]
    sizes = {name: rec["bytes"] for name, rec in manifest["files"].items()}
    passes = json.loads((out / "passes.json").read_text())
    graphs = {}
    for graph in manifest["graphs"]:
        plan = graph.get("precision_plan", {})
        pass_seconds = {r["name"]: r["seconds"] for r in passes.get(graph["name"], [])}
        graphs[graph["name"]] = {
            "attention": graph["op_counts"].get("Attention", 0),
            "softmax_left": graph["op_counts"].get("Softmax", 0),
            "casts": graph["op_counts"].get("Cast", 0),
            "nodes": graph["nodes"],
            "fp16_flop_share": plan.get("fp16_flop_share"),
            "fp32_nodes": plan.get("fp32_nodes"),
            "pass_seconds": pass_seconds,
        }
    engines = {
        e["graph"]: {"build_seconds": e["build"]["build_seconds"], "engine_bytes": e["build"]["engine_bytes"],
                     "peak_rss_gib": e["build"].get("peak_rss_gib"), "parity": e["parity"]["status"]}
        for e in manifest.get("engines", [])
    }  # fmt: skip
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "command": " ".join(cmd[1:]),
        "model": args.model,
        "precision": args.precision,
        "resolution": manifest["resolution"],
        "wall_seconds": round(wall, 1),
        "peak_rss_gib": round(peak_gib, 2),
        "stage_seconds": timings,
        "stage_peak_rss_gib": manifest.get("peak_rss_gib_after_stage", {}),  # the process's peak so far
        "export_seconds": round(sum(v for k, v in timings.items() if k.startswith("export:")), 1),
        "parity_seconds": round(sum(v for k, v in timings.items() if k.startswith("parity:")), 1),
        "parity_worst": manifest["parity"]["worst"],
        "file_bytes": sizes,
        "graphs": graphs,
        "engines": engines,
        "backend": manifest.get("backend"),
        "calibration_data": str(args.calibration_data) if args.calibration_data else None,
    }
    (HERE / "out").mkdir(exist_ok=True)
    suffix = "_calibration_data" if args.calibration_data else ""
    target = HERE / "out" / f"full_size_{args.model}_{args.precision}{suffix}.json"
    target.write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    rows = [("what", "value")]
    rows += [("wall time (whole run)", f"{wall:.1f} s"), ("peak RSS", f"{peak_gib:.2f} GiB")]
    peaks = manifest.get("peak_rss_gib_after_stage", {})
    rows += [
        (f"stage {k}", f"{v:.1f} s, peak RSS so far {peaks.get(k, float('nan')):.2f} GiB") for k, v in timings.items()
    ]
    rows += [(f"parity {k} max abs", f"{v['max_abs']:.2e}") for k, v in manifest["parity"]["worst"].items()]
    rows += [(f"file {k}", f"{v / 1e9:.3f} GB") for k, v in sizes.items()]
    for name, g in graphs.items():
        share = "-" if g["fp16_flop_share"] is None else f"{100 * g['fp16_flop_share']:.1f}%"
        ops = f"{g['attention']} Attention, {g['softmax_left']} Softmax left, {g['casts']} Cast"
        rows.append((f"graph {name}", f"{ops}, FP16 FLOPs {share}, {g['nodes']} nodes"))
        rows.append((f"passes {name}", ", ".join(f"{k} {v:.1f} s" for k, v in g["pass_seconds"].items())))
    for name, e in engines.items():
        rows.append((f"engine {name}", f"{e['engine_bytes'] / 1e9:.3f} GB, build {e['build_seconds']:.1f} s, "
                     f"child peak {e['peak_rss_gib']} GiB, parity {e['parity']}"))  # fmt: skip
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{a.ljust(width)}  {b}" for a, b in rows))
    print(f"written: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
