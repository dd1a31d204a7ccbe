"""Lower each standard ONNX ``Attention`` node back to MatMul / Softmax / MatMul (ONNX Runtime-bound copies only).

The artifact keeps fused ``Attention`` nodes: that is what TensorRT's importer turns into ``IAttention``. A
deployment that runs the ONNX on ONNX Runtime instead can pick the lowering that is fastest there
(:mod:`export_engine.runners.ort_cuda` applies it in memory when a session is created; the artifact's files
and hashes are untouched). This pass is the alternative to ONNX Runtime's own ``Attention`` kernels:

    Attention(Q, K, V[, mask], scale)  ->  Softmax(scale * Q @ Kᵀ [+ mask]) @ V

for 4-D Q/K/V ``(B, heads, S, head_dim)``, the form ``fuse_attention`` writes. When Q is FP16 the logits are
cast to FP32 for the softmax and its result back to FP16, which is what the fused kernels do (they keep the
softmax in FP32), so the lowered graph computes the same function at the same precision. The scale is applied
to Q before the product (head_dim elements per row instead of S_kv logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from export_engine.graph_passes.base import NodeBuilder, PassReport, next_index, timed

PASS = "decompose_attention"


@dataclass(frozen=True)
class DecomposeAttentionConfig:
    fp32_softmax: bool = True  # FP16 logits are softmaxed in FP32 (as the fused kernels do)


def decompose_attention(graph: gs.Graph, config: DecomposeAttentionConfig) -> PassReport:
    report = PassReport(PASS)
    with timed(report):
        index = next_index(graph, PASS)
        for node in [n for n in graph.nodes if n.op == "Attention" and n.domain in (None, "", "ai.onnx")]:
            report.matched += 1
            reason = _unsupported(node)
            if reason:
                report.skipped.append(f"{node.name}: {reason}")
                continue
            index = _rewrite(graph, node, index, config)
            report.rewritten += 1
        graph.cleanup().toposort()
    return report


def _unsupported(node: gs.Node) -> str | None:
    if len(node.outputs) > 1 or len(node.inputs) > 4:
        return "uses past key/value or extra outputs"
    if node.attrs.get("is_causal", 0) or node.attrs.get("softcap", 0.0):
        return "causal or soft-capped attention"
    ranks = {len(t.shape) for t in node.inputs[:3] if t.shape is not None}
    if ranks != {4}:
        return f"Q/K/V must be 4-D (B, heads, S, head_dim); ranks seen {sorted(ranks) or 'unknown'}"
    if node.attrs.get("scale") is None:
        return "no explicit scale (run fuse_attention first)"
    return None


def _rewrite(graph: gs.Graph, node: gs.Node, index: int, config: DecomposeAttentionConfig) -> int:
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    dtype = q.dtype if q.dtype is not None else np.float32

    b = NodeBuilder(graph, PASS, index, dtype)
    q_scaled = b.add("Mul", [q, b.const("scale", np.asarray(node.attrs["scale"], dtype=np.dtype(dtype)))])
    k_t = b.add("Transpose", [k], {"perm": [0, 1, 3, 2]})
    logits = b.add("MatMul", [q_scaled, k_t])
    if mask is not None:
        if mask.dtype == np.bool_:
            low = b.const("masked", np.asarray(np.finfo(np.dtype(dtype)).min, dtype))
            mask = b.add("Where", [mask, b.const("zero", np.asarray(0, dtype)), low])
        logits = b.add("Add", [logits, mask])
    half = np.dtype(dtype) == np.float16 and config.fp32_softmax
    if half:
        logits = b.add("Cast", [logits], {"to": TensorProto.FLOAT}, dtype=np.float32)
    probs = b.add("Softmax", [logits], {"axis": -1}, dtype=np.float32 if half else None)
    if half:
        probs = b.add("Cast", [probs], {"to": TensorProto.FLOAT16})
    result = node.outputs[0]
    node.outputs.clear()
    b.add("MatMul", [probs, v], out=result)
    return b.index
