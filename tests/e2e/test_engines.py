"""Artifacts with engines: real TensorRT-RTX builds of the tiny models, verify/inspect/run around them."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from export_engine.cli import main
from export_engine.exporters.registry import FAMILIES, get_family
from export_engine.runtime.session import load

needs_rtx = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None and importlib.util.find_spec("tensorrt_rtx_bindings") is None,
    reason="TensorRT-RTX is not installed (pip install -e '.[rtx]')",
)
no_full_trt = importlib.util.find_spec("tensorrt") is None


def _export(family: str, root: Path, *extra: str) -> Path:
    fam = get_family(family)
    (root / "config.json").write_text(json.dumps(fam.tiny_config()))
    out = root / f"{family}-art"
    argv = ["--model", family, "--random-weights", "--config", str(root / "config.json"), "--out", str(out), *extra]
    if fam.tiny_shape:
        argv += ["--resolution", fam.tiny_shape]
    assert main([*argv, "--quiet"]) == 0
    return out


@needs_rtx
@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
def test_rtx_engines_in_artifact(family: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Hybrid, as deployments ship them: FP16 attention gets its fused kernel (decomposable only where the head
    # size rules a fused kernel out, as in the tiny FastSAM3D decoder), FP32 islands stay FP32.
    art = _export(family, tmp_path, "--backend", "tensorrt-rtx", "--compute-capability", "8.9", "--precision", "hybrid",
                  "--strict")  # fmt: skip
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["backend"] == "tensorrt-rtx"
    assert [e["graph"] for e in manifest["engines"]] == [g["name"] for g in manifest["graphs"]]
    for engine in manifest["engines"]:
        assert (art / engine["file"]).stat().st_size == engine["build"]["engine_bytes"] > 0
        assert engine["header"]["targets"] == ["8.9"]
        assert engine["parity"]["status"] == "pending" and "GPU" in engine["parity"]["reason"]
        assert engine["onnx_sha256"] == manifest["files"][engine["onnx"]]["sha256"]
        assert not any(str(tmp_path) in json.dumps(v) for v in engine["build"].values())  # relative paths only
        assert {a["q_dtype"] for a in engine["build"]["attention"]} == {"HALF"}
    parity = json.loads((art / "parity.json").read_text())
    assert parity["status"] == "pending" and {e["status"] for e in parity["engines"]} == {"pending"}
    capsys.readouterr()
    assert main(["verify", str(art)]) == 0
    out = capsys.readouterr().out
    assert "needs tensorrt-rtx" in out and "check(s) pending" in out  # pending is never reported as verified
    assert main(["inspect", str(art)]) == 0
    assert "fused attention layers" in capsys.readouterr().out
    session = load(art)  # falls back to ONNX Runtime here, and says why
    fam = get_family(family)
    outputs = session.run(fam.sample_inputs(session.graphs, 0))
    assert all(np.isfinite(v).all() for v in outputs.values())
    tampered = tmp_path / "tampered"
    shutil.copytree(art, tampered)
    engine_file = tampered / manifest["engines"][0]["file"]
    engine_file.write_bytes(engine_file.read_bytes()[:-10] + b"0123456789")
    assert main(["verify", str(tampered)]) == 9


@needs_rtx
def test_rtx_engines_for_the_sparse_fastsam3d_encoder(tmp_path: Path) -> None:
    art = _export("fastsam3d", tmp_path, "--attention", "sparse", "--backend", "tensorrt-rtx", "--compute-capability",
                  "8.9", "--precision", "hybrid", "--strict")  # fmt: skip
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["attention"] == "sparse"
    engine = next(e for e in manifest["engines"] if e["graph"] == "encoder")
    assert (art / engine["file"]).stat().st_size > 0 and engine["parity"]["status"] == "pending"
    assert {a["q_dtype"] for a in engine["build"]["attention"]} == {"HALF"}  # the group attention is fused


@pytest.mark.skipif(not no_full_trt, reason="full TensorRT is installed here; the missing-backend error cannot show")
def test_missing_full_tensorrt_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "c.json").write_text(json.dumps(get_family("fastsam3d").tiny_config()))
    argv = ["--model", "fastsam3d", "--random-weights", "--config", str(tmp_path / "c.json"), "--backend", "tensorrt"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 8
    err = capsys.readouterr().err
    assert "tensorrt" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()


def test_unknown_backend(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--model", "mast3r", "--random-weights", "--backend", "coreml", "--out", str(tmp_path / "a")]) == 2
    assert "tensorrt-rtx" in capsys.readouterr().err
