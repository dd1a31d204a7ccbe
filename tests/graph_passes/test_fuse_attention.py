"""fuse_attention: every attention of the tiny MASt3R / FastSAM3D graphs becomes one ONNX Attention op,
with unchanged ONNX Runtime outputs, for both exporters; misses are reported with a reason."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from export_engine.errors import GraphPassError
from export_engine.graph_passes.base import load_graph
from export_engine.graph_passes.cleanup import (
    CheckFusedNormsConfig,
    FoldConstantsConfig,
    check_fused_norms,
    fold_constants,
)
from export_engine.graph_passes.fuse_attention import FuseAttentionConfig, fuse_attention
from export_engine.graph_passes.raise_opset import RaiseOpsetConfig, raise_opset

TINY = ["mast3r.encoder", "mast3r.decoder", "fastsam3d.encoder", "fastsam3d.prompt_decoder"]
# Head dims of the tiny configurations (embed dim / heads; the FastSAM3D decoder's cross-attentions run at
# half width): every Attention must carry scale = 1/sqrt(head_dim).
HEAD_DIMS = {"mast3r.encoder": {32}, "mast3r.decoder": {32}, "fastsam3d.encoder": {32},
             "fastsam3d.prompt_decoder": {12, 6}}  # fmt: skip
RTOL = 1e-5  # max |fused - unfused| relative to max |unfused|, per output


def run_all(graph: gs.Graph, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """ONNX Runtime CPU outputs of ``graph`` for each feed (one session)."""
    model = gs.export_onnx(graph, do_type_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [[np.asarray(o) for o in session.run(None, {n: feed[n] for n in names})] for feed in feeds]


def run_ort(graph: gs.Graph, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return run_all(graph, [feed])[0]


def max_rel_diff(actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
    assert [a.shape for a in actual] == [e.shape for e in expected]
    return max(float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-30)) for a, e in zip(actual, expected, strict=True))


def ops(graph: gs.Graph) -> Counter[str]:
    return Counter(n.op for n in graph.nodes)


# ---------------------------------------------------------------------------------------------------------
# TorchScript exporter (the default): written-out attention


@pytest.mark.parametrize("key", TINY)
def test_fuses_every_torchscript_attention(tiny_graphs: dict[str, Any], key: str) -> None:
    tiny = tiny_graphs[key]
    expected = tiny.spec.expected_counts["attention"]
    graph = load_graph(tiny.path)
    before = run_all(graph, tiny.feeds)
    fold_constants(graph, FoldConstantsConfig())

    report = fuse_attention(graph, FuseAttentionConfig(expected=expected, strict=True))

    assert (report.matched, report.rewritten, report.skipped, report.warnings) == (expected, expected, [], [])
    counts = ops(graph)
    assert counts["Attention"] == expected and counts["Softmax"] == 0
    assert graph.opset == 23 and graph.ir_version >= 11
    for node in (n for n in graph.nodes if n.op == "Attention"):
        assert node.name.startswith("fuse_attention/") and node.domain in (None, "")
        assert len(node.inputs) in (3, 4) and len(node.outputs) == 1
        assert all(t.dtype == np.float32 for t in node.inputs[:3])
    scales = [n.attrs["scale"] for n in graph.nodes if n.op == "Attention"]
    head_dims = {round(s**-2) for s in scales}
    assert head_dims == HEAD_DIMS[key]
    assert all(s == pytest.approx(round(s**-2) ** -0.5, rel=1e-6) for s in scales)
    if key == "fastsam3d.encoder":  # the relative-position bias became the additive mask
        assert all(len(n.inputs) == 4 for n in graph.nodes if n.op == "Attention")
    onnx.checker.check_model(gs.export_onnx(graph, do_type_check=True), full_check=True)
    after = run_all(graph, tiny.feeds)
    for fused, unfused in zip(after, before, strict=True):
        assert max_rel_diff(fused, unfused) < RTOL

    names = [n.name for n in graph.nodes]
    again = fuse_attention(graph, FuseAttentionConfig(expected=expected, strict=True))
    assert (again.matched, again.rewritten, again.details["existing"]) == (expected, 0, expected)
    assert [n.name for n in graph.nodes] == names  # nothing rewritten, nothing added


def test_runtime_scale_needs_fold_constants_first(tiny_graphs: dict[str, Any]) -> None:
    """The TorchScript exporter computes head_dim ** -0.5 from Shape(q): without folding nothing matches,
    every Softmax is reported with the reason, and --strict turns the count mismatch into an error."""
    tiny = tiny_graphs["mast3r.encoder"]
    graph = load_graph(tiny.path)
    report = fuse_attention(graph, FuseAttentionConfig(expected=3))
    assert report.rewritten == 0 and len(report.skipped) == 3
    assert all("not by a scalar constant; run fold_constants" in reason for reason in report.skipped)
    assert report.details["softmax_left"] and any("found 0 Attention ops" in w for w in report.warnings)
    assert ops(graph)["Softmax"] == 3 and graph.opset == 20  # nothing changed
    with pytest.raises(GraphPassError, match="found 0 Attention ops, the model spec expects 3"):
        fuse_attention(graph, FuseAttentionConfig(expected=3, strict=True))


def test_count_mismatch_warns_or_raises_under_strict(tiny_graphs: dict[str, Any]) -> None:
    tiny = tiny_graphs["fastsam3d.encoder"]
    graph = load_graph(tiny.path)
    fold_constants(graph, FoldConstantsConfig())
    with pytest.raises(GraphPassError, match="found 2 Attention ops, the model spec expects 5"):
        fuse_attention(graph.copy(), FuseAttentionConfig(expected=5, strict=True))
    report = fuse_attention(graph, FuseAttentionConfig(expected=5, strict=False))
    assert report.rewritten == 2
    assert report.warnings == ["fuse_attention: found 2 Attention ops, the model spec expects 5"]


# ---------------------------------------------------------------------------------------------------------
# dynamo exporter (attn_impl="sdpa", opset 23): SDPA already comes out as Attention


def _build_sdpa(family: str) -> Any:
    if family == "mast3r":
        from export_engine.exporters.mast3r import TINY_CONFIG as M_TINY
        from export_engine.models.mast3r.checkpoint import build_mast3r
        from export_engine.models.mast3r.config import MASt3RConfig

        return build_mast3r(MASt3RConfig.from_json(M_TINY), None, 0, attn_impl="sdpa")[0]
    from export_engine.exporters.fastsam3d import TINY_CONFIG as F_TINY
    from export_engine.models.fastsam3d.checkpoint import build_fastsam3d
    from export_engine.models.fastsam3d.config import FastSAM3DConfig

    return build_fastsam3d(FastSAM3DConfig.from_json(F_TINY), None, 0, attn_impl="sdpa")[0]


def _dynamo_example(spec: Any, feeds: list[dict[str, np.ndarray]]) -> tuple[Any, ...]:
    """torch.export specialises a dynamic dim whose example size is 1 (and then refuses the dynamic axis):
    use a feed whose dynamic dims are all >= 2, else stack the feeds along the (dynamic) batch axis."""
    import torch

    def dynamic_sizes(feed: dict[str, np.ndarray]) -> list[int]:
        return [feed[t.name].shape[i] for t in spec.inputs for i, d in enumerate(t.shape) if isinstance(d, str)]

    feed = next((f for f in feeds if min(dynamic_sizes(f), default=2) >= 2), None)
    if feed is None:
        feed = {t.name: np.concatenate([f[t.name] for f in feeds]) for t in spec.inputs}
    return tuple(torch.from_numpy(feed[name]) for name in spec.input_names)


@pytest.fixture(scope="module")
def dynamo_graph(tiny_graphs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from export_engine.exporters.onnx_from_torch import onnx_from_torch

    root = tmp_path_factory.mktemp("dynamo")
    models: dict[str, Any] = {}

    def export(key: str) -> Path:
        family = key.split(".")[0]
        tiny = tiny_graphs[key]
        model = models.setdefault(family, _build_sdpa(family))
        path = root / f"{key}.onnx"
        spec = dataclasses.replace(tiny.spec, opset=23)
        onnx_from_torch(spec.build_module(model), _dynamo_example(spec, tiny.feeds), path, spec, exporter="dynamo")
        return path

    return export


# The decoders take 10-20 s each to export with dynamo on a 2-core machine: kept out of the default run.
DYNAMO = [
    "mast3r.encoder",
    pytest.param("mast3r.decoder", marks=pytest.mark.slow),
    "fastsam3d.encoder",
    pytest.param("fastsam3d.prompt_decoder", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("key", DYNAMO)
def test_dynamo_attention_is_counted_and_normalised(tiny_graphs: dict[str, Any], dynamo_graph: Any, key: str) -> None:
    tiny = tiny_graphs[key]
    expected = tiny.spec.expected_counts["attention"]
    graph = load_graph(dynamo_graph(key))
    assert ops(graph)["Attention"] == expected and ops(graph)["Softmax"] == 0  # SDPA -> one Attention each
    before = run_all(graph, tiny.feeds)

    report = fuse_attention(graph, FuseAttentionConfig(expected=expected, strict=True))

    assert report.details["existing"] == expected and report.details["fused"] == 0
    assert report.details["normalised"] == expected  # the exporter leaves scale to its default; made explicit
    assert report.skipped == [] and report.warnings == []
    for node in (n for n in graph.nodes if n.op == "Attention"):
        assert node.attrs["scale"] == pytest.approx(node.inputs[0].shape[-1] ** -0.5, rel=1e-6)
        assert len(node.outputs) == 1 and len(node.inputs) <= 4
    after = run_all(graph, tiny.feeds)
    for fused, unfused in zip(after, before, strict=True):
        assert max_rel_diff(fused, unfused) < RTOL
    # Same seed, same weights: the SDPA graph agrees with the explicit-attention TorchScript graph.
    assert max_rel_diff(after[0], run_ort(load_graph(tiny.path), tiny.feeds[0])) < 1e-4

    again = fuse_attention(graph, FuseAttentionConfig(expected=expected, strict=True))
    assert again.rewritten == 0 and again.details["normalised"] == 0
    # LayerNorm and GELU stay single ops with this exporter too.
    norms = check_fused_norms(graph, CheckFusedNormsConfig())
    reference = check_fused_norms(load_graph(tiny.path), CheckFusedNormsConfig())
    assert (norms.details["layer_norm"], norms.details["gelu"]) == (
        reference.details["layer_norm"],
        reference.details["gelu"],
    )
    assert norms.details["erf"] == 0 and norms.warnings == []


# ---------------------------------------------------------------------------------------------------------
# synthetic graphs: the pattern variants and the misses


class Builder:
    def __init__(self, opset: int = 20) -> None:
        self.nodes: list[gs.Node] = []
        self.inputs: list[gs.Variable] = []
        self.opset = opset

    def input(self, name: str, shape: tuple[int, ...]) -> gs.Variable:
        tensor = gs.Variable(name, dtype=np.float32, shape=list(shape))
        self.inputs.append(tensor)
        return tensor

    def op(self, op: str, *inputs: gs.Tensor, **attrs: Any) -> gs.Variable:
        out = gs.Variable(f"t{len(self.nodes)}", dtype=np.float32)
        self.nodes.append(gs.Node(op, name=f"n{len(self.nodes)}", inputs=list(inputs), outputs=[out], attrs=attrs))
        return out

    def graph(self, *outputs: gs.Variable) -> gs.Graph:
        return gs.Graph(nodes=self.nodes, inputs=self.inputs, outputs=list(outputs), opset=self.opset)


def const(value: Any, dtype: Any = np.float32) -> gs.Constant:
    const.count += 1  # type: ignore[attr-defined]
    return gs.Constant(f"c{const.count}", np.asarray(value, dtype=dtype))  # type: ignore[attr-defined]


const.count = 0  # type: ignore[attr-defined]


def attention_variant(variant: str) -> gs.Graph:
    """softmax(logits) @ v for one way of writing the logits (B=1, H=2, Sq=5, Sk=7, D=8)."""
    b = Builder()
    q, k, v = b.input("q", (1, 2, 5, 8)), b.input("k", (1, 2, 7, 8)), b.input("v", (1, 2, 7, 8))
    bias = b.input("bias", (1, 1, 5, 7))
    kt = b.op("Transpose", k, perm=[0, 1, 3, 2])
    if variant == "div_after_sub_bias":  # (q kᵀ - bias) / 4: the mask is -bias / 4
        logits = b.op("Div", b.op("Sub", b.op("MatMul", q, kt), bias), const(4.0))
    elif variant == "bias_first_scale_on_both":  # bias + (0.5 q)(kᵀ 0.25)
        product = b.op("MatMul", b.op("Mul", const(0.5), q), b.op("Mul", kt, const([0.25])))
        logits = b.op("Add", bias, product)
    elif variant == "k_given_transposed":  # no Transpose to undo: the pass inserts one
        kt_in = b.input("kt", (1, 2, 8, 7))
        logits = b.op("Mul", b.op("MatMul", q, kt_in), const(0.125))
    elif variant == "reshaped_view":  # the bias is added in a (2, 5, 7) view, FastSAM3D-style
        view = b.op("Reshape", b.op("MatMul", q, kt), const([2, 5, 7], np.int64))
        bias3 = b.input("bias3", (2, 5, 7))
        logits = b.op("Reshape", b.op("Add", view, bias3), const([1, 2, 5, 7], np.int64))
    else:
        raise AssertionError(variant)
    return b.graph(b.op("MatMul", b.op("Softmax", logits, axis=-1), v))


def feed_for(graph: gs.Graph, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in graph.inputs}


@pytest.mark.parametrize(
    "variant", ["div_after_sub_bias", "bias_first_scale_on_both", "k_given_transposed", "reshaped_view"]
)
def test_synthetic_variants_fuse_exactly(variant: str) -> None:
    graph = attention_variant(variant)
    feed = feed_for(graph)
    before = run_ort(graph, feed)

    report = fuse_attention(graph, FuseAttentionConfig(expected=1, strict=True))

    assert (report.matched, report.rewritten, report.skipped) == (1, 1, [])
    assert ops(graph)["Attention"] == 1 and ops(graph)["Softmax"] == 0
    assert max_rel_diff(run_ort(graph, feed), before) < RTOL
    assert fuse_attention(graph, FuseAttentionConfig(expected=1)).rewritten == 0


def miss_variant(variant: str) -> gs.Graph:
    b = Builder()
    q, k, v = b.input("q", (1, 2, 5, 8)), b.input("k", (1, 2, 7, 8)), b.input("v", (1, 2, 7, 8))
    if variant == "rank3":  # [B*H, S, D] attention: the pass emits 4-D Attention only
        q, k, v = b.input("q3", (2, 5, 8)), b.input("k3", (2, 7, 8)), b.input("v3", (2, 7, 8))
        probs = b.op("Softmax", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 2, 1])), axis=-1)
        return b.graph(b.op("MatMul", probs, v))
    logits = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2]))
    if variant == "cast_in_logits":
        probs = b.op("Softmax", b.op("Cast", logits, to=onnx.TensorProto.FLOAT), axis=-1)
        return b.graph(b.op("MatMul", probs, v))
    if variant == "probs_reused":  # the attention map is also an output
        probs = b.op("Softmax", b.op("Mul", logits, const(0.3)), axis=-1)
        return b.graph(b.op("MatMul", probs, v), probs)
    if variant == "view_bias_broadcasts":  # a (1, 5, 7) bias in a (2, 5, 7) view cannot become the mask
        view = b.op("Reshape", logits, const([2, 5, 7], np.int64))
        term = b.input("bias13", (1, 5, 7))
        back = b.op("Reshape", b.op("Add", view, term), const([1, 2, 5, 7], np.int64))
        return b.graph(b.op("MatMul", b.op("Softmax", back, axis=-1), v))
    raise AssertionError(variant)


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        ("rank3", "has rank 3; the pass emits 4-D Attention only"),
        ("cast_in_logits", "Cast 'n2' between Q·Kᵀ and the softmax is not a scale, bias or reshape"),
        ("probs_reused", "the attention probabilities 't3' are a graph output"),
        ("view_bias_broadcasts", "do not span axis 0"),
    ],
)
def test_misses_are_reported_with_a_reason_and_change_nothing(variant: str, reason: str) -> None:
    graph = miss_variant(variant)
    feed = feed_for(graph)
    before, counts = run_ort(graph, feed), ops(graph)

    report = fuse_attention(graph, FuseAttentionConfig(expected=1))

    assert report.rewritten == 0 and len(report.skipped) == 1 and reason in report.skipped[0], report.skipped
    assert report.details["softmax_left"] and report.warnings  # the left Softmax and the count are both flagged
    assert ops(graph) == counts and graph.opset == 20
    np.testing.assert_array_equal(run_ort(graph, feed)[0], before[0])


def test_opset_raise_refuses_an_op_whose_meaning_changed() -> None:
    """GroupNormalization-21 changed its scale/bias from per-group to per-channel: raising 18 -> 23 would
    silently change the model, so the pass refuses before rewriting anything."""
    b = Builder(opset=18)
    x = b.input("x", (1, 4, 6))
    normed = b.op("GroupNormalization", x, const(np.ones(2)), const(np.zeros(2)), num_groups=2)
    q = b.op("Reshape", normed, const([1, 2, 2, 6], np.int64))
    logits = b.op("Mul", b.op("MatMul", q, b.op("Transpose", q, perm=[0, 1, 3, 2])), const(0.4))
    graph = b.graph(b.op("MatMul", b.op("Softmax", logits, axis=-1), q))
    with pytest.raises(GraphPassError, match=r"GroupNormalization changed between opset 18 and 21"):
        fuse_attention(graph, FuseAttentionConfig())
    assert graph.opset == 18 and ops(graph)["Softmax"] == 1


def test_raise_opset_pass_keeps_outputs(tiny_graphs: dict[str, Any]) -> None:
    """Every op of the TorchScript graphs (If subgraphs included) only gained types between 20 and 23."""
    tiny = tiny_graphs["fastsam3d.encoder"]
    graph = load_graph(tiny.path)
    before = run_ort(graph, tiny.feeds[0])
    report = raise_opset(graph, RaiseOpsetConfig(target=23))
    assert report.rewritten == 1 and report.details["from"] == 20 and report.details["to"] == 23
    assert {"Cast", "Constant", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "If"} <= set(
        report.details["reversioned_ops"]
    )
    assert graph.opset == 23 and graph.ir_version == 11
    np.testing.assert_array_equal(run_ort(graph, tiny.feeds[0])[0], before[0])
    assert raise_opset(graph, RaiseOpsetConfig(target=23)).rewritten == 0


def test_existing_attention_gets_an_explicit_scale_and_past_inputs_are_reported() -> None:
    b = Builder(opset=23)
    q, k, v = b.input("q", (1, 2, 5, 8)), b.input("k", (1, 2, 7, 8)), b.input("v", (1, 2, 7, 8))
    y = b.op("Attention", q, k, v)
    graph = b.graph(y)
    feed = feed_for(graph)
    before = run_ort(graph, feed)
    report = fuse_attention(graph, FuseAttentionConfig(expected=1, strict=True))
    assert (report.matched, report.rewritten, report.details["normalised"]) == (1, 1, 1)
    assert graph.nodes[0].attrs["scale"] == pytest.approx(8**-0.5)
    assert max_rel_diff(run_ort(graph, feed), before) < RTOL

    past = Builder(opset=23)
    q, k, v = past.input("q", (1, 2, 5, 8)), past.input("k", (1, 2, 7, 8)), past.input("v", (1, 2, 7, 8))
    past_k, past_v = past.input("past_k", (1, 2, 3, 8)), past.input("past_v", (1, 2, 3, 8))
    y = past.op("Attention", q, k, v, gs.Variable.empty(), past_k, past_v)
    report = fuse_attention(past.graph(y), FuseAttentionConfig())
    assert report.rewritten == 0 and "uses past_key/value or extra outputs" in report.skipped[0]
