"""The ONNX Runtime fusions (lower_rotary, fold_norm_casts, fuse_skip_layernorm, fuse_bias_gelu): same outputs on
ONNX Runtime's CPU provider (which has every contrib op they write), structure, skips with reasons, idempotence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from graph_passes.graph_testing import op_counts, run_graph

from export_engine.cli import main
from export_engine.exporters.mast3r import TINY_CONFIG
from export_engine.graph_passes.base import load_graph, producer
from export_engine.graph_passes.cleanup import FoldConstantsConfig, fold_constants
from export_engine.graph_passes.fold_norm_casts import FoldNormCastsConfig, fold_norm_casts
from export_engine.graph_passes.fuse_attention import FuseAttentionConfig, fuse_attention
from export_engine.graph_passes.fuse_bias_gelu import FuseBiasGeluConfig, fuse_bias_gelu
from export_engine.graph_passes.fuse_skip_layernorm import FuseSkipLayerNormConfig, fuse_skip_layernorm
from export_engine.graph_passes.lower_attention_bsh import (
    LowerAttentionBshConfig,
    _heads_per_row,
    _pair_permutation,
    lower_attention_bsh,
)
from export_engine.graph_passes.lower_rotary import LowerRotaryConfig, lower_rotary


def _folded(tiny: Any, attention: bool = False) -> gs.Graph:
    """A tiny graph with constants folded (and attention fused: one Attention node per block, as in artifacts)."""
    graph = load_graph(tiny.path)
    fold_constants(graph, FoldConstantsConfig())
    if attention:
        fuse_attention(graph, FuseAttentionConfig())
    return graph


def _prepared(tiny: Any, attention: bool = False) -> tuple[gs.Graph, Any, list[np.ndarray]]:
    """A tiny graph with constants folded (and attention fused), its op counts and its CPU outputs."""
    graph = _folded(tiny, attention)
    return graph, op_counts(graph), run_graph(graph, tiny.feeds[0])


@pytest.fixture
def own_ops() -> None:
    """export-engine's operator library, CPU build (the graphs that use it run on ONNX Runtime's CPU provider)."""
    from export_engine.runners import ort_ops

    ok, why = ort_ops.available(cuda=False)
    if not ok:
        pytest.skip(f"export-engine's operator library cannot be built here: {why}")


def _close(got: list[np.ndarray], want: list[np.ndarray], rel: float) -> None:
    for g, w in zip(got, want, strict=True):
        scale = max(float(np.abs(w.astype(np.float32)).max()), 1.0)
        np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("key", ["mast3r.encoder", "mast3r.decoder"])
def test_fp32_fusions_keep_the_outputs_of_the_tiny_mast3r(tiny_graphs: dict[str, Any], key: str) -> None:
    tiny = tiny_graphs[key]
    graph = _folded(tiny)
    before_ops = op_counts(graph)
    before = run_graph(graph, tiny.feeds[0])

    rotary = lower_rotary(graph, LowerRotaryConfig())
    skip = fuse_skip_layernorm(graph, FuseSkipLayerNormConfig())
    gelu = fuse_bias_gelu(graph, FuseBiasGeluConfig())

    after = op_counts(graph)
    assert rotary.rewritten == rotary.matched > 0 and not rotary.skipped
    assert after["RotaryEmbedding"] == rotary.rewritten and after["Neg"] == 0  # every rotate_half is gone
    assert gelu.rewritten == before_ops["Gelu"] and after["Gelu"] == 0
    assert skip.rewritten > 0 and after["SkipLayerNormalization"] == skip.rewritten
    assert after["LayerNormalization"] == before_ops["LayerNormalization"] - skip.rewritten
    onnx.checker.check_model(gs.export_onnx(graph))
    _close(run_graph(graph, tiny.feeds[0]), before, 2e-5)  # FP32: the same function up to summation order
    again = [f(graph, c) for f, c in ((lower_rotary, LowerRotaryConfig()), (fuse_skip_layernorm,
             FuseSkipLayerNormConfig()), (fuse_bias_gelu, FuseBiasGeluConfig()))]  # fmt: skip
    assert [r.rewritten for r in again] == [0, 0, 0]


def _hybrid(root: Path, model: str, config: dict, *extra: str) -> Path:
    """A tiny random-weight hybrid artifact of ``model`` (ONNX only)."""
    (root / "config.json").write_text(json.dumps(config))
    out = root / f"{model}-hybrid"
    args = ["--model", model, "--precision", "hybrid", "--random-weights", "--backend", "onnx", "--quiet",
            "--config", str(root / "config.json"), *extra, "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def hybrid_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _hybrid(tmp_path_factory.mktemp("fusions"), "mast3r", TINY_CONFIG, "--resolution", "80x48")


def _feed(artifact: Path, graph: str) -> dict[str, np.ndarray]:
    with np.load(artifact / "reference" / f"{graph}.inputs.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("name", ["encoder", "decoder"])
def test_fold_norm_casts_runs_hybrid_layernorms_on_fp16(hybrid_artifact: Path, name: str) -> None:
    graph = load_graph(hybrid_artifact / f"{name}.onnx")
    before_ops = op_counts(graph)
    feed = _feed(hybrid_artifact, name)
    before = run_graph(graph, feed)

    report = fold_norm_casts(graph, FoldNormCastsConfig())

    assert report.rewritten == report.matched >= before_ops["LayerNormalization"] - 1 > 0, report.skipped
    # the Cast back to FP16 goes with every island, the Cast to FP32 wherever nothing else reads it
    assert op_counts(graph)["Cast"] <= before_ops["Cast"] - report.rewritten - 1
    norms = [n for n in graph.nodes if n.name.startswith("fold_norm_casts/")]
    assert all(n.inputs[0].dtype == np.float16 and n.outputs[0].dtype == np.float16 for n in norms)
    assert all(n.attrs["stash_type"] == 1 and n.inputs[1].values.dtype == np.float16 for n in norms)
    onnx.checker.check_model(gs.export_onnx(graph))
    _close(run_graph(graph, feed), before, 2e-2)  # only scale/shift rounding to FP16 differs
    assert fold_norm_casts(graph, FoldNormCastsConfig()).matched == 0
    skip = fuse_skip_layernorm(graph, FuseSkipLayerNormConfig())  # now sees the FP16 residual sums
    assert skip.rewritten > 0
    _close(run_graph(graph, feed), before, 2e-2)


# --- skips, with reasons -------------------------------------------------------------------------------------------


def _rope_graph(table: np.ndarray, dim: int = 8) -> gs.Graph:
    """x * COS + rotate_half_2d(x) * SIN for x (B, 2, 4, dim), as the exporter writes it."""
    x = gs.Variable("x", dtype=np.float32, shape=("batch", 2, 4, dim))
    q = dim // 4
    nodes, parts = [], []
    for i, (start, end, neg) in enumerate(((q, 2 * q, True), (0, q, False), (3 * q, dim, True), (2 * q, 3 * q, False))):
        piece = gs.Variable(f"s{i}", dtype=np.float32)
        consts = [gs.Constant(f"c{i}{k}", np.array([v], np.int64)) for k, v in enumerate((start, end, -1))]
        nodes.append(gs.Node("Slice", inputs=[x, *consts], outputs=[piece]))
        if neg:
            negated = gs.Variable(f"n{i}", dtype=np.float32)
            nodes.append(gs.Node("Neg", inputs=[piece], outputs=[negated]))
            piece = negated
        parts.append(piece)
    rot, a, b, y = (gs.Variable(n, dtype=np.float32) for n in ("rot", "a", "b", "y"))
    nodes += [gs.Node("Concat", attrs={"axis": -1}, inputs=parts, outputs=[rot]),
              gs.Node("Mul", inputs=[x, gs.Constant("cos", np.cos(table))], outputs=[a]),
              gs.Node("Mul", inputs=[rot, gs.Constant("sin", np.sin(table))], outputs=[b]),
              gs.Node("Add", inputs=[a, b], outputs=[y])]  # fmt: skip
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=17)


def _angles(dim: int = 8, repeat: bool = True) -> np.ndarray:
    rng = np.random.default_rng(0)
    quarter = rng.standard_normal((4, dim // 4)).astype(np.float32)
    other = quarter if repeat else rng.standard_normal((4, dim // 4)).astype(np.float32)
    return np.concatenate([quarter, other, quarter * 0.5, other * 0.5], axis=1)


def test_lower_rotary_matches_a_hand_written_2d_rope_and_skips_non_rope_tables() -> None:
    graph = _rope_graph(_angles())
    feed = {"x": np.random.default_rng(1).standard_normal((3, 2, 4, 8)).astype(np.float32)}
    before = run_graph(graph, feed)
    report = lower_rotary(graph, LowerRotaryConfig())
    assert (report.matched, report.rewritten) == (1, 1)
    _close(run_graph(graph, feed), before, 1e-6)

    odd = _rope_graph(_angles(repeat=False))
    report = lower_rotary(odd, LowerRotaryConfig())
    assert report.rewritten == 0 and "do not repeat" in report.skipped[0]


def test_fuse_bias_gelu_skips_the_tanh_approximation() -> None:
    x, h, y = gs.Variable("x", np.float32, ("b", 4)), gs.Variable("h", np.float32), gs.Variable("y", np.float32)
    add = gs.Node("Add", inputs=[x, gs.Constant("bias", np.ones(4, np.float32))], outputs=[h])
    gelu = gs.Node("Gelu", attrs={"approximate": "tanh"}, inputs=[h], outputs=[y])
    graph = gs.Graph(nodes=[add, gelu], inputs=[x], outputs=[y], opset=20)
    report = fuse_bias_gelu(graph, FuseBiasGeluConfig())
    assert report.rewritten == 0 and "tanh" in report.skipped[0]


def test_fold_norm_casts_skips_an_island_whose_fp32_output_is_used_in_fp32() -> None:
    x = gs.Variable("x", np.float16, ("b", 3, 4))
    x32, n, y16, z = (gs.Variable(k, d) for k, d in (("x32", np.float32), ("n", np.float32), ("y16", np.float16),
                                                    ("z", np.float32)))  # fmt: skip
    nodes = [gs.Node("Cast", attrs={"to": onnx.TensorProto.FLOAT}, inputs=[x], outputs=[x32]),
             gs.Node("LayerNormalization", attrs={"axis": -1}, inputs=[x32, gs.Constant("g", np.ones(4, np.float32)),
                     gs.Constant("b", np.zeros(4, np.float32))], outputs=[n]),
             gs.Node("Cast", attrs={"to": onnx.TensorProto.FLOAT16}, inputs=[n], outputs=[y16]),
             gs.Node("Exp", inputs=[n], outputs=[z])]  # fmt: skip
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[y16, z], opset=17)
    report = fold_norm_casts(graph, FoldNormCastsConfig())
    assert report.rewritten == 0 and "also feeds ['Exp']" in report.skipped[0]


@pytest.mark.parametrize("max_row", [1024, 1])  # whole tokens a rotary row, or one head a row
@pytest.mark.parametrize("key", ["mast3r.encoder", "mast3r.decoder"])
def test_attention_blocks_in_token_major_layout_keep_the_outputs(
    tiny_graphs: dict[str, Any], key: str, max_row: int
) -> None:
    tiny = tiny_graphs[key]
    graph = _folded(tiny, attention=True)
    before_ops = op_counts(graph)
    before = run_graph(graph, tiny.feeds[0])

    report = lower_attention_bsh(graph, LowerAttentionBshConfig(max_row=max_row))

    after = op_counts(graph)
    assert report.rewritten == report.matched == before_ops["Attention"] > 0, report.skipped
    assert after["MultiHeadAttention"] == report.rewritten and after["Attention"] == 0
    assert after["RotaryEmbedding"] == 2 * report.rewritten and after["Neg"] == 0  # RoPE on q and k of each
    for rope in (n for n in graph.nodes if n.op == "RotaryEmbedding"):
        attention = next(n for n in graph.nodes if n.op == "MultiHeadAttention")
        rows = rope.attrs["num_heads"]  # one row per token (1024) or per head (1)
        assert rope.attrs["interleaved"] == 1
        assert rows == (1 if max_row == 1024 else attention.attrs["num_heads"])
        hidden = attention.outputs[0].shape[-1]
        assert rope.inputs[2].values.shape[1] * rows * 2 == hidden  # cache width = row / 2
    assert after["Transpose"] <= before_ops["Transpose"] - 2 * report.rewritten  # no head-major round trip
    onnx.checker.check_model(gs.export_onnx(graph))
    _close(run_graph(graph, tiny.feeds[0]), before, 2e-5)  # FP32: permuted heads, the same scores
    assert lower_attention_bsh(graph, LowerAttentionBshConfig()).matched == 0


def test_pair_permutation_makes_every_rope_pair_adjacent() -> None:
    for dim, sections in ((64, 2), (64, 1), (48, 3)):
        perm = _pair_permutation(dim, sections)
        assert sorted(perm) == list(range(dim))
        m = dim // sections
        for i in range(dim // 2):  # old indices of the pair now at (2i, 2i + 1): (s*m + j, s*m + m/2 + j)
            assert perm[2 * i + 1] - perm[2 * i] == m // 2 and perm[2 * i] % m < m // 2


def test_rotary_rows_hold_whole_heads_within_the_thread_limit() -> None:
    assert _heads_per_row(16, 64, 1024) == 16  # MASt3R encoder: the whole token
    assert _heads_per_row(12, 64, 1024) == 12  # decoder: 768 values
    assert _heads_per_row(24, 64, 1024) == 12  # 1536 values: two rows of 12 heads
    assert _heads_per_row(5, 256, 1024) == 1  # a divisor of the head count or one head
    assert _heads_per_row(4, 2048, 1024) == 1


def test_attention_with_a_bias_input_is_skipped(tiny_graphs: dict[str, Any]) -> None:
    graph = load_graph(tiny_graphs["fastsam3d.encoder"].path)  # relative-position bias on every attention
    fold_constants(graph, FoldConstantsConfig())
    assert fuse_attention(graph, FuseAttentionConfig()).rewritten > 0
    report = lower_attention_bsh(graph, LowerAttentionBshConfig())
    assert report.rewritten == 0
    assert all("mask, bias" in s or "not" in s for s in report.skipped)


@pytest.mark.parametrize("key", ["mast3r.encoder", "mast3r.decoder"])
def test_attention_as_group_query_attention_keeps_the_outputs(tiny_graphs: dict[str, Any], key: str) -> None:
    """``op="gqa"``: one non-causal GroupQueryAttention per block with RoPE inside; the packed self-attention
    projections feed it whole (no Split), the cross-attention's three projections separately."""
    tiny = tiny_graphs[key]
    graph, before_ops, before = _prepared(tiny, attention=True)

    assert lower_attention_bsh(graph.copy(), LowerAttentionBshConfig(op="gqa")).rewritten == 0  # FP32: skipped
    report = lower_attention_bsh(graph, LowerAttentionBshConfig(op="gqa", gqa_fp32=True))  # CPU runs FP32 GQA

    after = op_counts(graph)
    assert report.rewritten == report.matched == before_ops["Attention"] > 0, report.skipped
    assert after["GroupQueryAttention"] == report.rewritten and after["Attention"] == 0
    assert after["RotaryEmbedding"] == after["Split"] == after["Neg"] == 0
    for node in (n for n in graph.nodes if n.op == "GroupQueryAttention"):
        assert node.attrs["causal"] == 0 and node.attrs["do_rotary"] == 1 and node.attrs["rotary_interleaved"] == 1
        head = node.outputs[0].shape[-1] // node.attrs["num_heads"]
        assert node.inputs[7].values.shape[1] * 2 == head  # cos cache: one head's pairs per token
    onnx.checker.check_model(gs.export_onnx(graph))
    _close(run_graph(graph, tiny.feeds[0]), before, 2e-5)
    assert lower_attention_bsh(graph, LowerAttentionBshConfig(op="gqa", gqa_fp32=True)).matched == 0


