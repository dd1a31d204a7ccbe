"""FastSAM3D interactive sessions and `export-engine segment` on a tiny artifact and a synthetic NIfTI volume."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from export_engine.calibration.synthetic import structured_volume
from export_engine.cli import main
from export_engine.errors import ModelInputError
from export_engine.exporters.fastsam3d import TINY_CONFIG
from export_engine.families.fastsam3d.segment import SegmentSession
from export_engine.runtime.session import load


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seg")
    (root / "config.json").write_text(json.dumps(TINY_CONFIG))
    out = root / "art"
    argv = ["--model", "fastsam3d", "--random-weights", "--config", str(root / "config.json"), "--out", str(out)]
    assert main([*argv, "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def nifti(tmp_path_factory: pytest.TempPathFactory) -> Path:
    volume = structured_volume(80, seed=5)[:, 5:75, 10:70]  # (80, 70, 60): larger and smaller than 64
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    path = tmp_path_factory.mktemp("vol") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    return path


def test_session_feeds_previous_mask_back(artifact: Path) -> None:
    volume = structured_volume(64, seed=1)
    session = SegmentSession(load(artifact))
    session.set_volume(volume)
    first = session.click((30, 32, 33))
    second = session.click((20, 25, 40), positive=False)
    assert first.mask.shape == volume.shape and first.mask.dtype == bool
    assert not np.array_equal(first.low_res_logits, second.low_res_logits)
    # Replaying the second click with a zero previous mask gives another answer: the feedback is used.
    fresh = SegmentSession(load(artifact))
    fresh.set_volume(volume)
    alone = fresh.click((20, 25, 40), positive=False)
    assert not np.allclose(alone.low_res_logits, second.low_res_logits)


def test_segment_cli_writes_mask_in_original_geometry(artifact: Path, nifti: Path, tmp_path: Path) -> None:
    out, plot = tmp_path / "mask.nii.gz", tmp_path / "slices.png"
    argv = ["segment", str(artifact), str(nifti), "--click", "40,35,30", "--click", "45,30,28,0"]
    assert main([*argv, "--out", str(out), "--plot", str(plot)]) == 0
    mask = nib.load(str(out))
    assert mask.shape == (80, 70, 60)
    np.testing.assert_array_equal(mask.affine, nib.load(str(nifti)).affine)
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("click", "message"), [("90,3,3", "outside the volume"), ("1,2", "D,H,W"), ("3,3,3,2", "LABEL 1")]
)
def test_segment_rejects_bad_clicks(
    artifact: Path, nifti: Path, tmp_path: Path, capsys: pytest.CaptureFixture, click: str, message: str
) -> None:
    code = main(["segment", str(artifact), str(nifti), "--click", click, "--out", str(tmp_path / "m.nii.gz")])
    assert code in (2, 4)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.nii.gz").exists()


def test_segment_rejects_unreadable_volume(artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"garbage")
    assert main(["segment", str(artifact), str(bad), "--click", "1,1,1", "--out", str(tmp_path / "m.npy")]) == 4
    assert "could not be read" in capsys.readouterr().err


def test_click_before_volume_is_an_error(artifact: Path) -> None:
    session = SegmentSession(load(artifact))
    with pytest.raises(Exception, match="set_volume"):
        session.click((1, 1, 1))
    session.set_volume(structured_volume(64, seed=2))
    with pytest.raises(ModelInputError, match="outside"):
        session.click((64, 1, 1))
