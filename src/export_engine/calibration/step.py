"""The calibration stage of ``--precision hybrid``: measure, plan, search; it returns a :class:`PrecisionPlan`
that the ``apply_precision_plan`` pass then applies.

It runs inside the pass schedule, after the FP32 cleanups and attention fusion, because the plan must describe
that exact graph (it changes nothing in the graph itself): activation statistics are collected on it in memory
with ONNX Runtime on calibration inputs (never the parity inputs), rules give a precision plan (or
``--precision-plan FILE`` is reused), and a bounded sensitivity search keeps as much FP16 as the tolerances
allow.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from export_engine.calibration.plan import HybridCastConfig, plan_precision
from export_engine.calibration.search import Known, SearchConfig, search_precision
from export_engine.calibration.sessions import in_memory_model
from export_engine.calibration.statistics import collect_activation_stats
from export_engine.core.types import Feed, Tolerance
from export_engine.graph_passes.base import PassReport, timed
from export_engine.graph_passes.precision_plan import PrecisionPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibratePrecisionConfig:
    graph_name: str
    feeds: Sequence[Feed]
    tolerances: Mapping[str, Tolerance]
    plan_file: Path | None = None  # reuse this plan instead of measuring
    hybrid: HybridCastConfig = field(default_factory=HybridCastConfig)
    search: SearchConfig | None = field(default_factory=lambda: SearchConfig(max_evaluations=6))


@dataclass
class CalibrationResult:
    """The plan calibration decided, the search's record (None when it did not search) and the step's report."""

    plan: PrecisionPlan
    report: PassReport
    search: Any = None


def calibrate_precision(graph: gs.Graph, config: CalibratePrecisionConfig) -> CalibrationResult:
    """Decide the precision plan for ``graph`` (changes nothing in the graph itself)."""
    report = PassReport("calibrate_precision")
    search = None
    with timed(report):
        if config.plan_file is not None:
            plan = PrecisionPlan.from_json(config.plan_file)
            report.details["source"] = str(config.plan_file)
        else:
            # The graph as it is in memory, its weights read in place by ONNX Runtime: no calibration copy on disk.
            model = in_memory_model(graph)
            fp32_outputs: list[dict[str, np.ndarray]] = []  # the same run gives the search its FP32 reference
            stats = collect_activation_stats(model, list(config.feeds), keep_outputs=fp32_outputs)
            del model
            plan = plan_precision(graph, stats, config.hybrid)
            report.details["source"] = f"measured on {len(config.feeds)} calibration input(s)"
            if config.search is not None:
                known = Known(graph=graph, reference=fp32_outputs)
                plan, search = search_precision(None, list(config.feeds), config.tolerances, plan,
                                                config=config.search, known=known)  # fmt: skip
                report.details["search"] = _search_summary(search)
        summary = plan.summary()
        report.matched = summary.get("nodes", 0)
        report.details["plan"] = summary
    return CalibrationResult(plan, report, search)


def _search_summary(search: Any) -> Any:
    to_dict = getattr(search, "to_dict", None)
    return to_dict() if callable(to_dict) else str(search)
