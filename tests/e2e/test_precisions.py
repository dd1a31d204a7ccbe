"""fp16 and hybrid through the CLI: fused attention only, the precision plan, and the case that matters
(massive activations: naive FP16 must be refused, hybrid must pass)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from export_engine.cli import main
from export_engine.exporters.mast3r import TINY_CONFIG
from export_engine.models.mast3r.checkpoint import build_mast3r
from export_engine.models.mast3r.config import MASt3RConfig


def _argv(root: Path, out: str, *extra: str) -> list[str]:
    (root / "config.json").write_text(json.dumps(TINY_CONFIG))
    return ["--model", "mast3r", "--config", str(root / "config.json"), "--resolution", "80x48",
            "--backend", "onnx", "--out", str(root / out), "--quiet", "--strict", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def massive_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny MASt3R whose encoder block 1 MLP hidden state reaches ~1e5 (beyond FP16's 65504), as real ViT-L
    weights have "massive activations": fc1 x 1e5 and fc2 / 1e5 (GELU(a h) / a ~ ReLU(h): a sane network)."""
    model, _, _ = build_mast3r(MASt3RConfig.from_json(TINY_CONFIG), None, 0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["enc_blocks.1.mlp.fc1.weight"] *= 1e5
    state["enc_blocks.1.mlp.fc1.bias"] *= 1e5
    state["enc_blocks.1.mlp.fc2.weight"] /= 1e5
    path = tmp_path_factory.mktemp("massive") / "massive.safetensors"
    unique = {k: v for k, v in state.items() if ".scratch.layer_rn." not in k}  # aliases are restored on load
    save_file({k: v.contiguous() for k, v in unique.items()}, str(path))
    return path


def test_massive_activations_refused_at_fp16_pass_at_hybrid(
    massive_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = ["--checkpoint", str(massive_checkpoint)]
    assert main([*_argv(tmp_path, "fp16", "--precision", "fp16"), *ckpt]) == 7
    err = capsys.readouterr().err
    assert "parity failed" in err and "encoder/tokens" in err
    assert not (tmp_path / "fp16").exists()

    assert main([*_argv(tmp_path, "hybrid", "--precision", "hybrid"), *ckpt]) == 0
    art = tmp_path / "hybrid"
    plans = json.loads((art / "precision_plan.json").read_text())["graphs"]
    fp32_nodes = {k: v for k, v in plans["encoder"]["nodes"].items() if v["precision"] == "fp32"}
    assert any("enc_blocks.1/mlp/fc1" in k for k in fp32_nodes), "the massive MLP must be kept in FP32"
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["parity"]["passed"]
    assert 0 < manifest["graphs"][0]["precision_plan"]["fp16_flop_share"] < 1

    # The plan is reusable: a second export with --precision-plan skips calibration and gives the same plan.
    argv = _argv(tmp_path, "again", "--precision", "hybrid", "--precision-plan", str(art / "precision_plan.json"))
    assert main([*argv, *ckpt]) == 0
    again = json.loads((tmp_path / "again" / "precision_plan.json").read_text())["graphs"]
    assert {k: v["precision"] for k, v in again["encoder"]["nodes"].items()} == {
        k: v["precision"] for k, v in plans["encoder"]["nodes"].items()
    }


@pytest.mark.parametrize("precision", ["fp16", "hybrid"])
def test_half_precision_artifacts_are_fused_and_strongly_typed(precision: str, tmp_path: Path) -> None:
    assert main([*_argv(tmp_path, "art", "--precision", precision, "--random-weights")]) == 0
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    for graph in manifest["graphs"]:
        ops = graph["op_counts"]
        assert "Softmax" not in ops, f"{graph['name']}: bare Softmax left"
        assert ops["Attention"] == graph["expected_counts"]["attention"]
        assert ops.get("Cast", 0) > 0
        assert all(t["dtype"] == "float32" for t in graph["inputs"] + graph["outputs"])
    assert (tmp_path / "art" / "precision_plan.json").exists() == (precision == "hybrid")


def test_bad_precision_plan_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "plan.json").write_text(json.dumps({"graphs": {"other": {}}}))
    argv = _argv(
        tmp_path, "art", "--precision", "hybrid", "--random-weights", "--precision-plan", str(tmp_path / "plan.json")
    )
    assert main(argv) == 2
    assert "no plan for graph" in capsys.readouterr().err
    assert not (tmp_path / "art").exists()


def test_skip_pass_names_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([*_argv(tmp_path, "art", "--random-weights", "--skip-pass", "fuse_everything")]) == 2
    assert "fuse_attention" in capsys.readouterr().err


def test_skipping_fusion_keeps_softmax(tmp_path: Path) -> None:
    assert main([*_argv(tmp_path, "art", "--random-weights", "--skip-pass", "fuse_attention")]) == 0
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert all("Attention" not in g["op_counts"] and g["op_counts"]["Softmax"] > 0 for g in manifest["graphs"])


def test_calibration_data_folder(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from export_engine.calibration.synthetic import structured_image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        image = (structured_image(96, 128, 50 + i).transpose(1, 2, 0) + 1) * 127.5
        Image.fromarray(image.astype(np.uint8)).save(photos / f"{i}.png")
    argv = _argv(tmp_path, "art", "--precision", "hybrid", "--random-weights", "--calibration-data", str(photos))
    assert main(argv) == 0
    passes = json.loads((tmp_path / "art" / "passes.json").read_text())
    calibrate = next(r for r in passes["decoder"] if r["name"] == "calibrate_precision")
    assert calibrate["details"]["source"] == "measured on 2 calibration input(s)"  # 3 photos -> 2 pairs


def test_calibration_data_needs_hybrid_and_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(_argv(tmp_path, "a", "--random-weights", "--calibration-data", str(tmp_path))) == 2
    assert "hybrid only" in capsys.readouterr().err
    argv = _argv(tmp_path, "a", "--random-weights", "--precision", "hybrid", "--calibration-data", str(tmp_path / "x"))
    assert main(argv) == 2
    assert "does not exist" in capsys.readouterr().err
