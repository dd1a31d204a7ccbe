"""A convolution's bias with the ReLU or residual Add after it, as export-engine's ``BiasActivation`` (ONNX
Runtime copies only).

ONNX Runtime's CUDA ``Conv`` adds its bias with a cuDNN kernel of its own after the convolution, and the ReLU or
the residual Add that follows (DPT's residual convolution units: ReLU, Conv, ReLU, Conv, Add) is one more
element-wise pass over the same tensor. This pass removes the bias from the ``Conv`` and writes

    Conv(x, W) -> BiasActivation(y, b, relu=1)              for Conv(x, W, b) -> Relu
    Conv(x, W) -> BiasActivation(y, b, residual, relu=0)    for Conv(x, W, b) -> Add(., residual)

so each pair is one pass. ``BiasActivation`` is in export-engine's operator library
(``export_engine.runners.ort_ops``), which the runner registers; the artifact keeps the standard ops that
TensorRT fuses itself. Only a constant 1-D bias, a convolution whose output has that one consumer, and a residual
of the convolution's own shape and type are rewritten (dims equal where static; where both are named, the names
may differ, and the kernel checks the shapes when it runs: no broadcasting); others are skipped with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from export_engine.graph_passes.base import OWN_DOMAIN as DOMAIN
from export_engine.graph_passes.base import PassReport, next_index, node_name, timed

PASS = "fuse_conv_epilogue"


@dataclass(frozen=True)
class FuseConvEpilogueConfig:
    pass


def fuse_conv_epilogue(graph: gs.Graph, config: FuseConvEpilogueConfig) -> PassReport:
    report = PassReport(PASS)
    with timed(report):
        index = next_index(graph, PASS)
        outputs = {t.name for t in graph.outputs}
        for conv in [n for n in graph.nodes if n.op == "Conv" and n.domain in (None, "", "ai.onnx")]:
            if len(conv.inputs) < 3 or not conv.inputs[2].name:
                continue  # no bias: nothing to move
            report.matched += 1
            plan = _plan(conv, outputs)
            if isinstance(plan, str):
                report.skipped.append(f"{conv.name}: {plan}")
                continue
            follower, residual = plan
            bias = conv.inputs[2]
            conv.inputs.pop(2)
            out = follower.outputs[0]
            follower.outputs.clear()
            inputs = [conv.outputs[0], bias, *([residual] if residual is not None else [])]
            graph.nodes.append(gs.Node("BiasActivation", name=node_name(PASS, index), domain=DOMAIN, inputs=inputs,
                                       outputs=[out], attrs={"relu": int(follower.op == "Relu")}))  # fmt: skip
            index += 1
            report.rewritten += 1
        graph.cleanup().toposort()
    return report


def _plan(conv: gs.Node, graph_outputs: set[str]) -> tuple[gs.Node, gs.Tensor | None] | str:
    """(the follower node, the residual or None), or why this convolution is left alone."""
    y, bias = conv.outputs[0], conv.inputs[2]
    if not isinstance(bias, gs.Constant) or bias.values.ndim != 1:
        return "bias is not a constant vector"
    if y.name in graph_outputs or len(y.outputs) != 1:
        return "the convolution's output has other consumers"
    if y.dtype is not None and np.dtype(y.dtype) != bias.values.dtype:
        return f"bias dtype {bias.values.dtype} differs from the output's {np.dtype(y.dtype)}"
    follower = y.outputs[0]
    if follower.op == "Relu":
        return follower, None
    if follower.op != "Add" or len(follower.inputs) != 2:
        return f"followed by {follower.op}, not Relu or a residual Add"
    residual = follower.inputs[1] if follower.inputs[0] is y else follower.inputs[0]
    if residual is y or isinstance(residual, gs.Constant):
        return "the Add is not a residual (a constant or the output itself)"
    if not _same_shape(y.shape, residual.shape):
        return f"residual shape {residual.shape} is not the convolution's {y.shape}"
    if residual.dtype is not None and y.dtype is not None and np.dtype(residual.dtype) != np.dtype(y.dtype):
        return "residual type differs from the convolution's"
    return follower, residual


def _same_shape(a: list | None, b: list | None) -> bool:
    """Equal rank, equal static dims, and named dims only against named dims (their values are checked at run
    time: exporters name one batch dimension differently along different paths)."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(x == y if isinstance(x, int) or isinstance(y, int) else True for x, y in zip(a, b, strict=True))
