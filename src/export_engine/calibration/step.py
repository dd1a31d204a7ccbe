"""The calibration step of ``--precision hybrid``: measure, plan, search; the plan is then applied by a pass.

It runs inside the pass schedule, after the FP32 cleanups and attention fusion, because the plan must describe
that exact graph: the graph is saved (FP32), activation statistics are collected on it with ONNX Runtime on
calibration inputs (never the parity inputs), rules give a precision plan (or ``--precision-plan FILE`` is
reused), and a bounded sensitivity search keeps as much FP16 as the tolerances allow.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_graphsurgeon as gs

from export_engine.calibration.plan import HybridCastConfig, PrecisionPlan, plan_precision
from export_engine.calibration.search import SearchConfig, search_precision
from export_engine.calibration.statistics import collect_activation_stats
from export_engine.exporters.spec import Feed, Tolerance
from export_engine.graph_passes.base import PassReport, save_graph, timed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibratePrecisionConfig:
    graph_name: str
    feeds: Sequence[Feed]
    tolerances: Mapping[str, Tolerance]
    work_dir: Path
    plan_file: Path | None = None  # reuse this plan instead of measuring
    hybrid: HybridCastConfig = field(default_factory=HybridCastConfig)
    search: SearchConfig | None = field(default_factory=lambda: SearchConfig(max_evaluations=6))
    sink: dict[str, Any] = field(default_factory=dict)  # receives "plan" and "search" for the apply pass


def calibrate_precision(graph: gs.Graph, config: CalibratePrecisionConfig) -> PassReport:
    """Decide the precision plan for ``graph`` (changes nothing in the graph itself)."""
    report = PassReport("calibrate_precision")
    with timed(report):
        if config.plan_file is not None:
            plan = PrecisionPlan.from_json(config.plan_file)
            report.details["source"] = str(config.plan_file)
        else:
            path = config.work_dir / f"{config.graph_name}.calibration.onnx"
            save_graph(graph, path)
            stats = collect_activation_stats(path, list(config.feeds))
            plan = plan_precision(graph, stats, config.hybrid)
            report.details["source"] = f"measured on {len(config.feeds)} calibration input(s)"
            if config.search is not None:
                plan, search = search_precision(path, list(config.feeds), config.tolerances, plan, config=config.search)
                config.sink["search"] = search
                report.details["search"] = _search_summary(search)
        config.sink["plan"] = plan
        summary = plan.summary()
        report.matched = summary.get("nodes", 0)
        report.details["plan"] = summary
    return report


def _search_summary(search: Any) -> Any:
    to_dict = getattr(search, "to_dict", None)
    return to_dict() if callable(to_dict) else str(search)
