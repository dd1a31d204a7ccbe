from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from export_engine.artifacts.store import (
    ARTIFACT_KIND,
    MANIFEST,
    SCHEMA_VERSION,
    ArtifactWriter,
    read_manifest,
    verify_files,
)
from export_engine.errors import ArtifactError


def _manifest() -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": ARTIFACT_KIND,
        "model": "toy",
        "graphs": [],
        "precision": "fp32",
    }


def _write(target: Path, payload: bytes = b"onnx", force: bool = False) -> None:
    writer = ArtifactWriter(target, force=force)
    with writer as staging:
        (staging / "g.onnx").write_bytes(payload)
        writer.commit(_manifest())


def test_commit_writes_manifest_with_hashes(tmp_path: Path) -> None:
    _write(tmp_path / "a")
    manifest = read_manifest(tmp_path / "a")
    assert set(manifest["files"]) == {"g.onnx"}
    assert verify_files(tmp_path / "a", manifest) == ["g.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging leftovers


def test_failure_inside_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ArtifactWriter(tmp_path / "a") as staging:
        (staging / "g.onnx").write_bytes(b"half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), ArtifactWriter(tmp_path / "a") as staging:
        (staging / "g.onnx").write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_disk_error_becomes_artifact_error_and_keeps_old(tmp_path: Path) -> None:
    _write(tmp_path / "a", b"old")
    with pytest.raises(ArtifactError, match="No space left"), ArtifactWriter(tmp_path / "a", force=True):
        raise OSError(28, "No space left on device")
    assert (tmp_path / "a" / "g.onnx").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_refuses_existing_artifact_unless_forced(tmp_path: Path) -> None:
    _write(tmp_path / "a", b"old")
    with pytest.raises(ArtifactError, match="--force"):
        _write(tmp_path / "a", b"new")
    assert (tmp_path / "a" / "g.onnx").read_bytes() == b"old"
    _write(tmp_path / "a", b"new", force=True)
    assert (tmp_path / "a" / "g.onnx").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_refuses_non_empty_folder_without_artifact(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not empty"):
        _write(tmp_path / "a", force=True)
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: (d / "g.onnx").write_bytes(b"onnY"), "sha256"),
        (lambda d: (d / "g.onnx").write_bytes(b"onnx!"), "bytes"),
        (lambda d: (d / "g.onnx").unlink(), "missing"),
    ],
)
def test_verify_catches_tampering(tmp_path: Path, change, message: str) -> None:
    _write(tmp_path / "a")
    change(tmp_path / "a")
    with pytest.raises(ArtifactError, match=message):
        verify_files(tmp_path / "a", read_manifest(tmp_path / "a"))


def test_newer_schema_and_garbage_are_refused(tmp_path: Path) -> None:
    _write(tmp_path / "a")
    path = tmp_path / "a" / MANIFEST
    data = json.loads(path.read_text())
    data["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="upgrade export-engine"):
        read_manifest(tmp_path / "a")
    path.write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(tmp_path / "a")
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        read_manifest(tmp_path / "nothing")


def _commit_after_barrier(target: str, payload: bytes, barrier: Any, results: Any) -> None:
    writer = ArtifactWriter(Path(target))
    try:
        with writer as staging:
            (staging / "g.onnx").write_bytes(payload)
            barrier.wait(timeout=30)  # both exports passed their start check; now both commit
            writer.commit(_manifest())
        results.put(("ok", payload))
    except ArtifactError as err:
        results.put(("refused", str(err)))


def test_two_concurrent_exports_never_clobber_each_other(tmp_path: Path) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    target = tmp_path / "a"
    procs = [ctx.Process(target=_commit_after_barrier, args=(str(target), p, barrier, results)) for p in (b"1", b"2")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert [o[0] for o in outcomes] == ["ok", "refused"]
    winner = outcomes[0][1]
    assert (target / "g.onnx").read_bytes() == winner
    assert "received an artifact from another run" in outcomes[1][1] and "kept at" in outcomes[1][1]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("a.new-")]
    assert len(kept) == 1 and verify_files(kept[0], read_manifest(kept[0])) == ["g.onnx"]
    assert (kept[0] / "g.onnx").read_bytes() != winner
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a", kept[0].name])  # no lock or staging left


def test_user_files_that_appear_during_an_export_are_never_replaced(tmp_path: Path) -> None:
    target = tmp_path / "a"
    writer = ArtifactWriter(target, force=True)
    with pytest.raises(ArtifactError, match="received other files"), writer as staging:
        (staging / "g.onnx").write_bytes(b"x")
        target.mkdir()
        (target / "notes.txt").write_text("mine")
        writer.commit(_manifest())
    assert (target / "notes.txt").read_text() == "mine" and not (target / MANIFEST).exists()
    assert any(p.name.startswith("a.new-") for p in tmp_path.iterdir())
