"""The one readable flow: spec -> onnx -> passes -> calibration -> parity -> artifact.

    load model
    for each graph: export FP32 ONNX; gate A: PyTorch FP32 vs ONNX Runtime (the exporter is faithful)
    (free the torch model)
    for each graph: graph passes for the precision (fusion, cleanups, FP16 / HybridCast with calibration);
                    gate B: FP32 ONNX (ONNX Runtime) vs the final graph at the precision's tolerances,
                    on inputs not used for calibration
    write reports, reference data for `verify --run`, the manifest; rename the staging folder into place

Nothing is written at the target until every gate passed; a failure raises a stage error and the staging
directory disappears.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import torch
from polygraphy.backend.base import BaseRunner

from export_engine.artifacts.store import ArtifactWriter, write_json
from export_engine.builders.for_artifact import build_engines
from export_engine.calibration.inputs import CALIBRATION_SEED_OFFSET, PARITY_SEED_OFFSET
from export_engine.calibration.step import CalibratePrecisionConfig, calibrate_precision
from export_engine.config import Backend, ExportConfig, Precision
from export_engine.core.types import Feed, ModelSpec
from export_engine.errors import UsageError
from export_engine.exporters.onnx_from_torch import onnx_from_torch
from export_engine.exporters.registry import get_family
from export_engine.exporters.spec import FamilySpec, LoadedModel
from export_engine.graph_passes.apply_precision_plan import ApplyPrecisionPlanConfig, apply_precision_plan
from export_engine.graph_passes.base import PassReport
from export_engine.graph_passes.cleanup import (
    CheckFusedNormsConfig,
    FoldConstantsConfig,
    ReplaceEinsumConfig,
    check_fused_norms,
    fold_constants,
    replace_einsum,
)
from export_engine.graph_passes.convert_fp16 import ConvertFp16Config, convert_fp16
from export_engine.graph_passes.fuse_attention import FuseAttentionConfig, fuse_attention
from export_engine.graph_passes.schedule import PassContext, ScheduledPass, run_passes
from export_engine.record import ExportRun, build_manifest, parity_record
from export_engine.runners.backends import choose_backend
from export_engine.runners.ort_cpu import onnxrt_runner
from export_engine.runners.recorded import RecordedRunner
from export_engine.runners.torch_cpu import TorchRunner
from export_engine.validation.parity import GraphParityReport, check_parity, raise_on_failure

log = logging.getLogger(__name__)

# The ordered passes per precision: (name, config builder, pass). Names are what --skip-pass takes.
# Folding comes first (the TorchScript exporter computes attention scales from Shape ops at run time), fusion
# before any precision change (precision passes must see Attention as one op and never cast around a softmax).
_CLEANUP: tuple[ScheduledPass, ...] = (
    ("fold_constants", lambda g, c: fold_constants(
        g, FoldConstantsConfig(input_shapes={t.name: t.shape for t in c.spec.inputs}))),
    ("replace_einsum", lambda g, c: replace_einsum(g, ReplaceEinsumConfig(strict=c.config.strict))),
    ("fuse_attention", lambda g, c: fuse_attention(
        g, FuseAttentionConfig(c.spec.expected_counts.get("attention"), c.config.strict))),
    ("check_fused_norms", lambda g, c: check_fused_norms(g, CheckFusedNormsConfig(strict=c.config.strict))),
)  # fmt: skip
_FP16: tuple[ScheduledPass, ...] = (("convert_fp16", lambda g, c: convert_fp16(g, ConvertFp16Config())),)


def _calibrate(graph: gs.Graph, context: PassContext) -> PassReport:
    """The calibration stage as a scheduled step: its plan goes into the context for the apply pass."""
    result = calibrate_precision(graph, _calibration_config(context))
    context.plan = result.plan
    return result.report


def _apply_plan(graph: gs.Graph, context: PassContext) -> PassReport:
    if context.plan is None:
        raise UsageError("apply_precision_plan needs calibrate_precision: do not skip calibrate_precision alone")
    # A reused plan must fit this graph exactly (strict); a measured one was made for it.
    strict = context.config.strict or context.config.precision_plan is not None
    return apply_precision_plan(graph, ApplyPrecisionPlanConfig(context.plan, strict=strict))


_HYBRID: tuple[ScheduledPass, ...] = (("calibrate_precision", _calibrate), ("apply_precision_plan", _apply_plan))
PASSES: dict[Precision, tuple[ScheduledPass, ...]] = {
    Precision.FP32: _CLEANUP,
    Precision.FP16: _CLEANUP + _FP16,
    Precision.HYBRID: _CLEANUP + _HYBRID,
}


def _calibration_config(context: PassContext) -> CalibratePrecisionConfig:
    spec, config = context.spec, context.config
    plan_file = None
    if config.precision_plan is not None:
        plan_file = context.work_dir / f"{spec.name}.plan.json"
        plan_file.write_text(json.dumps(read_plan_section(config.precision_plan, spec.name)))
    return CalibratePrecisionConfig(
        graph_name=spec.name,
        feeds=context.calibration,
        tolerances=spec.tolerances[Precision.HYBRID],
        plan_file=plan_file,
    )


def read_plan_section(path: Path, graph: str) -> Any:
    """One graph's plan from a precision_plan.json written by an earlier export (``--precision-plan``)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"precision plan {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"precision plan {path} is not valid JSON: {err}") from err
    graphs = data.get("graphs") if isinstance(data, dict) else None
    if not isinstance(graphs, dict) or graph not in graphs:
        found = sorted(graphs) if isinstance(graphs, dict) else "none"
        raise UsageError(
            f"precision plan {path} has no plan for graph {graph!r} (graphs: {found}); give the precision_plan.json "
            f"of an artifact of the same model"
        )
    return graphs[graph]


