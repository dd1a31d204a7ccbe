"""Running a precision's steps over one graph: load, run each step (logging one line each), save."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx_graphsurgeon as gs

from export_engine.config import ExportConfig
from export_engine.core.types import Feed, ModelSpec
from export_engine.graph_passes.base import PassReport, load_graph, save_graph
from export_engine.graph_passes.precision_plan import PrecisionPlan

log = logging.getLogger(__name__)


@dataclass
class PassContext:
    """What a scheduled step may read about the graph it runs on; the calibration stage sets ``plan``."""

    spec: ModelSpec
    config: ExportConfig
    calibration: Sequence[Feed]  # calibration inputs (never the parity gate's)
    fp32_path: Path  # the exported FP32 graph; scratch files go beside it
    plan: PrecisionPlan | None = None  # hybrid: made by calibration, applied by apply_precision_plan

    @property
    def work_dir(self) -> Path:
        return self.fp32_path.parent


# A scheduled step: (name, step). A step builds its pass's config from the context and runs the pass on the
# graph; the calibration step also records its plan in the context. Names are what --skip-pass takes.
Step = Callable[[gs.Graph, PassContext], PassReport]
ScheduledPass = tuple[str, Step]


def run_passes(final_path: Path, context: PassContext, passes: Sequence[ScheduledPass] = ()) -> list[PassReport]:
    """Apply ``passes`` (minus ``--skip-pass``) to the graph at ``context.fp32_path``; write ``final_path``."""
    active = [p for p in passes if p[0] not in context.config.skip_passes]
    if not active:
        _copy_onnx(context.fp32_path, final_path)
        return []
    graph = load_graph(context.fp32_path)
    reports = []
    for name, step in active:
        report = step(graph, context)
        log.info("pass %-24s %s: %s (%.1f s)", name, context.spec.name, report.summary(), report.seconds)
        reports.append(report)
    save_graph(graph, final_path)
    return reports


def _copy_onnx(source: Path, target: Path) -> None:
    """Copy an ONNX file and its external data file (the data file keeps its relative name)."""
    import onnx

    proto = onnx.load(str(source), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    if not locations:
        shutil.copyfile(source, target)
        return
    data = target.with_name(target.name + ".data")
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data.name
    (location,) = locations
    shutil.copyfile(source.with_name(location), data)
    onnx.save_model(proto, str(target))
