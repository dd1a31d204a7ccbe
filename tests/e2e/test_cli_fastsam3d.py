"""FastSAM3D through the whole CLI: the reference small model reproduces upstream outputs from an artifact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export_engine.cli import main

CASES = ("click1", "click2", "nomask", "batch2")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, fastsam3d_ref: Path) -> Path:
    out = tmp_path_factory.mktemp("fastsam3d") / "art"
    code = main(
        [
            "--model", "fastsam3d", "--precision", "fp32",
            "--checkpoint", str(fastsam3d_ref / "state_dict.safetensors"),
            "--config", str(fastsam3d_ref / "config.json"), "--out", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    return out


def test_manifest(artifact: Path) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["model"] == "fastsam3d" and manifest["resolution"] == "64x64x64"
    graphs = {g["name"]: g for g in manifest["graphs"]}
    assert set(graphs) == {"encoder", "prompt_decoder"}
    inputs = {t["name"]: t for t in graphs["prompt_decoder"]["inputs"]}
    assert inputs["point_coords"]["shape"] == ["prompts", "points", 3]
    assert inputs["point_labels"]["dtype"] == "int64"
    assert inputs["image_embedding"]["shape"] == [1, 96, 8, 8, 8]


@pytest.mark.parametrize("case", CASES)
def test_run_reproduces_upstream(artifact: Path, fastsam3d_ref: Path, tmp_path: Path, case: str) -> None:
    ref_in = np.load(fastsam3d_ref / "inputs.npz")
    feed = {"image": ref_in["image"]}
    for key in ("point_coords", "point_labels", "mask_input"):
        if f"{case}__{key}" in ref_in.files:
            feed[key] = ref_in[f"{case}__{key}"]
    np.savez(tmp_path / "in.npz", **feed)
    assert main(["run", str(artifact), "--inputs", str(tmp_path / "in.npz"), "--outputs", str(tmp_path / "o.npz")]) == 0
    got = np.load(tmp_path / "o.npz")
    expected = np.load(fastsam3d_ref / f"case_{case}.npz")
    np.testing.assert_allclose(got["image_embedding"], np.load(fastsam3d_ref / "encoder.npz")["image_embedding"],
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    for name in ("low_res_masks", "iou_predictions", "masks_upscaled"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-4, err_msg=name)
    flips = int(((got["masks_upscaled"] > 0) != expected["binary_mask"].astype(bool)).sum())
    assert flips <= 2, f"{flips} voxels of the binary mask differ"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"point_coords": np.array([[[70.0, 3.0, 3.0]]], np.float32)}, "outside the volume"),
        ({"point_labels": np.array([[2]])}, "must be 1 (positive)"),
        ({"mask_input": np.zeros((1, 1, 16, 16, 16), np.float32)}, "mask_input has shape"),
        ({"image": np.zeros((1, 1, 32, 32, 32), np.float32)}, "crop or pad"),
    ],
)
def test_bad_prompts(artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture, change: dict, message: str) -> None:
    feed = {
        "image": np.random.default_rng(0).standard_normal((1, 1, 64, 64, 64)).astype(np.float32),
        "point_coords": np.array([[[10.0, 20.0, 30.0]]], np.float32),
        "point_labels": np.array([[1]]),
        **change,
    }
    np.savez(tmp_path / "in.npz", **feed)
    assert main(["run", str(artifact), "--inputs", str(tmp_path / "in.npz"), "--outputs", str(tmp_path / "o.npz")]) == 4
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()


def test_resolution_does_not_apply(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [
        "--model",
        "fastsam3d",
        "--random-weights",
        "--resolution",
        "128x128",
        "--out",
        str(tmp_path / "a"),
    ]
    assert main(argv) == 2
    assert "--resolution does not apply" in capsys.readouterr().err


def test_graphs_are_engine_friendly(artifact: Path) -> None:
    """No boolean-mask scatter, no data-dependent shapes, no Einsum; the image PE is a constant."""
    import onnx

    for name in ("encoder.onnx", "prompt_decoder.onnx"):
        ops = [n.op_type for n in onnx.load(str(artifact / name), load_external_data=False).graph.node]
        assert not {"NonZero", "ScatterND", "GatherND", "Einsum", "Loop"} & set(ops), name
    ops = [n.op_type for n in onnx.load(str(artifact / "prompt_decoder.onnx")).graph.node]
    assert ops.count("Sin") == 1 and ops.count("Cos") == 1, "only the clicks' Fourier features are computed"
