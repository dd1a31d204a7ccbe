"""Pack an artifact into one .tar.gz and unpack it safely (verified before success is reported).

Unpacking refuses anything that could write outside the target or create something other than plain files
and folders: absolute paths, ``..`` components, symbolic and hard links, device files, FIFOs, duplicate or
oversized members. It extracts into a hidden staging folder next to the target, verifies every sha256
against the manifest, and only then renames the folder into place.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from export_engine.artifacts.store import MANIFEST, read_manifest, verify_files
from export_engine.atomic import replacing
from export_engine.errors import ArtifactError

log = logging.getLogger(__name__)

# A generous ceiling (full-size MASt3R FP32 graphs plus an engine are ~6 GB): stops decompression bombs.
MAX_UNPACKED_BYTES = 64 * 1024**3


def pack(artifact: Path, target: Path) -> Path:
    """Verify ``artifact`` and write it as ``target`` (.tar.gz) with one top-level folder named after it."""
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    files = verify_files(artifact, manifest)
    target = Path(target)
    if not target.name.endswith((".tar.gz", ".tgz")):
        raise ArtifactError(f"pack target {target} must end in .tar.gz")
    root = artifact.resolve().name
    try:
        with replacing(target) as partial, tarfile.open(partial, "w:gz", compresslevel=1) as tar:
            for rel in [*files, MANIFEST]:  # compresslevel 1: weights barely compress, favour speed
                tar.add(artifact / rel, arcname=f"{root}/{rel}", recursive=False)
    except OSError as err:
        raise ArtifactError(f"writing {target} failed ({err.strerror or err}); nothing was written") from err
    log.info("packed %s (%d files) into %s", artifact, len(files) + 1, target)
    return target


def _safe_members(tar: tarfile.TarFile, archive: Path) -> tuple[str, list[tarfile.TarInfo]]:
    members = tar.getmembers()
    if not members:
        raise ArtifactError(f"{archive} is empty")
    roots: set[str] = set()
    seen: set[str] = set()
    total = 0
    for member in members:
        name = member.name
        path = PurePosixPath(name)
        if name.startswith("/") or path.is_absolute() or "\\" in name or ":" in path.parts[0]:
            raise ArtifactError(f"{archive} holds an absolute path ({name!r}); refusing to unpack it")
        if any(part == ".." for part in path.parts):
            raise ArtifactError(f"{archive} holds a path that leaves the target ({name!r}); refusing to unpack it")
        if member.issym() or member.islnk():
            raise ArtifactError(f"{archive} holds a link ({name!r} -> {member.linkname!r}); refusing to unpack it")
        if not (member.isfile() or member.isdir()):
            raise ArtifactError(f"{archive} holds a device file, FIFO or other special entry ({name!r}); refusing")
        normalized = path.as_posix().rstrip("/")
        if normalized in seen:
            raise ArtifactError(f"{archive} holds {name!r} twice; refusing to unpack it")
        seen.add(normalized)
        roots.add(path.parts[0])
        total += member.size
        if total > MAX_UNPACKED_BYTES:
            raise ArtifactError(f"{archive} unpacks to more than {MAX_UNPACKED_BYTES / 1024**3:.0f} GiB; refusing")
    if len(roots) != 1:
        raise ArtifactError(f"{archive} must hold one artifact folder, found {sorted(roots)[:4]}")
    return roots.pop(), members


def _swap(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; a previous folder there is moved aside first and removed only after."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def unpack(archive: Path, target: Path, force: bool = False) -> Path:
    """Unpack ``archive`` into ``target`` (the artifact folder itself), verifying it before reporting success."""
    archive, target = Path(archive), Path(target).absolute()
    if not archive.is_file():
        raise ArtifactError(f"{archive} not found")
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise ArtifactError(f"{target} exists and is not empty; choose another -o or pass --force")
    staging = target.parent / f".{target.name}.unpack-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "r:*") as tar:
            root, members = _safe_members(tar, archive)
            staging.mkdir()
            tar.extractall(staging, members=members, filter="data")
        unpacked = staging / root
        verify_files(unpacked, read_manifest(unpacked))
        _swap(unpacked, target)
    except (tarfile.TarError, EOFError) as err:
        raise ArtifactError(f"{archive} is not a readable .tar.gz ({err}); download it again") from err
    except OSError as err:
        raise ArtifactError(f"unpacking {archive} failed ({err.strerror or err}); nothing was written") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("unpacked and verified %s into %s", archive, target)
    return target
