#!/usr/bin/env python3
"""FastNN-Lite launch settings side by side: the pair and the symmetric pass as recorded graphs (CUDA only).

    python3 bench/fastnn_variants.py [--calls 200] [--rounds 3] [--profile] [--out bench/out]
        [--variant NAME:FIELD=VALUE,FIELD=VALUE ...]

Each variant is the default ``Tiles`` with some fields changed (``--variant relaxed:atomic_sem=acq_rel``;
values are Python literals, e.g. ``prune_block=(8,8)``). On the 512x384 smooth benchmark maps (subsample 8)
every variant records a ``CapturedMatcher`` and a ``CapturedCorrespondences``; their results must equal the
upstream algorithm's (computed once, and timed: ``--reference-calls``). The variants are timed in turns
(``--rounds`` turns of ``--calls`` calls each), so that a machine whose speed drifts treats them alike; the table
gives the median and percentiles over all of a variant's calls. ``--profile`` adds each variant's kernel time per
symmetric pass by kernel (the device loop launched from Python, so that the profiler sees every launch). Writes
fastnn_variants.json.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fastnn_bench import percentiles, same, smooth_maps, time_calls, to_numpy

from export_engine.families.mast3r import fastnn_kernel as fk
from export_engine.families.mast3r.fastnn import (
    CapturedCorrespondences,
    CapturedMatcher,
    MatchConfig,
    extract_correspondences,
)
from export_engine.families.mast3r.matching_reference import (
    extract_correspondences_reference,
    reciprocal_nn_reference,
)

HERE = Path(__file__).resolve().parent
DEFAULT_VARIANTS = ("default:", "acq_rel atomics:atomic_sem='acq_rel'", "probe per block:prune_probe_group=1",
                    "probe per 4 blocks:prune_probe_group=4")  # fmt: skip


def parse_variant(text: str) -> tuple[str, fk.Tiles]:
    """'NAME:FIELD=VALUE,...' -> (NAME, the default tiles with those fields)."""
    name, _, changes = text.partition(":")
    fields: dict[str, Any] = {}
    for item in filter(None, (c.strip() for c in _split_top_level(changes))):
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(fk.Tiles)}:
            raise SystemExit(f"variant {name!r}: Tiles has no field {key!r}")
        fields[key] = ast.literal_eval(value)
    return name, dataclasses.replace(fk.DEFAULT_TILES, **fields)


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside parentheses (tuple values)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="timed calls per variant and case in each turn")
    parser.add_argument("--rounds", type=int, default=3, help="turns over the variants")
    parser.add_argument("--variant", action="append", help="NAME:FIELD=VALUE,... (repeatable)")
    parser.add_argument("--profile", action="store_true", help="kernel time per symmetric pass, by kernel")
    parser.add_argument("--reference-calls", type=int, default=10,
                        help="timed upstream calls (pair; a quarter as many symmetric), 0: none")  # fmt: skip
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: the matchers record CUDA graphs")
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    maps = [m.cuda() for m in smooth_maps(384, 512, 4)]
    gen = torch.Generator().manual_seed(2)
    confs = [(1 + torch.rand(384, 512, generator=gen)).cuda() for _ in range(4)]
    d1, d2 = maps[:2]

    def reference_pair() -> tuple:
        return reciprocal_nn_reference(d1, d2, 8, device=d1.device)

    def reference_sym() -> tuple:
        return extract_correspondences_reference(maps, confs, 8, device=d1.device)

    want_pair, want_sym = to_numpy(reference_pair()), to_numpy(reference_sym())
    upstream = {}
    if args.reference_calls:
        upstream = {"pair": time_calls(reference_pair, 1, args.reference_calls),
                    "symmetric": time_calls(reference_sym, 1, max(1, args.reference_calls // 4))}  # fmt: skip
    shape = tuple(d1.shape)
    cases: dict[str, dict[str, Any]] = {}
    calls: dict[tuple[str, str], Callable[[], Any]] = {}
    for name, tiles in variants:
        config = MatchConfig(kernel="fused", tiles=tiles)
        pair, sym = CapturedMatcher(shape, shape, 8, config), CapturedCorrespondences(shape, shape, 8, config)
        calls[name, "pair"] = lambda p=pair: p(d1, d2)
        calls[name, "symmetric"] = lambda s=sym: s(maps, confs)
        cases[name] = {"tiles": dataclasses.asdict(tiles),
                       "pair_identical": same(to_numpy(pair(d1, d2)), want_pair),
                       "symmetric_identical": same(to_numpy(sym(maps, confs)), want_sym),
                       "times": {"pair": [], "symmetric": []}}  # fmt: skip
        if args.profile:
            from gpu_cases import profile

            prof = profile(lambda c=config: extract_correspondences(maps, confs, 8, c), runs=5, top=14)
            cases[name]["symmetric_kernels"] = prof
    for _ in range(args.rounds):
        for (name, case), fn in calls.items():
            timing = time_calls(fn, 5, args.calls, keep_all=True)
            cases[name]["times"][case].extend(timing.pop("all_ms"))
    print(f"{torch.cuda.get_device_name()}: {args.rounds} turns of {args.calls} calls per variant and case (ms)")
    print(f"{'variant':28} {'pair med':>9} {'p10':>7} {'p90':>7} {'sym med':>9} {'p10':>7} {'p90':>7}  identical")
    for name, case in cases.items():
        for key in ("pair", "symmetric"):
            times = case["times"].pop(key)
            case[key] = {**percentiles(times), "calls": len(times)}
        p, s = case["pair"], case["symmetric"]
        ok = "yes" if case["pair_identical"] and case["symmetric_identical"] else "NO"
        print(f"{name:28} {p['median_ms']:9.3f} {p['p10_ms']:7.3f} {p['p90_ms']:7.3f} {s['median_ms']:9.3f} "
              f"{s['p10_ms']:7.3f} {s['p90_ms']:7.3f}  {ok}")  # fmt: skip
    if upstream:
        pair_ms, sym_ms = upstream["pair"]["median_ms"], upstream["symmetric"]["median_ms"]
        first = next(iter(cases.values()))
        print(
            f"{'upstream algorithm':28} {pair_ms:9.3f} {'':7} {'':7} {sym_ms:9.3f}   (first variant: "
            f"{pair_ms / first['pair']['median_ms']:.1f}x, {sym_ms / first['symmetric']['median_ms']:.1f}x faster)"
        )
    for name, case in cases.items():
        prof = case.get("symmetric_kernels")
        if prof:
            top = ", ".join(f"{k['kernel'][:28]} {k['ms']:.3f}" for k in prof["top_kernels_ms"][:10])
            print(f"kernels per symmetric pass, {name}: {prof['gpu_kernel_ms_per_run']:.3f} ms ({top})")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fastnn_variants.json"
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rounds": args.rounds, "calls": args.calls,
                                "upstream": upstream, "variants": cases}, indent=1))  # fmt: skip
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
