"""Reading and writing 3-D volumes: .npy and NIfTI (.nii / .nii.gz, through nibabel)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export_engine.atomic import replacing
from export_engine.errors import ModelInputError


@dataclass(frozen=True)
class Volume:
    data: np.ndarray  # (D, H, W) in the file's voxel order
    affine: np.ndarray  # 4x4 voxel -> world (identity for .npy)
    source: Path


def _is_nifti(path: Path) -> bool:
    return path.name.endswith((".nii", ".nii.gz"))


def load_volume(path: str | Path) -> Volume:
    path = Path(path)
    if not path.is_file():
        raise ModelInputError(f"volume {path} not found")
    try:
        if path.suffix == ".npy":
            data = np.load(path, allow_pickle=False)
            affine = np.eye(4)
        elif _is_nifti(path):
            import nibabel as nib

            image: Any = nib.load(str(path))
            data = np.asarray(image.dataobj)
            affine = np.asarray(image.affine, dtype=np.float64)
        else:
            raise ModelInputError(f"volume {path}: unsupported format; give a .npy, .nii or .nii.gz file")
    except ModelInputError:
        raise
    except Exception as err:  # numpy / nibabel raise many types for damaged files
        raise ModelInputError(f"volume {path} could not be read ({type(err).__name__}: {err})") from err
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ModelInputError(f"volume {path} has shape {data.shape}; expected a 3-D volume")
    return Volume(np.asarray(data), affine, path)


def save_mask(mask: np.ndarray, path: str | Path, affine: np.ndarray | None = None) -> Path:
    """Write a uint8 mask as .nii.gz/.nii (with ``affine``) or .npy, atomically."""
    path = Path(path)
    if not (_is_nifti(path) or path.suffix == ".npy"):
        raise ModelInputError(f"mask output {path}: give a .nii.gz, .nii or .npy file name")
    with replacing(path) as tmp:
        if _is_nifti(path):
            import nibabel as nib

            nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4) if affine is None else affine), str(tmp))
        else:
            np.save(tmp, mask.astype(np.uint8))
    return path