@pytest.mark.parametrize("key", ["mast3r.encoder", "mast3r.decoder"])
@pytest.mark.usefixtures("own_ops")
def test_attention_with_fused_projection_tails_keeps_the_outputs(tiny_graphs: dict[str, Any], key: str) -> None:
    """``op="fused"``: each projection's bias add, rotation and split become one ``BiasRotarySplit`` (a packed
    q/k/v projection: one node with three outputs; cross-attention: one per projection), then MultiHeadAttention.
    Run on the CPU with export-engine's operator library."""
    tiny = tiny_graphs[key]
    graph, before_ops, before = _prepared(tiny, attention=True)

    report = lower_attention_bsh(graph, LowerAttentionBshConfig(op="fused"))

    after = op_counts(graph)
    assert report.rewritten == report.matched == before_ops["Attention"] > 0, report.skipped
    assert after["MultiHeadAttention"] == report.rewritten and after["Attention"] == 0
    assert after["RotaryEmbedding"] == after["Split"] == after["Neg"] == 0
    fused = [n for n in graph.nodes if n.op == "BiasRotarySplit"]
    assert fused and all(n.domain == "ai.export_engine" for n in fused)
    assert sum(len(n.outputs) for n in fused) == 3 * report.rewritten  # q, k and v of every block
    for node in fused:
        rotate = node.attrs["rotate"]
        assert rotate in ([1, 1, 0], [1], [0]) and len(node.outputs) == len(rotate)
        assert producer(node.inputs[0], "MatMul") is not None  # the bias add is inside
        if any(rotate):
            head = node.attrs["head_dim"]
            assert node.inputs[2].values.dtype == np.float32 and node.inputs[2].values.shape[1] * 2 == head
    assert after["Add"] <= before_ops["Add"] - sum(1 for n in fused)  # each projection's bias add is gone
    assert after["Transpose"] <= before_ops["Transpose"] - 2 * report.rewritten
    onnx.checker.check_model(gs.export_onnx(graph))
    _close(run_graph(graph, tiny.feeds[0]), before, 2e-5)  # FP32: permuted heads, the same scores
    assert lower_attention_bsh(graph, LowerAttentionBshConfig(op="fused")).matched == 0


