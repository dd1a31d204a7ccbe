"""apply_precision_plan: strongly typed hybrid graphs with FP32 islands exactly where the plan says, minimal
shared casts, FP16 attention without casts around it, FP32 graph I/O, and a second run that changes nothing."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import onnx_graphsurgeon as gs
import pytest
from calibration.hybrid_testing import (
    LOOSE,
    attention_block,
    block_feeds,
    cached_stats,
    check_strongly_typed,
    compare_all,
    io_dtypes,
    node_by_name,
    run_ort,
    save_model,
)

from export_engine.calibration.plan import plan_precision
from export_engine.calibration.statistics import collect_activation_stats
from export_engine.errors import GraphPassError
from export_engine.graph_passes.apply_precision_plan import ApplyPrecisionPlanConfig, apply_precision_plan
from export_engine.graph_passes.base import load_graph, save_graph
from export_engine.graph_passes.graph_facts import FP16, FP32, is_boundary_cast, np_dtype
from export_engine.graph_passes.precision_plan import PrecisionPlan, current_precisions

log = logging.getLogger(__name__)
TINY = ("mast3r.encoder", "mast3r.decoder", "fastsam3d.encoder", "fastsam3d.prompt_decoder")


def _hybrid(source: Path, feeds: list, target: Path) -> tuple[Path, PrecisionPlan, object]:
    graph = load_graph(source)
    plan = plan_precision(graph, cached_stats(source, feeds))
    report = apply_precision_plan(graph, ApplyPrecisionPlanConfig(plan))
    save_graph(graph, target, external_data=False)
    return target, plan, report


def _casts_are_minimal(path: Path) -> int:
    graph = load_graph(path)
    casts = [(n.inputs[0].name, n.attrs["to"]) for n in graph.nodes if is_boundary_cast(n)]
    assert len(casts) == len(set(casts)), [c for c, k in Counter(casts).items() if k > 1]
    return len(casts)


@pytest.mark.parametrize("key", TINY)
def test_tiny_graph_hybrid(tiny_graphs: dict, tmp_path: Path, key: str) -> None:
    tiny = tiny_graphs[key]
    path, plan, report = _hybrid(tiny.path, tiny.feeds, tmp_path / "hybrid.onnx")
    check_strongly_typed(path)
    assert io_dtypes(path) == io_dtypes(tiny.path)
    graph = load_graph(path)
    for node in graph.nodes:
        if node.op == "LayerNormalization":  # input, scale and bias are cast: TensorRT 11 follows input dtypes
            assert [np_dtype(t) for t in node.inputs] == [FP32] * len(node.inputs), node.name
        if node.op in ("Exp", "ReduceL2"):
            assert np_dtype(node.inputs[0]) == FP32 and np_dtype(node.outputs[0]) == FP32, node.name
        if node.op in ("MatMul", "Conv", "Gemm"):
            assert np_dtype(node.outputs[0]) == FP16, node.name  # benign random weights: matrix ops stay FP16
    # The graph computes exactly what the plan says, and the plan's cast count is what the pass inserted.
    planned = {k: e.precision for k, e in plan.nodes.items()}
    assert current_precisions(graph) == planned
    summary = plan.summary()
    assert _casts_are_minimal(path) == summary["casts"] == report.details["casts_added"]  # type: ignore[attr-defined]
    assert 0.99 <= summary["fp16_flop_share"] <= 1.0 and summary["gflops"] > 0
    worst = compare_all(run_ort(tiny.path, tiny.feeds), run_ort(path, tiny.feeds), LOOSE)
    log.info("%s hybrid max abs errors: %s; %s", key, {n: f"{o.max_abs:.3g}" for n, o in worst.items()},
             plan.summary_line())  # fmt: skip
    assert all(o.passed for o in worst.values()), {n: (o.max_abs, o.share_over) for n, o in worst.items()}


def test_fastsam3d_layernorm3d_is_an_fp32_island(tiny_graphs: dict, tmp_path: Path) -> None:
    """The hand-written LayerNorm3d (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div) is FP32 as a whole."""
    tiny = tiny_graphs["fastsam3d.encoder"]
    graph = load_graph(tiny.path)
    plan = plan_precision(graph, cached_stats(tiny.path, tiny.feeds))
    island = [k for k, e in plan.nodes.items() if e.rule == "normalization" and "/neck/neck.1/" in k]
    assert {plan.nodes[k].op for k in island} >= {"ReduceMean", "Sub", "Pow", "Add", "Sqrt", "Div"}
    assert all(plan.nodes[k].precision == "fp32" for k in island)


def test_mast3r_heads_are_fp32(tiny_graphs: dict) -> None:
    """exp/expm1 heads and everything after them, and descriptor normalisation, are FP32 by rule."""
    tiny = tiny_graphs["mast3r.decoder"]
    plan = plan_precision(load_graph(tiny.path), cached_stats(tiny.path, tiny.feeds))
    by_op = {(e.op, e.rule) for e in plan.nodes.values() if e.precision == "fp32"}
    assert {("Exp", "exp_head"), ("ReduceL2", "normalization")} <= by_op
    for key, entry in plan.nodes.items():
        if entry.op in ("Exp", "ReduceL2", "LayerNormalization"):
            assert entry.precision == "fp32", key


def test_attention_stays_fp16_without_casts_around_it(tmp_path: Path) -> None:
    source = save_model(attention_block(), tmp_path / "block.onnx")
    feeds = block_feeds()
    path, plan, _ = _hybrid(source, feeds, tmp_path / "hybrid.onnx")
    check_strongly_typed(path)
    assert plan.nodes["attention"].precision == "fp16" and plan.nodes["attention"].rule == "attention"
    graph = load_graph(path)
    attention = node_by_name(graph, "attention")
    assert [np_dtype(t) for t in attention.inputs] == [FP16] * 3
    assert all(t.inputs[0].op != "Cast" for t in attention.inputs)
    assert all(c.op != "Cast" for c in attention.outputs[0].outputs)
    assert np_dtype(node_by_name(graph, "conf_exp").inputs[0]) == FP32
    worst = compare_all(run_ort(source, feeds), run_ort(path, feeds), LOOSE)
    assert all(o.passed for o in worst.values())


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    source = save_model(attention_block(), tmp_path / "block.onnx")
    path, plan, _ = _hybrid(source, block_feeds(), tmp_path / "hybrid.onnx")
    graph = load_graph(path)
    before = [(n.op, n.name, [t.name for t in n.inputs], [str(np_dtype(t)) for t in n.outputs]) for n in graph.nodes]
    report = apply_precision_plan(graph, ApplyPrecisionPlanConfig(plan))
    after = [(n.op, n.name, [t.name for t in n.inputs], [str(np_dtype(t)) for t in n.outputs]) for n in graph.nodes]
    assert report.rewritten == 0 and report.details["casts_added"] == 0 and before == after


def test_reapplying_another_plan_stays_valid(tmp_path: Path) -> None:
    """Moving a node of a hybrid graph back to FP32 (what the search does) leaves no dead casts behind."""
    source = save_model(attention_block(), tmp_path / "block.onnx")
    feeds = block_feeds()
    path, plan, _ = _hybrid(source, feeds, tmp_path / "hybrid.onnx")
    graph = load_graph(path)
    moved = plan.with_precision(["fc1", "fc1_bias", "act"], "fp32", "user", "test")
    apply_precision_plan(graph, ApplyPrecisionPlanConfig(moved))
    second = save_graph_checked(graph, tmp_path / "again.onnx")
    assert current_precisions(load_graph(second)) == {k: e.precision for k, e in moved.nodes.items()}
    _casts_are_minimal(second)
    worst = compare_all(run_ort(source, feeds), run_ort(second, feeds), LOOSE)
    assert all(o.passed for o in worst.values())


def save_graph_checked(graph: gs.Graph, path: Path) -> Path:
    save_graph(graph, path, external_data=False)
    check_strongly_typed(path)
    return path


def test_plan_that_does_not_fit(tmp_path: Path) -> None:
    source = save_model(attention_block(), tmp_path / "block.onnx")
    plan = plan_precision(load_graph(source), collect_activation_stats(source, block_feeds(1)))
    entry = plan.nodes["fc1"]
    plan.nodes["no_such_node"] = type(entry)(**{**entry.to_dict(), "ordinal": 99})
    graph = load_graph(source)
    report = apply_precision_plan(graph, ApplyPrecisionPlanConfig(plan))
    assert any("no_such_node" in s for s in report.skipped)
    with pytest.raises(GraphPassError, match="does not fit"):
        apply_precision_plan(load_graph(source), ApplyPrecisionPlanConfig(plan, strict=True))


def test_after_fuse_attention(tiny_graphs: dict, tmp_path: Path) -> None:
    """On the real pass order (opset 23, fused attention): Attention keeps FP16 Q/K/V and no casts around it."""
    fusion = pytest.importorskip("export_engine.graph_passes.fuse_attention")
    opset = pytest.importorskip("export_engine.graph_passes.raise_opset")
    cleanup = pytest.importorskip("export_engine.graph_passes.cleanup")
    tiny = tiny_graphs["mast3r.encoder"]
    graph = load_graph(tiny.path)
    opset.raise_opset(graph, opset.RaiseOpsetConfig())
    cleanup.fold_constants(graph, cleanup.FoldConstantsConfig())
    fusion.fuse_attention(graph, fusion.FuseAttentionConfig())
    fused = tmp_path / "fused.onnx"
    save_graph(graph, fused, external_data=False)
    if not any(n.op == "Attention" for n in graph.nodes):
        pytest.skip("fuse_attention did not fuse the tiny encoder")
    path, plan, _ = _hybrid(fused, tiny.feeds, tmp_path / "hybrid.onnx")
    check_strongly_typed(path)
    attention = [n for n in load_graph(path).nodes if n.op == "Attention"]
    assert attention and all(plan.nodes[n.name].rule == "attention" for n in attention)
    for node in attention:
        assert all(np_dtype(t) == FP16 for t in node.inputs if t.name)
        assert not any(t.inputs and t.inputs[0].op == "Cast" for t in node.inputs if t.name)
        assert not any(c.op == "Cast" for c in node.outputs[0].outputs)
    worst = compare_all(run_ort(fused, tiny.feeds), run_ort(path, tiny.feeds), LOOSE)
    assert all(o.passed for o in worst.values())
