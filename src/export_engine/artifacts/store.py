"""Artifact directories: atomic writing, manifest reading and hash verification.

An artifact is a directory holding the exported files, ``parity.json`` and ``manifest.json``; the manifest
records the sha256 of every other file. It is built in a hidden staging directory next to the target and
renamed into place only when complete, so a failed or interrupted run leaves nothing that looks like an
artifact (and never damages an artifact that was already there).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

from export_engine.errors import ArtifactError, ExportError
from export_engine.hashing import sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
ARTIFACT_KIND = "export-engine-artifact"


def hash_tree(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``root`` except the manifest, by POSIX relative path."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST:
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


class ArtifactWriter:
    """``with ArtifactWriter(target, force) as staging: ...; writer.commit(manifest)``."""

    def __init__(self, target: Path, force: bool = False):
        self.target = Path(target).absolute()
        self.force = force
        self.staging = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"
        self.committed = False

    def check_target(self) -> None:
        """Fail early (before any long work) when the target cannot be written."""
        target = self.target
        if target.exists() and not target.is_dir():
            raise ArtifactError(f"output path {target} exists and is not a directory; choose another --out")
        if target.is_dir() and (target / MANIFEST).exists() and not self.force:
            raise ArtifactError(
                f"{target} already holds an artifact; pass --force to replace it or choose another --out"
            )
        if target.is_dir() and not (target / MANIFEST).exists() and any(target.iterdir()):
            raise ArtifactError(
                f"{target} exists, is not empty and holds no artifact; choose an empty or new --out folder"
            )

    def __enter__(self) -> Path:
        self.check_target()
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            if self.staging.exists():
                shutil.rmtree(self.staging)
            self.staging.mkdir()
        except OSError as err:
            raise ArtifactError(f"cannot create the artifact next to {self.target}: {err.strerror or err}") from err
        return self.staging

    def commit(self, manifest: dict[str, Any]) -> None:
        """Hash every staged file, write the manifest last, then move the directory into place."""
        manifest = dict(manifest)
        manifest["files"] = hash_tree(self.staging)
        try:
            _write_json(self.staging / MANIFEST, manifest)
            self._swap_into_place()
        except OSError as err:
            raise ArtifactError(
                f"writing the artifact {self.target} failed ({err.strerror or err}); nothing was written"
            ) from err
        self.committed = True

    def _swap_into_place(self) -> None:
        """Move the staging folder to the target under an exclusive lock, checking the target again first: what
        appeared there while this export ran (another export, the user's own files) is never replaced, except
        an artifact under ``--force``. A refused commit keeps the finished artifact next to the target."""
        import fcntl

        lock_path = self.target.parent / f".{self.target.name}.lock"
        while True:  # two exports to one --out commit one after the other
            lock = open(lock_path, "a")
            fcntl.flock(lock, fcntl.LOCK_EX)
            if lock_path.exists() and os.stat(lock_path).st_ino == os.fstat(lock.fileno()).st_ino:
                break  # still the live lock file (not one a finished commit unlinked meanwhile)
            lock.close()
        with lock:
            try:
                problem = self._target_problem()
                if problem:
                    kept = self._keep_staging()
                    raise ArtifactError(f"{problem}; this export's finished artifact was kept at {kept}")
                self._replace_target()
            finally:
                lock_path.unlink(missing_ok=True)

    def _target_problem(self) -> str | None:
        target = self.target
        if not target.exists():
            return None
        if not target.is_dir():
            return f"{target} appeared as a file while this export ran; nothing was replaced"
        if (target / MANIFEST).exists():
            if self.force:
                return None
            return f"{target} received an artifact from another run while this one ran; pass --force to replace it"
        if any(target.iterdir()):
            return f"{target} received other files while this export ran; they were left untouched"
        return None

    def _keep_staging(self) -> Path:
        kept = self.target.parent / f"{self.target.name}.new-{os.getpid()}"
        os.rename(self.staging, kept)
        self.staging = kept
        self.committed = True  # the finished artifact stays where the message says
        return kept

    def _replace_target(self) -> None:
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.replace(self.target, old)
        try:
            os.replace(self.staging, self.target)
        except OSError:
            if old is not None:
                os.replace(old, self.target)  # put the previous artifact back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.committed:
            shutil.rmtree(self.staging, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, ExportError):
            raise ArtifactError(
                f"writing the artifact {self.target} failed ({exc.strerror or exc}); nothing was written"
            ) from exc


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_json(path: Path, data: Any) -> None:
    _write_json(path, data)


def read_manifest(artifact: Path) -> dict[str, Any]:
    """Read and sanity-check ``manifest.json`` (schema version, kind, required fields)."""
    artifact = Path(artifact)
    path = artifact / MANIFEST
    if not artifact.is_dir():
        raise ArtifactError(f"{artifact} is not an artifact directory (export one with export-engine --model ...)")
    if not path.is_file():
        raise ArtifactError(f"{artifact} has no {MANIFEST}; it is not an artifact or its export did not finish")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); the artifact is damaged: export it again") from err
    if not isinstance(manifest, dict) or manifest.get("kind") != ARTIFACT_KIND:
        raise ArtifactError(f"{path} is not an export-engine manifest")
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{path} has no integer schema_version; the artifact is damaged")
    if version > SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} uses manifest schema {version}, newer than this export-engine reads ({SCHEMA_VERSION}); "
            f"upgrade export-engine"
        )
    for key in ("model", "graphs", "files", "precision"):
        if key not in manifest:
            raise ArtifactError(f"{path} lacks the field {key!r}; the artifact is damaged: export it again")
    return manifest


def verify_files(artifact: Path, manifest: dict[str, Any]) -> list[str]:
    """Check every file recorded in the manifest; return the list of verified files or raise."""
    artifact = Path(artifact)
    problems = []
    for rel, record in manifest["files"].items():
        path = artifact / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != record["bytes"]:
            problems.append(f"{rel} has {path.stat().st_size} bytes, the manifest says {record['bytes']}")
        elif sha256_file(path) != record["sha256"]:
            problems.append(f"{rel} does not match its sha256")
    if problems:
        raise ArtifactError(
            f"artifact {artifact} failed verification: {'; '.join(problems[:4])}; it was modified or damaged "
            f"after export: export it again or restore the original"
        )
    return sorted(manifest["files"])