def test_fused_projection_tails_need_whole_16_byte_vectors() -> None:
    """A head size that 16-byte vectors of FP16 do not divide is left to the stock operators, with the reason."""
    graph = _self_attention(tokens=6, heads=2, head_dim=4)
    assert lower_attention_bsh(graph.copy(), LowerAttentionBshConfig()).rewritten == 1  # the stock form takes it
    report = lower_attention_bsh(graph, LowerAttentionBshConfig(op="fused"))
    assert report.matched == 1 and report.rewritten == 0
    assert "multiple of 8" in report.skipped[0]


def _self_attention(tokens: int, heads: int, head_dim: int) -> gs.Graph:
    """One self-attention block as the exporter writes it (packed projection, head-major q/k/v), no RoPE."""
    rng = np.random.default_rng(0)
    width = heads * head_dim
    x = gs.Variable("x", np.float32, (1, tokens, width))
    y = gs.Variable("y", np.float32, (1, tokens, width))
    t = {name: gs.Variable(name, np.float32, shape) for name, shape in (
        ("product", (1, tokens, 3 * width)), ("packed", (1, tokens, 3 * width)),
        ("split", (1, tokens, 3, heads, head_dim)), ("major", (3, 1, heads, tokens, head_dim)),
        ("q", (1, heads, tokens, head_dim)), ("k", (1, heads, tokens, head_dim)), ("v", (1, heads, tokens, head_dim)),
        ("attended", (1, heads, tokens, head_dim)), ("back", (1, tokens, heads, head_dim)))}  # fmt: skip
    weight = gs.Constant("w", rng.standard_normal((width, 3 * width)).astype(np.float32))
    bias = gs.Constant("b", rng.standard_normal(3 * width).astype(np.float32))
    nodes = [
        gs.Node("MatMul", inputs=[x, weight], outputs=[t["product"]]),
        gs.Node("Add", inputs=[t["product"], bias], outputs=[t["packed"]]),
        gs.Node("Reshape", inputs=[t["packed"], gs.Constant("s5", np.array([1, tokens, 3, heads, head_dim]))],
                outputs=[t["split"]]),
        gs.Node("Transpose", attrs={"perm": [2, 0, 3, 1, 4]}, inputs=[t["split"]], outputs=[t["major"]]),
        *(gs.Node("Gather", attrs={"axis": 0}, inputs=[t["major"], gs.Constant(f"i{i}", np.array(i))],
                  outputs=[t[name]]) for i, name in enumerate("qkv")),
        gs.Node("Attention", attrs={"scale": head_dim**-0.5}, inputs=[t["q"], t["k"], t["v"]],
                outputs=[t["attended"]]),
        gs.Node("Transpose", attrs={"perm": [0, 2, 1, 3]}, inputs=[t["attended"]], outputs=[t["back"]]),
        gs.Node("Reshape", inputs=[t["back"], gs.Constant("s3", np.array([1, tokens, width]))], outputs=[y]),
    ]  # fmt: skip
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=23)


