from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from export_engine.artifacts.pack import pack, unpack
from export_engine.artifacts.store import ARTIFACT_KIND, SCHEMA_VERSION, ArtifactWriter, read_manifest
from export_engine.cli import main
from export_engine.errors import ArtifactError


def _artifact(root: Path) -> Path:
    target = root / "art"
    writer = ArtifactWriter(target)
    with writer as staging:
        (staging / "g.onnx").write_bytes(b"graph" * 100)
        (staging / "reference").mkdir()
        (staging / "reference" / "g.inputs.npz").write_bytes(b"inputs")
        writer.commit({"schema_version": SCHEMA_VERSION, "kind": ARTIFACT_KIND, "model": "toy", "graphs": [],
                       "precision": "fp32"})  # fmt: skip
    return target


def test_pack_unpack_round_trip(tmp_path: Path) -> None:
    art = _artifact(tmp_path)
    archive = pack(art, tmp_path / "a.tar.gz")
    out = unpack(archive, tmp_path / "restored")
    assert read_manifest(out)["files"] == read_manifest(art)["files"]
    assert (out / "reference" / "g.inputs.npz").read_bytes() == b"inputs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "art", "restored"]


def test_pack_refuses_tampered_artifact(tmp_path: Path) -> None:
    art = _artifact(tmp_path)
    (art / "g.onnx").write_bytes(b"evil" * 125)
    with pytest.raises(ArtifactError, match="sha256"):
        pack(art, tmp_path / "a.tar.gz")
    assert not (tmp_path / "a.tar.gz").exists()


def _evil(tmp_path: Path, kind: str) -> Path:
    art = _artifact(tmp_path / "src")
    archive = tmp_path / f"{kind}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(art.rglob("*")):
            tar.add(path, arcname=f"art/{path.relative_to(art).as_posix()}", recursive=False)
        info = tarfile.TarInfo()
        if kind == "absolute":
            info.name = "/tmp/evil.txt"
        elif kind == "dotdot":
            info.name = "art/../../evil.txt"
        elif kind == "symlink":
            info.name, info.type, info.linkname = "art/link", tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.name, info.type, info.linkname = "art/hard", tarfile.LNKTYPE, "art/g.onnx"
        elif kind == "device":
            info.name, info.type = "art/dev", tarfile.CHRTYPE
        elif kind == "fifo":
            info.name, info.type = "art/fifo", tarfile.FIFOTYPE
        if info.isfile():
            data = b"evil"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        else:
            tar.addfile(info)
    return archive


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "hardlink", "device", "fifo"])
def test_unpack_refuses_malicious_archives(tmp_path: Path, kind: str) -> None:
    archive = _evil(tmp_path, kind)
    with pytest.raises(ArtifactError, match="refusing"):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not (tmp_path.parent / "evil.txt").exists()


def test_unpack_verifies_before_success(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "src")
    archive = tmp_path / "t.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(art.rglob("*")):
            arcname = f"art/{path.relative_to(art).as_posix()}"
            if path.name == "g.onnx":
                data = b"x" * path.stat().st_size  # same size, other bytes
                info = tarfile.TarInfo(arcname)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.add(path, arcname=arcname, recursive=False)
    with pytest.raises(ArtifactError, match="sha256"):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unpack_refuses_garbage_and_occupied_target(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    assert main(["unpack", str(tmp_path / "junk.tar.gz"), "-o", str(tmp_path / "out")]) == 9
    assert "not a readable" in capsys.readouterr().err
    art = _artifact(tmp_path)
    archive = pack(art, tmp_path / "a.tar.gz")
    assert main(["unpack", str(archive), "-o", str(art)]) == 9
    assert "not empty" in capsys.readouterr().err
    assert main(["unpack", str(archive), "-o", str(art), "--force"]) == 0
