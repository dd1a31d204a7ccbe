"""``export-engine verify``: is this artifact intact, readable here, and (with ``run``) still numerically right?"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export_engine.artifacts.store import read_manifest, verify_files
from export_engine.errors import ArtifactError, ParityError
from export_engine.exporters.spec import Tolerance
from export_engine.validation.parity import GraphParityReport, compare_output, format_table

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    artifact: Path
    files: int
    checks: list[str] = field(default_factory=list)
    parity: list[GraphParityReport] = field(default_factory=list)


def verify(artifact: Path, run: bool = False) -> VerifyReport:
    """Hashes and schema always; with ``run``, rerun every graph on its stored inputs and compare with the stored
    FP32 reference outputs at the artifact's tolerances."""
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    files = verify_files(artifact, manifest)
    report = VerifyReport(artifact, len(files), [f"{len(files)} files match their sha256", "manifest schema ok"])
    report.checks.extend(engine_compatibility(artifact, manifest))
    if run:
        report.parity = _rerun(artifact, manifest)
        report.checks.append(f"parity rerun on this machine passed ({len(report.parity)} graphs)")
    return report


def engine_compatibility(artifact: Path, manifest: dict[str, Any]) -> list[str]:
    """One line per engine: can it run here, or what it needs that this machine lacks."""
    from export_engine.builders.backends import backend_version
    from export_engine.runtime.engine_runner import can_run_engine

    lines = []
    for engine in manifest.get("engines", []):
        name, backend, built = engine["graph"], engine["backend"], engine.get("backend_version")
        installed = backend_version(backend)
        targets = engine.get("header", {}).get("targets")
        needs = f"{backend} {built}" + (
            f" and a GPU of compute capability {', '.join(map(str, targets))}" if targets else ""
        )
        if installed is None:
            lines.append(f"engine {name}: needs {needs}; this machine has no {backend}: ONNX Runtime will run the ONNX")
            continue
        if built and installed != built:
            lines.append(f"engine {name}: needs {needs}; this machine has {backend} {installed}: rebuild the engine")
            continue
        runnable, why = can_run_engine(artifact / engine["file"], backend)
        if runnable:
            lines.append(f"engine {name}: runs here ({why}); parity {engine.get('parity', {}).get('status')}")
        else:
            lines.append(f"engine {name}: needs {needs}; here: {why}: ONNX Runtime will run the ONNX")
    return lines


def _rerun(artifact: Path, manifest: dict[str, Any]) -> list[GraphParityReport]:
    from export_engine.runtime.session import load

    session = load(artifact, verify=False)
    reports = []
    for graph in manifest["graphs"]:
        check = graph.get("reference_check")
        if not check:
            raise ArtifactError(f"{artifact}: graph {graph['name']} stores no reference data; export it again")
        with np.load(artifact / check["inputs"]) as data:
            feed = {k: data[k] for k in data.files}
        with np.load(artifact / check["expected"]) as data:
            expected = {k: data[k] for k in data.files}
        outputs = session.runners[graph["name"]](feed)
        results = [
            compare_output(name, outputs[name], expected[name], Tolerance(**check["tolerances"][name]))
            for name in expected
        ]
        reports.append(
            GraphParityReport(
                graph["name"], "stored-fp32-reference", session.provider, manifest["precision"], 1, 0.0, results
            )
        )
    if not all(r.passed for r in reports):
        raise ParityError(
            f"artifact {artifact} no longer matches its FP32 reference on this machine\n" + format_table(reports)
        )
    log.info("%s", format_table(reports))
    return reports
