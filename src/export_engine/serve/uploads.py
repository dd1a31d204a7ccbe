"""Volumes from request bodies and masks into response bodies: NIfTI (.nii, .nii.gz) and .npy, bounded.

A body is read by its file name's suffix, or by its first bytes when the name has none (gzip, NumPy and
NIfTI magic). Decompression stops at the server's voxel limit, so a small .nii.gz cannot expand into
gigabytes (a "zip bomb").
"""

from __future__ import annotations

import gzip
import io
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from export_engine.errors import ModelInputError
from export_engine.serve.errors import PayloadTooLargeError

NIFTI_HEADER = 352  # NIfTI-1 header + extension flag; NIfTI-2 headers are 544
FORMATS = (".nii.gz", ".nii", ".npy")


@dataclass(frozen=True)
class UploadedVolume:
    data: np.ndarray  # (D, H, W), the file's voxel order and dtype
    affine: np.ndarray  # 4x4 voxel -> world (identity for .npy)
    name: str


def format_of(name: str, head: bytes) -> str:
    lower = name.lower()
    for suffix in FORMATS:
        if lower.endswith(suffix):
            return suffix
    if head[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if head[:6] == b"\x93NUMPY":
        return ".npy"
    if head[344:348] in (b"n+1\x00", b"n+2\x00") or head[4:8] in (b"n+2\x00",):
        return ".nii"
    raise ModelInputError(f"volume {name!r}: unknown format; upload a .nii.gz, .nii or .npy file")


def read_volume(name: str, body: bytes, max_voxels: int) -> UploadedVolume:
    """Parse an uploaded volume; any damage is a :class:`ModelInputError` naming the file."""
    kind = format_of(name, body[:560])
    try:
        if kind == ".npy":
            data = np.load(io.BytesIO(body), allow_pickle=False)
            affine = np.eye(4)
        else:
            raw = _gunzip(body, max_voxels * 8 + 4096) if kind == ".nii.gz" else body
            data, affine = _nifti(raw)
    except (ModelInputError, PayloadTooLargeError):
        raise
    except Exception as err:  # numpy / nibabel / zlib raise many types for damaged files
        raise ModelInputError(
            f"volume {name!r} could not be read ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
            f"is it a complete {kind} file?"
        ) from err
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) < 1:
        raise ModelInputError(f"volume {name!r} has shape {data.shape}; expected a 3-D volume (D, H, W)")
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise ModelInputError(f"volume {name!r} has dtype {data.dtype}; expected real numbers")
    if data.size > max_voxels:
        raise PayloadTooLargeError(f"volume {name!r} has {data.size} voxels, over this server's {max_voxels}")
    return UploadedVolume(np.asarray(data), affine, name)


def _gunzip(body: bytes, limit: int) -> bytes:
    inflater: Any = zlib
    try:  # ISA-L's inflate (the optional `isal` package) is about twice as fast as zlib's
        from isal import isal_zlib

        inflater = isal_zlib
    except ImportError:
        pass
    inflate = inflater.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = inflate.decompress(body, limit)
    if inflate.unconsumed_tail:
        raise PayloadTooLargeError(f"the gzip stream expands beyond {limit} bytes, over this server's voxel limit")
    if not inflate.eof:
        raise ModelInputError("the .nii.gz upload is truncated (the gzip stream ends early); upload the whole file")
    return out


def _nifti(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    image: Any
    try:
        image = nib.Nifti1Image.from_bytes(raw)
    except Exception:  # not NIfTI-1: try NIfTI-2, whose error is the one reported
        image = nib.Nifti2Image.from_bytes(raw)
    proxy = image.dataobj
    affine = np.asarray(image.affine, dtype=np.float64)
    shape = tuple(int(n) for n in proxy.shape)
    dtype = np.dtype(proxy.dtype)
    end = int(proxy.offset) + int(np.prod(shape)) * dtype.itemsize
    if len(raw) < end:
        raise ModelInputError(
            f"the NIfTI upload is truncated: {len(raw)} bytes, its header describes {end}; upload the whole file"
        )
    if float(proxy.slope) == 1.0 and float(proxy.inter) == 0.0 and dtype.kind in "iuf":
        # The voxels as they lie in the body, kept in the file's (Fortran) order: one copy, no transposition
        # (nibabel's reader would copy twice; torch moves such an array to a GPU as it is, strides and all).
        flat = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=int(proxy.offset))
        return flat.reshape(shape, order="F").copy(order="K"), affine
    return np.asarray(proxy), affine  # scaled data: nibabel applies slope and intercept


def mask_bytes(mask: np.ndarray, fmt: str, affine: np.ndarray) -> tuple[bytes, str]:
    """A uint8 mask as a response body and its media type: ``npy``, ``nii.gz`` or ``nii``."""
    mask8 = np.ascontiguousarray(mask, dtype=np.uint8)
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, mask8)
        return buffer.getvalue(), "application/octet-stream"
    return nifti_bytes(mask8, affine, compress=fmt == "nii.gz")


def nifti_bytes(data: np.ndarray, affine: np.ndarray, compress: bool = True) -> tuple[bytes, str]:
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    raw = image.to_bytes()
    if not compress:
        return raw, "application/octet-stream"
    return gzip.compress(raw, compresslevel=1), "application/gzip"
