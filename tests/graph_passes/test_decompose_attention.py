"""decompose_attention: fused Attention back to MatMul/Softmax/MatMul with the same ONNX Runtime outputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from graph_passes.graph_testing import op_counts, run_graph

from export_engine.graph_passes.base import load_graph
from export_engine.graph_passes.cleanup import FoldConstantsConfig, fold_constants
from export_engine.graph_passes.decompose_attention import DecomposeAttentionConfig, decompose_attention
from export_engine.graph_passes.fuse_attention import FuseAttentionConfig, fuse_attention

TINY = ["mast3r.encoder", "mast3r.decoder", "fastsam3d.encoder", "fastsam3d.prompt_decoder"]


@pytest.mark.parametrize("key", TINY)
def test_decomposes_every_fused_attention_of_the_tiny_models(tiny_graphs: dict[str, Any], key: str) -> None:
    tiny = tiny_graphs[key]
    expected = tiny.spec.expected_counts["attention"]
    graph = load_graph(tiny.path)
    fold_constants(graph, FoldConstantsConfig())
    fuse_attention(graph, FuseAttentionConfig(expected=expected, strict=True))
    fused = run_graph(graph, tiny.feeds[0])

    report = decompose_attention(graph, DecomposeAttentionConfig())

    assert (report.matched, report.rewritten, report.skipped) == (expected, expected, [])
    counts = op_counts(graph)
    assert counts["Attention"] == 0 and counts["Softmax"] == expected
    assert all(n.name.startswith("decompose_attention/") for n in graph.nodes if n.op == "Softmax")
    onnx.checker.check_model(gs.export_onnx(graph))
    for got, want in zip(run_graph(graph, tiny.feeds[0]), fused, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(float(np.abs(want).max()), 1.0))
    again = decompose_attention(graph, DecomposeAttentionConfig())
    assert (again.matched, again.rewritten) == (0, 0)


def _attention_graph(dtype: type, mask: str | None) -> gs.Graph:
    b, h, s, kv, d = 2, 3, 5, 7, 8
    q = gs.Variable("q", dtype=dtype, shape=(b, h, s, d))
    k = gs.Variable("k", dtype=dtype, shape=(b, h, kv, d))
    v = gs.Variable("v", dtype=dtype, shape=(b, h, kv, d))
    inputs = [q, k, v]
    if mask == "bool":
        inputs.append(gs.Variable("m", dtype=np.bool_, shape=(1, 1, s, kv)))
    elif mask == "float":
        inputs.append(gs.Variable("m", dtype=dtype, shape=(1, h, s, kv)))
    out = gs.Variable("out", dtype=dtype, shape=(b, h, s, d))
    node = gs.Node("Attention", name="attn", attrs={"scale": 0.3}, inputs=inputs, outputs=[out])
    graph = gs.Graph(nodes=[node], inputs=inputs, outputs=[out], opset=23)
    return graph


@pytest.mark.parametrize(("dtype", "mask", "tol"), [(np.float32, None, 1e-6), (np.float32, "bool", 1e-6),
                                                    (np.float32, "float", 1e-6), (np.float16, None, 2e-3),
                                                    (np.float16, "float", 2e-3)])  # fmt: skip
def test_matches_onnx_attention_with_masks_and_fp16(dtype: type, mask: str | None, tol: float) -> None:
    rng = np.random.default_rng(0)
    graph = _attention_graph(dtype, mask)
    feed = {t.name: (rng.standard_normal(t.shape) * 2).astype(dtype) for t in graph.inputs[:3]}
    if mask == "bool":
        feed["m"] = rng.random((1, 1, 5, 7)) > 0.3
        feed["m"][..., 0] = True  # every row attends somewhere
    elif mask == "float":
        feed["m"] = rng.standard_normal((1, 3, 5, 7)).astype(dtype)
    fused = run_graph(graph, feed)[0]

    report = decompose_attention(graph, DecomposeAttentionConfig())

    assert report.rewritten == 1
    casts = [n for n in graph.nodes if n.op == "Cast"]
    assert len(casts) == (2 if dtype == np.float16 else 0)  # FP16 logits are softmaxed in FP32
    np.testing.assert_allclose(
        run_graph(graph, feed)[0].astype(np.float32), fused.astype(np.float32), atol=tol, rtol=tol
    )


def test_skips_3d_attention_with_a_reason() -> None:
    q = gs.Variable("q", dtype=np.float32, shape=(1, 4, 16))
    out = gs.Variable("out", dtype=np.float32, shape=(1, 4, 16))
    node = gs.Node("Attention", name="a", attrs={"scale": 0.5, "q_num_heads": 2, "kv_num_heads": 2},
                   inputs=[q, q, q], outputs=[out])  # fmt: skip
    graph = gs.Graph(nodes=[node], inputs=[q], outputs=[out], opset=23)
    report = decompose_attention(graph, DecomposeAttentionConfig())
    assert report.rewritten == 0 and "4-D" in report.skipped[0]
