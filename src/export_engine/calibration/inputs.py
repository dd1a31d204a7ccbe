"""Representative inputs for calibration (activation statistics and the precision search).

* Built-in sets: each model family's structured synthetic feeds (``calibration/synthetic.py`` through
  ``FamilySpec.parity_feeds``), drawn by the pipeline with ``CALIBRATION_SEED_OFFSET`` added to the seed so
  that calibration never sees the parity inputs (a plan tuned on the very inputs the parity gate checks would
  pass by construction).
* A user folder: images (png/jpg, read with Pillow when it is installed; .npy arrays always) or volumes
  (.npy, .nii, .nii.gz, read by the small NIfTI-1 reader below: nibabel is not a dependency). Model-specific
  preprocessing (resizing, normalisation, layout) is a callable given by the caller.
"""

from __future__ import annotations

import gzip
import logging
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from export_engine.core.types import Feed
from export_engine.errors import ModelInputError, UsageError

log = logging.getLogger(__name__)

PARITY_SEED_OFFSET = 7919  # the parity gate's feeds
CALIBRATION_SEED_OFFSET = 104_729  # a prime far from the parity gate's offset
KINDS: dict[str, tuple[str, ...]] = {
    "images": (".png", ".jpg", ".jpeg", ".npy"),
    "volumes": (".nii.gz", ".nii", ".npy"),
}
Preprocess = Callable[[np.ndarray], np.ndarray]


def load_calibration_dir(
    path: Path,
    kind: str = "images",
    *,
    preprocess: Preprocess | None = None,
    limit: int | None = None,
) -> list[np.ndarray]:
    """Read every image or volume of ``path`` (sorted by name), each through ``preprocess`` when given.

    Images come back as float32 (H, W, C) in [0, 1] (RGB; grayscale gets C = 1); volumes as float32 in NIfTI
    voxel order (i, j, k), scaled by the header's slope/intercept, as nibabel's ``get_fdata`` gives them.
    """
    if kind not in KINDS:
        raise UsageError(f"unknown calibration input kind {kind!r}; choose one of: {', '.join(KINDS)}")
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"calibration folder {folder} does not exist or is not a folder")
    suffixes = KINDS[kind]
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(suffixes))
    if not files:
        raise UsageError(
            f"calibration folder {folder} holds no {kind} ({', '.join(suffixes)}); add some or use the built-in set"
        )
    if limit is not None:
        files = files[:limit]
    reader = read_image if kind == "images" else read_volume
    arrays = []
    for file in files:
        array = reader(file)
        if preprocess is not None:
            try:
                array = preprocess(array)
            except (ValueError, TypeError) as err:
                raise ModelInputError(f"calibration file {file}: preprocessing failed ({err})") from err
        arrays.append(np.asarray(array, dtype=np.float32))
    log.info("calibration inputs: %d %s from %s", len(arrays), kind, folder)
    return arrays


def feeds_from_arrays(arrays: Sequence[np.ndarray], input_name: str, *, batch: int = 1) -> list[Feed]:
    """Group preprocessed arrays into feeds ``{input_name: (batch, ...)}`` (a short last batch is kept)."""
    if not arrays:
        raise ModelInputError("no calibration arrays to make feeds from")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ModelInputError(f"calibration arrays have different shapes {sorted(shapes)}; preprocess them to one")
    return [{input_name: np.stack(arrays[i : i + batch]).astype(np.float32)} for i in range(0, len(arrays), batch)]


def read_image(path: Path) -> np.ndarray:
    """An image file as float32 (H, W, C) in [0, 1]; .npy arrays are returned as stored (as float32)."""
    path = Path(path)
    if path.name.lower().endswith(".npy"):
        return _read_npy(path)
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UsageError(
            f"reading {path.suffix} calibration images needs Pillow (pip install pillow); or save them as .npy"
        ) from None
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB") if image.mode not in ("L", "RGB") else image
            array = np.asarray(rgb, dtype=np.float32)
    except (OSError, UnidentifiedImageError) as err:
        raise ModelInputError(f"calibration image {path} cannot be read ({err})") from err
    if array.ndim == 2:
        array = array[..., None]
    return array / 255.0


def read_volume(path: Path) -> np.ndarray:
    path = Path(path)
    if path.name.lower().endswith(".npy"):
        return _read_npy(path)
    return read_nifti(path)


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ModelInputError(f"calibration file {path} is not a readable .npy array ({err})") from err
    if not np.issubdtype(array.dtype, np.number):
        raise ModelInputError(f"calibration file {path} holds {array.dtype} data; expected numbers")
    return array.astype(np.float32)


# NIfTI-1 datatype codes -> numpy (nifti1.h); RGB and complex types are not volumes for these models.
_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}


def read_nifti(path: Path) -> np.ndarray:
    """A single-file NIfTI-1 volume (.nii or .nii.gz) as float32 in voxel order (i, j, k, ...)."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise ModelInputError(f"NIfTI file {path} cannot be read ({err})") from err
    if len(raw) < 352:
        raise ModelInputError(f"NIfTI file {path} is too short ({len(raw)} bytes) for a NIfTI-1 header")
    endian = next((e for e in "<>" if struct.unpack(f"{e}i", raw[:4])[0] == 348), None)
    if endian is None:
        size = struct.unpack("<i", raw[:4])[0]
        kind = "NIfTI-2 (not supported; convert to NIfTI-1 or .npy)" if size == 540 else "not NIfTI-1"
        raise ModelInputError(f"{path}: header size {size}: {kind}")
    magic = raw[344:348]
    if magic != b"n+1\x00":
        what = "a .hdr/.img pair (not supported; save as .nii)" if magic == b"ni1\x00" else f"magic {magic!r}"
        raise ModelInputError(f"{path}: not a single-file NIfTI-1 volume ({what})")
    dims = struct.unpack(f"{endian}8h", raw[40:56])
    ndim = dims[0]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dims[1 : ndim + 1]):
        raise ModelInputError(f"{path}: invalid NIfTI dimensions {dims}")
    shape = tuple(int(d) for d in dims[1 : ndim + 1])
    datatype = struct.unpack(f"{endian}h", raw[70:72])[0]
    if datatype not in _NIFTI_DTYPES:
        raise ModelInputError(f"{path}: NIfTI datatype {datatype} is not a scalar volume type")
    offset = int(struct.unpack(f"{endian}f", raw[108:112])[0])
    slope, intercept = struct.unpack(f"{endian}ff", raw[112:120])
    dtype = np.dtype(endian + _NIFTI_DTYPES[datatype])
    count = int(np.prod(shape))
    if offset < 348 or offset + count * dtype.itemsize > len(raw):
        raise ModelInputError(
            f"{path}: data of {shape} {dtype} at offset {offset} does not fit the file ({len(raw)} bytes)"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")
    volume = data.astype(np.float32)
    if np.isfinite(slope) and slope != 0 and (slope != 1 or intercept != 0):  # slope 0 means "no scaling"
        volume = volume * np.float32(slope) + np.float32(intercept)
    return volume
