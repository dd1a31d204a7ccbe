"""PrecisionPlan: rules, thresholds, FLOPs, JSON round trip and node identity across re-exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from calibration.hybrid_testing import attention_block, block_feeds, save_model

from export_engine.calibration.plan import HybridCastConfig, plan_precision
from export_engine.calibration.statistics import collect_activation_stats
from export_engine.errors import UsageError
from export_engine.graph_passes.apply_precision_plan import ApplyPrecisionPlanConfig, apply_precision_plan
from export_engine.graph_passes.base import load_graph
from export_engine.graph_passes.precision_plan import PrecisionPlan


@pytest.fixture(scope="module")
def block(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = save_model(attention_block(), tmp_path_factory.mktemp("plan") / "block.onnx")
    return path, collect_activation_stats(path, block_feeds())


def test_rules_and_flops(block: tuple[Path, dict]) -> None:
    path, stats = block
    plan = plan_precision(load_graph(path), stats)
    rules = {key: (e.precision, e.rule) for key, e in plan.nodes.items()}
    assert rules["ln1"] == rules["ln2"] == ("fp32", "layernorm")
    assert rules["conf_exp"] == ("fp32", "exp_head")
    assert rules["attention"] == ("fp16", "attention")
    assert rules["fc1"] == ("fp16", "default")
    # FLOPs from shapes: MatMul (1, 8, 16) x (16, 64) and Attention (1, 2, 8, 8): 2 B H S S (Dk + Dv).
    assert plan.nodes["fc1"].flops == 2 * 8 * 16 * 64 and plan.nodes["fc1"].depth == 16
    assert plan.nodes["attention"].flops == 2 * 2 * 8 * 8 * (8 + 8)
    summary = plan.summary()
    total = sum(e.flops for e in plan.nodes.values())
    fp16 = sum(e.flops for e in plan.nodes.values() if e.precision == "fp16")
    assert summary["fp16_flop_share"] == pytest.approx(fp16 / total, abs=1e-6) and fp16 == total  # no big values
    assert summary["casts"] > 0 and summary["fp32_islands"] >= 2  # LN islands, the exp head
    assert "head" in {n for n, e in plan.nodes.items() if e.flops} and plan.nodes["head"].precision == "fp16"


def test_thresholds_are_configurable(block: tuple[Path, dict]) -> None:
    path, stats = block
    strict = plan_precision(load_graph(path), stats, HybridCastConfig(data_max=0.5, max_reduction_depth=32))
    reasons = {key: e.rule for key, e in strict.nodes.items() if e.precision == "fp32"}
    assert reasons["fc2"] in ("magnitude", "reduction_depth")  # K = 64 > 32, and |x| > 0.5
    assert "magnitude" in reasons.values()
    assert strict.nodes["attention"].precision == "fp16"  # fused attention stays FP16 ...
    assert any("attention" in w for w in strict.metadata["warnings"])  # ... with a warning
    assert strict.fp16_flop_share() < plan_precision(load_graph(path), stats).fp16_flop_share()


def test_json_round_trip(block: tuple[Path, dict], tmp_path: Path) -> None:
    path, stats = block
    plan = plan_precision(load_graph(path), stats)
    file = tmp_path / "plan.json"
    text = plan.to_json(file)
    data = json.loads(text)
    assert data["format"] == "export-engine-precision-plan" and data["nodes"]["ln1"]["reason"]
    again = PrecisionPlan.from_json(file)
    assert again.nodes == plan.nodes and again.metadata == json.loads(json.dumps(plan.metadata))
    assert PrecisionPlan.from_json(text).nodes == plan.nodes
    with pytest.raises(UsageError, match="not a precision plan"):
        PrecisionPlan.from_json('{"nodes": {}}')
    with pytest.raises(UsageError, match="cannot read"):
        PrecisionPlan.from_json(tmp_path / "missing.json")
    bad = json.loads(text)
    bad["nodes"]["fc1"]["precision"] = "int8"
    with pytest.raises(UsageError, match="int8"):
        PrecisionPlan.from_json(json.dumps(bad))


def test_structural_key_when_names_change(block: tuple[Path, dict]) -> None:
    """A plan still applies when node names differ (falls back to op + ordinal in graph order)."""
    path, stats = block
    plan = plan_precision(load_graph(path), stats)
    graph = load_graph(path)
    for node in graph.nodes:
        node.name = f"renamed_{node.name}"
    report = apply_precision_plan(graph, ApplyPrecisionPlanConfig(plan, strict=True))
    assert report.matched == len(plan.nodes) and not report.skipped
    ln = next(n for n in graph.nodes if n.name == "renamed_ln1")
    assert all(str(t.dtype) == "float32" for t in ln.inputs)


def test_node_names_survive_reexport(tmp_path: Path) -> None:
    """Our exporter names nodes deterministically for a model and config, so plans keyed by name are reusable."""
    import torch

    from export_engine.exporters.onnx_from_torch import onnx_from_torch
    from export_engine.exporters.registry import get_family

    family = get_family("mast3r")
    names = []
    for i in range(2):
        loaded = family.load(family.tiny_config(), None, i)  # other random weights: same structure
        encoder = family.graphs(loaded.config, family.tiny_shape)[0]
        images = torch.zeros(1, 3, *encoder.inputs[0].shape[2:])
        path = tmp_path / f"encoder{i}.onnx"
        onnx_from_torch(encoder.build_module(loaded.module), (images,), path, encoder)
        names.append([(n.op, n.name) for n in load_graph(path).nodes])
    assert names[0] == names[1]
