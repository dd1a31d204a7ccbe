"""search_precision: moves FP32 islands outward until the outputs pass, returns data-driven FP32 nodes to FP16
while they still pass, never returns values near FP16's range, and stops at its evaluation budget."""

from __future__ import annotations

from pathlib import Path

import pytest
from calibration.hybrid_testing import massive_mast3r_encoder

from export_engine.calibration.plan import HybridCastConfig, plan_precision
from export_engine.calibration.search import Evaluation, Known, SearchConfig, search_precision
from export_engine.calibration.statistics import collect_activation_stats
from export_engine.core.types import Tolerance
from export_engine.graph_passes.base import load_graph
from export_engine.graph_passes.precision_plan import PrecisionPlan

TOKENS = {"tokens": Tolerance(atol=1e-2, rtol=1e-2)}
FC2 = "/enc_blocks.1/mlp/fc2/MatMul"


@pytest.fixture(scope="module")
def hidden(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list, dict]:
    path, feeds = massive_mast3r_encoder(tmp_path_factory.mktemp("search"), "hidden")
    return path, feeds[:2], collect_activation_stats(path, feeds[:2])


def test_failing_plan_is_tightened_until_it_passes(hidden: tuple[Path, list, dict]) -> None:
    path, feeds, stats = hidden
    rules = plan_precision(load_graph(path), stats)
    massive = [k for k, e in rules.nodes.items() if e.rule == "magnitude"]
    blind = rules.with_precision(massive, "fp16", "default", "a plan that missed the massive activations")
    plan, report = search_precision(path, feeds, TOKENS, blind, config=SearchConfig(max_evaluations=6))
    assert report.passed and not report.steps[0].passed and report.steps[-1].passed
    assert FC2 in report.moved_to_fp32 and plan.nodes[FC2].precision == "fp32"
    assert len(report.steps) <= 6 and plan.metadata["created_by"] == "search_precision"
    assert report.final_outputs["tokens"]["passed"]


def test_passing_plan_is_relaxed_but_never_near_overflow(hidden: tuple[Path, list, dict]) -> None:
    path, feeds, stats = hidden
    cautious = plan_precision(load_graph(path), stats, HybridCastConfig(data_max=2.0))
    plan, report = search_precision(path, feeds, TOKENS, cautious, config=SearchConfig(max_evaluations=5))
    assert report.steps[0].passed and report.passed
    assert report.returned_to_fp16 and report.final_fp16_flop_share > report.initial_fp16_flop_share
    for key in report.returned_to_fp16:
        assert (plan.nodes[key].absmax or 0.0) <= SearchConfig().never_relax_above
    assert plan.nodes[FC2].precision == "fp32"  # reads |x| ~ 1e5: ORT-CPU parity cannot be trusted there


def test_budget_is_respected_and_failure_reported(hidden: tuple[Path, list, dict]) -> None:
    path, feeds, stats = hidden
    plan0 = plan_precision(load_graph(path), stats)
    seen: list[PrecisionPlan] = []

    def never(plan: PrecisionPlan) -> Evaluation:
        seen.append(plan)
        return Evaluation(False, {"tokens": {"max_abs": 1.0, "share_over": 1.0, "ratio": 9.0, "passed": False}}, 0.0)

    plan, report = search_precision(path, feeds, TOKENS, plan0, config=SearchConfig(max_evaluations=4),
                                    evaluate=never)  # fmt: skip
    assert len(seen) == len(report.steps) == 4 and not report.passed
    assert plan.fp16_flop_share() < plan0.fp16_flop_share()  # islands moved outward on every step


def test_known_graph_and_reference_give_the_same_search(hidden: tuple[Path, list, dict]) -> None:
    path, feeds, stats = hidden
    graph = load_graph(path)
    rules = plan_precision(graph, stats)
    massive = [k for k, e in rules.nodes.items() if e.rule == "magnitude"]
    blind = rules.with_precision(massive, "fp16", "default", "a plan that missed the massive activations")
    kept: list = []
    collect_activation_stats(path, feeds, keep_outputs=kept)
    before = [(n.op, [t.dtype for t in n.outputs]) for n in graph.nodes]
    config = SearchConfig(max_evaluations=4)
    alone, report_alone = search_precision(path, feeds, TOKENS, blind, config=config)
    given, report_given = search_precision(path, feeds, TOKENS, blind, config=config,
                                           known=Known(graph=graph, reference=kept))  # fmt: skip
    assert {k: e.precision for k, e in alone.nodes.items()} == {k: e.precision for k, e in given.nodes.items()}
    assert [s.passed for s in report_alone.steps] == [s.passed for s in report_given.steps]
    assert [(n.op, [t.dtype for t in n.outputs]) for n in graph.nodes] == before  # candidates were copies
    with pytest.raises(ValueError, match="reference outputs"):
        search_precision(path, feeds, TOKENS, blind, config=config, known=Known(reference=kept[:1]))
