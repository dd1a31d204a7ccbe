"""Bias add + exact GELU as ONNX Runtime's ``com.microsoft.BiasGelu`` (ONNX Runtime-bound copies only).

Every transformer MLP computes ``Gelu(x @ W1 + b1)``: the bias Add and the GELU are two element-wise passes
over the widest activation of the block (4x the model width). ``BiasGelu(x @ W1, b1)`` is one, with the same
exact (erf) GELU. Only ``approximate="none"`` GELU, a constant 1-D bias over the last axis and an Add whose
only consumer is the GELU are rewritten; others are skipped with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from export_engine.graph_passes.base import PassReport, next_index, node_name, producer, timed

PASS = "fuse_bias_gelu"
DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class FuseBiasGeluConfig:
    pass


def fuse_bias_gelu(graph: gs.Graph, config: FuseBiasGeluConfig) -> PassReport:
    report = PassReport(PASS)
    with timed(report):
        index = next_index(graph, PASS)
        for gelu in [n for n in graph.nodes if n.op == "Gelu" and n.domain in (None, "", "ai.onnx")]:
            x = gelu.inputs[0]
            add = producer(x, "Add")
            if add is None:
                continue
            report.matched += 1
            operands = _operands(add, gelu)
            if isinstance(operands, str):
                report.skipped.append(f"{gelu.name}: {operands}")
                continue
            value, bias = operands
            out = gelu.outputs[0]
            gelu.outputs.clear()
            fused = gs.Node("BiasGelu", name=node_name(PASS, index), domain=DOMAIN, inputs=[value, bias], outputs=[out])
            graph.nodes.append(fused)
            index += 1
            report.rewritten += 1
        graph.cleanup().toposort()
    return report


def _operands(add: gs.Node, gelu: gs.Node) -> tuple[gs.Tensor, gs.Constant] | str:
    if gelu.attrs.get("approximate", "none") not in ("none", b"none"):
        return "tanh-approximate GELU (BiasGelu is the exact one)"
    if len(add.outputs[0].outputs) != 1:
        return "the bias sum has other consumers"
    constants = [t for t in add.inputs if isinstance(t, gs.Constant)]
    values = [t for t in add.inputs if not isinstance(t, gs.Constant)]
    if len(constants) != 1 or len(values) != 1:
        return "not a variable plus a constant bias"
    bias, value = constants[0], values[0]
    if bias.values.ndim != 1:
        return f"bias of shape {list(bias.values.shape)} is not 1-D"
    if value.shape is not None and isinstance(value.shape[-1], int) and value.shape[-1] != bias.values.shape[0]:
        return f"bias length {bias.values.shape[0]} differs from the last axis {value.shape[-1]}"
    if value.dtype is not None and value.dtype != bias.values.dtype:
        return f"bias dtype {bias.values.dtype} differs from the input's {value.dtype}"
    return value, bias
