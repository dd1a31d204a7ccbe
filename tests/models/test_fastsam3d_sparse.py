"""FastSAM3D's "3D sparse flash attention" encoder variant: the upstream reference vectors, ragged and tiny token
counts against a plain per-group loop, and the artifact path (--attention sparse)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from export_engine.cli import main
from export_engine.models.fastsam3d.config import FastSAM3DConfig
from export_engine.models.fastsam3d.image_encoder import RelPosAttention3D
from export_engine.models.fastsam3d.model import FastSAM3D


def _sparse_model(ref: Path, attn_impl: str) -> FastSAM3D:
    config = FastSAM3DConfig.from_json(json.loads((ref / "config.json").read_text()))
    model = FastSAM3D(dataclasses.replace(config, encoder_attention="sparse"), attn_impl=attn_impl)
    model.load_state_dict(load_file(str(ref / "state_dict.safetensors")), strict=True)  # the same weights load
    return model.eval()


@pytest.mark.parametrize("attn_impl", ["explicit", "sdpa"])
def test_sparse_encoder_reproduces_the_upstream_fp32_reference(fastsam3d_ref: Path, attn_impl: str) -> None:
    image = torch.from_numpy(np.load(fastsam3d_ref / "inputs.npz")["image"])
    with torch.no_grad():
        got = _sparse_model(fastsam3d_ref, attn_impl).encode(image).numpy()
    ref = np.load(fastsam3d_ref / "encoder.npz")
    np.testing.assert_allclose(got, ref["image_embedding_sparse_fp32ref"], atol=1e-4, rtol=1e-4)
    assert np.abs(got - ref["image_embedding"]).max() > 0.1  # a different function from the dense encoder


def _per_group_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: int) -> torch.Tensor:
    """The definition, one group at a time: G_r = r, r + S, ...; outputs concatenated in group order."""
    n, scale = q.shape[2], q.shape[3] ** -0.5
    outs = []
    for r in range(min(segment, n)):
        idx = torch.arange(r, n, segment)
        weights = ((q[:, :, idx] * scale) @ k[:, :, idx].transpose(-2, -1)).softmax(dim=-1)
        outs.append(weights @ v[:, :, idx])
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("tokens", [27, 64, 512, 1000])  # fewer than S, one group each, uniform, ragged
@pytest.mark.parametrize("attn_impl", ["explicit", "sdpa"])
def test_sparse_groups_match_the_definition(tokens: int, attn_impl: str) -> None:
    attn = RelPosAttention3D(24, 2, 4, True, True, attn_impl, sparse_segment=64)
    gen = torch.Generator().manual_seed(tokens)
    q, k, v = (torch.randn(2, 2, tokens, 12, generator=gen) for _ in range(3))
    got = attn._sparse(q, k, v)
    torch.testing.assert_close(got, _per_group_loop(q, k, v, 64), atol=1e-5, rtol=1e-5)
    if tokens < 64:
        torch.testing.assert_close(got, v)  # one token per group: the layer returns v unchanged


def test_ragged_volume_exports_and_matches_pytorch(tmp_path: Path, fastsam3d_ref: Path) -> None:
    """img_size 80, patch 8: 1000 tokens = 15 x 64 + 40, so 40 groups of 16 and 24 of 15 tokens."""
    config = json.loads((fastsam3d_ref / "config.json").read_text())
    config["model"]["img_size"] = 80
    (tmp_path / "c.json").write_text(json.dumps(config))
    out = tmp_path / "ragged"
    argv = ["--model", "fastsam3d", "--attention", "sparse", "--random-weights", "--backend", "onnx", "--strict",
            "--config", str(tmp_path / "c.json"), "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0  # the FP32 gate compares the ONNX graph with PyTorch at 1e-4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["attention"] == "sparse" and manifest["parity"]["passed"]


@pytest.fixture(scope="module")
def sparse_artifacts(tmp_path_factory: pytest.TempPathFactory, fastsam3d_ref: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sparse")
    found = {}
    for precision in ("fp32", "hybrid"):
        out = root / precision
        argv = ["--model", "fastsam3d", "--attention", "sparse", "--precision", precision, "--backend", "onnx",
                "--checkpoint", str(fastsam3d_ref / "state_dict.safetensors"), "--config",
                str(fastsam3d_ref / "config.json"), "--out", str(out), "--quiet", "--strict"]  # fmt: skip
        assert main(argv) == 0
        found[precision] = out
    return found


CASES = [("fp32", "image_embedding_sparse_fp32ref", 1e-4), ("hybrid", "image_embedding_sparse_fp16emu", 1e-2)]


@pytest.mark.parametrize(("precision", "reference", "tol"), CASES)
def test_sparse_artifacts_reproduce_the_reference_vectors(
    sparse_artifacts: dict[str, Path], fastsam3d_ref: Path, precision: str, reference: str, tol: float
) -> None:
    image = np.load(fastsam3d_ref / "inputs.npz")["image"]
    path = sparse_artifacts[precision] / "encoder.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": image})[0].astype(np.float32)
    expected = np.load(fastsam3d_ref / "encoder.npz")[reference]
    np.testing.assert_allclose(got, expected, atol=tol * max(1.0, float(np.abs(expected).max())), rtol=tol)


def test_sparse_artifact_is_recorded_shown_and_segments(sparse_artifacts: dict[str, Path],
                                                        capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    import export_engine as ee
    from export_engine.calibration.synthetic import structured_volume

    art = sparse_artifacts["hybrid"]
    capsys.readouterr()
    assert main(["inspect", str(art)]) == 0
    assert "attention   sparse" in capsys.readouterr().out
    segmenter = ee.SegmentSession(ee.load(art))
    segmenter.set_volume(structured_volume(70, seed=4), around=[(35, 30, 40)])
    result = segmenter.click((35, 30, 40))
    assert result.mask.shape == (70, 70, 70) and np.isfinite(result.iou_prediction)


def test_sparse_is_refused_for_mast3r(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--model", "mast3r", "--attention", "sparse", "--random-weights", "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "--attention sparse is not available for mast3r; choose one of: dense" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
