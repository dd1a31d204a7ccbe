"""Reading uploaded volumes: NIfTI (plain, gzip, scaled), .npy, damaged and oversized bodies."""

from __future__ import annotations

import gzip
import io

import nibabel as nib
import numpy as np
import pytest

from export_engine.errors import ModelInputError
from export_engine.serve.errors import PayloadTooLargeError
from export_engine.serve.uploads import mask_bytes, nifti_bytes, read_volume


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
    assert len(zeros) < 4096  # a small body that inflates to 0.5 MB: refused from its header, not inflated
    with pytest.raises(PayloadTooLargeError, match="262144 voxels, over"):
        read_volume("bomb.nii.gz", zeros, 1000)


def test_the_voxel_limit_is_checked_from_the_header_before_any_voxel_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    import export_engine.serve.uploads as uploads

    limits: list[int] = []
    gunzip = uploads._gunzip
    monkeypatch.setattr(uploads, "_gunzip", lambda body, limit, **kw: limits.append(limit) or gunzip(body, limit, **kw))
    header = nib.Nifti1Header()  # a header that promises 1000^3 scaled voxels (8 GB as float64), no voxels
    header.set_data_shape((1000, 1000, 1000))
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(2.0, 1.0)
    forged = header.binaryblock + b"\0" * 4
    for name, body in (("forged.nii", forged), ("forged.nii.gz", gzip.compress(forged))):
        with pytest.raises(PayloadTooLargeError, match="1000000000 voxels, over"):
            read_volume(name, body, 10**6)
    assert limits == [540]  # only the header was inflated
    npy = io.BytesIO()  # an .npy header that promises 4 GB of float32, with no data
    np.lib.format.write_array_header_1_0(npy, {"descr": "<f4", "fortran_order": False, "shape": (1000,) * 3})
    with pytest.raises(PayloadTooLargeError, match="1000000000 voxels, over"):
        read_volume("forged.npy", npy.getvalue(), 10**6)


def test_gzip_inflates_to_the_limit_in_the_files_own_data_type() -> None:
    # 10^3 uint8 voxels followed by 10 kB more: over 1000 voxels of one byte (+ header), stopped while inflating.
    raw = nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), np.eye(4)).to_bytes()
    with pytest.raises(PayloadTooLargeError, match="expands beyond 1352 bytes"):
        read_volume("bomb.nii.gz", gzip.compress(raw + b"\0" * 10_000), 1000)
    assert read_volume("ok.nii.gz", gzip.compress(raw), 1000).data.sum() == 1000


def test_multi_member_gzip_is_read_whole() -> None:
    volume = _volume()
    raw = nib.Nifti1Image(volume, np.eye(4)).to_bytes()
    members = gzip.compress(raw[:100]) + gzip.compress(raw[100:1000]) + gzip.compress(raw[1000:])
    for body in (members, members + b"\0" * 16):  # some writers pad the last member with zeros
        np.testing.assert_array_equal(read_volume("multi.nii.gz", body, 10**6).data, volume)
    with pytest.raises(PayloadTooLargeError, match="expands beyond"):  # the limit holds over all the members
        read_volume("multi.nii.gz", members + gzip.compress(b"\0" * 10_000), volume.size)
    with pytest.raises(ModelInputError, match="8 bytes after its gzip stream that are not gzip"):
        read_volume("multi.nii.gz", members + b"not gzip", 10**6)


@pytest.mark.parametrize(
    ("values", "stored"),
    [
        (np.arange(-5, 3, dtype=np.int64), np.int32),
        (np.arange(8, dtype=np.uint64) + 2**40, np.float64),
        (np.arange(8, dtype=np.uint64), np.int32),
        (np.linspace(-2, 2, 8, dtype=np.float16), np.float32),
    ],
)
def test_volumes_nibabel_refuses_are_written_in_a_type_that_holds_them(values: np.ndarray, stored: type) -> None:
    body, _ = nifti_bytes(values.reshape(2, 2, 2), np.eye(4))
    back = nib.Nifti1Image.from_bytes(gzip.decompress(body))
    assert back.get_data_dtype() == stored
    np.testing.assert_array_equal(np.asarray(back.dataobj), values.reshape(2, 2, 2))
