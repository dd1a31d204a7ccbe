"""FastSAM3D pre-processing: torchio ZNormalization(x > 0) and CropOrPad semantics, in numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export_engine.errors import ModelInputError
from export_engine.families.fastsam3d.preprocess import (
    CropWindow,
    preprocess_volume,
    window_around_mask,
    window_around_points,
    window_centered,
    z_normalize,
)


def test_reproduces_reference_image(fastsam3d_ref: Path) -> None:
    ref = np.load(fastsam3d_ref / "inputs.npz")
    result = preprocess_volume(ref["raw_volume"], size=64)
    assert result.window == CropWindow((0, 0, 0), (64, 64, 64), (64, 64, 64))
    assert result.image.dtype == np.float32 and result.image.shape == (1, 1, 64, 64, 64)
    np.testing.assert_allclose(result.image, ref["image"], atol=1e-6, rtol=1e-6)  # observed: bit-exact
    assert result.norm_mean == pytest.approx(float(ref["norm_mean"]), rel=1e-6)
    assert result.norm_std == pytest.approx(float(ref["norm_std"]), rel=1e-6)


def test_z_normalize_uses_voxels_above_zero_and_unbiased_std() -> None:
    volume = np.array([[[-5.0, 0.0], [1.0, 2.0]], [[3.0, 0.0], [0.0, -1.0]]])
    out, mean, std = z_normalize(volume)
    assert mean == pytest.approx(2.0) and std == pytest.approx(1.0)  # over {1, 2, 3}, ddof=1
    np.testing.assert_allclose(out, (volume - 2.0) / 1.0)  # applied to every voxel, no clipping


def test_centered_window_odd_voxel_goes_to_start() -> None:
    # torchio CropOrPad docstring example: (4, 0, 7) voxels to remove -> (2, 2, 0, 0, 4, 3).
    crop = window_centered((10, 6, 13), (6, 6, 6))
    assert crop.start == (2, 0, 4)
    pad = window_centered((3, 6, 2), (6, 6, 6))  # pad 3 -> 2 before, 1 after; pad 4 -> 2 / 2
    assert pad.start == (-2, 0, -2)
    volume = np.arange(3 * 6 * 2, dtype=np.float32).reshape(3, 6, 2) + 1
    cube = pad.crop(volume)
    assert cube.shape == (6, 6, 6)
    np.testing.assert_array_equal(cube[2:5, :, 2:4], volume)
    assert cube.sum() == volume.sum()  # zero padding elsewhere


@pytest.mark.parametrize(
    ("box", "size", "start"),
    [
        ((10, 20), 8, 11),  # centre 15 (integer), even target: 15 - 4
        ((10, 21), 8, 11),  # centre 15.5, even target: shifted to 15 -> 11
        ((10, 20), 7, 11),  # centre 15, odd target: 14.5 - 3.5
        ((10, 21), 7, 12),  # centre 15.5, odd target: 15.5 - 3.5
        ((0, 2), 8, -3),  # near the border: the window starts in the padding
    ],
)
def test_mask_centred_window_follows_torchio(box: tuple[int, int], size: int, start: int) -> None:
    mask = np.zeros((40, 40, 40), dtype=np.uint8)
    mask[box[0] : box[1], 5:6, 30:40] = 1
    window = window_around_mask(mask, size)
    assert window.start[0] == start
    assert window.start[1] == int(np.floor(5.5 - size / 2))
    assert window.start[2] == int(np.floor(35 - size / 2))


def test_empty_mask_falls_back_to_centre() -> None:
    assert window_around_mask(np.zeros((10, 10, 10)), 4).start == (3, 3, 3)


def test_label_centred_preprocess_and_paste_back() -> None:
    rng = np.random.default_rng(0)
    volume = rng.normal(100, 50, size=(70, 50, 90)).astype(np.float32)
    label = np.zeros(volume.shape, dtype=np.uint8)
    label[30:40, 5:15, 60:85] = 1
    result = preprocess_volume(volume[None, None], size=64, label=label)
    window = result.window
    assert window.start == (3, -22, 40) and window.original_shape == volume.shape
    cube = window.crop(volume)
    np.testing.assert_allclose(result.image[0, 0], (cube - result.norm_mean) / result.norm_std, rtol=1e-5, atol=1e-5)
    # Statistics come from the crop, padding excluded (only voxels > 0 count).
    positive = cube[cube > 0].astype(np.float64)
    assert result.norm_mean == pytest.approx(positive.mean(), rel=1e-6)
    assert result.norm_std == pytest.approx(positive.std(ddof=1), rel=1e-6)
    # Masks map back into the original geometry; the label survives the round trip.
    back = window.paste_back(window.crop(label)[None, None])
    assert back.shape == (1, 1, *volume.shape)
    np.testing.assert_array_equal(back[0, 0], label)
    # Clicks move with the window.
    click = np.array([[35.0, 10.0, 70.0]])
    np.testing.assert_allclose(window.points_to_crop(click), [[32.0, 32.0, 30.0]])
    np.testing.assert_allclose(window.points_to_original(window.points_to_crop(click)), click)


def test_points_centred_window() -> None:
    window = window_around_points(np.array([[10, 20, 30], [20, 20, 41]]), (64, 64, 64), 32)
    assert window.start == (-1, 4, 20)
    with pytest.raises(ModelInputError, match="span"):
        window_around_points(np.array([[0, 0, 0], [40, 0, 0]]), (64, 64, 64), 32)
    result = preprocess_volume(np.ones((64, 64, 64)) + np.eye(64)[None], size=32, points=np.array([[10, 20, 30]]))
    assert result.window.start == (-6, 4, 14)  # a single click lands on voxel S/2 of the crop


@pytest.mark.parametrize(
    ("volume", "needle"),
    [
        (np.ones((4, 4)), "3-D"),
        (np.ones((2, 4, 4, 4)), "3-D"),
        (np.zeros((0, 4, 4)), "empty"),
        (np.full((8, 8, 8), -3.0), "voxel"),
        (np.where(np.eye(8)[None] > 0, np.nan, 1.0) * np.ones((8, 8, 8)), "NaN"),
        (np.full((8, 8, 8), 5.0), "std 0"),
        (np.array([["a"] * 8] * 8 * 8).reshape(8, 8, 8), "real numbers"),
    ],
)
def test_bad_volumes_raise_model_input_error(volume: np.ndarray, needle: str) -> None:
    with pytest.raises(ModelInputError, match=needle):
        preprocess_volume(volume, size=8)


def test_label_shape_mismatch() -> None:
    with pytest.raises(ModelInputError, match="label shape"):
        preprocess_volume(np.ones((8, 8, 8)), size=8, label=np.ones((8, 8, 4)))
