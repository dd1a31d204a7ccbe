"""One three-valued status (passed / pending / failed) for what an artifact promises, read from its manifest.

The ONNX gates run at export and are passed (a failing gate writes no artifact). An engine's parity is
``passed`` or ``failed`` when the exporting machine could run it, else ``pending`` until a machine that can run
it checks it (``export-engine verify ARTIFACT --run``, or the runtime's load-time check). Pending is never
shown or counted as passed.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export_engine.artifacts.store import MANIFEST

PASSED, PENDING, FAILED = "passed", "pending", "failed"
VERIFICATION = "verification.json"  # beside the manifest, outside the hashed set


@dataclass
class ArtifactStatus:
    status: str  # passed | pending | failed
    lines: list[tuple[str, str]] = field(default_factory=list)  # (status, what)


def artifact_status(manifest: dict[str, Any], verification: dict[str, Any] | None = None) -> ArtifactStatus:
    """Overall status: failed if anything failed, else pending if any engine's parity is pending, else passed.
    An engine whose parity a ``verification`` record (``verification_for``) settled takes that status."""
    parity = manifest.get("parity", {})
    lines = [(PASSED if parity.get("passed") else FAILED, f"ONNX parity gates ({parity.get('candidate')} vs "
              f"{parity.get('reference')}, {parity.get('samples')} sample(s))")]  # fmt: skip
    settled = {r["graph"]: r for r in (verification or {}).get("engines", [])}
    for engine in manifest.get("engines", []):
        record = engine.get("parity", {})
        status, what = record.get("status", PENDING), f"engine {engine['graph']} ({engine['backend']}) parity"
        if status == PENDING and engine["graph"] in settled:
            status = settled[engine["graph"]]["status"]
            what += f", checked on {settled[engine['graph']]['gpu']} ({VERIFICATION})"
        elif status == PENDING:
            what += f": {record.get('reason', 'not run yet')}"
        lines.append((status if status in (PASSED, FAILED) else PENDING, what))
    statuses = {s for s, _ in lines}
    overall = FAILED if FAILED in statuses else PENDING if PENDING in statuses else PASSED
    return ArtifactStatus(overall, lines)


def manifest_sha256(artifact: Path) -> str:
    return hashlib.sha256((Path(artifact) / MANIFEST).read_bytes()).hexdigest()


def machine_fingerprint(backend_version: str | None) -> dict[str, Any]:
    """What a verification record is valid for: the GPU model, driver and runtime versions."""
    import torch

    driver = None
    version_file = Path("/proc/driver/nvidia/version")  # "NVRM version: ... Kernel Module  580.159.04  ..."
    if version_file.is_file() and "Kernel Module" in (text := version_file.read_text()):
        driver = text.split("Kernel Module")[-1].split()[0]
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "driver": driver,
        "cuda": torch.version.cuda,
        "backend_version": backend_version,
        "host_arch": platform.machine(),
    }


def read_verification(artifact: Path) -> dict[str, Any] | None:
    """The artifact's verification record when it names this manifest (a record of another manifest is ignored)."""
    path = Path(artifact) / VERIFICATION
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("manifest_sha256") != manifest_sha256(artifact):
        return None
    return record


def verification_for(record: dict[str, Any] | None, graph: str, fingerprint: dict[str, Any]) -> str | None:
    """The status a verification record gives ``graph``'s engine on this machine, or None when it does not
    apply here (another GPU model, driver or runtime version)."""
    for entry in (record or {}).get("engines", []):
        if entry["graph"] == graph and all(entry.get(k) == v for k, v in fingerprint.items()):
            return str(entry["status"])
    return None