@pytest.mark.usefixtures("own_ops")
def test_conv_bias_with_relu_or_residual_becomes_one_pass(tiny_graphs: dict[str, Any]) -> None:
    """``fuse_conv_epilogue``: the DPT heads' Conv(bias) -> Relu and Conv(bias) -> Add(residual) pairs become a
    bias-free Conv and one ``BiasActivation``; other convolutions keep their bias (skipped with the reason)."""
    from export_engine.graph_passes.fuse_conv_epilogue import FuseConvEpilogueConfig, fuse_conv_epilogue

    tiny = tiny_graphs["mast3r.decoder"]
    graph, before_ops, before = _prepared(tiny)

    report = fuse_conv_epilogue(graph, FuseConvEpilogueConfig())

    after = op_counts(graph)
    fused = [n for n in graph.nodes if n.op == "BiasActivation"]
    relu = sum(n.attrs["relu"] for n in fused)
    assert report.rewritten == len(fused) > 0 and report.matched == report.rewritten + len(report.skipped)
    assert 0 < relu < len(fused)  # both forms occur in the DPT heads
    assert after["Relu"] == before_ops["Relu"] - relu and after["Add"] == before_ops["Add"] - (len(fused) - relu)
    odd = [s for s in report.skipped if "not Relu or a residual Add" not in s and "other consumers" not in s]
    assert not odd, odd
    for node in fused:
        conv = node.inputs[0].inputs[0]
        assert conv.op == "Conv" and len(conv.inputs) == 2  # the bias moved into the epilogue
        assert len(node.inputs) == (2 if node.attrs["relu"] else 3)
    onnx.checker.check_model(gs.export_onnx(graph))
    _close(run_graph(graph, tiny.feeds[0]), before, 2e-5)
    assert fuse_conv_epilogue(graph, FuseConvEpilogueConfig()).rewritten == 0


