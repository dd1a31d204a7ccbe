"""A deployment's view: pack an artifact, unpack it elsewhere, then `match` / `segment` from the unpacked copy
give the same results as from the original."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from export_engine.calibration.synthetic import structured_image, structured_volume
from export_engine.cli import main
from export_engine.exporters.fastsam3d import TINY_CONFIG as FASTSAM3D_TINY
from export_engine.exporters.mast3r import TINY_CONFIG as MAST3R_TINY


def _export_pack_unpack(root: Path, model: str, config: dict, extra: list[str]) -> tuple[Path, Path]:
    (root / "config.json").write_text(json.dumps(config))
    original, archive, restored = root / "art", root / "art.tar.gz", root / "deployed" / "art"
    argv = ["--model", model, "--random-weights", "--config", str(root / "config.json"), "--out", str(original)]
    assert main([*argv, *extra, "--backend", "onnx", "--quiet"]) == 0
    assert main(["pack", str(original), "-o", str(archive)]) == 0
    assert main(["unpack", str(archive), "-o", str(restored)]) == 0
    return original, restored


def test_match_from_a_packed_artifact(tmp_path: Path) -> None:
    original, restored = _export_pack_unpack(tmp_path, "mast3r", MAST3R_TINY, ["--resolution", "96x64"])
    images = []
    for seed in (1, 2):
        pixels = ((structured_image(128, 192, seed).transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)
        images.append(tmp_path / f"{seed}.png")
        Image.fromarray(pixels).save(images[-1])
    results = []
    for artifact in (original, restored):
        out = tmp_path / f"{artifact.parent.name}.npz"
        assert main(["match", str(artifact), *map(str, images), "--out", str(out), "--subsample", "4"]) == 0
        results.append(np.load(out))
    assert len(results[1]["xy1"]) > 0
    for key in results[0].files:
        np.testing.assert_array_equal(results[1][key], results[0][key])


def test_segment_from_a_packed_artifact(tmp_path: Path) -> None:
    original, restored = _export_pack_unpack(tmp_path, "fastsam3d", FASTSAM3D_TINY, [])
    volume = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(structured_volume(72, seed=3), np.diag([1.0, 1.0, 2.0, 1.0])), str(volume))
    masks = []
    for artifact in (original, restored):
        out = tmp_path / f"{artifact.parent.name}.nii.gz"
        assert main(["segment", str(artifact), str(volume), "--click", "36,30,40", "--out", str(out)]) == 0
        masks.append(np.asarray(nib.load(str(out)).dataobj))
    assert masks[1].shape == (72, 72, 72)
    np.testing.assert_array_equal(masks[1], masks[0])


@pytest.mark.parametrize("model", ["mast3r"])
def test_tampered_package_is_refused_before_running(tmp_path: Path, model: str, capsys: pytest.CaptureFixture) -> None:
    _, restored = _export_pack_unpack(tmp_path, model, MAST3R_TINY, ["--resolution", "96x64"])
    graph = restored / "decoder.onnx"
    graph.write_bytes(graph.read_bytes()[:-1] + b"\x00")
    assert main(["match", str(restored), "a.png", "b.png", "--out", str(tmp_path / "m.npz")]) == 9
    assert "sha256" in capsys.readouterr().err
    assert not (tmp_path / "m.npz").exists()
