"""Running a precision's pass tuple over one graph: load, run each pass (logging one line each), save."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from export_engine.config import ExportConfig
from export_engine.exporters.spec import Feed, ModelSpec
from export_engine.graph_passes.base import PassReport, load_graph, save_graph

log = logging.getLogger(__name__)

# A scheduled pass: (name, function building its config from the run's context, the pass itself).
# The context gives a pass what it may need: the spec, the export config, calibration feeds, the FP32 path.
PassContext = Mapping[str, Any]
ScheduledPass = tuple[str, Callable[[PassContext], Any], Callable[[Any, Any], PassReport]]


def run_passes(
    fp32_path: Path,
    final_path: Path,
    spec: ModelSpec,
    config: ExportConfig,
    calibration: Sequence[Feed],
    extra: dict[str, Any],
    passes: Sequence[ScheduledPass] = (),
    scratch: dict[str, Any] | None = None,
) -> list[PassReport]:
    """Apply ``passes`` (minus ``config.skip_passes``) to the graph at ``fp32_path``; write ``final_path``."""
    active = [p for p in passes if p[0] not in config.skip_passes]
    if not active:
        _copy_onnx(fp32_path, final_path)
        return []
    graph = load_graph(fp32_path)
    context: dict[str, Any] = {
        "spec": spec,
        "config": config,
        "calibration": calibration,
        "fp32_path": fp32_path,
        "work_dir": fp32_path.parent,
        "extra": extra.setdefault("graphs", {}).setdefault(spec.name, {}),  # JSON facts for the manifest
        "scratch": scratch if scratch is not None else {},  # objects passed between passes (e.g. the plan)
    }
    reports = []
    for name, make_config, run_pass in active:
        report = run_pass(graph, make_config(context))
        log.info("pass %-24s %s: %s (%.1f s)", name, spec.name, report.summary(), report.seconds)
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
