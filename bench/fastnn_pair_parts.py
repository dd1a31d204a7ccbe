#!/usr/bin/env python3
"""Where a captured FastNN-Lite pair's time goes, and how much it varies from call to call (CUDA only).

    python3 bench/fastnn_pair_parts.py [--calls 300] [--out bench/out]

On the 512x384 smooth benchmark maps (subsample 8) it times, over many calls each: the whole
``CapturedMatcher`` call (copying the maps in, both recorded graphs as needed, the host's check of the flags,
de-duplication and unpacking), the first recorded graph's replay alone, and the first graph's replay with
the flags' read-back. It prints median, 10th and 90th percentiles and writes JSON, so that a slow median can be
told apart between GPU work and host work.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from fastnn_bench import smooth_maps, time_calls

from export_engine.families.mast3r.fastnn import CapturedMatcher, MatchConfig

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: the matcher records CUDA graphs")
    d1, d2 = (m.cuda() for m in smooth_maps(512, 384, 2))
    captured = CapturedMatcher(tuple(d1.shape), tuple(d2.shape), 8, MatchConfig(kernel="fused"))
    recorded = captured._recorded
    parts = {
        "whole call": lambda: captured(d1, d2),
        "first graph's replay": recorded._first.replay,
        "first graph's replay and the flags read back": lambda: (recorded._first.replay(), recorded._flags.tolist()),
    }
    rows = [{"case": name, **time_calls(fn, 10, args.calls)} for name, fn in parts.items()]
    rows.append({"case": "second graph replays during the whole calls", "count": captured.rest_replays})
    print(f"{torch.cuda.get_device_name()}, {args.calls} calls each")
    print(f"{'case':50} {'median':>8} {'p10':>8} {'p90':>8} {'min':>8}  (ms)")
    for row in rows:
        if "median_ms" in row:
            print(f"{row['case']:50} {row['median_ms']:8.3f} {row['p10_ms']:8.3f} {row['p90_ms']:8.3f} "
                  f"{row['min_ms']:8.3f}")  # fmt: skip
        else:
            print(f"{row['case']:50} {row['count']}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fastnn_pair_parts.json"
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "calls": args.calls, "rows": rows}, indent=1))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
