"""The one readable flow: spec -> onnx -> parity -> artifact.

    load model  ->  for each graph: export ONNX  ->  parity (PyTorch FP32 vs ONNX Runtime)  ->  manifest

Nothing is written at the target until every graph passed parity; a failure raises a stage error and the
staging directory disappears.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import logging
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx
import torch

from export_engine import __version__
from export_engine.artifacts.store import ARTIFACT_KIND, SCHEMA_VERSION, ArtifactWriter, write_json
from export_engine.config import ExportConfig
from export_engine.errors import UsageError
from export_engine.exporters.onnx_from_torch import OnnxExportResult, onnx_from_torch
from export_engine.exporters.registry import get_family
from export_engine.exporters.spec import FamilySpec, Feed, LoadedModel, ModelSpec
from export_engine.progress import stage
from export_engine.validation.parity import (
    GraphParityReport,
    TorchRunner,
    check_parity,
    format_table,
    onnxrt_runner,
    raise_on_failure,
)

log = logging.getLogger(__name__)

_VERSIONED = ("torch", "onnx", "onnxruntime", "polygraphy", "onnx-graphsurgeon", "numpy", "safetensors")


@dataclass(frozen=True)
class ExportResult:
    artifact: Path
    manifest: dict[str, Any]
    parity: list[GraphParityReport]
    timings: dict[str, float]


def export(config: ExportConfig) -> ExportResult:
    """Run the whole export described by ``config`` and return where the artifact is."""
    family = get_family(config.model)
    _check_choices(family, config)
    config_json = read_config_file(config.config_file)
    writer = ArtifactWriter(config.out, force=config.force)
    writer.check_target()  # fail before minutes of work, not after
    timings: dict[str, float] = {}
    peaks: dict[str, float] = {}

    with stage("load", timings, peaks):
        loaded = family.load(config_json, config.checkpoint, config.seed if config.random_weights else None)
    specs = family.graphs(loaded.config, config.resolution)
    for spec in specs:
        if config.precision not in spec.tolerances:
            available = ", ".join(p.value for p in spec.tolerances)
            raise UsageError(
                f"precision {config.precision.value!r} is not available for {family.name} yet; use: {available}"
            )
    with stage("feeds", timings, peaks):
        feeds = family.parity_feeds(loaded, specs, config.parity_samples, config.seed + 7919)

    with writer as staging:
        exports: dict[str, OnnxExportResult] = {}
        reports: list[GraphParityReport] = []
        for spec in specs:
            with stage(f"export:{spec.name}", timings, peaks):
                exports[spec.name] = _export_graph(loaded, spec, feeds[spec.name], staging)
            with stage(f"parity:{spec.name}", timings, peaks):
                reports.append(_parity(loaded, spec, feeds[spec.name], exports[spec.name].path, config))
            gc.collect()
        raise_on_failure(reports, f"{family.name} at {config.precision.value}")
        write_json(staging / "parity.json", _parity_json(reports))
        manifest = _manifest(family, config, loaded, specs, exports, reports, timings)
        manifest["peak_rss_gib_after_stage"] = peaks
        writer.commit(manifest)
    log.info("artifact written to %s", writer.target)
    return ExportResult(writer.target, manifest, reports, timings)


def _check_choices(family: FamilySpec, config: ExportConfig) -> None:
    if bool(config.checkpoint) == bool(config.random_weights):
        raise UsageError(
            "give exactly one of --checkpoint PATH_OR_HF_ID (official weights) or --random-weights [--seed N]"
        )
    family.validate_shape(config.resolution)


def read_config_file(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"config file {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"config file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a JSON object, not {type(data).__name__}")
    return data


def _export_graph(loaded: LoadedModel, spec: ModelSpec, feeds: list[Feed], staging: Path) -> OnnxExportResult:
    module = spec.build_module(loaded.module)
    example = tuple(torch.from_numpy(feeds[0][name]) for name in spec.input_names)
    return onnx_from_torch(module, example, staging / f"{spec.name}.onnx", spec)


def _parity(
    loaded: LoadedModel, spec: ModelSpec, feeds: list[Feed], path: Path, config: ExportConfig
) -> GraphParityReport:
    reference = TorchRunner(spec.build_module(loaded.module), spec, name="pytorch-fp32")
    candidate = onnxrt_runner(path, name=f"onnxruntime-{config.precision.value}")
    tolerances = spec.tolerances[config.precision]
    return check_parity(reference, candidate, feeds, tolerances, graph=spec.name, precision=config.precision.value)


def _parity_json(reports: list[GraphParityReport]) -> dict[str, Any]:
    return {
        "passed": all(r.passed for r in reports),
        "graphs": [r.to_dict() for r in reports],
        "table": format_table(reports).splitlines(),
    }


def _graph_record(spec: ModelSpec, result: OnnxExportResult) -> dict[str, Any]:
    proto = onnx.load(str(result.path), load_external_data=False)
    return {
        "name": spec.name,
        "file": result.path.name,
        "data_files": [p.name for p in result.data_files],
        "opset": result.opset,
        "exporter": result.exporter,
        "nodes": len(proto.graph.node),
        "inputs": [_value_info(v) for v in proto.graph.input],
        "outputs": [_value_info(v) for v in proto.graph.output],
        "shape_notes": dict(spec.shape_notes),
        "expected_counts": dict(spec.expected_counts),
        "export_seconds": round(result.seconds, 2),
    }


def _value_info(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    return {"name": value.name, "shape": shape, "dtype": dtype}


def _versions() -> dict[str, str]:
    versions = {"export-engine": __version__, "python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _manifest(
    family: FamilySpec,
    config: ExportConfig,
    loaded: LoadedModel,
    specs: tuple[ModelSpec, ...],
    exports: dict[str, OnnxExportResult],
    reports: list[GraphParityReport],
    timings: dict[str, float],
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": ARTIFACT_KIND,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": family.name,
        "config": loaded.config.to_dict(),
        "weights": loaded.describe_weights(),
        "resolution": specs[0].shape_notes.get("resolution", config.resolution or family.default_shape),
        "precision": config.precision.value,
        "backend": config.backend.value,
        "run": {"inputs": list(family.run_input_names), "outputs": list(family.run_output_names)},
        "graphs": [_graph_record(spec, exports[spec.name]) for spec in specs],
        "parity": {
            "passed": all(r.passed for r in reports),
            "reference": "pytorch-fp32",
            "candidate": f"onnxruntime-cpu-{config.precision.value}",
            "samples": config.parity_samples,
            "worst": {
                f"{r.graph}/{o.output}": {"max_abs": o.max_abs, "max_rel": o.max_rel}
                for r in reports
                for o in r.outputs
            },
        },
        "timings_seconds": timings,
        "versions": _versions(),
    }
