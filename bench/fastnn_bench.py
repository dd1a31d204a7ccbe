#!/usr/bin/env python3
"""FastNN-Lite vs the plain reference matcher on full-size (512x384) MASt3R-like descriptor maps.

    python3 bench/fastnn_bench.py [--device cuda|cpu] [--repeats N] [--subsample 8] [--symmetric] [--fp16]

Descriptors: 24-dim unit maps, a bilinear random field (16 px cells) plus noise; desc2 the same field shifted
by (5, 3) px with its own noise (the construction of matching.npz, full size). Both matchers run warm-up calls
and then N timed calls per pair (CUDA events on GPU, perf_counter on CPU); every timed result must equal the
reference's. Peak memory: torch.cuda.max_memory_allocated above the inputs on GPU; on CPU one extra untimed
run of each matcher in a child process whose glibc returns every allocation >= 64 KiB to the system on free
(MALLOC_MMAP_THRESHOLD_), so that its resident set size, sampled every 2 ms, follows the live tensors: the peak
above the RSS before the run. Prints a table and writes bench/out/fastnn_<device>.json. CPU defaults (2
reference and 3 fast repeats, warm-up on small maps, one torch thread) keep the run under a minute on the
project machine. One thread because that machine's 2 cores are shared: with 2 OpenMP threads the same run
took 2 to 10 times longer from one minute to the next (a descheduled thread stalls every barrier).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from export_engine.families.mast3r.fastnn import MatchConfig, extract_correspondences, fast_reciprocal_nn
from export_engine.families.mast3r.matching_reference import extract_correspondences_reference, reciprocal_nn_reference

HERE = Path(__file__).resolve().parent
log = logging.getLogger("fastnn_bench")
Outputs = tuple[np.ndarray, ...]


def smooth_maps(height: int, width: int, count: int, dim: int = 24, noise: float = 0.3, seed: int = 0) -> list:
    """`count` unit (H, W, D) maps: map k is the shared field shifted by k * (5, 3) px plus its own noise."""
    gen = torch.Generator().manual_seed(seed)
    dx, dy, cell = 5, 3, 16
    pad_y, pad_x = dy * (count - 1), dx * (count - 1)
    coarse = torch.randn(1, dim, (height + pad_y) // cell + 2, (width + pad_x) // cell + 2, generator=gen)
    field = F.interpolate(coarse, scale_factor=cell, mode="bilinear", align_corners=False)[0]
    field = field / field.std()
    maps = []
    for k in range(count):
        shifted = field[:, k * dy : k * dy + height, k * dx : k * dx + width]
        noisy = shifted + noise * torch.randn(shifted.shape, generator=gen)
        maps.append(F.normalize(noisy, dim=0).permute(1, 2, 0).contiguous())
    return maps


class RssPeak:
    """Peak resident set size above the starting one, sampled by a thread (CPU runs)."""

    def __init__(self, period_s: float = 0.002) -> None:
        self.period_s, self.peak, self._stop = period_s, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self) -> RssPeak:
        self._base = self.peak = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_bytes(self) -> int:
        return self.peak - self._base


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.machine()
    return f"{model} ({os.cpu_count()} cores)"


def to_numpy(outputs: tuple) -> Outputs:
    return tuple(o.cpu().numpy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in outputs)


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int, keep_all: bool = False) -> dict[str, Any]:
    """Wall time of `repeats` calls of `fn`, each until the GPU is idle, after `warmup` calls (CUDA): median,
    minimum, 10th and 90th percentiles in ms (and every call's time, sorted, under "all_ms" with `keep_all`)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    summary = {**percentiles(times), "runs": repeats}
    return {**summary, "all_ms": times} if keep_all else summary


def percentiles(times: list[float]) -> dict[str, float]:
    """Median, minimum, 10th and 90th percentiles of call times in ms."""
    times = sorted(times)
    return {"median_ms": statistics.median(times), "min_ms": times[0], "p10_ms": times[len(times) // 10],
            "p90_ms": times[(9 * len(times)) // 10]}  # fmt: skip


def timed_runs(fn: Callable[[], tuple], device: torch.device, warmup: Callable[[], tuple], repeats: int) -> dict:
    """Warm up, then `repeats` timed calls; returns times (ms), the last outputs and the peak extra memory."""
    warmup()
    times, outputs = [], []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
            outputs.append(to_numpy(out))
        peak = torch.cuda.max_memory_allocated() - base
    else:  # CPU memory is measured in a child process (see memory_in_child)
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
            outputs.append(to_numpy(out))
        peak = -1
    return {"times_ms": times, "outputs": outputs, "peak_bytes": peak}


def memory_in_child(kind: str, args: argparse.Namespace) -> int:
    """Peak extra RSS (bytes) of one untimed `kind` run ('reference' or 'fast') in a fresh CPU process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    options = {"--memory-child": kind, "--height": args.height, "--width": args.width,
               "--subsample": args.subsample, "--block-size": args.block_size, "--threads": args.threads}  # fmt: skip
    cmd = [sys.executable, __file__, "--device", "cpu"]
    cmd += [str(x) for flag, value in options.items() if value for x in (flag, value)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"])


def run_memory_child(args: argparse.Namespace) -> int:
    d1, d2 = smooth_maps(args.height, args.width, 2)
    small = smooth_maps(96, 128, 2, seed=1)

    def fn(a: torch.Tensor, b: torch.Tensor) -> tuple:
        if args.memory_child == "reference":
            return reciprocal_nn_reference(a, b, args.subsample, block_size=args.block_size)
        return fast_reciprocal_nn(a, b, args.subsample, block_size=args.block_size)

    fn(*small)
    with RssPeak() as rss:
        fn(d1, d2)
    sys.stdout.write(json.dumps({"peak_extra_bytes": rss.extra_bytes}) + "\n")
    return 0


def same(a: Outputs, b: Outputs) -> bool:
    return all(x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def bench_case(name: str, ref_fn: Callable, fast_fn: Callable, small: tuple, full: tuple, args: argparse.Namespace,
               device: torch.device) -> dict:  # fmt: skip
    """Time the reference and the fast matcher on `full` inputs (warm-up on `small`) and compare outputs."""
    log.info("%s: reference ...", name)
    ref = timed_runs(lambda: ref_fn(*full), device, lambda: ref_fn(*small), args.ref_repeats)
    log.info("%s: fast ...", name)
    fast = timed_runs(lambda: fast_fn(*full), device, lambda: fast_fn(*small), args.repeats)
    expected = ref["outputs"][0]
    identical = all(same(o, expected) for o in ref["outputs"] + fast["outputs"])
    row: dict = {"case": name, "identical": identical, "matches": len(expected[0])}
    for key, res in (("reference", ref), ("fast", fast)):
        row[key] = {
            "median_ms": statistics.median(res["times_ms"]),
            "min_ms": min(res["times_ms"]),
            "runs": len(res["times_ms"]),
            "peak_extra_mib": res["peak_bytes"] / 2**20,
        }
    row["speedup_median"] = row["reference"]["median_ms"] / row["fast"]["median_ms"]
    return row


def agreement(name: str, fn: Callable, exact_fn: Callable, full: tuple, args: argparse.Namespace,
              device: torch.device) -> dict:  # fmt: skip
    """Timing of an inexact option (fp16) and the share of the exact matches it reproduces."""
    res = timed_runs(lambda: fn(*full), device, lambda: fn(*full), args.repeats)
    exact = to_numpy(exact_fn(*full))
    got = res["outputs"][0]
    pairs = {tuple(r) for r in np.concatenate(exact[:2], axis=1).tolist()}
    got_pairs = {tuple(r) for r in np.concatenate(got[:2], axis=1).tolist()}
    return {
        "case": name,
        "median_ms": statistics.median(res["times_ms"]),
        "min_ms": min(res["times_ms"]),
        "matches": len(got_pairs),
        "shared_with_fp32": len(pairs & got_pairs) / max(len(pairs), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--subsample", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, help="timed fast runs (default 20 on GPU, 2 on CPU)")
    parser.add_argument("--ref-repeats", type=int, help="timed reference runs (default 5 on GPU, 2 on CPU)")
    parser.add_argument("--symmetric", action="store_true", default=None, help="also time extract_correspondences")
    parser.add_argument("--fp16", action="store_true", default=None, help="also time the fp16 option (inexact)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default 1 on CPU, see the docstring)")
    parser.add_argument("--memory-child", choices=("reference", "fast"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cpu" and not args.threads:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return run_memory_child(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    args.repeats = args.repeats or (20 if on_gpu else 3)
    args.ref_repeats = args.ref_repeats or (5 if on_gpu else 2)
    args.symmetric = on_gpu if args.symmetric is None else args.symmetric
    args.fp16 = on_gpu if args.fp16 is None else args.fp16
    load_before = os.getloadavg()[0]

    maps = [m.to(device) for m in smooth_maps(args.height, args.width, 4 if args.symmetric else 2)]
    small = [m.to(device) for m in smooth_maps(96, 128, 4 if args.symmetric else 2, seed=1)]
    s, bs = args.subsample, args.block_size

    def ref_pair(d1: torch.Tensor, d2: torch.Tensor) -> tuple:
        return reciprocal_nn_reference(d1, d2, s, block_size=bs, device=device)

    def fast_pair(d1: torch.Tensor, d2: torch.Tensor) -> tuple:
        return fast_reciprocal_nn(d1, d2, s, block_size=bs)

    rows = [bench_case("pair 1->2", ref_pair, fast_pair, tuple(small[:2]), tuple(maps[:2]), args, device)]
    if not on_gpu:
        log.info("pair 1->2: peak memory of one run of each, in child processes ...")
        for key in ("reference", "fast"):
            rows[0][key]["peak_extra_mib"] = memory_in_child(key, args) / 2**20
    if args.symmetric:
        gen = torch.Generator().manual_seed(2)
        confs = [(1 + torch.rand(args.height, args.width, generator=gen)).to(device) for _ in range(4)]
        small_confs = [(1 + torch.rand(96, 128, generator=gen)).to(device) for _ in range(4)]

        def ref_sym(descs: list, qconfs: list) -> tuple:
            return extract_correspondences_reference(descs, qconfs, s, block_size=bs, device=device)

        def fast_sym(descs: list, qconfs: list) -> tuple:
            return extract_correspondences(descs, qconfs, s, MatchConfig(block_size=bs))

        rows.append(bench_case("symmetric (4 maps)", ref_sym, fast_sym, (small, small_confs), (maps, confs), args,
                               device))  # fmt: skip
    extras = []
    if args.fp16:
        extras.append(agreement(
            "pair 1->2 fp16", lambda a, b: fast_reciprocal_nn(a, b, s, block_size=bs, precision="fp16"),
            fast_pair, tuple(maps[:2]), args, device,
        ))  # fmt: skip

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(device) if on_gpu else cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
        "torch": torch.__version__,
        "shape": [args.height, args.width, 24],
        "subsample": s,
        "block_size": bs,
        "rows": rows,
        "inexact_options": extras,
    }
    header = ("case", "ref median ms", "ref min ms", "fast median ms", "fast min ms", "speedup", "matches",
              "identical", "ref peak MiB", "fast peak MiB")  # fmt: skip
    table = [header]
    for r in rows:
        ref, fast = r["reference"], r["fast"]
        table.append((r["case"], f"{ref['median_ms']:.1f}", f"{ref['min_ms']:.1f}", f"{fast['median_ms']:.1f}",
                      f"{fast['min_ms']:.1f}", f"{r['speedup_median']:.2f}x", str(r["matches"]), str(r["identical"]),
                      f"{ref['peak_extra_mib']:.1f}", f"{fast['peak_extra_mib']:.1f}"))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    log.info("\n%s: %dx%d maps, D=24, subsample %d, block %d, %d torch threads", result["device"], args.width,
             args.height, s, bs, result["torch_threads"])  # fmt: skip
    for row in table:
        log.info("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    for e in extras:
        log.info("%s: median %.1f ms, min %.1f ms, %d matches, %.1f %% shared with fp32", e["case"], e["median_ms"],
                 e["min_ms"], e["matches"], 100 * e["shared_with_fp32"])  # fmt: skip
    (HERE / "out").mkdir(exist_ok=True)
    target = HERE / "out" / f"fastnn_{device.type}.json"
    target.write_text(json.dumps(result, indent=2) + "\n")
    log.info("written: %s", target)
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
