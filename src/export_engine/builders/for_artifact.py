"""The engine stage of an export: build one engine per graph, then check it where it can run.

When the engine can run on the build machine, Polygraphy compares it against the FP32 ONNX reference at the
spec's tolerances before the artifact is finalised; when it cannot (a TensorRT-RTX engine built on a machine
without a GPU), the record says parity is pending and ``export-engine verify ARTIFACT --run`` performs it on
the target GPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from export_engine.builders.build import BuildResult, engine_from_onnx
from export_engine.builders.config import BuildConfig, profiles_from_spec
from export_engine.config import ExportConfig
from export_engine.core.types import Feed, ModelSpec
from export_engine.hashing import sha256_file
from export_engine.runners.engine_info import read_header
from export_engine.runners.ort_cpu import onnxrt_runner
from export_engine.validation.parity import GraphParityReport, check_parity

log = logging.getLogger(__name__)


def build_config_for(spec: ModelSpec, config: ExportConfig, backend: str, engines_dir: Path) -> BuildConfig:
    profiles = (profiles_from_spec(spec, spec.profile_dims),) if spec.dynamic_axes() else ()
    return BuildConfig(
        backend=backend,  # type: ignore[arg-type]
        opt_level=config.opt_level,
        profiles=profiles,
        timing_cache_copy=engines_dir / "timing.cache" if backend == "tensorrt" else None,
        compute_capabilities=config.compute_capabilities,
        hardware_compatibility=config.hardware_compatibility,  # type: ignore[arg-type]
        version_compatible=config.version_compatible,
    )


def build_engines(
    staging: Path,
    specs: Sequence[ModelSpec],
    config: ExportConfig,
    backend: str,
    references: Mapping[str, Path],
    feeds: Mapping[str, Sequence[Feed]],
) -> tuple[list[dict[str, Any]], list[GraphParityReport]]:
    """Build ``engines/<graph>.engine`` for every graph; returns manifest records and the engine parity reports."""
    from export_engine.runners.engine import EngineRunner, can_run_engine

    engines_dir = staging / "engines"
    engines_dir.mkdir(exist_ok=True)

    def build(spec: ModelSpec) -> BuildResult:
        onnx_path, engine_path = staging / f"{spec.name}.onnx", engines_dir / f"{spec.name}.engine"
        result = engine_from_onnx(onnx_path, engine_path, build_config_for(spec, config, backend, engines_dir))
        log.info("built %s engine for %s: %.1f MB in %.1f s", backend, spec.name, result.engine_bytes / 1e6,
                 result.build_seconds)  # fmt: skip
        return result

    # TensorRT-RTX compiles ahead of time on the CPU, one core per build child: the graphs build side by side
    # (full MASt3R on 2 cores: 30.8 s one after the other, 21.2 s together). Full TensorRT times kernels on the
    # GPU while it builds, so its builds stay one at a time: two at once would disturb each other's timings.
    workers = min(len(specs), os.cpu_count() or 1) if backend == "tensorrt-rtx" else 1
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        results = list(pool.map(build, specs))
    records, reports = [], []
    for spec, result in zip(specs, results, strict=True):
        onnx_path = staging / f"{spec.name}.onnx"
        engine_path = engines_dir / f"{spec.name}.engine"
        runnable, why = can_run_engine(engine_path, backend)
        if runnable:
            report = check_parity(
                onnxrt_runner(references[spec.name], name="onnxruntime-fp32"),
                EngineRunner(engine_path, backend),
                list(feeds[spec.name]),
                spec.tolerances[config.precision],
                graph=f"{spec.name}[engine]",
                precision=config.precision.value,
            )
            reports.append(report)
            parity: dict[str, Any] = {"status": "passed" if report.passed else "failed", "report": report.to_dict()}
        else:
            parity = {
                "status": "pending",
                "reason": why,
                "how": "export-engine verify ARTIFACT --run on the target GPU",
            }
        records.append(
            {
                "graph": spec.name,
                "file": f"engines/{engine_path.name}",
                "onnx": onnx_path.name,
                "onnx_sha256": sha256_file(onnx_path),
                "backend": backend,
                "backend_version": result.backend_version,
                "header": read_header(engine_path),
                "build": _relative(result.to_dict(), staging),
                "parity": parity,
            }
        )
    return records, reports


def _relative(data: Any, root: Path) -> Any:
    """Paths inside the staging folder become artifact-relative (the manifest must not name a temp folder)."""
    if isinstance(data, dict):
        return {k: _relative(v, root) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_relative(v, root) for v in data]
    if isinstance(data, str) and data.startswith(str(root)):
        return Path(data).relative_to(root).as_posix()
    return data
