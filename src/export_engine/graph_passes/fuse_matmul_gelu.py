"""A transformer MLP's first layer with its GELU as export-engine's ``MatMulBiasGelu`` (ONNX Runtime copies only).

After ``fuse_bias_gelu`` the first MLP layer runs as a MatMul and a ``BiasGelu``: the MatMul writes the block's
widest activation (4x the model width), and BiasGelu reads it and writes it again. ``MatMulBiasGelu`` is one
cuBLASLt matmul whose epilogue adds the bias and applies GELU, so that activation is written once. Its GELU is the
tanh form (the one the epilogue has), which differs from the exact GELU by at most 4.7e-4 (at x = 2.7, where
float16 values are 2e-3 apart); the runner's self-check compares the rewritten graph with the artifact's stored
FP32 outputs before using it.

Rewritten: a float16 MatMul of a variable (..., K) by a constant (K, N) whose product feeds only a ``BiasGelu``
(or a ``Gelu``, exact or tanh, of a bias Add) with a constant (N,) bias. Others are skipped with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from export_engine.graph_passes.base import OWN_DOMAIN as DOMAIN
from export_engine.graph_passes.base import PassReport, next_index, node_name, producer, timed

PASS = "fuse_matmul_gelu"


@dataclass(frozen=True)
class FuseMatMulGeluConfig:
    pass


def fuse_matmul_gelu(graph: gs.Graph, config: FuseMatMulGeluConfig) -> PassReport:
    report = PassReport(PASS)
    with timed(report):
        index = next_index(graph, PASS)
        outputs = {t.name for t in graph.outputs}
        for gelu in [n for n in graph.nodes if _is_gelu(n)]:
            operands = _gelu_operands(gelu)
            if operands is None:
                continue  # GELU of something other than a MatMul's bias sum: not this pass's pattern
            report.matched += 1
            if isinstance(operands, str):
                report.skipped.append(f"{gelu.name}: {operands}")
                continue
            value, bias = operands
            matmul = producer(value, "MatMul")
            assert matmul is not None  # _gelu_operands only returns products of a MatMul
            why = _problem(matmul, bias, outputs)
            if why:
                report.skipped.append(f"{gelu.name}: {why}")
                continue
            out = gelu.outputs[0]
            gelu.outputs.clear()
            x, w = matmul.inputs
            graph.nodes.append(gs.Node("MatMulBiasGelu", name=node_name(PASS, index), domain=DOMAIN,
                                       inputs=[x, w, bias], outputs=[out]))  # fmt: skip
            index += 1
            report.rewritten += 1
        graph.cleanup().toposort()
    return report


def _is_gelu(node: gs.Node) -> bool:
    return (node.op == "BiasGelu" and node.domain == "com.microsoft") or (
        node.op == "Gelu" and node.domain in (None, "", "ai.onnx")
    )


def _gelu_operands(gelu: gs.Node) -> tuple[gs.Tensor, gs.Tensor] | str | None:
    """(the pre-bias product, the bias) of a BiasGelu or of a Gelu of a bias Add; why not; None: no bias Add."""
    if gelu.op == "BiasGelu":
        return (gelu.inputs[0], gelu.inputs[1]) if producer(gelu.inputs[0], "MatMul") is not None else None
    add = producer(gelu.inputs[0], "Add")
    if add is None:
        return None
    values = [t for t in add.inputs if not isinstance(t, gs.Constant)]
    if len(values) != 1 or producer(values[0], "MatMul") is None:
        return None
    if len(add.outputs[0].outputs) != 1:
        return "the bias sum has other consumers"
    bias = next(t for t in add.inputs if isinstance(t, gs.Constant))
    return values[0], bias


def _problem(matmul: gs.Node, bias: gs.Tensor, graph_outputs: set[str]) -> str | None:
    x, w = matmul.inputs
    product = matmul.outputs[0]
    if product.name in graph_outputs or len(product.outputs) != 1:
        return "the product has other consumers"
    consumer = product.outputs[0]
    if consumer.op == "Add" and consumer.outputs[0].name in graph_outputs:
        return "the bias sum is a graph output"
    if isinstance(x, gs.Constant) and not isinstance(w, gs.Constant):
        return "the constant is the left operand"
    if not isinstance(w, gs.Constant) or w.values.ndim != 2:
        return "the weight is not a constant matrix"
    if isinstance(x, gs.Constant):
        return "the left operand is a constant"
    if not isinstance(bias, gs.Constant) or bias.values.shape != (w.values.shape[1],):
        return f"the bias is not a constant vector of {w.values.shape[1]} values"
    types = (w.values.dtype, bias.values.dtype, *([x.dtype] if x.dtype is not None else []))
    if any(t != np.float16 for t in types):
        return f"types {sorted({str(t) for t in types})}: the operator is float16 only"
    if x.shape is not None and isinstance(x.shape[-1], int) and x.shape[-1] != w.values.shape[0]:
        return f"the input's last axis {x.shape[-1]} is not the weight's {w.values.shape[0]} rows"
    return None
