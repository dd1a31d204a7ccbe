"""The artifact manifest (schema in docs/ARTIFACT.md): what was exported, from what, how, and how well."""

from __future__ import annotations

import datetime as dt
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from export_engine import __version__
from export_engine.artifacts.store import ARTIFACT_KIND, SCHEMA_VERSION

if TYPE_CHECKING:
    from export_engine.pipeline import _Run

_VERSIONED = ("torch", "onnx", "onnxruntime", "polygraphy", "onnx-graphsurgeon", "numpy", "safetensors")


def versions() -> dict[str, str]:
    found = {"export-engine": __version__, "python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def value_info(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    return {"name": value.name, "shape": shape, "dtype": dtype}


def graph_record(staging: Path, run: _Run, name: str) -> dict[str, Any]:
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
    record.update(run.extra.get("graphs", {}).get(name, {}))
    return record


def build_manifest(staging: Path, run: _Run, weights: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
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
        "backend": run.extra["backend"]["name"],
        "backend_reason": run.extra["backend"]["reason"],
        "engines": run.extra.get("engines", []),
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
