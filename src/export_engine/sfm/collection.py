"""An image collection: the files of a folder (or given one by one), named as COLMAP and hloc name them.

Every file is opened once before any work (header and EXIF only, no pixel decoding): an unreadable file,
two files of the same name, or nothing to match stops the run before the database exists. Sizes are those
after EXIF orientation, as the images are matched. The focal length comes from EXIF where the file has one
(35 mm equivalent, else the focal length with the focal-plane resolution); ``None`` leaves it to the prior.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from export_engine.errors import ModelInputError

log = logging.getLogger(__name__)

SUFFIXES = (".jpg", ".jpeg", ".png")
_ORIENTATION, _EXIF_IFD = 0x0112, 0x8769
_FOCAL, _FOCAL_35MM = 0x920A, 0xA405
_PLANE_X_RES, _PLANE_UNIT = 0xA20E, 0xA210
_UNIT_MM = {2: 25.4, 3: 10.0, 4: 1.0, 5: 0.001}  # FocalPlaneResolutionUnit: inch, cm, mm, um
_FULL_FRAME_WIDTH_MM = 36.0


@dataclass(frozen=True)
class CollectionImage:
    name: str  # relative to the folder (forward slashes), or the file name for files given one by one
    path: Path
    size: tuple[int, int]  # (W, H) after EXIF orientation
    focal_px: float | None  # from EXIF, in pixels of `size`; None: not recorded


def list_images(inputs: Sequence[str | Path]) -> list[CollectionImage]:
    """The images of ``inputs`` (folders, searched recursively, and files), sorted by name."""
    found: dict[str, Path] = {}
    for item in map(Path, inputs):
        if item.is_dir():
            entries = [(p.relative_to(item).as_posix(), p) for p in sorted(item.rglob("*")) if _is_image(p)]
        elif item.is_file():
            entries = [(item.name, item)]
        else:
            raise ModelInputError(f"{item} is neither an image file nor a folder; give folders or jpg/png files")
        for name, path in entries:
            if name in found:
                raise ModelInputError(
                    f"two images are named {name!r} ({found[name]} and {path}); COLMAP and hloc key images by "
                    "name: rename one or give a common parent folder"
                )
            found[name] = path
    if len(found) < 2:
        raise ModelInputError(
            f"{len(found)} image(s) found in {', '.join(map(str, inputs))}; matching needs at least 2 "
            f"({'/'.join(s.lstrip('.') for s in SUFFIXES)} files)"
        )
    images = [_probe(name, path) for name, path in sorted(found.items())]
    log.info("%d images", len(images))
    return images


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SUFFIXES and not path.name.startswith(".")


def _probe(name: str, path: Path) -> CollectionImage:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            width, height = opened.size
            exif = opened.getexif()
    except (UnidentifiedImageError, OSError) as err:
        raise ModelInputError(f"image {path} could not be read ({err}); remove it or give a PNG or JPEG file") from err
    if exif.get(_ORIENTATION, 1) in (5, 6, 7, 8):  # a quarter turn: the matched image is transposed
        width, height = height, width
    return CollectionImage(name, path, (width, height), _focal_px(exif, path, (width, height)))


def _focal_px(exif: object, path: Path, size: tuple[int, int]) -> float | None:
    """Focal length in pixels from EXIF: the 35 mm equivalent over a 36 mm wide frame, else the focal length in mm
    times the focal-plane resolution (pixels per unit of the sensor, in the image's stored resolution)."""
    detail = exif.get_ifd(_EXIF_IFD) if hasattr(exif, "get_ifd") else {}
    try:
        f35 = float(detail.get(_FOCAL_35MM, 0) or 0)
        if f35 > 0:
            return f35 / _FULL_FRAME_WIDTH_MM * max(size)
        focal_mm = float(detail.get(_FOCAL, 0) or 0)
        resolution = float(detail.get(_PLANE_X_RES, 0) or 0)
        unit_mm = _UNIT_MM.get(int(detail.get(_PLANE_UNIT, 2) or 2))
        if focal_mm > 0 and resolution > 0 and unit_mm:
            return focal_mm * resolution / unit_mm
    except (TypeError, ValueError, ZeroDivisionError):
        log.info("%s: unreadable EXIF focal length; the prior is used", path.name)
    return None
