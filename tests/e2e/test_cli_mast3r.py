"""MASt3R through the whole CLI: the reference small model reproduces upstream outputs from an artifact."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export_engine.cli import main


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, mast3r_ref: Path) -> Path:
    out = tmp_path_factory.mktemp("mast3r") / "art"
    code = main(
        [
            "--model", "mast3r", "--precision", "fp32",
            "--checkpoint", str(mast3r_ref / "model.safetensors"),
            "--config", str(mast3r_ref / "config.json"),
            "--resolution", "80x48", "--backend", "onnx", "--out", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    return out


def test_artifact_layout_and_manifest(artifact: Path, mast3r_ref: Path) -> None:
    assert sorted(p.name for p in artifact.iterdir()) == [
        "decoder.onnx",
        "encoder.onnx",
        "manifest.json",
        "parity.json",
        "passes.json",
        "reference",
    ]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["model"] == "mast3r" and manifest["precision"] == "fp32" and manifest["resolution"] == "80x48"
    digest = hashlib.sha256((mast3r_ref / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["weights"]["sha256"] == digest
    assert manifest["config"]["enc_embed_dim"] == 96
    graphs = {g["name"]: g for g in manifest["graphs"]}
    assert graphs["encoder"]["inputs"] == [{"name": "images", "shape": ["batch", 3, 48, 80], "dtype": "float32"}]
    assert graphs["decoder"]["outputs"][0] == {"name": "view1_pts3d", "shape": ["batch", 48, 80, 3], "dtype": "float32"}
    assert set(manifest["files"]) == {
        "decoder.onnx",
        "encoder.onnx",
        "parity.json",
        "passes.json",
        "reference/encoder.inputs.npz",
        "reference/encoder.expected.npz",
        "reference/decoder.inputs.npz",
        "reference/decoder.expected.npz",
    }
    assert manifest["parity"]["passed"] is True
    assert {"torch", "onnx", "onnxruntime", "polygraphy"} <= set(manifest["versions"])
    parity = json.loads((artifact / "parity.json").read_text())
    assert parity["passed"] and len(parity["exporter"]) == 2 and len(parity["final"]) == 2
    assert parity["status"] == "passed" and parity["engines"] == []  # ONNX only: nothing pending


def test_run_reproduces_upstream_outputs(artifact: Path, mast3r_ref: Path, tmp_path: Path) -> None:
    # One resolution per artifact: the mixed-shape reference pair is reproduced by tests/models instead.
    expected = np.load(mast3r_ref / "outputs.npz")
    out = tmp_path / "out.npz"
    assert main(["run", str(artifact), "--inputs", str(mast3r_ref / "inputs.npz"), "--outputs", str(out)]) == 0
    got = np.load(out)
    assert sorted(got.files) == sorted(expected.files)
    for name in expected.files:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_run_rejects_wrong_shapes_and_names(artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, view1_img=np.zeros((1, 3, 64, 64), np.float32), view2_img=np.zeros((1, 3, 64, 64), np.float32))
    assert main(["run", str(artifact), "--inputs", str(bad), "--outputs", str(tmp_path / "o.npz")]) == 4
    assert "exported for 80x48" in capsys.readouterr().err
    np.savez(bad, img=np.zeros((1, 3, 48, 80), np.float32))
    assert main(["run", str(artifact), "--inputs", str(bad), "--outputs", str(tmp_path / "o.npz")]) == 4
    assert "view1_img" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()


def test_run_refuses_tampered_artifact(artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    data = bytearray((copy / "encoder.onnx").read_bytes())
    data[-100] ^= 0xFF
    (copy / "encoder.onnx").write_bytes(bytes(data))
    inputs = tmp_path / "in.npz"
    np.savez(inputs, view1_img=np.zeros((1, 3, 48, 80), np.float32), view2_img=np.zeros((1, 3, 48, 80), np.float32))
    assert main(["run", str(copy), "--inputs", str(inputs), "--outputs", str(tmp_path / "o.npz")]) == 9
    assert "encoder.onnx does not match its sha256" in capsys.readouterr().err


def test_inspect(artifact: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(artifact)]) == 0
    text = capsys.readouterr().out
    assert (
        "mast3r" in text
        and "view2_pts3d_in_other_view" in text
        and "status      passed" in text
        and "passed   ONNX parity gates" in text
    )


def test_refuses_existing_artifact_then_force(artifact: Path, mast3r_ref: Path, capsys: pytest.CaptureFixture) -> None:
    args = [
        "--model", "mast3r", "--checkpoint", str(mast3r_ref / "model.safetensors"),
        "--config", str(mast3r_ref / "config.json"), "--resolution", "80x48", "--out", str(artifact), "--quiet",
    ]  # fmt: skip
    before = (artifact / "manifest.json").read_text()
    assert main(args) == 9
    assert "--force" in capsys.readouterr().err
    assert (artifact / "manifest.json").read_text() == before
    assert main([*args, "--force"]) == 0
    assert json.loads((artifact / "manifest.json").read_text())["parity"]["passed"]


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--out", str(tmp_path / "art"), "--quiet", *extra]


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--model", "mast4r", "--random-weights"], 2, "choose one of: mast3r"),
        (["--model", "mast3r", "--precision", "int8", "--random-weights"], 2, "fp32, fp16, hybrid"),
        (["--model", "mast3r", "--random-weights", "--resolution", "500x384"], 2, "multiples of 16"),
        (["--model", "mast3r"], 2, "--random-weights"),
        (["--model", "mast3r", "--checkpoint", "/nonexistent/x.pth"], 3, "not found"),
    ],
)
def test_bad_usage(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], code: int, message: str) -> None:
    assert main(_args(tmp_path, *argv)) == code
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_corrupt_and_foreign_checkpoints(tmp_path: Path, mast3r_ref: Path, capsys: pytest.CaptureFixture) -> None:
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes((mast3r_ref / "model.safetensors").read_bytes()[:5000])
    assert main(_args(tmp_path, "--model", "mast3r", "--checkpoint", str(truncated))) == 3
    assert "corrupt" in capsys.readouterr().err
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"image_encoder.pos_embed": torch.zeros(1, 8, 8, 8, 96)}}, foreign)
    assert main(_args(tmp_path, "--model", "mast3r", "--checkpoint", str(foreign))) == 3
    assert "image_encoder.pos_embed" in capsys.readouterr().err
    assert not (tmp_path / "art").exists()


def test_interrupted_export_leaves_nothing(tmp_path: Path, mast3r_ref: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import export_engine.pipeline as pipeline

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_final_gate", interrupt)
    argv = _args(
        tmp_path, "--model", "mast3r", "--checkpoint", str(mast3r_ref / "model.safetensors"),
        "--config", str(mast3r_ref / "config.json"), "--resolution", "80x48",
    )  # fmt: skip
    assert main(argv) == 130
    assert not list(tmp_path.iterdir())


def test_console_script_reports_version_and_models() -> None:
    proc = subprocess.run([sys.executable, "-m", "export_engine.cli", "models"], capture_output=True, text=True)
    assert proc.returncode == 0 and "mast3r" in proc.stdout


def test_verify_pack_unpack_and_run_from_package(artifact: Path, tmp_path: Path, mast3r_ref: Path) -> None:
    assert main(["verify", str(artifact), "--run"]) == 0
    archive = tmp_path / "mast3r.tar.gz"
    assert main(["pack", str(artifact), "-o", str(archive)]) == 0
    restored = tmp_path / "restored"
    assert main(["unpack", str(archive), "-o", str(restored)]) == 0
    out = tmp_path / "out.npz"
    assert main(["run", str(restored), "--inputs", str(mast3r_ref / "inputs.npz"), "--outputs", str(out)]) == 0
    expected = np.load(mast3r_ref / "outputs.npz")
    np.testing.assert_allclose(np.load(out)["view1_pts3d"], expected["view1_pts3d"], rtol=1e-4, atol=1e-4)


def test_verify_run_catches_a_changed_graph(artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import onnx
    from onnx import numpy_helper

    from export_engine.artifacts.store import hash_tree

    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    proto = onnx.load(str(copy / "decoder.onnx"))
    init = max(proto.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(proto, str(copy / "decoder.onnx"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"] = hash_tree(copy)  # a consistent re-hash: only the numbers can tell
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(copy)]) == 0
    assert main(["verify", str(copy), "--run"]) == 7
    assert "no longer matches" in capsys.readouterr().err
