"""``export --bundle-operators``: the artifact carries its operator libraries, hashed in the manifest, and a
runtime that names the artifact prefers them; a changed library fails ``verify`` and is passed over."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export_engine.cli import main
from export_engine.exporters.fastsam3d import TINY_CONFIG
from export_engine.runners import ort_ops
from export_engine.runners.ort_ops import build, faults

pytestmark = pytest.mark.skipif(
    ort_ops.cxx() is None and not ort_ops.prebuilt_folders(), reason="no C++ compiler and no prebuilt operators"
)


def test_an_artifact_carries_and_serves_its_operators(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    monkeypatch.setenv("EXPORT_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "nvcc", lambda: None)  # CUDA operators only where prebuilt (CI): no 20 s build here
    ort_ops.forget()
    prebuilt_cuda = any(f.glob("cuda13/*.so") for f in ort_ops.prebuilt_folders())
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    artifact = tmp_path / "art"
    argv = ["--model", "fastsam3d", "--random-weights", "--config", str(tmp_path / "config.json"), "--out",
            str(artifact), "--backend", "onnx", "--quiet", "--bundle-operators"]  # fmt: skip
    try:
        assert main(argv) == 0
        manifest = json.loads((artifact / "manifest.json").read_text())
        builds = {Path(r["file"]).parent.name: r for r in manifest["operators"]}
        assert set(builds) == ({"cpu", "cuda13"} if prebuilt_cuda else {"cpu"})
        assert builds["cpu"]["providers"] == "cpu" and builds["cpu"]["ort_api"] == 17
        for record in builds.values():
            assert {record["file"], f"{Path(record['file']).parent}/build.json"} <= set(manifest["files"])
        capsys.readouterr()
        assert main(["verify", str(artifact)]) == 0

        bundled = ort_ops.use_bundled(artifact)
        assert artifact / builds["cpu"]["file"] in bundled
        choice = ort_ops.choose(cuda=False)
        assert choice.source == "bundled" and choice.path == artifact / builds["cpu"]["file"]
        assert main(["doctor", str(artifact)]) == 0
        assert f"export-engine's CPU operators bundled (cpu): {choice.path}" in capsys.readouterr().out

        ort_ops.use_bundled(None)
        faults.provoke("corrupt", choice.path)  # a changed file: verify says so, loading passes it over
        assert main(["verify", str(artifact)]) != 0
        ort_ops.use_bundled(artifact)
        again = ort_ops.choose(cuda=False)  # the bundled CUDA build (it has CPU kernels too), or not bundled at all
        assert again.path != choice.path and "does not match the sha256 in its artifact's manifest" in again.refused[0]
    finally:
        ort_ops.use_bundled(None)
        ort_ops.forget()
