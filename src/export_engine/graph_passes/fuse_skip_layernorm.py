"""Residual add (+ bias) + LayerNorm as ONNX Runtime's ``com.microsoft.SkipLayerNormalization`` (ORT copies only).

A pre-norm transformer block ends ``x = x + (h @ W + b)`` and the next one starts with ``LayerNorm(x)``: three
element-wise passes (bias, residual, normalisation) over the token matrix, each a kernel on ONNX Runtime's CUDA
provider. ``SkipLayerNormalization(h @ W, x, scale, shift, b)`` does all three in one, returning the normalised
rows and (its fourth output) the sum itself for the residual stream. Statistics are in FP32 for FP16 inputs, and
the sum feeding them is not rounded to FP16 first (closer to FP32, not further).

Rewritten: a LayerNormalization over the last axis of a rank-3 tensor that is the sum of two variables of the
same rank; the bias is folded in when one addend is itself ``variable + constant 1-D bias`` used only here.
Anything else is skipped with the reason. Run :mod:`fold_norm_casts` first on hybrid graphs, so that the
LayerNorms read the FP16 sum directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from export_engine.graph_passes.base import PassReport, next_index, node_name, producer, timed

PASS = "fuse_skip_layernorm"
DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class FuseSkipLayerNormConfig:
    fold_bias: bool = True  # fold a constant 1-D bias add of one addend into the fused node


def fuse_skip_layernorm(graph: gs.Graph, config: FuseSkipLayerNormConfig) -> PassReport:
    report = PassReport(PASS)
    with timed(report):
        index = next_index(graph, PASS)
        for ln in [n for n in graph.nodes if n.op == "LayerNormalization"]:
            x = ln.inputs[0]
            add = producer(x, "Add")
            if add is None:
                continue
            report.matched += 1
            reason = _problem(ln, add)
            if reason:
                report.skipped.append(f"{ln.name}: {reason}")
                continue
            _rewrite(graph, ln, add, config, node_name(PASS, index))
            index += 1
            report.rewritten += 1
        graph.cleanup().toposort()
    return report


def _problem(ln: gs.Node, add: gs.Node) -> str | None:
    if len(ln.outputs) != 1:
        return "uses the mean / inverse-std outputs"
    a, b = add.inputs
    if isinstance(a, gs.Constant) or isinstance(b, gs.Constant):
        return "one addend is a constant"
    shapes = [t.shape for t in (a, b, ln.inputs[0])]
    if any(s is None or len(s) != 3 for s in shapes):
        return "the sum and its addends are not all rank 3 (B, S, hidden)"
    if not all(isinstance(s[-1], int) and s[-1] == shapes[0][-1] for s in shapes):
        return "addends differ in their hidden size"
    if int(ln.attrs.get("axis", -1)) not in (-1, 2):
        return "normalises over more than the last axis"
    dtypes = {np.dtype(t.dtype) for t in (a, b, ln.outputs[0]) if t.dtype is not None}
    if len(dtypes) != 1:
        return f"mixed dtypes {sorted(str(d) for d in dtypes)}"
    for weight in ln.inputs[1:]:
        if weight.name and not isinstance(weight, gs.Constant):
            return "scale or bias is not a constant"
    return None


def _bias_split(tensor: gs.Tensor, add: gs.Node) -> tuple[gs.Tensor, gs.Constant] | None:
    """(variable, bias) when ``tensor`` is ``variable + constant 1-D bias`` consumed only by ``add``."""
    if not (isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Add"):
        return None
    if [c for c in tensor.outputs] != [add]:
        return None
    inner = tensor.inputs[0]
    constants = [t for t in inner.inputs if isinstance(t, gs.Constant)]
    values = [t for t in inner.inputs if not isinstance(t, gs.Constant)]
    if len(constants) != 1 or len(values) != 1 or constants[0].values.ndim != 1:
        return None
    if values[0].shape is None or len(values[0].shape) != 3 or constants[0].values.dtype != np.dtype(values[0].dtype):
        return None
    return values[0], constants[0]


def _rewrite(graph: gs.Graph, ln: gs.Node, add: gs.Node, config: FuseSkipLayerNormConfig, name: str) -> None:
    a, b = add.inputs
    value, skip, bias = a, b, None
    if config.fold_bias:
        for first, second in ((a, b), (b, a)):
            split = _bias_split(first, add)
            if split is not None:
                (value, bias), skip = split, second
                break
    total = add.outputs[0]
    scale = ln.inputs[1]
    shift = ln.inputs[2] if len(ln.inputs) > 2 and ln.inputs[2].name else gs.Variable.empty()
    inputs = [value, skip, scale, shift] + ([bias] if bias is not None else [])
    outputs = [ln.outputs[0]]
    others = [c for c in total.outputs if c is not ln]
    if others:  # the residual stream continues from the fused node's sum output
        add.outputs.clear()
        outputs += [gs.Variable.empty(), gs.Variable.empty(), total]
    ln.outputs.clear()
    attrs = {"epsilon": float(ln.attrs.get("epsilon", 1e-5))}
    graph.nodes.append(gs.Node("SkipLayerNormalization", name=name, domain=DOMAIN, attrs=attrs, inputs=inputs,
                               outputs=outputs))  # fmt: skip
