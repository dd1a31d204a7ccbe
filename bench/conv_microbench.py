#!/usr/bin/env python3
"""ONNX Runtime CUDA on single FP16 convolutions shaped like MASt3R's DPT head, as cuDNN runs them and lowered.

    python3 bench/conv_microbench.py [--out DIR]

Each case is a one-node graph (random weights, batch 1, one view) run by the project's CUDA runner with CUDA
graphs, once as is and once through lower_conv_im2col; the table gives the median time of each and the largest
difference between the two outputs. Prints a table and writes conv_microbench.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gpu_cases as cases  # noqa: E402

from export_engine.runners.ort_cuda import CudaGraphRunner, CudaSessionConfig  # noqa: E402

# (in channels, out channels, height, width): DPT fusion-block residual units at 1/2 and 1/4 resolution, the
# head's first convolution (1/2) and its full-resolution convolution (MASt3R at 512x384).
CASES = ((256, 256, 192, 256), (256, 256, 96, 128), (256, 128, 192, 256), (128, 128, 384, 512))


def conv_graph(folder: Path, c: int, o: int, h: int, w: int) -> tuple[Path, dict]:
    rng = np.random.default_rng(c + o + h)
    weight = (rng.standard_normal((o, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float16)
    bias = rng.standard_normal(o).astype(np.float16)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, c, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, o, h, w])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )  # fmt: skip
    path = folder / f"conv_{c}_{o}_{h}x{w}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    meta = {"inputs": [{"name": "x", "shape": [1, c, h, w], "dtype": "float16"}],
            "outputs": [{"name": "y", "shape": [1, o, h, w], "dtype": "float16"}]}  # fmt: skip
    return path, meta


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("conv_microbench: no CUDA GPU visible; run it on the device machine", file=sys.stderr)
        return 8
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for c, o, h, w in CASES:
            path, meta = conv_graph(Path(tmp), c, o, h, w)
            x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0)).half().cuda()
            row: dict = {"case": f"conv 3x3 {c}->{o} at {h}x{w}", "gflop": 2 * 9 * c * o * h * w / 1e9}
            outputs = {}
            for label, im2col in (("cudnn", False), ("im2col", True)):
                config = CudaSessionConfig(cuda_graph=True, patch_conv=False, im2col=im2col)
                runner = CudaGraphRunner(path, meta, config)
                timing = cases.time_calls(lambda r=runner, x=x: r.run({"x": x}, copy=False), 10, args.repeats)
                row[f"{label}_ms"] = timing["median_ms"]
                outputs[label] = runner.run({"x": x})["y"].float()
            row["max_abs_diff"] = float((outputs["cudnn"] - outputs["im2col"]).abs().max())
            row["speedup"] = row["cudnn_ms"] / row["im2col_ms"]
            rows.append(row)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conv_microbench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['device']}: ONNX Runtime CUDA, FP16, batch 1, CUDA graphs")
    print(f"{'case':<34} {'GFLOP':>6} {'cuDNN ms':>9} {'im2col ms':>10} {'speedup':>8} {'max |diff|':>11}")
    for r in rows:
        print(f"{r['case']:<34} {r['gflop']:>6.1f} {r['cudnn_ms']:>9.3f} {r['im2col_ms']:>10.3f} "
              f"{r['speedup']:>7.1f}x {r['max_abs_diff']:>11.2e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