@pytest.mark.usefixtures("own_ops")
def test_dpt_upsampling_as_export_engines_bilinear_resize(tiny_graphs: dict[str, Any]) -> None:
    from export_engine.graph_passes.lower_resize import LowerResizeConfig, lower_resize

    tiny = tiny_graphs["mast3r.decoder"]
    graph, before_ops, before = _prepared(tiny)

    report = lower_resize(graph, LowerResizeConfig())

    after = op_counts(graph)
    assert report.rewritten == report.matched == before_ops["Resize"] > 0, report.skipped
    assert after["Resize"] == 0 and after["ResizeBilinear"] == report.rewritten
    assert all(n.attrs["scale"] == [2, 2] for n in graph.nodes if n.op == "ResizeBilinear")
    onnx.checker.check_model(gs.export_onnx(graph))
    _close(run_graph(graph, tiny.feeds[0]), before, 2e-5)
    assert lower_resize(graph, LowerResizeConfig()).matched == 0


def test_resize_outside_bilinear_align_corners_by_whole_factors_is_skipped() -> None:
    from export_engine.graph_passes.lower_resize import LowerResizeConfig, lower_resize

    def resize(scales: list[float], **attrs: Any) -> gs.Graph:
        x = gs.Variable("x", np.float32, (1, 2, 4, 4))
        y = gs.Variable("y", np.float32, None)
        const = gs.Constant("scales", np.asarray(scales, dtype=np.float32))
        node = gs.Node("Resize", inputs=[x, gs.Variable.empty(), const], outputs=[y], attrs=attrs)
        return gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=19)

    linear = {"mode": "linear", "coordinate_transformation_mode": "align_corners"}
    cases = [(resize([1, 1, 2, 2], mode="nearest"), "mode 'nearest'"),
             (resize([1, 1, 2, 2], mode="linear"), "coordinate transformation 'half_pixel'"),
             (resize([1, 1, 1.5, 2], **linear), "not [1, 1, whole, whole]"),
             (resize([1, 2, 2, 2], **linear), "not [1, 1, whole, whole]"),
             (resize([1, 1, 2, 2], antialias=1, **linear), "non-default attributes ['antialias']")]  # fmt: skip
    for graph, reason in cases:
        report = lower_resize(graph, LowerResizeConfig())
        assert report.matched == 1 and report.rewritten == 0 and reason in report.skipped[0], report.skipped
    assert lower_resize(resize([1, 1, 2, 3], **linear), LowerResizeConfig()).rewritten == 1


@pytest.mark.usefixtures("own_ops")
def test_fused_projection_tails_follow_the_packing_order(tiny_graphs: dict[str, Any]) -> None:
    """A packed projection whose parts are not in q, k, v order (here k and v swapped) rotates the parts q and k
    actually take."""
    from export_engine.graph_passes.lower_rotary import _match as rope_match

    tiny = tiny_graphs["mast3r.encoder"]
    graph = _folded(tiny, attention=True)
    swapped = 0
    for att in [n for n in graph.nodes if n.op == "Attention"]:
        rope = rope_match(producer(att.inputs[1], "Add"), LowerRotaryConfig())
        gather_k, gather_v = producer(rope.x, "Gather"), producer(att.inputs[2], "Gather")
        gather_k.inputs[1] = gs.Constant(f"{gather_k.name}/swapped", np.array(2, dtype=np.int64))
        gather_v.inputs[1] = gs.Constant(f"{gather_v.name}/swapped", np.array(1, dtype=np.int64))
        swapped += 1
    assert swapped > 0
    before = run_graph(graph, tiny.feeds[0])

    report = lower_attention_bsh(graph, LowerAttentionBshConfig(op="fused"))

    assert report.rewritten == swapped, report.skipped
    assert all(n.attrs["rotate"] == [1, 0, 1] for n in graph.nodes if n.op == "BiasRotarySplit")
    _close(run_graph(graph, tiny.feeds[0]), before, 2e-5)


