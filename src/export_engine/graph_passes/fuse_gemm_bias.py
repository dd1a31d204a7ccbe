"""Projection + bias as one ``Gemm`` (ONNX Runtime-bound copies only).

A linear layer exports as ``MatMul(x, W) -> Add(b)``: on ONNX Runtime's CUDA provider the Add is an element-wise
kernel that reads the whole product back and writes it again (MASt3R: 24 packed q/k/v projections in the
encoder, ~100 projections in the decoders). ``Gemm(x, W, b)`` computes the same thing with the bias in the
matrix product's epilogue (the provider broadcasts the bias into the output, then accumulates the product onto
it). ``Gemm`` takes 2-D operands, so an x of rank > 2 is reshaped to (tokens, K) and the result back to the
Add's output shape (reshapes are free: they alias their input).

Only a MatMul by a constant 2-D weight whose product feeds nothing but an Add of a constant 1-D bias over the
last axis, with at most one dynamic output dimension, is rewritten; others are skipped with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from export_engine.graph_passes.base import NodeBuilder, PassReport, next_index, producer, timed

PASS = "fuse_gemm_bias"


@dataclass(frozen=True)
class FuseGemmBiasConfig:
    pass


@dataclass
class _Match:
    add: gs.Node
    x: gs.Tensor
    weight: gs.Constant
    bias: gs.Constant


def fuse_gemm_bias(graph: gs.Graph, config: FuseGemmBiasConfig) -> PassReport:
    report = PassReport(PASS)
    with timed(report):
        index = next_index(graph, PASS)
        for add in [n for n in graph.nodes if n.op == "Add" and n.domain in (None, "", "ai.onnx")]:
            matmuls = [producer(t, "MatMul") for t in add.inputs]
            if not any(matmuls):
                continue
            report.matched += 1
            match = _match(add)
            if isinstance(match, str):
                report.skipped.append(f"{add.name}: {match}")
                continue
            index = _rewrite(graph, match, index)
            report.rewritten += 1
        graph.cleanup().toposort()
    return report


def _match(add: gs.Node) -> _Match | str:
    constants = [t for t in add.inputs if isinstance(t, gs.Constant)]
    products = [t for t in add.inputs if not isinstance(t, gs.Constant)]
    if len(constants) != 1 or len(products) != 1:
        return "not a product plus a constant bias"
    bias, product = constants[0], products[0]
    matmul = producer(product, "MatMul")
    if matmul is None:
        return "the bias is added to something other than a MatMul"
    if len(product.outputs) != 1:
        return "the product has other consumers"
    x, weight = matmul.inputs
    if not isinstance(weight, gs.Constant) or weight.values.ndim != 2:
        return "the MatMul's weight is not a constant 2-D matrix"
    k, n = weight.values.shape
    if bias.values.ndim != 1 or bias.values.shape[0] != n:
        return f"bias of shape {list(bias.values.shape)} is not 1-D over the {n} outputs"
    if bias.values.dtype != weight.values.dtype or (x.dtype is not None and x.dtype != weight.values.dtype):
        return "bias, weight and input differ in dtype"
    out = add.outputs[0]
    if x.shape is None or len(x.shape) < 2 or x.shape[-1] != k:
        return "input rank or last dimension unknown"
    if out.shape is None or sum(not isinstance(d, int) for d in out.shape) > 1:
        return "more than one output dimension is not static"
    return _Match(add, x, weight, bias)


def _rewrite(graph: gs.Graph, match: _Match, index: int) -> int:
    b = NodeBuilder(graph, PASS, index, match.weight.values.dtype)
    out = match.add.outputs[0]
    shape = [int(d) if isinstance(d, int) else -1 for d in out.shape]  # at most one -1 (see _match)
    match.add.outputs.clear()
    k = match.weight.values.shape[0]
    if len(shape) == 2:
        b.add("Gemm", [match.x, match.weight, match.bias], out=out)
        return b.index
    flat = b.reshape(match.x, [-1, k])
    product = b.add("Gemm", [flat, match.weight, match.bias])
    b.add("Reshape", [product, b.const("shape", np.asarray(shape, dtype=np.int64))], out=out)
    return b.index
