"""Rewrite stride-1 2-D convolutions as im2col + one MatMul (ONNX Runtime-bound copies only).

Measured on an H100 (ONNX Runtime 1.31.1 CUDA, FP16, bench/RESULTS.md): the 3x3 convolutions of MASt3R's DPT
heads ran on cuDNN's generic ``implicit_convolve_sgemm`` kernels (cuDNN's frontend found no execution plan),
15.5 of the 30 ms of GPU time per pair (10.5 ms in one kernel variant). As a matrix product the same
arithmetic could run on tensor cores:

    X (B, C, H, W) -> NHWC -> Pad -> kh*kw shifted Slices -> Concat (B, H', W', kh*kw*C) @ W' (kh*kw*C, O) + b
      -> (B, H', W', O) -> NCHW

It moves kh*kw copies of the input through memory, so it pays off only where the convolution kernel is very
slow. Measured there (bench/conv_microbench.py, batch 1): it is not: cuDNN 2.22 / 0.62 / 1.16 / 2.27 ms against
im2col 2.36 / 0.70 / 2.37 / 4.63 ms for the 256->256 (1/2 and 1/4 resolution), 256->128 and full-resolution
128->128 layers, so the runner leaves it off by default; the pass stays for other GPUs and libraries.

Exact up to summation order; only group-1, dilation-1, stride-1 convolutions with constant
weights and static spatial sizes are rewritten, 1x1 included only when ``include_1x1``. Applied in memory by
:mod:`export_engine.runners.ort_cuda`, never to the artifact's files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from export_engine.graph_passes.base import NodeBuilder, PassReport, conv_operand_problem, next_index, timed

PASS = "lower_conv_im2col"


@dataclass(frozen=True)
class LowerConvIm2colConfig:
    min_output_pixels: int = 0  # leave convolutions with smaller outputs (H' x W') to the convolution kernels
    include_1x1: bool = False


def lower_conv_im2col(graph: gs.Graph, config: LowerConvIm2colConfig) -> PassReport:
    report = PassReport(PASS)
    with timed(report):
        index = next_index(graph, PASS)
        for node in [n for n in graph.nodes if n.op == "Conv"]:
            reason = _unsupported(node, config)
            if reason is None:
                report.matched += 1
                index = _rewrite(graph, node, index)
                report.rewritten += 1
            elif reason != "out of scope":
                report.matched += 1
                report.skipped.append(f"{node.name}: {reason}")
        graph.cleanup().toposort()
    return report


def _unsupported(node: gs.Node, config: LowerConvIm2colConfig) -> str | None:
    x, weight = node.inputs[0], node.inputs[1]
    if x.shape is None or len(x.shape) != 4 or not isinstance(weight, gs.Constant):
        return "out of scope"
    kh, kw = weight.shape[2:]
    if any(s != 1 for s in node.attrs.get("strides", [1, 1])) or ((kh, kw) == (1, 1) and not config.include_1x1):
        return "out of scope"
    if int(node.attrs.get("group", 1)) != 1 or any(d != 1 for d in node.attrs.get("dilations", [1, 1])):
        return "grouped or dilated"
    if node.attrs.get("auto_pad", "NOTSET") != "NOTSET":
        return "auto_pad"
    if not all(isinstance(d, int) for d in x.shape[1:]):
        return "input shape is not static"
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    height, width = x.shape[2] + pads[0] + pads[2] - kh + 1, x.shape[3] + pads[1] + pads[3] - kw + 1
    if height * width < config.min_output_pixels:
        return "out of scope"
    return conv_operand_problem(node)


def _rewrite(graph: gs.Graph, node: gs.Node, index: int) -> int:
    x, weight = node.inputs[0], node.inputs[1]
    w = weight.values  # (O, C, kh, kw)
    out_ch, channels, kh, kw = w.shape
    pads = [int(p) for p in node.attrs.get("pads", [0, 0, 0, 0])]  # top, left, bottom, right
    height, width = x.shape[2] + pads[0] + pads[2] - kh + 1, x.shape[3] + pads[1] + pads[3] - kw + 1
    b = NodeBuilder(graph, PASS, index, x.dtype)
    nhwc = b.add("Transpose", [x], {"perm": [0, 2, 3, 1]})
    if any(pads):
        spatial_pads = np.asarray([0, pads[0], pads[1], 0, 0, pads[2], pads[3], 0], dtype=np.int64)  # NHWC order
        nhwc = b.add("Pad", [nhwc, b.const("pads", spatial_pads)])
    if (kh, kw) == (1, 1):
        columns = nhwc
    else:
        shifted = []
        for dy in range(kh):
            for dx in range(kw):
                starts = b.const("starts", np.asarray([dy, dx], np.int64))
                ends = b.const("ends", np.asarray([dy + height, dx + width], np.int64))
                shifted.append(b.add("Slice", [nhwc, starts, ends, b.const("axes", np.asarray([1, 2], np.int64))]))
        columns = b.add("Concat", shifted, {"axis": 3})  # (B, H', W', kh*kw*C), (dy, dx) outer, channel inner
    matrix = w.transpose(2, 3, 1, 0).reshape(kh * kw * channels, out_ch)
    product = b.add("MatMul", [columns, b.const("weight", matrix)])
    if len(node.inputs) > 2 and node.inputs[2].name:
        product = b.add("Add", [product, b.const("bias", node.inputs[2].values)])
    result = node.outputs[0]
    node.outputs.clear()
    b.add("Transpose", [product], {"perm": [0, 3, 1, 2]}, out=result)
    return b.index
