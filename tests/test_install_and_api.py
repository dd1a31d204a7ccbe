"""Installing and using export-engine like a library: dependency ranges, one ONNX Runtime build, the Python API
and `export-engine doctor`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib

import export_engine as ee
from export_engine.cli import main
from export_engine.core import onnxruntime_install
from export_engine.exporters.fastsam3d import TINY_CONFIG as FASTSAM3D_TINY

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> list[tuple[str, str]]:
    """(requirement, the text of its line and the line above it) for every dependency and extra."""
    lines = (ROOT / "pyproject.toml").read_text().splitlines()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    every = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    found = []
    for requirement in every:
        index = next(i for i, line in enumerate(lines) if f'"{requirement}"' in line)
        found.append((requirement, lines[index - 1] + "\n" + lines[index]))
    return found


def test_no_dependency_is_pinned_to_one_version_without_a_stated_reason() -> None:
    from packaging.requirements import Requirement

    for requirement, context in _requirements():
        if any(spec.operator in ("==", "===") for spec in Requirement(requirement).specifier):
            assert "#" in context, f"{requirement} is pinned to one version with no comment saying why"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch = [r for r in project["dependencies"] if r.startswith("torch")]
    assert torch and all("==" not in r and "<" not in r for r in torch)  # any newer torch, CPU or CUDA, is kept
    assert not any(r.startswith("onnxruntime") for r in project["dependencies"])  # chosen by an extra
    extras = project["optional-dependencies"]
    assert [r.split(">")[0] for r in extras["cpu"]] == ["onnxruntime"]
    assert [Requirement(r).name for r in extras["gpu"]] == ["onnxruntime-gpu", "export-engine-ops"]  # prebuilt ops


def test_installing_keeps_the_torch_already_there() -> None:
    """pip's resolver, offline, against what this environment has (its torch included): every requirement is met
    by an installed version, so nothing but export-engine itself would be installed, and no torch replaced."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation", "--report", "-",
         "--quiet", "-e", f"{ROOT}[cpu]"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    names = {item["metadata"]["name"].lower() for item in report["install"]}
    assert names == {"export-engine"}
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    assert not [line for line in check.stdout.splitlines() if "export-engine" in line.lower()], check.stdout


def test_onnxruntime_builds_are_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    monkeypatch.setattr(
        onnxruntime_install, "installed", lambda: {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}
    )
    problem = onnxruntime_install.problem()
    assert problem and "both onnxruntime 1.32.0 and onnxruntime-gpu 1.31.1" in problem and "[gpu]" in problem
    monkeypatch.setattr(onnxruntime_install, "installed", lambda: {})
    assert main(["run", str(tmp_path), "--inputs", "x.npz", "--outputs", "y.npz"]) == 8
    assert "ONNX Runtime is not installed: pip install 'export-engine[cpu]'" in capsys.readouterr().err


def test_doctor_reports_this_machine_and_an_artifact(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "c.json").write_text(json.dumps(FASTSAM3D_TINY))
    art = tmp_path / "art"
    argv = ["--model", "fastsam3d", "--random-weights", "--backend", "onnx", "--config", str(tmp_path / "c.json")]
    assert main([*argv, "--out", str(art), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["doctor", str(art)]) == 0
    text = capsys.readouterr().out
    for expected in ("onnxruntime", "providers", "--backend auto", "ONNX Runtime on CUDA", "status", "passed",
                     "graph encoder", "graph prompt_decoder", "export-engine's CUDA operators"):  # fmt: skip
        assert expected in text, expected
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"packages", "gpu", "engine builders", "runtime"} <= set(report["sections"])
    assert main(["doctor", str(tmp_path / "missing")]) == 0  # a finding, not a crash
    assert "problem:" in capsys.readouterr().out


def _readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API") :]
    section = section[: section.index("\n## ", 5)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_python_api_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Python block of the README's API section, as written, in a folder holding what they read."""
    from PIL import Image

    from export_engine.calibration.synthetic import structured_image, structured_volume
    from export_engine.exporters.mast3r import TINY_CONFIG as MAST3R_TINY

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.json").write_text(json.dumps(MAST3R_TINY))
    argv = ["--model", "mast3r", "--random-weights", "--backend", "onnx", "--config", "m.json", "--quiet"]
    assert main([*argv, "--resolution", "96x64", "--out", "mast3r-hybrid-512x384"]) == 0  # tiny, same name
    for seed, name in ((1, "a.jpg"), (2, "b.jpg")):
        image = structured_image(128, 192, seed)
        Image.fromarray(((image.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)).save(name)
    np.save("ct.npy", structured_volume(64, seed=3))
    blocks = _readme_python_blocks()
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_package_import_is_light() -> None:
    code = "import sys, export_engine; print(any(m in sys.modules for m in ('torch', 'onnxruntime')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False"
    assert ee.list_models() == ["mast3r", "fastsam3d"] and ee.Matcher.__name__ == "Matcher"


def test_doctor_builds_the_operators_on_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    from export_engine.runners import ort_ops

    if ort_ops.cxx() is None:
        pytest.skip("builds export-engine's CPU operators: no C++ compiler on this machine")
    monkeypatch.setenv("EXPORT_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setattr(ort_ops, "nvcc", lambda: None)  # the CPU build: seconds, not nvcc's tens of seconds
    monkeypatch.setattr(ort_ops.build, "nvcc", lambda: None)
    monkeypatch.setattr(ort_ops, "prebuilt_folders", lambda: [])  # CI installs one: this is about building
    ort_ops.forget()
    try:
        assert main(["doctor", "--build-ops"]) == 0
        out = capsys.readouterr().out
        assert "export-engine's CUDA operators none:" in out and "nvcc" in out
        assert [p.name for p in tmp_path.rglob("*.so")] == [ort_ops.LIBRARY_NAME]
        monkeypatch.setattr(ort_ops.build, "cxx", lambda: "/bin/false")
        ort_ops.forget()
        monkeypatch.setenv("EXPORT_ENGINE_CACHE", str(tmp_path / "other"))
        assert main(["doctor", "--build-ops"]) == 8  # a failed build: BackendError's exit code, no library left
        assert not list((tmp_path / "other").rglob("*.so"))
    finally:
        ort_ops.forget()
