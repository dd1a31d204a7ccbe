"""FastSAM3D pre-processing as the released evaluation does it, in plain numpy (and in torch, on any device).

Upstream (FastSAM3D:validation_student.py + utils/data_loader.py), after resampling to
1.5 mm and RAS+ reorientation (not done here: this module receives an array):

1. torchio ``CropOrPad(target_shape=(S, S, S), mask_name='label')``: a window of S voxels per axis centred on
   the bounding box of the label (or of the clicks, when there is no label), zero padding where the
   window leaves the volume. Without any mask torchio centres the window on the volume.
2. torchio ``ZNormalization(masking_method=x > 0)`` on the cropped volume: mean and unbiased std over the
   voxels > 0, then every voxel (x - mean) / std. Padding zeros are excluded from the statistics but are
   normalised too. No clipping.

:class:`CropWindow` records where the S^3 cube sits in the original volume so that clicks can be moved
into crop coordinates and predicted masks pasted back into the original geometry.

:func:`preprocess_tensor` does the same crop/pad and z-normalisation on a torch tensor where it lives (a CUDA
tensor stays on its GPU, with no host synchronisation), with the numpy path's arithmetic: statistics summed in
float64 and rounded to float32, the normalisation itself in float32, so both give the same encoder input.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from export_engine.errors import ModelInputError

log = logging.getLogger(__name__)

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class CropWindow:
    """The crop cube in original voxel coordinates: [start, start + size) per axis (d, h, w).

    `start` may be negative and `start + size` may exceed the volume: those voxels are zero padding.
    """

    start: Triple
    size: Triple
    original_shape: Triple

    def crop(self, volume: np.ndarray) -> np.ndarray:
        """Cut the window out of a (D, H, W) array, zero-filling outside the volume."""
        out = np.zeros(self.size, dtype=volume.dtype)
        src, dst = self._overlap()
        out[dst] = volume[src]
        return out

    def paste_back(self, crop: np.ndarray, fill: float = 0) -> np.ndarray:
        """Inverse of :meth:`crop` for (..., S, S, S) arrays: (..., D, H, W), `fill` outside the window."""
        if tuple(crop.shape[-3:]) != self.size:
            raise ModelInputError(f"paste_back: array {crop.shape} does not end in the window size {self.size}")
        out = np.full((*crop.shape[:-3], *self.original_shape), fill, dtype=crop.dtype)
        src, dst = self._overlap()
        out[..., src[0], src[1], src[2]] = crop[..., dst[0], dst[1], dst[2]]
        return out

    def crop_tensor(self, volume: Any) -> Any:
        """:meth:`crop` for a torch tensor (D, H, W): a float32 window on the tensor's device."""
        import torch

        out = torch.zeros(self.size, dtype=torch.float32, device=volume.device)
        src, dst = self._overlap()
        out[dst] = volume[src].to(torch.float32)
        return out

    def paste_back_tensor(self, crop: Any, fill: bool | float = 0) -> Any:
        """:meth:`paste_back` for a torch tensor (..., S, S, S), on the tensor's device."""
        import torch

        if tuple(crop.shape[-3:]) != self.size:
            raise ModelInputError(f"paste_back: array {tuple(crop.shape)} does not end in the window size {self.size}")
        out = torch.full((*crop.shape[:-3], *self.original_shape), fill, dtype=crop.dtype, device=crop.device)
        src, dst = self._overlap()
        out[..., src[0], src[1], src[2]] = crop[..., dst[0], dst[1], dst[2]]
        return out

    def points_to_crop(self, points: np.ndarray) -> np.ndarray:
        """(..., 3) voxel coordinates (d, h, w) of the original volume -> coordinates in the crop."""
        return np.asarray(points, dtype=np.float32) - np.asarray(self.start, dtype=np.float32)

    def points_to_original(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(points, dtype=np.float32) + np.asarray(self.start, dtype=np.float32)

    def overlap(self) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """(slices of the volume, slices of the crop) where the window and the volume overlap."""
        return self._overlap()

    def _overlap(self) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        src, dst = [], []
        for start, size, extent in zip(self.start, self.size, self.original_shape, strict=True):
            lo, hi = max(start, 0), min(start + size, extent)
            hi = max(hi, lo)
            src.append(slice(lo, hi))
            dst.append(slice(lo - start, hi - start))
        return tuple(src), tuple(dst)


@dataclass(frozen=True)
class PreprocessResult:
    image: np.ndarray  # (1, 1, S, S, S) float32, the encoder input
    window: CropWindow
    norm_mean: float
    norm_std: float


# ------------------------------------------------------------------------------------------ windows


def window_centered(shape: Sequence[int], size: int | Sequence[int]) -> CropWindow:
    """torchio CropOrPad without a mask: crop or pad symmetrically; the odd voxel goes to the START side.

    (torchio splits n cropped/padded voxels as ceil(n/2) before, floor(n/2) after.)
    """
    shape3, size3 = _triple(shape), _triple(size)
    start = []
    for extent, target in zip(shape3, size3, strict=True):
        diff = extent - target
        start.append((diff + 1) // 2 if diff >= 0 else -((-diff + 1) // 2))
    return CropWindow((start[0], start[1], start[2]), size3, shape3)


def window_around_box(
    box_min: Sequence[int], box_max: Sequence[int], shape: Sequence[int], size: int | Sequence[int]
) -> CropWindow:
    """torchio CropOrPad(mask_name=...): centre the window on the box [box_min, box_max) (exclusive max).

    torchio takes centre = (min + max) / 2 and, when it is not representable for the target parity, moves
    it half a voxel towards the start; the net effect is start = floor(centre - S / 2) on every axis.
    """
    shape3, size3 = _triple(shape), _triple(size)
    start = tuple(
        int(np.floor((lo + hi) / 2 - target / 2)) for lo, hi, target in zip(box_min, box_max, size3, strict=True)
    )
    return CropWindow((start[0], start[1], start[2]), size3, shape3)


def window_around_mask(mask: np.ndarray, size: int | Sequence[int]) -> CropWindow:
    """Window centred on the bounding box of the non-zero voxels of `mask` (D, H, W) (e.g. the label).

    An all-zero mask falls back to the centred window, as torchio does (with a warning).
    """
    mask3 = _as_3d(mask, "mask") != 0
    if not mask3.any():
        log.warning("window_around_mask: the mask is empty; centring the crop on the volume instead")
        return window_centered(mask3.shape, size)
    nz = [np.flatnonzero(mask3.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    return window_around_box([i[0] for i in nz], [i[-1] + 1 for i in nz], mask3.shape, size)


def window_around_points(points: np.ndarray, shape: Sequence[int], size: int | Sequence[int]) -> CropWindow:
    """Window centred (torchio rule) on the bounding box of integer click voxels (N, 3) in (d, h, w).

    Stands in for the Slicer plug-in's crop around all clicks; raises when the clicks span more than S.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if pts.shape[0] == 0 or not np.isfinite(pts).all():
        raise ModelInputError(f"window_around_points: need >= 1 finite (d, h, w) click, got {pts.tolist()}")
    vox = np.floor(pts).astype(np.int64)
    lo, hi = vox.min(axis=0), vox.max(axis=0) + 1
    size3 = _triple(size)
    if np.any(hi - lo > np.asarray(size3)):
        raise ModelInputError(
            f"clicks span {tuple((hi - lo).tolist())} voxels, more than the model's {size3} crop; "
            f"segment them in separate sessions"
        )
    return window_around_box(lo.tolist(), hi.tolist(), shape, size3)


# ------------------------------------------------------------------------------------------ intensity


def z_normalize(volume: np.ndarray) -> tuple[np.ndarray, float, float]:
    """torchio ZNormalization(masking_method=x > 0): statistics over voxels > 0, applied to all voxels.

    Returns (normalised float32 volume, mean, unbiased std). Statistics are accumulated in float64 and
    rounded to float32, the subtraction and division run in float32 like torchio's tensors.
    """
    values = np.asarray(volume, dtype=np.float32)
    if not np.isfinite(values).all():
        raise ModelInputError("FastSAM3D volume has NaN or infinite voxels; fix or mask them before inference")
    foreground = values[values > 0].astype(np.float64)
    if foreground.size < 2:
        raise ModelInputError(
            f"FastSAM3D volume has {foreground.size} voxel(s) > 0 in the crop; z-normalisation needs at "
            f"least 2 (is the crop outside the body, or the intensities shifted to <= 0?)"
        )
    mean = np.float32(foreground.mean())
    std = np.float32(foreground.std(ddof=1))
    if not std > 0:
        raise ModelInputError("FastSAM3D volume: all voxels > 0 have the same value (std 0); cannot normalise")
    return (values - mean) / std, float(mean), float(std)


# ------------------------------------------------------------------------------------------ entry point


def preprocess_volume(
    volume: np.ndarray,
    size: int = 128,
    label: np.ndarray | None = None,
    points: np.ndarray | None = None,
) -> PreprocessResult:
    """Volume (D, H, W), (1, D, H, W) or (1, 1, D, H, W) -> encoder input (1, 1, S, S, S) + crop window.

    The window is centred on `label`'s bounding box (evaluation), else on the `points` (clicks in original
    voxel coordinates), else on the volume. Normalisation statistics come from the cropped volume.
    """
    vol = _as_3d(volume, "volume")
    if vol.size == 0:
        raise ModelInputError(f"FastSAM3D volume is empty (shape {tuple(np.shape(volume))})")
    if not np.issubdtype(vol.dtype, np.number) or np.iscomplexobj(vol):
        raise ModelInputError(f"FastSAM3D volume must be real numbers, got dtype {vol.dtype}")
    if not np.isfinite(vol).all():
        raise ModelInputError("FastSAM3D volume has NaN or infinite voxels; fix or mask them before inference")
    if label is not None:
        lab = _as_3d(label, "label")
        if lab.shape != vol.shape:
            raise ModelInputError(f"label shape {lab.shape} differs from the volume shape {vol.shape}")
        window = window_around_mask(lab, size)
    elif points is not None:
        window = window_around_points(points, vol.shape, size)
    else:
        window = window_centered(vol.shape, size)
    image, mean, std = z_normalize(window.crop(vol))  # crop first: only the window is converted to float32
    return PreprocessResult(image[None, None], window, mean, std)


@dataclass(frozen=True)
class TensorPreprocessResult:
    """:func:`preprocess_tensor`'s result. ``image`` is queued on the volume's device; ``checks`` (a float64
    tensor on that device) is read by :func:`check_preprocessed` once the caller can afford a host sync."""

    image: Any  # torch (1, 1, S, S, S) float32
    window: CropWindow
    checks: Any  # torch float64 [all finite, voxels > 0, std]


def preprocess_tensor(volume: Any, size: int = 128, points: np.ndarray | None = None) -> TensorPreprocessResult:
    """:func:`preprocess_volume` for a torch tensor (D, H, W) of real numbers, on its own device, without any
    host synchronisation (data-dependent checks are deferred: see :func:`check_preprocessed`).

    Statistics are sums over the foreground in float64 (numpy's ``mean`` and ``std(ddof=1)``, which sum
    pairwise, round to the same float32 values: 1 ulp of float64 is ~1e-9 ulp of float32), then the same float32
    subtraction and division as :func:`z_normalize`.
    """
    import torch

    vol = _squeezed_3d(volume, "volume")
    if vol.numel() == 0:
        raise ModelInputError(f"FastSAM3D volume is empty (shape {tuple(volume.shape)})")
    if vol.dtype == torch.bool or vol.is_complex():
        raise ModelInputError(f"FastSAM3D volume must be real numbers, got dtype {vol.dtype}")
    shape = tuple(int(s) for s in vol.shape)
    window = window_centered(shape, size) if points is None else window_around_points(points, shape, size)
    finite = torch.ones((), dtype=torch.bool, device=vol.device)  # integers are finite
    if vol.is_floating_point():
        finite = torch.isfinite(vol).all()
    crop = window.crop_tensor(vol)
    foreground = crop > 0
    count = foreground.sum(dtype=torch.float64)
    wide = crop.to(torch.float64)
    mean = torch.where(foreground, wide, 0).sum() / count
    deviation = torch.where(foreground, wide - mean, 0)
    std = ((deviation * deviation).sum() / (count - 1)).sqrt()
    image = (crop - mean.to(torch.float32)) / std.to(torch.float32)
    checks = torch.stack([finite.to(torch.float64), count, std.to(torch.float32).to(torch.float64)])
    return TensorPreprocessResult(image[None, None], window, checks)


def check_preprocessed(result: TensorPreprocessResult) -> None:
    """Raise the numpy path's errors for a :func:`preprocess_tensor` result (one small device-to-host copy)."""
    finite, count, std = (float(v) for v in result.checks.cpu().tolist())
    if not finite:
        raise ModelInputError("FastSAM3D volume has NaN or infinite voxels; fix or mask them before inference")
    if count < 2:
        raise ModelInputError(
            f"FastSAM3D volume has {int(count)} voxel(s) > 0 in the crop; z-normalisation needs at "
            f"least 2 (is the crop outside the body, or the intensities shifted to <= 0?)"
        )
    if not std > 0:
        raise ModelInputError("FastSAM3D volume: all voxels > 0 have the same value (std 0); cannot normalise")


def _as_3d(array: np.ndarray, what: str) -> np.ndarray:
    return _squeezed_3d(np.asarray(array), what)


def _squeezed_3d(array: Any, what: str) -> Any:
    """A numpy array or torch tensor without its leading axes of size 1, which must leave 3 (D, H, W)."""
    arr = array
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ModelInputError(
            f"FastSAM3D {what} must be 3-D (D, H, W), optionally with leading axes of size 1, got shape "
            f"{tuple(array.shape)}"
        )
    return arr


def _triple(value: int | Sequence[int]) -> Triple:
    if isinstance(value, int | np.integer):
        items = [int(value)] * 3
    else:
        items = [int(v) for v in value]
    if len(items) != 3 or min(items) < 1:
        raise ModelInputError(f"expected a positive size or three positive sizes, got {value!r}")
    return items[0], items[1], items[2]
