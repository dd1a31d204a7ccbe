"""Volumes from request bodies and masks into response bodies: NIfTI (.nii, .nii.gz) and .npy, bounded.

A body is read by its file name's suffix, or by its first bytes when the name has none (gzip, NumPy and
NIfTI magic). A volume's size is checked against the server's voxel limit from its header, before any voxel
is read, and decompression stops at that limit in the file's own data type, so a small .nii.gz cannot expand
into gigabytes (a "zip bomb").
"""

from __future__ import annotations

import gzip
import io
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from export_engine.errors import ModelInputError
from export_engine.serve.errors import PayloadTooLargeError

NIFTI_HEADERS = 540  # enough bytes for either header: NIfTI-1's is 348 bytes, NIfTI-2's 540
MAX_EXTENSIONS = 16 * 2**20  # header extensions (before the voxels) beyond this are refused, not inflated
# The data types a NIfTI-1 image holds as they are; others are cast to one of these before writing one.
NIFTI_DTYPES = frozenset(np.dtype(t) for t in ("u1", "i1", "i2", "u2", "i4", "u4", "f4", "f8"))
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
    """Parse an uploaded volume; any damage is a :class:`ModelInputError` naming the file, a volume over
    ``max_voxels`` a :class:`PayloadTooLargeError` (known from its header, before its voxels are read)."""
    kind = format_of(name, body[:560])
    try:
        if kind == ".npy":
            data = _npy(name, body, max_voxels)
            affine = np.eye(4)
        else:
            head = _gunzip(body, NIFTI_HEADERS, head_only=True) if kind == ".nii.gz" else body[:NIFTI_HEADERS]
            itemsize, offset = _check_nifti_header(name, head, max_voxels)
            raw = _gunzip(body, max_voxels * itemsize + offset) if kind == ".nii.gz" else body
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
    _check_voxels(name, data.shape, max_voxels)
    return UploadedVolume(np.asarray(data), affine, name)


def _check_voxels(name: str, shape: tuple[int, ...], max_voxels: int) -> None:
    voxels = math.prod(int(n) for n in shape)  # Python integers: a forged header cannot overflow the product
    if voxels > max_voxels:
        raise PayloadTooLargeError(f"volume {name!r} has {voxels} voxels, over this server's {max_voxels}")


def _npy(name: str, body: bytes, max_voxels: int) -> np.ndarray:
    """The array of an .npy body, its shape checked from the header before the data is read."""
    stream = io.BytesIO(body)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, _ = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, _ = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ModelInputError(f"volume {name!r} is an .npy file of format {version}; save it with np.save")
    _check_voxels(name, shape, max_voxels)
    stream.seek(0)
    return np.asarray(np.load(stream, allow_pickle=False))


def _check_nifti_header(name: str, head: bytes, max_voxels: int) -> tuple[int, int]:
    """Check the volume a NIfTI header describes against the limits; its voxels' size and offset in bytes."""
    import nibabel as nib

    header: Any
    try:
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(head[:348]))
    except Exception:  # not NIfTI-1: try NIfTI-2, whose error is the one reported
        header = nib.Nifti2Header.from_fileobj(io.BytesIO(head[:540]))
    _check_voxels(name, header.get_data_shape(), max_voxels)
    offset = int(header.get_data_offset())
    if offset > MAX_EXTENSIONS:
        raise PayloadTooLargeError(
            f"volume {name!r}: its header puts the voxels at byte {offset}, after over "
            f"{MAX_EXTENSIONS // 2**20} MiB of header extensions; save it without them"
        )
    return int(np.dtype(header.get_data_dtype()).itemsize), offset


def _gunzip(body: bytes, limit: int, head_only: bool = False) -> bytes:
    """Inflate every gzip member of ``body`` (a file may hold several) into at most ``limit`` bytes;
    ``head_only`` returns the first ``limit`` bytes instead of refusing a longer stream."""
    inflater: Any = zlib
    try:  # ISA-L's inflate (the optional `isal` package) is about twice as fast as zlib's
        from isal import isal_zlib

        inflater = isal_zlib
    except ImportError:
        pass
    parts: list[bytes] = []
    total, rest = 0, body
    while True:
        inflate = inflater.decompressobj(wbits=16 + zlib.MAX_WBITS)
        part = inflate.decompress(rest, limit - total + 1)  # one byte more than the limit reveals overflow
        parts.append(part)
        total += len(part)
        if head_only and (total >= limit or not inflate.eof):
            return b"".join(parts)[:limit]
        if total > limit:
            raise PayloadTooLargeError(f"the gzip stream expands beyond {limit} bytes, over this server's voxel limit")
        if not inflate.eof:
            raise ModelInputError("the .nii.gz upload is truncated (the gzip stream ends early); upload the whole file")
        rest = inflate.unused_data
        if not rest.strip(b"\x00"):  # the end, or the zero padding some writers add (as gzip's reader allows)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        if rest[:2] != b"\x1f\x8b":
            raise ModelInputError(
                f"the .nii.gz upload has {len(rest)} bytes after its gzip stream that are not gzip; "
                "upload the file as it was written"
            )


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

    image = nib.Nifti1Image(_storable(data), affine)
    image.header.set_xyzt_units("mm")
    raw = image.to_bytes()
    if not compress:
        return raw, "application/octet-stream"
    return gzip.compress(raw, compresslevel=1), "application/gzip"


def _storable(data: np.ndarray) -> np.ndarray:
    """``data`` in a data type a NIfTI-1 image holds (nibabel refuses float16, int64 and uint64 without an
    explicit header): smaller floats as float32, wider integers as int32 when every value fits, else float64."""
    if data.dtype in NIFTI_DTYPES:
        return data
    if data.dtype.kind == "f":
        return data.astype(np.float32 if data.dtype.itemsize < 4 else np.float64)
    info = np.iinfo(np.int32)
    if data.dtype.kind in "iu" and (data.size == 0 or (int(data.min()) >= info.min and int(data.max()) <= info.max)):
        return data.astype(np.int32)
    return data.astype(np.float64)
