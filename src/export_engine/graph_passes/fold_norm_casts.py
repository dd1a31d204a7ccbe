"""Run LayerNorm "FP32 islands" on FP16 storage with FP32 statistics (ONNX Runtime-bound copies only).

Hybrid precision keeps every LayerNormalization in FP32: ``Cast(fp16 -> fp32) -> LayerNormalization ->
Cast(fp32 -> fp16)``. What the island protects is the statistics (mean and variance over a row in FP32); its
input was FP16 and its output is rounded to FP16 right after. ONNX Runtime's LayerNormalization on FP16 tensors
already accumulates in FP32 (``stash_type=1``, the default), so the same computation runs as one node on FP16
in and out, without the two Cast kernels and the FP32 round trip through memory:

    Cast(x16 -> fp32) -> LN(fp32 scale, bias) -> Cast(-> fp16)   =>   LN(x16, fp16 scale, bias, stash_type=1)

The only numerical change is scale and bias rounded to FP16 (relative 2^-11, below the output's own FP16
rounding); the runtime's load-time check compares the result against the artifact's FP32 reference. Shape-only
consumers of the FP32 output are moved to the FP16 one; an island whose FP32 output feeds anything else is
skipped with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from export_engine.graph_passes.base import PassReport, next_index, node_name, timed

PASS = "fold_norm_casts"
_SHAPE_ONLY = ("Shape", "Size")


@dataclass(frozen=True)
class FoldNormCastsConfig:
    stash_type: int = 1  # FP32 statistics


def fold_norm_casts(graph: gs.Graph, config: FoldNormCastsConfig) -> PassReport:
    report = PassReport(PASS)
    with timed(report):
        index = next_index(graph, PASS)
        for node in [n for n in graph.nodes if n.op == "LayerNormalization"]:
            source = _fp16_source(node)
            if source is None:
                continue
            report.matched += 1
            reason = _problem(node)
            if reason:
                report.skipped.append(f"{node.name}: {reason}")
                continue
            _rewrite(node, source, config, node_name(PASS, index))
            index += 1
            report.rewritten += 1
        graph.cleanup().toposort()
    return report


def _is_cast(node: gs.Node, to: int) -> bool:
    return node.op == "Cast" and int(node.attrs.get("to", -1)) == to


def _fp16_source(ln: gs.Node) -> gs.Tensor | None:
    """The FP16 tensor an FP32 LayerNorm island casts its input from, or None when ``ln`` is not one."""
    x = ln.inputs[0]
    if not (isinstance(x, gs.Variable) and len(x.inputs) == 1 and _is_cast(x.inputs[0], TensorProto.FLOAT)):
        return None
    source = x.inputs[0].inputs[0]
    return source if source.dtype is not None and np.dtype(source.dtype) == np.float16 else None


def _problem(ln: gs.Node) -> str | None:
    if len(ln.outputs) != 1:
        return "uses the mean / inverse-std outputs"
    consumers = ln.outputs[0].outputs
    casts = [c for c in consumers if _is_cast(c, TensorProto.FLOAT16)]
    others = [c.op for c in consumers if c not in casts and c.op not in _SHAPE_ONLY]
    if not casts:
        return "its output is not cast back to FP16"
    if others:
        return f"its FP32 output also feeds {sorted(set(others))}"
    for weight in ln.inputs[1:]:
        if weight.name and not isinstance(weight, gs.Constant):
            return "scale or bias is not a constant"
        if isinstance(weight, gs.Constant) and np.abs(weight.values).max(initial=0) > 65504:
            return "scale or bias overflows FP16"
    return None


def _rewrite(ln: gs.Node, source: gs.Tensor, config: FoldNormCastsConfig, name: str) -> None:
    consumers = list(ln.outputs[0].outputs)
    casts = [c for c in consumers if _is_cast(c, TensorProto.FLOAT16)]
    result = casts[0].outputs[0]
    for cast in casts[1:]:  # the same FP16 value cast twice: one tensor serves all their consumers
        for consumer in list(cast.outputs[0].outputs):
            consumer.inputs[consumer.inputs.index(cast.outputs[0])] = result
    for consumer in consumers:
        if consumer.op in _SHAPE_ONLY:
            consumer.inputs[0] = result
    for cast in casts:
        cast.outputs.clear()
    weights = [
        gs.Constant(f"{name}/{('scale', 'bias')[i]}", w.values.astype(np.float16)) if isinstance(w, gs.Constant) else w
        for i, w in enumerate(ln.inputs[1:])
    ]
    ln.inputs = [source, *weights]
    ln.outputs = [result]
    ln.attrs["stash_type"] = config.stash_type
    ln.name = name
