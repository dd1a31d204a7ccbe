"""The record of one export, and the two files written from it: the manifest and parity.json.

Every stage of :mod:`export_engine.pipeline` adds to one :class:`ExportRun`; the manifest (schema in
docs/ARTIFACT.md) and parity.json are both derived from it here, so they cannot disagree.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from export_engine.artifacts.manifest import value_info, versions
from export_engine.artifacts.store import ARTIFACT_KIND, SCHEMA_VERSION
from export_engine.config import ExportConfig
from export_engine.core.types import ModelSpec
from export_engine.exporters.onnx_from_torch import OnnxExportResult
from export_engine.exporters.spec import FamilySpec
from export_engine.graph_passes.base import PassReport
from export_engine.graph_passes.precision_plan import PrecisionPlan
from export_engine.progress import stage
from export_engine.validation.compare import GraphParityReport, format_table


@dataclass
class ExportRun:
    """The record of one export: what every stage produced. The manifest and parity.json are both written
    from it (:func:`build_manifest`, :func:`parity_record`)."""

    family: FamilySpec
    config: ExportConfig
    specs: tuple[ModelSpec, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=dict)
    exports: dict[str, OnnxExportResult] = field(default_factory=dict)
    exporter_parity: list[GraphParityReport] = field(default_factory=list)
    final_parity: list[GraphParityReport] = field(default_factory=list)
    passes: dict[str, list[PassReport]] = field(default_factory=dict)
    backend: str = "onnx"  # what --backend resolved to, and why
    backend_reason: str = ""
    engines: list[dict[str, Any]] = field(default_factory=list)  # one record per built engine
    plans: dict[str, PrecisionPlan] = field(default_factory=dict)  # hybrid: each graph's precision plan
    # per graph: the exported FP32 ONNX's outputs on the parity feeds (from the first gate, for the final one)
    fp32_outputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    graph_facts: dict[str, dict[str, Any]] = field(default_factory=dict)  # per graph: extra manifest facts

    def stage(self, name: str) -> Any:
        return stage(name, self.timings, self.peaks)


def graph_record(staging: Path, run: ExportRun, name: str) -> dict[str, Any]:
    spec = next(s for s in run.specs if s.name == name)
    path = staging / f"{name}.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    data_files = sorted({e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"})
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    tolerances = spec.tolerances[run.config.precision]
    record: dict[str, Any] = {
        "name": name,
        "file": path.name,
        "data_files": data_files,
        "opset": opset,
        "exporter": run.exports[name].exporter,
        "nodes": len(proto.graph.node),
        "op_counts": dict(sorted(ops.items())),
        "inputs": [value_info(v) for v in proto.graph.input],
        "outputs": [value_info(v) for v in proto.graph.output],
        "shape_notes": dict(spec.shape_notes),
        "expected_counts": dict(spec.expected_counts),
        "export_seconds": round(run.exports[name].seconds, 2),
        "passes": [r.summary() for r in run.passes.get(name, [])],
        "reference_check": {
            "inputs": f"reference/{name}.inputs.npz",
            "expected": f"reference/{name}.expected.npz",
            "tolerances": {out: tol.to_dict() for out, tol in tolerances.items()},
        },
    }
    record.update(run.graph_facts.get(name, {}))
    return record


def build_manifest(staging: Path, run: ExportRun, weights: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    specs = run.specs
    final = {r.graph: r for r in run.final_parity}
    exporter = {r.graph: r for r in run.exporter_parity}
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": ARTIFACT_KIND,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": run.family.name,
        "config": config,
        "weights": weights,
        "resolution": specs[0].shape_notes.get("resolution", run.config.resolution or run.family.default_shape),
        "precision": run.config.precision.value,
        "attention": run.config.attention,
        "backend": run.backend,
        "backend_reason": run.backend_reason,
        "engines": run.engines,
        "run": {"inputs": list(run.family.run_input_names), "outputs": list(run.family.run_output_names)},
        "graphs": [graph_record(staging, run, spec.name) for spec in specs],
        "parity": {
            "passed": all(r.passed for r in run.final_parity),
            "reference": "onnxruntime-fp32 (the exported FP32 graph; itself checked against pytorch-fp32)",
            "candidate": f"onnxruntime-cpu-{run.config.precision.value}",
            "samples": run.config.parity_samples,
            "worst": {
                f"{r.graph}/{o.output}": {"max_abs": o.max_abs, "max_rel": o.max_rel}
                for r in final.values()
                for o in r.outputs
            },
            "exporter_worst": {
                f"{r.graph}/{o.output}": {"max_abs": o.max_abs, "max_rel": o.max_rel}
                for r in exporter.values()
                for o in r.outputs
            },
        },
        "timings_seconds": run.timings,
        "peak_rss_gib_after_stage": run.peaks,
        "versions": versions(),
    }


def parity_record(run: ExportRun) -> dict[str, Any]:
    """parity.json's content: the three-valued status (failed if anything failed, pending if an engine's parity
    is still to be checked on a GPU that runs it, else passed), the ONNX gates and every engine's parity."""
    engines = [{"graph": e["graph"], "backend": e["backend"], **e["parity"]} for e in run.engines]
    statuses = {e["status"] for e in engines} | {"passed" if all(r.passed for r in run.final_parity) else "failed"}
    return {
        "status": "failed" if "failed" in statuses else "pending" if "pending" in statuses else "passed",
        "passed": all(r.passed for r in run.final_parity),  # the ONNX gates
        "exporter": [r.to_dict() for r in run.exporter_parity],
        "final": [r.to_dict() for r in run.final_parity],
        "engines": engines,
        "table": format_table(run.exporter_parity + run.final_parity).splitlines(),
    }