def pass_names() -> list[str]:
    return sorted({name for passes in PASSES.values() for name, _ in passes})


@dataclass
class ExportResult:
    artifact: Path
    manifest: dict[str, Any]
    parity: list[GraphParityReport]
    timings: dict[str, float]
    passes: dict[str, list[PassReport]] = field(default_factory=dict)


def export(config: ExportConfig) -> ExportResult:
    """Run the whole export described by ``config`` and return where the artifact is."""
    family = get_family(config.model)
    _check_choices(family, config)
    config_json = read_config_file(config.config_file)
    writer = ArtifactWriter(config.out, force=config.force)
    writer.check_target()  # fail before minutes of work, not after
    if config.bundle_operators:  # the same: no operator library to bundle is said now
        from export_engine.runners import ort_ops

        ort_ops.choose(cuda=False)
    run = ExportRun(family, config)
    backend, why = choose_backend(config.backend.value)
    run.backend, run.backend_reason = backend, why
    log.info("backend: %s (%s)", backend, why)

    with run.stage("load"):
        loaded = family.load(config_json, config.checkpoint, config.seed if config.random_weights else None,
                             config.attention)  # fmt: skip
    run.specs = family.graphs(loaded.config, config.resolution)
    _check_precision(run)
    with run.stage("feeds"):
        # Different seeds: the final gate must not reuse the inputs calibration saw.
        feeds = family.parity_feeds(loaded, run.specs, config.parity_samples, config.seed + PARITY_SEED_OFFSET)
        calib: dict[str, list[Feed]] = {spec.name: [] for spec in run.specs}
        if config.precision is Precision.HYBRID and config.precision_plan is None:
            if config.calibration_data is not None:
                calib = family.user_feeds(loaded, run.specs, config.calibration_data, config.seed)
            else:
                calib = family.parity_feeds(loaded, run.specs, config.calibration_samples,
                                            config.seed + CALIBRATION_SEED_OFFSET)  # fmt: skip

    with writer as staging:
        work = staging / ".work"
        work.mkdir()
        for spec in run.specs:
            with run.stage(f"export:{spec.name}"):
                module = spec.build_module(loaded.module)
                example = tuple(torch.from_numpy(feeds[spec.name][0][n]) for n in spec.input_names)
                run.exports[spec.name] = onnx_from_torch(module, example, work / f"{spec.name}.fp32.onnx", spec)
            with run.stage(f"parity-torch:{spec.name}"):
                run.exporter_parity.append(_exporter_gate(loaded, spec, feeds[spec.name], run))
            gc.collect()
        raise_on_failure(run.exporter_parity, f"{family.name}: PyTorch vs exported FP32 ONNX")
        weights = loaded.describe_weights()
        resolved_config = loaded.config.to_dict()
        del loaded, module
        gc.collect()

        for spec in run.specs:
            fp32_path = run.exports[spec.name].path
            final_path = staging / f"{spec.name}.onnx"
            with run.stage(f"passes:{spec.name}"):
                context = PassContext(spec, config, calib[spec.name], fp32_path)
                run.passes[spec.name] = run_passes(final_path, context, PASSES[config.precision])
                if context.plan is not None:
                    run.plans[spec.name] = context.plan
            with run.stage(f"parity:{spec.name}"):
                run.final_parity.append(_final_gate(spec, fp32_path, final_path, feeds[spec.name], run))
            gc.collect()
        raise_on_failure(run.final_parity, f"{family.name} at {config.precision.value}")

        _write_reports(staging, run, feeds)
        if backend != "onnx":
            with run.stage("engines"):
                references = {name: result.path for name, result in run.exports.items()}
                records, reports = build_engines(staging, run.specs, config, backend, references, feeds)
                raise_on_failure(reports, f"{family.name} {backend} engines")
            run.engines = records
        _write_parity(staging, run)
        shutil.rmtree(work)
        manifest = build_manifest(staging, run, weights, resolved_config)
        if config.bundle_operators:
            from export_engine.runners.ort_ops.bundle import bundle_into

            manifest["operators"] = bundle_into(staging)  # hashed with every other file by commit
        writer.commit(manifest)
    log.info("artifact written to %s", writer.target)
    return ExportResult(writer.target, manifest, run.final_parity, run.timings, run.passes)


