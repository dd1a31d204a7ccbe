"""Rewrite "patchify" convolutions (kernel == stride, no padding) as one MatMul (ONNX Runtime-bound copies only).

A Conv whose kernel equals its stride sees every input pixel exactly once: it is a matrix product of the
non-overlapping patches with the flattened kernel. ConvTranspose with kernel == stride is the reverse: every
input pixel becomes one output patch. Both appear in these models as patch embeddings (MASt3R 16x16, FastSAM3D
16^3) and as DPT's upsampling reassembly, and ONNX Runtime's CUDA provider runs them with slow direct cuDNN
kernels (measured on an H100, FP16: 1.8 ms for FastSAM3D's 16^3 patch embedding, bench/RESULTS.md), where the
same product as a GEMM takes microseconds.

    Conv:           X (B, C, S1..Sn) -> patches (B, prod(S/k), C*prod(k)) @ W' (C*prod(k), O) + b -> (B, O, S/k)
    ConvTranspose:  X (B, C, s1..sn) -> (B, prod(s), C) @ W' (C, O*prod(k)) -> patches -> (B, O, s*k) + b

Exact up to summation order. Only static spatial sizes and constant weights are rewritten; everything else is
skipped with the reason. Like :mod:`decompose_attention`, this is applied in memory by the ONNX Runtime runner,
never to the artifact's files (TensorRT picks its own convolution kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from export_engine.graph_passes.base import NodeBuilder, PassReport, conv_operand_problem, next_index, timed

PASS = "lower_patch_conv"


@dataclass(frozen=True)
class LowerPatchConvConfig:
    transpose: bool = True  # also ConvTranspose with kernel == stride


def lower_patch_conv(graph: gs.Graph, config: LowerPatchConvConfig) -> PassReport:
    report = PassReport(PASS)
    with timed(report):
        index = next_index(graph, PASS)
        ops = ("Conv", "ConvTranspose") if config.transpose else ("Conv",)
        for node in [n for n in graph.nodes if n.op in ops]:
            reason = _unsupported(node)
            if reason == "not a patch convolution":
                continue
            report.matched += 1
            if reason:
                report.skipped.append(f"{node.name}: {reason}")
                continue
            index = (_rewrite_conv if node.op == "Conv" else _rewrite_transpose)(graph, node, index)
            report.rewritten += 1
        graph.cleanup().toposort()
    return report


def _unsupported(node: gs.Node) -> str | None:
    weight = node.inputs[1]
    if not isinstance(weight, gs.Constant):
        return "not a patch convolution" if weight.shape is None else "weight is not a constant"
    kernel = list(weight.shape[2:])
    strides = list(node.attrs.get("strides", [1] * len(kernel)))
    if kernel != strides or all(k == 1 for k in kernel):
        return "not a patch convolution"
    if any(node.attrs.get("pads", [0])) or any(node.attrs.get("output_padding", [0])):
        return "padded"
    if int(node.attrs.get("group", 1)) != 1 or any(d != 1 for d in node.attrs.get("dilations", [1])):
        return "grouped or dilated"
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or node.attrs.get("output_shape"):
        return "auto_pad or output_shape set"
    x = node.inputs[0]
    if x.shape is None or len(x.shape) != len(kernel) + 2 or not all(isinstance(d, int) for d in x.shape[1:]):
        return "input spatial shape is not static"
    if node.op == "Conv" and any(s % k for s, k in zip(x.shape[2:], kernel, strict=True)):
        return "input size is not a multiple of the kernel"
    return conv_operand_problem(node)


def _rewrite_conv(graph: gs.Graph, node: gs.Node, index: int) -> int:
    x, weight = node.inputs[0], node.inputs[1]
    w = weight.values  # (O, C, k1..kn)
    out_ch, channels, kernel = w.shape[0], w.shape[1], list(w.shape[2:])
    n = len(kernel)
    grid = [s // k for s, k in zip(x.shape[2:], kernel, strict=True)]
    b = NodeBuilder(graph, PASS, index, x.dtype)
    # (B, C, g1, k1, ..., gn, kn) -> (B, g1..gn, C, k1..kn) -> (B, G, C*K)
    split = b.reshape(x, [0, channels] + [v for g, k in zip(grid, kernel, strict=True) for v in (g, k)])
    perm = [0] + [2 + 2 * i for i in range(n)] + [1] + [3 + 2 * i for i in range(n)]
    patches = b.reshape(b.add("Transpose", [split], {"perm": perm}), [0, int(np.prod(grid)), int(w[0].size)])
    product = b.add("MatMul", [patches, b.const("weight", w.reshape(out_ch, -1).T)])
    if len(node.inputs) > 2 and node.inputs[2].name:
        product = b.add("Add", [product, b.const("bias", node.inputs[2].values)])
    # (B, G, O) -> (B, g1..gn, O) -> (B, O, g1..gn)
    tokens = b.reshape(product, [0, *grid, out_ch])
    result = node.outputs[0]
    node.outputs.clear()
    b.add("Transpose", [tokens], {"perm": [0, n + 1, *range(1, n + 1)]}, out=result)
    return b.index


def _rewrite_transpose(graph: gs.Graph, node: gs.Node, index: int) -> int:
    x, weight = node.inputs[0], node.inputs[1]
    w = weight.values  # (C, O, k1..kn)
    channels, out_ch, kernel = w.shape[0], w.shape[1], list(w.shape[2:])
    n = len(kernel)
    grid = list(x.shape[2:])
    b = NodeBuilder(graph, PASS, index, x.dtype)
    # (B, C, s1..sn) -> (B, s1..sn, C) -> (B, S, C) @ (C, O*K) -> (B, s1..sn, O, k1..kn)
    pixels = b.reshape(b.add("Transpose", [x], {"perm": [0, *range(2, n + 2), 1]}), [0, int(np.prod(grid)), channels])
    product = b.add("MatMul", [pixels, b.const("weight", w.reshape(channels, -1))])
    blocks = b.reshape(product, [0, *grid, out_ch, *kernel])
    # -> (B, O, s1, k1, ..., sn, kn) -> (B, O, s1*k1, ..., sn*kn)
    perm = [0, n + 1] + [v for i in range(n) for v in (1 + i, n + 2 + i)]
    image = b.reshape(
        b.add("Transpose", [blocks], {"perm": perm}), [0, out_ch] + [s * k for s, k in zip(grid, kernel, strict=True)]
    )
    result = node.outputs[0]
    node.outputs.clear()
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = node.inputs[2].values.reshape(out_ch, *([1] * n))
        b.add("Add", [image, b.const("bias", bias)], out=result)
    else:
        b.add("Identity", [image], out=result)
    return b.index
