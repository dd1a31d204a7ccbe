"""fold_constants (incl. the squeeze-If removal), replace_einsum and check_fused_norms."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from export_engine.errors import GraphPassError
from export_engine.graph_passes.base import load_graph
from export_engine.graph_passes.cleanup import (
    CheckFusedNormsConfig,
    FoldConstantsConfig,
    ReplaceEinsumConfig,
    check_fused_norms,
    fold_constants,
    replace_einsum,
)

RTOL = 1e-5  # max |after - before| relative to max |before|, per output


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
# fold_constants


def test_fold_constants_removes_the_squeeze_ifs(tiny_graphs: dict[str, Any]) -> None:
    """The FastSAM3D encoder's `.squeeze(-2)` calls export as If nodes; with shapes inferred they fold."""
    tiny = tiny_graphs["fastsam3d.encoder"]
    graph = load_graph(tiny.path)
    assert ops(graph)["If"] == 6
    before = run_all(graph, tiny.feeds)
    spec_shapes = {t.name: t.shape for t in tiny.spec.inputs}

    report = fold_constants(graph, FoldConstantsConfig(input_shapes=spec_shapes))

    assert ops(graph)["If"] == 0 and report.details["if_before"] == 6 and report.skipped == []
    assert report.details["nodes_after"] < report.details["nodes_before"] // 2
    assert graph.inputs[0].shape == ["batch", 1, 64, 64, 64]  # the batch stays dynamic
    for after, ref in zip(run_all(graph, tiny.feeds), before, strict=True):
        assert max_rel_diff(after, ref) < RTOL

    names = [n.name for n in graph.nodes]
    again = fold_constants(graph, FoldConstantsConfig(input_shapes=spec_shapes))
    assert again.rewritten == 0 and [n.name for n in graph.nodes] == names


def test_fold_constants_makes_the_attention_scale_constant(tiny_graphs: dict[str, Any]) -> None:
    """MASt3R's scale is head_dim ** -0.5 computed from Shape(q) until shapes are folded."""
    graph = load_graph(tiny_graphs["mast3r.encoder"].path)
    fold_constants(graph, FoldConstantsConfig())
    for softmax in (n for n in graph.nodes if n.op == "Softmax"):
        scale = softmax.inputs[0].inputs[0]
        assert scale.op == "Mul" and isinstance(scale.inputs[1], gs.Constant)
        assert float(scale.inputs[1].values) == pytest.approx(32**-0.5)


def test_fold_constants_rejects_shapes_that_contradict_the_graph(tiny_graphs: dict[str, Any]) -> None:
    graph = load_graph(tiny_graphs["mast3r.encoder"].path)
    with pytest.raises(GraphPassError, match=r"input 'images' has rank 4 .* the spec declares \(1, 3, 48\)"):
        fold_constants(graph, FoldConstantsConfig(input_shapes={"images": (1, 3, 48)}))
    with pytest.raises(GraphPassError, match="the spec declares input 'image'; the graph has"):
        fold_constants(graph, FoldConstantsConfig(input_shapes={"image": (1, 3, 48, 80)}))


# ---------------------------------------------------------------------------------------------------------
# replace_einsum


def einsum_graph(equation: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...], opset: int = 20) -> gs.Graph:
    a = gs.Variable("a", dtype=np.float32, shape=list(shape_a))
    b = gs.Variable("b", dtype=np.float32, shape=list(shape_b))
    out = gs.Variable("y", dtype=np.float32)
    node = gs.Node("Einsum", name="einsum", attrs={"equation": equation}, inputs=[a, b], outputs=[out])
    return gs.Graph(nodes=[node], inputs=[a, b], outputs=[out], opset=opset)


@pytest.mark.parametrize(
    ("equation", "shape_a", "shape_b", "transposes"),
    [
        ("bhqd,bhkd->bhqk", (2, 3, 5, 4), (2, 3, 6, 4), 1),  # q·kᵀ: K is transposed
        ("bij,bjk->bik", (2, 5, 4), (2, 4, 6), 0),  # already a MatMul
        ("bhqk,bhkd->bqhd", (2, 3, 5, 6), (2, 3, 6, 4), 1),  # output heads-last: transposed back
        ("ki,kj->ij", (4, 5), (4, 6), 1),  # Aᵀ·B
    ],
)
def test_replace_einsum_rewrites_plain_matmuls(
    equation: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...], transposes: int
) -> None:
    graph = einsum_graph(equation, shape_a, shape_b)
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal(shape_a).astype(np.float32), "b": rng.standard_normal(shape_b).astype(np.float32)}
    before = run_ort(graph, feed)

    report = replace_einsum(graph, ReplaceEinsumConfig(strict=True))

    assert (report.matched, report.rewritten, report.skipped) == (1, 1, [])
    assert ops(graph) == Counter({"MatMul": 1, **({"Transpose": transposes} if transposes else {})})
    assert all(n.name.startswith("replace_einsum/") for n in graph.nodes)
    after = run_ort(graph, feed)
    assert after[0].dtype == np.float32 and max_rel_diff(after, before) < RTOL
    again = replace_einsum(graph, ReplaceEinsumConfig(strict=True))
    assert (again.matched, again.rewritten) == (0, 0)