@pytest.mark.usefixtures("own_ops")
def test_fused_cross_attention_rotates_k_by_its_own_angles(tiny_graphs: dict[str, Any]) -> None:
    """In cross-attention q and k come from different images: each rotates by its own tokens' angles (here k's
    tables are shifted by one token, so using q's for k would change the outputs)."""
    from export_engine.graph_passes.lower_attention_bsh import _projection
    from export_engine.graph_passes.lower_rotary import _match as rope_match

    tiny = tiny_graphs["mast3r.decoder"]
    graph = _folded(tiny, attention=True)
    shifted = 0
    for att in [n for n in graph.nodes if n.op == "Attention"]:
        rope = rope_match(producer(att.inputs[1], "Add"), LowerRotaryConfig())
        if _projection(rope.x).parts != 1:
            continue  # self-attention: q and k share one packed projection and one table
        for mul in (t.inputs[0] for t in rope.add.inputs):
            i, table = next((i, t) for i, t in enumerate(mul.inputs) if isinstance(t, gs.Constant))
            mul.inputs[i] = gs.Constant(f"{table.name}/k{shifted}", np.roll(table.values, 1, axis=-2))
        shifted += 1
    assert shifted > 0
    before = run_graph(graph, tiny.feeds[0])

    report = lower_attention_bsh(graph, LowerAttentionBshConfig(op="fused"))

    assert report.rewritten == report.matched and not report.skipped
    _close(run_graph(graph, tiny.feeds[0]), before, 2e-5)


def _emulate_nhwc_conv(graph: gs.Graph) -> gs.Graph:
    """A copy with each NhwcConv (ONNX Runtime's CUDA provider only) written as Transpose, Conv, Transpose, so that
    the CPU provider runs the channels-last graph around it."""
    graph = graph.copy()
    for node in [n for n in graph.nodes if n.op == "NhwcConv"]:
        x, weight, *bias = node.inputs
        nchw_in = gs.Variable(f"{node.name}/nchw_in", dtype=x.dtype)
        nchw_out = gs.Variable(f"{node.name}/nchw_out", dtype=x.dtype)
        oihw = gs.Constant(f"{node.name}/oihw", np.ascontiguousarray(weight.values.transpose(0, 3, 1, 2)))
        out = node.outputs[0]
        node.outputs.clear()
        graph.nodes += [
            gs.Node("Transpose", attrs={"perm": [0, 3, 1, 2]}, inputs=[x], outputs=[nchw_in]),
            gs.Node("Conv", attrs=dict(node.attrs), inputs=[nchw_in, oihw, *bias], outputs=[nchw_out]),
            gs.Node("Transpose", attrs={"perm": [0, 2, 3, 1]}, inputs=[nchw_out], outputs=[out]),
        ]
    return graph.cleanup().toposort()


@pytest.mark.usefixtures("own_ops")
def test_nhwc_convolutions_cancel_the_layout_changes_between_them(tiny_graphs: dict[str, Any]) -> None:
    """``lower_conv_nhwc`` on the DPT heads (after ``conv_epilogue`` and ``resize_bilinear``): every convolution
    runs as NhwcConv, the ReLUs, residual adds, epilogues and upsampling run channels-last in between, and only the
    heads' entries and exits keep a layout Transpose. Numerics on the CPU with NhwcConv emulated."""
    from export_engine.graph_passes.fuse_conv_epilogue import FuseConvEpilogueConfig, fuse_conv_epilogue
    from export_engine.graph_passes.lower_conv_nhwc import LowerConvNhwcConfig, lower_conv_nhwc
    from export_engine.graph_passes.lower_resize import LowerResizeConfig, lower_resize

    tiny = tiny_graphs["mast3r.decoder"]
    graph, _, before = _prepared(tiny)
    fuse_conv_epilogue(graph, FuseConvEpilogueConfig())
    lower_resize(graph, LowerResizeConfig())
    before_ops = op_counts(graph)

    report = lower_conv_nhwc(graph, LowerConvNhwcConfig())

    after = op_counts(graph)
    assert report.rewritten == report.matched == before_ops["Conv"] > 0, report.skipped
    assert after["Conv"] == 0 and after["NhwcConv"] == before_ops["Conv"]
    own = [n for n in graph.nodes if n.op in ("BiasActivation", "ResizeBilinear")]
    assert own and all(n.attrs.get("channels_last") == 1 for n in own)  # all of them moved into NHWC
    added = after["Transpose"] - before_ops["Transpose"]
    assert 0 < added <= before_ops["Conv"] // 3, added  # entries and exits, not two per convolution
    _close(run_graph(_emulate_nhwc_conv(graph), tiny.feeds[0]), before, 2e-5)
    assert lower_conv_nhwc(graph, LowerConvNhwcConfig()).matched == 0


