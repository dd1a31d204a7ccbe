"""``export-engine verify``: is this artifact intact, readable here, and (with ``run``) still numerically right?

Every line of the report carries a status: ``ok`` (checked and fine), ``pending`` (cannot be checked on this
machine: an engine's parity until a GPU that runs it checks it), ``note`` (what this machine lacks to run
something; ONNX Runtime runs the ONNX instead) or ``failed``. ``verify`` succeeds when nothing it could check
failed, and says what stays pending and why. ``run`` re-runs every graph on its stored reference input with
what this machine would use (an engine where one runs here) and, when it ran engines, writes a verification
record beside the manifest (``verification.json``, outside the hashed set) that later loads on the same GPU
model, driver and runtime versions accept without running the check again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export_engine.artifacts import status as st
from export_engine.artifacts.store import read_manifest, verify_files, write_json
from export_engine.errors import ParityError
from export_engine.validation.compare import GraphParityReport, format_table

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    artifact: Path
    files: int
    checks: list[tuple[str, str]] = field(default_factory=list)  # (ok | pending | note | failed, what)
    parity: list[GraphParityReport] = field(default_factory=list)

    @property
    def pending(self) -> list[str]:
        return [what for status, what in self.checks if status == st.PENDING]

    @property
    def failed(self) -> list[str]:
        return [what for status, what in self.checks if status == st.FAILED]


def verify(artifact: Path, run: bool = False) -> VerifyReport:
    """Hashes and schema always; engine compatibility and parity status; with ``run``, rerun every graph on its
    stored inputs and compare with the stored FP32 reference outputs at the artifact's tolerances."""
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    files = verify_files(artifact, manifest)
    report = VerifyReport(artifact, len(files), [("ok", f"{len(files)} files match their sha256"),
                                                 ("ok", "manifest schema ok")])  # fmt: skip
    report.checks.extend(engine_compatibility(artifact, manifest))
    if run:
        report.parity = _rerun(artifact, manifest)
        report.checks.append(("ok", f"parity rerun on this machine passed ({len(report.parity)} graphs)"))
    status = st.artifact_status(manifest, st.read_verification(artifact))
    for line_status, what in status.lines:
        report.checks.append(("ok" if line_status == st.PASSED else line_status, what))
    return report


def engine_compatibility(artifact: Path, manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """One line per engine: can it run here, or what it needs that this machine lacks."""
    from export_engine.runners.backends import backend_version
    from export_engine.runners.engine import can_run_engine

    lines = []
    for engine in manifest.get("engines", []):
        name, backend, built = engine["graph"], engine["backend"], engine.get("backend_version")
        installed = backend_version(backend)
        targets = engine.get("header", {}).get("targets")
        needs = f"{backend} {built}" + (
            f" and a GPU of compute capability {', '.join(map(str, targets))}" if targets else ""
        )
        if installed is None:
            lines.append(("note", f"engine {name}: needs {needs}; this machine has no {backend}: ONNX Runtime "
                                  "will run the ONNX"))  # fmt: skip
            continue
        if built and installed != built:
            lines.append(("note", f"engine {name}: needs {needs}; this machine has {backend} {installed}: rebuild "
                                  "the engine"))  # fmt: skip
            continue
        runnable, why = can_run_engine(artifact / engine["file"], backend)
        if runnable:
            lines.append(("ok", f"engine {name}: runs here ({why})"))
        else:
            lines.append(("note", f"engine {name}: needs {needs}; here: {why}: ONNX Runtime will run the ONNX"))
    return lines


def _rerun(artifact: Path, manifest: dict[str, Any]) -> list[GraphParityReport]:
    from export_engine.runners.self_check import check_runner
    from export_engine.runtime.session import load

    session = load(artifact, verify=False, self_check=False)  # the comparison below is the check
    engines = {e["graph"]: e for e in manifest.get("engines", [])}
    reports, records = [], []
    for graph in manifest["graphs"]:
        runner = session.runners[graph["name"]]
        engine = engines.get(graph["name"])
        ran_engine = engine is not None and graph["name"] in session.engine_graphs
        backend = f"{engine['backend']} engine" if ran_engine and engine else session.provider
        report = check_runner(runner, artifact, graph, backend, manifest["precision"])
        reports.append(report)
        if ran_engine and engine:
            records.append({"graph": graph["name"], "backend": engine["backend"],
                            **st.machine_fingerprint(engine.get("backend_version")),
                            "status": st.PASSED if report.passed else st.FAILED,
                            "report": report.to_dict()})  # fmt: skip
    if records:
        record = {"manifest_sha256": st.manifest_sha256(artifact), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "engines": records}  # fmt: skip
        write_json(artifact / st.VERIFICATION, json.loads(json.dumps(record, default=str)))
        log.info("wrote %s (engine parity on this GPU: %s)", artifact / st.VERIFICATION,
                 ", ".join(f"{r['graph']} {r['status']}" for r in records))  # fmt: skip
    if not all(r.passed for r in reports):
        raise ParityError(
            f"artifact {artifact} no longer matches its FP32 reference on this machine\n" + format_table(reports)
        )
    log.info("%s", format_table(reports))
    return reports