@pytest.mark.parametrize(
    ("equation", "shape_a", "shape_b", "reason"),
    [
        ("nchw,nkc->nkhw", (1, 3, 4, 5), (1, 2, 3), "not a plain matmul"),  # two free letters in A
        ("bij,bjk->bk", (2, 3, 4), (2, 4, 5), "not a plain matmul"),  # also sums over i
        ("...ij,...jk->...ik", (2, 3, 4), (2, 4, 5), "uses an ellipsis"),
        ("bii,bij->bj", (2, 3, 3), (2, 3, 4), "repeats a letter"),
    ],
)
def test_replace_einsum_reports_what_it_leaves(
    equation: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...], reason: str
) -> None:
    graph = einsum_graph(equation, shape_a, shape_b)
    report = replace_einsum(graph, ReplaceEinsumConfig())
    assert report.rewritten == 0 and len(report.skipped) == 1 and reason in report.skipped[0]
    assert ops(graph) == Counter({"Einsum": 1})
    with pytest.raises(GraphPassError, match=reason):
        replace_einsum(graph, ReplaceEinsumConfig(strict=True))


# ---------------------------------------------------------------------------------------------------------
# check_fused_norms


@pytest.mark.parametrize(
    ("key", "layer_norms", "gelus", "decomposed"),
    [
        ("mast3r.encoder", 7, 3, 0),
        ("mast3r.decoder", 34, 10, 0),
        ("fastsam3d.encoder", 6, 4, 2),  # neck LayerNorm3d x2: mean over channels (axis 1)
        ("fastsam3d.prompt_decoder", 9, 4, 3),  # LayerNorm3d in the mask downscaling and the upscaling
    ],
)
def test_check_fused_norms_on_the_tiny_graphs(
    tiny_graphs: dict[str, Any], key: str, layer_norms: int, gelus: int, decomposed: int
) -> None:
    graph = load_graph(tiny_graphs[key].path)
    counts = ops(graph)
    config = CheckFusedNormsConfig(expected_layer_norms=layer_norms, expected_gelus=gelus, strict=True)
    report = check_fused_norms(graph, config)
    assert (report.details["layer_norm"], report.details["gelu"]) == (layer_norms, gelus)
    assert len(report.details["decomposed_norms"]) == decomposed and report.warnings == []
    assert all("not over the last axis" in reason for reason in report.skipped)
    assert report.rewritten == 0 and ops(graph) == counts


def hand_written_norm_graph(axis: int) -> gs.Graph:
    """(x - mean) / sqrt(var + eps) over ``axis`` of a (2, 3, 4) input, plus an erf GELU."""
    x = gs.Variable("x", dtype=np.float32, shape=[2, 3, 4])
    nodes: list[gs.Node] = []

    def op(kind: str, *inputs: gs.Tensor, **attrs: Any) -> gs.Variable:
        out = gs.Variable(f"t{len(nodes)}", dtype=np.float32)
        nodes.append(gs.Node(kind, name=f"n{len(nodes)}", inputs=list(inputs), outputs=[out], attrs=attrs))
        return out

    axes = gs.Constant("axes", np.array([axis], np.int64))
    centred = op("Sub", x, op("ReduceMean", x, axes))
    variance = op("ReduceMean", op("Pow", centred, gs.Constant("two", np.array(2, np.float32))), axes)
    std = op("Sqrt", op("Add", variance, gs.Constant("eps", np.array(1e-6, np.float32))))
    y = op("Erf", op("Div", centred, std))
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=20)


def test_check_fused_norms_flags_hand_written_trailing_norm_and_gelu() -> None:
    report = check_fused_norms(hand_written_norm_graph(axis=-1), CheckFusedNormsConfig())
    assert report.details["decomposed_norms"] == ["n0"] and report.details["erf"] == 1
    assert len(report.warnings) == 2 and "decomposed LayerNorm over the last axis at n0" in report.warnings[0]
    with pytest.raises(GraphPassError, match="decomposed LayerNorm over the last axis"):
        check_fused_norms(hand_written_norm_graph(axis=2), CheckFusedNormsConfig(strict=True))


def test_check_fused_norms_reports_channel_first_norm_as_skipped() -> None:
    graph = hand_written_norm_graph(axis=1)
    graph.nodes = [n for n in graph.nodes if n.op != "Erf"]
    graph.outputs = [graph.nodes[-1].outputs[0]]
    report = check_fused_norms(graph, CheckFusedNormsConfig(strict=True))
    assert report.warnings == []
    assert report.skipped == ["decomposed norm at n0 (axes [1] of rank 3): not over the last axis, left as primitives"]


def test_check_fused_norms_count_mismatch(tiny_graphs: dict[str, Any]) -> None:
    graph = load_graph(tiny_graphs["mast3r.encoder"].path)
    assert check_fused_norms(graph, CheckFusedNormsConfig(expected_gelus=4)).warnings
    with pytest.raises(GraphPassError, match="found 7 LayerNormalization ops, the model spec expects 8"):
        check_fused_norms(graph, CheckFusedNormsConfig(expected_layer_norms=8, strict=True))