def test_nhwc_convolutions_keep_slice_index_types_and_leave_rank_changing_constants() -> None:
    """A Slice with int32 indices keeps them int32 when its axes are remapped; an Add of a size-1 constant of rank
    5 (which makes the result rank 5) is not moved into NHWC. Same outputs, NhwcConv emulated on the CPU."""
    from export_engine.graph_passes.lower_conv_nhwc import LowerConvNhwcConfig, lower_conv_nhwc

    rng = np.random.default_rng(4)
    x = gs.Variable("x", np.float32, (1, 4, 6, 6))
    conv = gs.Variable("conv", np.float32, (1, 8, 6, 6))
    relu = gs.Variable("relu", np.float32, (1, 8, 6, 6))
    sliced = gs.Variable("sliced", np.float32, (1, 8, 6, 3))
    wide = gs.Variable("wide", np.float32, (1, 1, 8, 6, 6))
    weight = gs.Constant("w", rng.standard_normal((8, 4, 3, 3)).astype(np.float32))
    ints = {name: gs.Constant(name, np.asarray(v, dtype=np.int32)) for name, v in
            (("starts", [0]), ("ends", [3]), ("axes", [-1]))}  # fmt: skip
    nodes = [
        gs.Node("Conv", inputs=[x, weight], outputs=[conv], attrs={"pads": [1, 1, 1, 1]}),
        gs.Node("Relu", inputs=[conv], outputs=[relu]),
        gs.Node("Slice", inputs=[relu, ints["starts"], ints["ends"], ints["axes"]], outputs=[sliced]),
        gs.Node("Add", inputs=[relu, gs.Constant("one", np.ones((1, 1, 1, 1, 1), np.float32))], outputs=[wide]),
    ]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[sliced, wide], opset=17)
    feed = {"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)}
    before = run_graph(graph, feed)

    assert lower_conv_nhwc(graph, LowerConvNhwcConfig()).rewritten == 1

    slice_node = next(n for n in graph.nodes if n.op == "Slice")
    assert slice_node.inputs[3].values.dtype == np.int32 and slice_node.inputs[3].values.tolist() == [2]
    add = next(n for n in graph.nodes if n.op == "Add")
    assert producer(add.inputs[0], "Transpose") is not None  # still fed in NCHW
    _close(run_graph(_emulate_nhwc_conv(graph), feed), before, 1e-5)


@pytest.mark.usefixtures("own_ops")
@pytest.mark.parametrize("name", ["encoder", "decoder"])
def test_mlp_first_layer_and_gelu_become_one_matmul(hybrid_artifact: Path, name: str) -> None:
    """``fuse_matmul_gelu`` after ``fuse_bias_gelu``: every float16 MLP's MatMul + BiasGelu is one
    ``MatMulBiasGelu`` (tanh GELU: within float16 rounding of the exact one on these activations)."""
    from export_engine.graph_passes.fuse_matmul_gelu import FuseMatMulGeluConfig, fuse_matmul_gelu

    graph = load_graph(hybrid_artifact / f"{name}.onnx")
    feed = _feed(hybrid_artifact, name)
    before = run_graph(graph, feed)
    gelus = fuse_bias_gelu(graph, FuseBiasGeluConfig()).rewritten
    matmuls = op_counts(graph)["MatMul"]

    report = fuse_matmul_gelu(graph, FuseMatMulGeluConfig())

    fused = [n for n in graph.nodes if n.op == "MatMulBiasGelu"]
    assert report.rewritten == len(fused) == gelus > 0, report.skipped
    assert op_counts(graph)["BiasGelu"] == 0 and op_counts(graph)["MatMul"] == matmuls - len(fused)
    assert all(n.inputs[1].values.dtype == np.float16 and n.inputs[2].values.ndim == 1 for n in fused)
    onnx.checker.check_model(gs.export_onnx(graph))
    _close(run_graph(graph, feed), before, 2e-2)
    assert fuse_matmul_gelu(graph, FuseMatMulGeluConfig()).matched == 0


def _mlp(dtype: type = np.float16, approximate: str = "none", also_output: str | None = None,
         bias_first: bool = False) -> gs.Graph:  # fmt: skip
    """x (n, 8) -> MatMul (8, 4) -> h -> Add bias -> s -> Gelu -> y; ``also_output`` ("h" or "s") is an output too."""
    x = gs.Variable("x", dtype=dtype, shape=("n", 8))
    t = {v: gs.Variable(v, dtype=dtype) for v in ("h", "s", "y")}
    bias = gs.Constant("b", np.ones(4, dtype))
    nodes = [gs.Node("MatMul", inputs=[x, gs.Constant("w", np.ones((8, 4), dtype))], outputs=[t["h"]]),
             gs.Node("Add", inputs=[bias, t["h"]] if bias_first else [t["h"], bias], outputs=[t["s"]]),
             gs.Node("Gelu", attrs={"approximate": approximate}, inputs=[t["s"]], outputs=[t["y"]])]  # fmt: skip
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[t["y"], *([t[also_output]] if also_output else [])], opset=20)


def test_matmul_gelu_skips_float32_and_shared_products() -> None:
    from export_engine.graph_passes.fuse_matmul_gelu import FuseMatMulGeluConfig, fuse_matmul_gelu

    assert fuse_matmul_gelu(_mlp(), FuseMatMulGeluConfig()).rewritten == 1  # the Gelu form too
    fp32 = fuse_matmul_gelu(_mlp(np.float32), FuseMatMulGeluConfig())
    assert fp32.rewritten == 0 and "float16 only" in fp32.skipped[0]
    shared = fuse_matmul_gelu(_mlp(also_output="h"), FuseMatMulGeluConfig())
    assert shared.rewritten == 0 and "other consumers" in shared.skipped[0]


@pytest.fixture(scope="module")
def fastsam3d_hybrid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export_engine.exporters.fastsam3d import TINY_CONFIG as FASTSAM3D_TINY

    return _hybrid(tmp_path_factory.mktemp("fusions_fastsam3d"), "fastsam3d", FASTSAM3D_TINY)


@pytest.mark.usefixtures("own_ops")
@pytest.mark.parametrize(("name", "norms", "gelus"), [("encoder", 2, 0), ("prompt_decoder", 3, 3)])
def test_channel_layernorms_become_one_operator(fastsam3d_hybrid: Path, name: str, norms: int, gelus: int) -> None:
    """``fuse_channel_layernorm``: the neck's two LayerNorm3d and the prompt encoder's and upsampler's three (each
    followed by GELU) become one ``ChannelLayerNorm`` each, on float16 storage where the graph casts around them."""
    from export_engine.graph_passes.fuse_channel_layernorm import (
        FuseChannelLayerNormConfig,
        fuse_channel_layernorm,
    )

    graph = load_graph(fastsam3d_hybrid / f"{name}.onnx")
    feed = _feed(fastsam3d_hybrid, name)
    before_ops, before = op_counts(graph), run_graph(graph, feed)

    report = fuse_channel_layernorm(graph, FuseChannelLayerNormConfig())

    fused = [n for n in graph.nodes if n.op == "ChannelLayerNorm"]
    assert report.rewritten == report.matched == len(fused) == norms, report.skipped
    assert sum(n.attrs["gelu"] for n in fused) == gelus
    assert op_counts(graph)["ReduceMean"] == before_ops["ReduceMean"] - 2 * norms
    assert op_counts(graph)["Gelu"] == before_ops["Gelu"] - gelus
    assert any(n.inputs[0].dtype == np.float16 for n in fused)  # the Casts around the statistics folded
    onnx.checker.check_model(gs.export_onnx(graph))
    _close(run_graph(graph, feed), before, 2e-2)
    assert fuse_channel_layernorm(graph, FuseChannelLayerNormConfig()).matched == 0