def export_config(model: str, precision: str | Precision = "fp32", **fields: Any) -> ExportConfig:
    """An :class:`ExportConfig` from user-level values: names are checked (unknown model, precision or backend
    -> UsageError listing the choices), ``out`` defaults to ``./<model>-<precision>-<shape>``, other fields are
    ExportConfig's (unknown ones -> UsageError)."""
    family = get_family(model)
    precision = precision if isinstance(precision, Precision) else Precision.parse(precision)
    known = {f.name for f in dataclasses.fields(ExportConfig)} - {"model", "precision"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UsageError(f"unknown export option(s) {unknown}; valid: {sorted(known)}")
    values = {k: v for k, v in fields.items() if v is not None}
    if isinstance(values.get("backend"), str):
        values["backend"] = Backend.parse(values["backend"])
    for key in ("out", "config_file", "calibration_data", "precision_plan"):
        if key in values:
            values[key] = Path(values[key])
    shape = values.get("resolution") or family.default_shape
    values.setdefault("out", Path(f"{family.name}-{precision.value}-{shape}"))
    return ExportConfig(model=family.name, precision=precision, **values)


def _check_choices(family: FamilySpec, config: ExportConfig) -> None:
    if config.attention not in family.attention_choices:
        raise UsageError(
            f"--attention {config.attention} is not available for {family.name}; choose one of: "
            f"{', '.join(family.attention_choices)}"
        )
    unknown = sorted(set(config.skip_passes) - set(pass_names()))
    if unknown:
        raise UsageError(f"unknown pass {unknown[0]!r} for --skip-pass; passes: {', '.join(pass_names()) or 'none'}")
    if bool(config.checkpoint) == bool(config.random_weights):
        raise UsageError(
            "give exactly one of --checkpoint PATH_OR_HF_ID (official weights) or --random-weights [--seed N]"
        )
    family.validate_shape(config.resolution)
    if config.calibration_data is not None:
        if config.precision is not Precision.HYBRID:
            raise UsageError(
                "--calibration-data applies to --precision hybrid only (fp32 and fp16 need no calibration)"
            )
        if not Path(config.calibration_data).is_dir():
            raise UsageError(f"calibration folder {config.calibration_data} does not exist or is not a folder")


def _check_precision(run: ExportRun) -> None:
    for spec in run.specs:
        if run.config.precision not in spec.tolerances:
            available = ", ".join(p.value for p in spec.tolerances)
            raise UsageError(
                f"precision {run.config.precision.value!r} is not available for {run.family.name} yet; use: {available}"
            )


def read_config_file(path: Path | None) -> dict[str, Any] | None:
    import json

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


def _exporter_gate(loaded: LoadedModel, spec: ModelSpec, feeds: list[Feed], run: ExportRun) -> GraphParityReport:
    from export_engine.config import Precision

    reference = TorchRunner(spec.build_module(loaded.module), spec, name="pytorch-fp32")
    candidate = onnxrt_runner(run.exports[spec.name].path, name="onnxruntime-fp32-export")
    tolerances = spec.tolerances[Precision.FP32]
    report = check_parity(reference, candidate, feeds, tolerances, graph=spec.name, precision="fp32")
    if report.candidate_outputs is not None:  # the final gate's reference: the same graph on the same feeds
        run.fp32_outputs[spec.name] = report.candidate_outputs
    return report


def _final_gate(
    spec: ModelSpec, fp32_path: Path, final_path: Path, feeds: list[Feed], run: ExportRun
) -> GraphParityReport:
    precision = run.config.precision.value
    recorded = run.fp32_outputs.get(spec.name)
    reference: BaseRunner = (
        RecordedRunner(feeds, recorded, name="onnxruntime-fp32")
        if recorded is not None
        else onnxrt_runner(fp32_path, name="onnxruntime-fp32")
    )
    if run.config.precision is Precision.FP32:
        candidate = onnxrt_runner(final_path, name="onnxruntime-fp32")
    else:
        # ONNX Runtime's CPU kernels run FP16 regions in FP32, hiding FP16 overflow; the emulated graph rounds every
        # FP16 tensor through FP16 storage (rounding, overflow to inf, flush to zero) as a GPU engine would.
        from polygraphy.backend.onnxrt import OnnxrtRunner

        from export_engine.calibration.fp16_emulation import emulated_session

        candidate = OnnxrtRunner(lambda: emulated_session(final_path), name=f"onnxruntime-{precision}-fp16-storage")
    tolerances = spec.tolerances[run.config.precision]
    return check_parity(reference, candidate, feeds, tolerances, graph=spec.name, precision=precision)


def _write_parity(staging: Path, run: ExportRun) -> None:
    """parity.json: the ONNX gates and every engine's parity status, from the same record as the manifest."""
    write_json(staging / "parity.json", parity_record(run))


def _write_reports(staging: Path, run: ExportRun, feeds: dict[str, list[Feed]]) -> None:
    """passes.json, precision plans, and per graph one input sample with its FP32 reference outputs."""
    write_json(staging / "passes.json", {g: [r.to_dict() for r in reports] for g, reports in run.passes.items()})
    plans = run.plans
    if plans:
        write_json(
            staging / "precision_plan.json",
            {
                "format": "export-engine-precision-plans",
                "graphs": {n: json.loads(p.to_json()) for n, p in plans.items()},
            },
        )
        for name, plan in plans.items():
            run.graph_facts.setdefault(name, {})["precision_plan"] = plan.summary()
    reference = staging / "reference"
    reference.mkdir()
    for report in run.final_parity:
        assert report.reference_sample is not None
        np.savez(reference / f"{report.graph}.inputs.npz", **feeds[report.graph][0])  # type: ignore[arg-type]
        np.savez(reference / f"{report.graph}.expected.npz", **report.reference_sample)  # type: ignore[arg-type]
