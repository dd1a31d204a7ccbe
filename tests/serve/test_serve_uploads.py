"""Reading uploaded volumes: NIfTI (plain, gzip, scaled), .npy, damaged and oversized bodies."""

from __future__ import annotations

import gzip
import io

import nibabel as nib
import numpy as np
import pytest

from export_engine.errors import ModelInputError
from export_engine.serve.errors import PayloadTooLargeError
from export_engine.serve.uploads import mask_bytes, read_volume


def _volume() -> np.ndarray:
    return np.random.default_rng(0).integers(-1000, 2000, (13, 11, 7)).astype(np.int16)


def test_nifti_voxels_affine_and_scaling_are_nibabels() -> None:
    volume, affine = _volume(), np.diag([0.7, 0.8, 2.5, 1.0])
    raw = nib.Nifti1Image(volume, affine).to_bytes()
    for name, body in (("ct.nii", raw), ("ct.nii.gz", gzip.compress(raw)), ("noname", gzip.compress(raw))):
        got = read_volume(name, body, 10**6)
        np.testing.assert_array_equal(got.data, volume)
        np.testing.assert_allclose(got.affine, affine, rtol=1e-6)  # the header stores float32
        assert got.data.dtype == np.int16 and got.data.flags.writeable
    scaled = nib.Nifti1Image(volume, affine)
    scaled.header.set_slope_inter(0.5, -3.0)
    got = read_volume("s.nii", scaled.to_bytes(), 10**6)
    np.testing.assert_allclose(got.data, np.asarray(nib.Nifti1Image.from_bytes(scaled.to_bytes()).dataobj))
    assert got.data.dtype == np.float64


def test_npy_and_mask_round_trip() -> None:
    volume = _volume().astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, volume)
    np.testing.assert_array_equal(read_volume("v.npy", buffer.getvalue(), 10**6).data, volume)
    mask = volume > 0
    body, _ = mask_bytes(mask, "nii.gz", np.eye(4))
    back = read_volume("m.nii.gz", body, 10**6).data
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, mask)


def test_damaged_and_oversized_bodies() -> None:
    raw = nib.Nifti1Image(_volume(), np.eye(4)).to_bytes()
    with pytest.raises(ModelInputError, match="NIfTI upload is truncated"):
        read_volume("ct.nii", raw[:-100], 10**6)
    with pytest.raises(ModelInputError, match="gzip stream ends early"):
        read_volume("ct.nii.gz", gzip.compress(raw)[:-100], 10**6)
    with pytest.raises(ModelInputError, match="unknown format"):
        read_volume("notes.txt", b"hello", 10**6)
    with pytest.raises(PayloadTooLargeError, match="voxels, over"):
        read_volume("big.nii", raw, 500)
    zeros = gzip.compress(nib.Nifti1Image(np.zeros((64, 64, 64), np.int16), np.eye(4)).to_bytes())
    assert len(zeros) < 4096  # a small body that inflates to 0.5 MB: stopped at the limit, not inflated whole
    with pytest.raises(PayloadTooLargeError, match="expands beyond"):
        read_volume("bomb.nii.gz", zeros, 1000)