def test_matmul_gelu_takes_tanh_gelu_and_skips_a_bias_sum_that_is_an_output() -> None:
    from export_engine.graph_passes.fuse_matmul_gelu import FuseMatMulGeluConfig, fuse_matmul_gelu

    graph = _mlp(approximate="tanh", bias_first=True)
    assert fuse_matmul_gelu(graph, FuseMatMulGeluConfig()).rewritten == 1  # the operator's own GELU
    assert [n.op for n in graph.nodes] == ["MatMulBiasGelu"]
    shared = fuse_matmul_gelu(_mlp(also_output="s", bias_first=True), FuseMatMulGeluConfig())
    assert shared.rewritten == 0 and "graph output" in shared.skipped[0]


def _channel_norm_graph(dtype: type = np.float32, axes: int = 1, weight_shape: tuple = (6, 1, 1),
                        extra_output: str | None = None) -> gs.Graph:  # fmt: skip
    """x (2, 6, 3, 4) -> LayerNorm over axis 1 written out element by element -> Mul -> Add -> Gelu."""
    x = gs.Variable("x", dtype=dtype, shape=(2, 6, 3, 4))
    names = ("mean", "centred", "square", "var", "var_eps", "std", "normed", "scaled", "shifted", "y")
    t = {n: gs.Variable(n, dtype=dtype) for n in names}
    axes_in = gs.Constant("axes", np.array([axes], np.int64))  # opset 18+: axes as an input
    rng = np.random.default_rng(0)
    nodes = [gs.Node("ReduceMean", attrs={"keepdims": 1}, inputs=[x, axes_in], outputs=[t["mean"]]),
             gs.Node("Sub", inputs=[x, t["mean"]], outputs=[t["centred"]]),
             gs.Node("Pow", inputs=[t["centred"], gs.Constant("two", np.array(2.0, dtype))], outputs=[t["square"]]),
             gs.Node("ReduceMean", attrs={"keepdims": 1}, inputs=[t["square"], axes_in], outputs=[t["var"]]),
             gs.Node("Add", inputs=[t["var"], gs.Constant("eps", np.array(1e-6, dtype))], outputs=[t["var_eps"]]),
             gs.Node("Sqrt", inputs=[t["var_eps"]], outputs=[t["std"]]),
             gs.Node("Div", inputs=[t["centred"], t["std"]], outputs=[t["normed"]]),
             gs.Node("Mul", inputs=[t["normed"], gs.Constant("w", rng.standard_normal(weight_shape).astype(dtype))],
                     outputs=[t["scaled"]]),
             gs.Node("Add", inputs=[gs.Constant("b", rng.standard_normal((6, 1, 1)).astype(dtype)), t["scaled"]],
                     outputs=[t["shifted"]]),
             gs.Node("Gelu", inputs=[t["shifted"]], outputs=[t["y"]]),
             gs.Node("Relu", inputs=[x], outputs=[gs.Variable("side", dtype=dtype)])]  # fmt: skip
    outputs = [t["y"], nodes[-1].outputs[0], *([t[extra_output]] if extra_output else [])]
    return gs.Graph(nodes=nodes, inputs=[x], outputs=outputs, opset=20)


@pytest.mark.usefixtures("own_ops")
def test_channel_layernorm_pass_edges() -> None:
    """The norm's input may have other consumers; axis 1 may be written -3; a Mul that is not per-channel ends
    the chain before it; float64 and an intermediate graph output are skipped with the reason."""
    from export_engine.graph_passes.fuse_channel_layernorm import (
        FuseChannelLayerNormConfig,
        fuse_channel_layernorm,
    )

    feed = {"x": np.random.default_rng(1).standard_normal((2, 6, 3, 4)).astype(np.float32)}
    unfolded = ["ChannelLayerNorm", "Mul", "Add", "Gelu", "Relu"]  # the weight runs along the last axis
    for graph, ops in ((_channel_norm_graph(), ["ChannelLayerNorm", "Relu"]),
                       (_channel_norm_graph(axes=-3), ["ChannelLayerNorm", "Relu"]),
                       (_channel_norm_graph(weight_shape=(1, 1, 4)), unfolded)):  # fmt: skip
        before = run_graph(graph, feed)
        report = fuse_channel_layernorm(graph, FuseChannelLayerNormConfig())
        assert report.rewritten == 1 and sorted(n.op for n in graph.nodes) == sorted(ops), report.skipped
        _close(run_graph(graph, feed), before, 1e-5)
    double = fuse_channel_layernorm(_channel_norm_graph(np.float64), FuseChannelLayerNormConfig())
    assert double.rewritten == 0 and "float16 or float" in double.skipped[0]
    exposed = fuse_channel_layernorm(_channel_norm_graph(extra_output="var"), FuseChannelLayerNormConfig())
    assert exposed.rewritten == 0 and "graph output" in exposed.skipped[0]
