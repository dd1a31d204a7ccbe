"""Calibration inputs: built-in synthetic sets, folders of images / volumes (npy, NIfTI-1), clear errors."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

from export_engine.calibration.inputs import (
    CALIBRATION_SEED_OFFSET,
    PARITY_SEED_OFFSET,
    feeds_from_arrays,
    load_calibration_dir,
    read_nifti,
)
from export_engine.errors import ModelInputError, UsageError

HAS_PILLOW = importlib.util.find_spec("PIL") is not None


def write_nifti(path: Path, volume: np.ndarray, *, slope: float = 0.0, inter: float = 0.0, endian: str = "<") -> None:
    """A minimal single-file NIfTI-1 (header, 4-byte extension flag, data in Fortran order)."""
    codes = {np.dtype(np.int16): 4, np.dtype(np.float32): 16, np.dtype(np.uint8): 2}
    data = np.asarray(volume)
    header = bytearray(348)
    struct.pack_into(f"{endian}i", header, 0, 348)
    dims = [data.ndim, *data.shape] + [1] * (7 - data.ndim)
    struct.pack_into(f"{endian}8h", header, 40, *dims)
    struct.pack_into(f"{endian}hh", header, 70, codes[data.dtype], data.dtype.itemsize * 8)
    struct.pack_into(f"{endian}8f", header, 76, 1, 1.5, 1.5, 1.5, 1, 1, 1, 1)
    struct.pack_into(f"{endian}fff", header, 108, 352.0, slope, inter)
    header[344:348] = b"n+1\x00"
    raw = bytes(header) + b"\x00" * 4 + data.astype(np.dtype(endian + data.dtype.str[1:])).tobytes(order="F")
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)


def test_nifti_reader_order_scaling_endianness(tmp_path: Path) -> None:
    volume = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    write_nifti(tmp_path / "a.nii", volume)
    write_nifti(tmp_path / "b.nii.gz", volume, slope=2.0, inter=-1.0, endian=">")
    a = read_nifti(tmp_path / "a.nii")
    assert a.dtype == np.float32 and a.shape == (2, 3, 4) and np.array_equal(a, volume)  # voxel order (i, j, k)
    assert np.array_equal(read_nifti(tmp_path / "b.nii.gz"), volume * 2.0 - 1.0)


def test_volume_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    volumes = [rng.standard_normal((4, 4, 4)).astype(np.float32) for _ in range(3)]
    write_nifti(tmp_path / "v0.nii.gz", volumes[0])
    np.save(tmp_path / "v1.npy", volumes[1])
    write_nifti(tmp_path / "v2.nii", volumes[2])
    (tmp_path / "notes.txt").write_text("ignored")
    arrays = load_calibration_dir(tmp_path, "volumes", preprocess=lambda v: v[None] * 2)
    assert len(arrays) == 3 and all(a.shape == (1, 4, 4, 4) for a in arrays)
    assert np.allclose(arrays[1], volumes[1][None] * 2)
    feeds = feeds_from_arrays(arrays, "image", batch=2)
    assert [f["image"].shape for f in feeds] == [(2, 1, 4, 4, 4), (1, 1, 4, 4, 4)]
    assert len(load_calibration_dir(tmp_path, "volumes", limit=2)) == 2


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="holds no volumes"):
        load_calibration_dir(tmp_path, "volumes")
    with pytest.raises(UsageError, match="not a folder"):
        load_calibration_dir(tmp_path / "missing", "images")
    with pytest.raises(UsageError, match="unknown calibration input kind"):
        load_calibration_dir(tmp_path, "videos")
    (tmp_path / "broken.nii").write_bytes(b"\x00" * 10)
    with pytest.raises(ModelInputError, match="too short"):
        load_calibration_dir(tmp_path, "volumes")
    (tmp_path / "broken.nii").write_bytes(struct.pack("<i", 540) + b"\x00" * 600)
    with pytest.raises(ModelInputError, match="NIfTI-2"):
        read_nifti(tmp_path / "broken.nii")
    (tmp_path / "broken.nii").unlink()
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(ModelInputError, match=r"bad\.npy"):
        load_calibration_dir(tmp_path, "volumes")
    with pytest.raises(ModelInputError, match="different shapes"):
        feeds_from_arrays([np.zeros((2, 2)), np.zeros((3, 3))], "x")


def test_images(tmp_path: Path) -> None:
    image = (np.arange(4 * 5 * 3) % 256).astype(np.uint8).reshape(4, 5, 3)
    if HAS_PILLOW:
        from PIL import Image

        Image.fromarray(image).save(tmp_path / "a.png")
        (arr,) = load_calibration_dir(tmp_path, "images")
        assert arr.shape == (4, 5, 3) and np.allclose(arr, image / 255.0)
    else:
        (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        with pytest.raises(UsageError, match="Pillow"):
            load_calibration_dir(tmp_path, "images")
        (tmp_path / "a.png").unlink()
        np.save(tmp_path / "a.npy", image.astype(np.float32) / 255)
        (arr,) = load_calibration_dir(tmp_path, "images")
        assert arr.shape == (4, 5, 3)


def test_builtin_sets_are_disjoint_from_parity_feeds() -> None:
    from export_engine.exporters.registry import get_family

    family = get_family("mast3r")
    loaded = family.load(family.tiny_config(), None, 0)
    specs = family.graphs(loaded.config, family.tiny_shape)
    assert CALIBRATION_SEED_OFFSET != PARITY_SEED_OFFSET  # the pipeline draws each set at its own offset
    calib = family.parity_feeds(loaded, specs, 1, CALIBRATION_SEED_OFFSET)
    parity = family.parity_feeds(loaded, specs, 1, PARITY_SEED_OFFSET)
    assert calib.keys() == parity.keys()
    assert not np.array_equal(calib["encoder"][0]["images"], parity["encoder"][0]["images"])
