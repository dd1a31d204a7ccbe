#!/usr/bin/env python3
"""Where ``SegmentSession.set_volume``'s time goes before the encoder: the volume's copy to the GPU and the
crop + z-normalisation on it. Needs torch with CUDA only (no artifact, no ONNX Runtime).

    python3 bench/volume_upload_bench.py [--out DIR] [--reps 50]

Rows, for a 160^3 float32 volume (16 MiB) and a 256^3 int16 one (32 MiB), every timing waiting for the GPU:
- the plain copy, ``tensor.to("cuda")`` from pageable memory (what set_volume did before);
- the staged copy, ``export_engine.runners.host_copy.to_device``, with chunks of 1, 2, 4 and 8 MiB;
- the ideal: the same bytes from a pinned tensor (a bound, not a path a caller's numpy array takes);
- crop + z-normalise on the device with its check (``preprocess_tensor`` + ``check_preprocessed``);
- the two together as set_volume runs them (staged copy, then the pre-processing).
Prints a table, writes ``volume_upload_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    import torch

    from export_engine.calibration.synthetic import structured_volume
    from export_engine.families.fastsam3d.preprocess import check_preprocessed, preprocess_tensor
    from export_engine.runners.host_copy import to_device

    if not torch.cuda.is_available():
        print("volume_upload_bench: needs a CUDA GPU (torch built with CUDA)", file=sys.stderr)
        return 2

    def timed(fn: Any) -> dict[str, float]:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        a = np.asarray(times)
        return {"p50_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)), "min_ms": float(a.min())}

    volumes = {
        "160^3 float32": structured_volume(160, seed=1),
        "256^3 int16": np.clip(structured_volume(256, seed=2), 0, 3000).astype(np.int16),
    }

    def rows_for(name: str, array: np.ndarray) -> list[dict[str, Any]]:
        host = torch.from_numpy(array)
        mib = host.numel() * host.element_size() / 2**20
        out = [{"volume": name, "case": "plain copy, pageable (tensor.to)", **timed(lambda: host.to("cuda"))}]
        for chunk in (1, 2, 4, 8):
            out.append({"volume": name, "case": f"staged copy, chunks of {chunk} MiB",
                        **timed(lambda c=chunk: to_device(host, "cuda", chunk_bytes=c << 20))})  # fmt: skip
        pinned = host.pin_memory()
        out.append({"volume": name, "case": "bound: from a pinned tensor",
                    **timed(lambda: pinned.to("cuda", non_blocking=True))})  # fmt: skip
        on_device = host.to("cuda")
        out.append({"volume": name, "case": "crop + z-normalise on the device, checked",
                    **timed(lambda: check_preprocessed(preprocess_tensor(on_device, 128)))})  # fmt: skip
        out.append({"volume": name, "case": "staged copy + crop + z-normalise (set_volume less the encoder)",
                    **timed(lambda: check_preprocessed(preprocess_tensor(to_device(host, "cuda"), 128)))})  # fmt: skip
        for row in out:
            copies = ("copy" in row["case"] and "normalise" not in row["case"]) or "bound" in row["case"]
            row["GB_s"] = mib * 2**20 / 1e9 / (row["p50_ms"] / 1e3) if copies else None
        return out

    rows = [row for name, array in volumes.items() for row in rows_for(name, array)]
    device = torch.cuda.get_device_name()
    print(
        f"\nvolume upload, {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {args.reps} reps"
    )
    print(f"{'volume':<15} {'case':<66} {'p50 ms':>8} {'p90 ms':>8} {'min ms':>8} {'GB/s':>6}")
    for row in rows:
        rate = f"{row['GB_s']:.1f}" if row["GB_s"] else ""
        print(
            f"{row['volume']:<15} {row['case']:<66} "
            f"{row['p50_ms']:8.3f} {row['p90_ms']:8.3f} {row['min_ms']:8.3f} {rate:>6}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "host": platform.node(), "reps": args.reps, "rows": rows}  # fmt: skip
    (args.out / "volume_upload_bench.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
