"""Image loading the way MASt3R expects it, fitted to an artifact's fixed resolution.

Upstream (dust3r load_images, size=512): EXIF orientation, RGB, resize so the long side is 512 (LANCZOS when
shrinking, BICUBIC when enlarging; new side = round(side * 512 / long side)), then centre-crop to multiples
of 16 with half-sizes ((2 c) // 16) * 8 around c = side // 2, then [0, 1] -> [-1, 1].

An artifact runs at one resolution (W x H). When upstream's procedure gives exactly that size (a 4:3 photo for
512x384) nothing else happens. Otherwise the image is scaled to cover W x H and centre-cropped to it (the same
resampling rule), and the log says so: another aspect ratio needs an artifact exported at that resolution
for results identical to upstream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export_engine.errors import ModelInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedImage:
    tensor: np.ndarray  # (1, 3, H, W) float32 in [-1, 1]
    rgb: np.ndarray  # (H, W, 3) uint8, what the network saw (for plots)
    source: Path
    original_size: tuple[int, int]  # (W, H) of the file after EXIF orientation
    scale: tuple[float, float] = (1.0, 1.0)  # resized / original, per axis (x, y)
    offset: tuple[int, int] = (0, 0)  # crop origin (left, top) in the resized image

    def to_original(self, xy: np.ndarray) -> np.ndarray:
        """(M, 2) pixel (x, y) of the network input -> (x, y) in the original image (pixel centres)."""
        return to_original(xy, self.scale, self.offset)


def _resample(image: object, size: tuple[int, int]) -> object:
    from PIL import Image

    w, h = image.size  # type: ignore[attr-defined]
    shrinking = size[0] * size[1] < w * h
    method = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
    return image.resize(size, method)  # type: ignore[attr-defined]


def upstream_size(width: int, height: int, long_side: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """(resized W, H) and the crop box (left, top, right, bottom) upstream's loader would use."""
    scale = long_side / max(width, height)
    new_w, new_h = round(width * scale), round(height * scale)
    cx, cy = new_w // 2, new_h // 2
    half_w, half_h = ((2 * cx) // 16) * 8, ((2 * cy) // 16) * 8
    return (new_w, new_h), (cx - half_w, cy - half_h, cx + half_w, cy + half_h)


@dataclass(frozen=True)
class Fit:
    """How an original image of a given size becomes the network input: resize, then crop."""

    original: tuple[int, int]  # (W, H) of the file after EXIF orientation
    resized: tuple[int, int]  # (W, H) after resampling
    box: tuple[int, int, int, int]  # crop (left, top, right, bottom) in the resized image
    upstream: bool  # False: upstream's procedure gives another size, scaled to cover and centre-cropped

    @property
    def scale(self) -> tuple[float, float]:
        """resized / original, per axis (x, y)."""
        return self.resized[0] / self.original[0], self.resized[1] / self.original[1]

    @property
    def offset(self) -> tuple[int, int]:
        """Crop origin (left, top) in the resized image."""
        return self.box[0], self.box[1]


def fit(original: tuple[int, int], width: int, height: int) -> Fit:
    """The resize and crop :func:`load_image` applies to an image of ``original`` (W, H) after EXIF orientation,
    known before decoding it (a collection's keypoint coordinates are laid out from this)."""
    resized, box = upstream_size(*original, long_side=max(width, height))
    if (box[2] - box[0], box[3] - box[1]) == (width, height):
        return Fit(original, resized, box, True)
    factor = max(width / original[0], height / original[1])
    cover = (max(width, round(original[0] * factor)), max(height, round(original[1] * factor)))
    left, top = (cover[0] - width) // 2, (cover[1] - height) // 2
    return Fit(original, cover, (left, top, left + width, top + height), False)


def to_original(xy: np.ndarray, scale: tuple[float, float], offset: tuple[int, int]) -> np.ndarray:
    """(M, 2) pixel (x, y) of the network input -> (x, y) in the original image (pixel centres at integers)."""
    xy = np.asarray(xy, dtype=np.float64)
    return (xy + np.asarray(offset, np.float64) + 0.5) / np.asarray(scale, np.float64) - 0.5


def read_rgb(path: str | Path, width: int, height: int) -> tuple[np.ndarray, Fit]:
    """The (H, W, 3) uint8 network input of the file at ``path`` (EXIF orientation, resize, crop), and its fit."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ModelInputError(f"image {path} not found")
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ModelInputError(f"image {path} could not be read ({err}); give a PNG or JPEG file") from err
    placed = fit(image.size, width, height)
    if not placed.upstream:
        upstream = upstream_size(*image.size, long_side=max(width, height))[1]
        log.info(
            "%s: %dx%d does not give %dx%d the upstream way (%dx%d); scaled to cover and centre-cropped",
            path.name, *image.size, width, height, upstream[2] - upstream[0], upstream[3] - upstream[1],
        )  # fmt: skip
    candidate = _resample(image, placed.resized).crop(placed.box)  # type: ignore[attr-defined]
    return np.asarray(candidate, dtype=np.uint8), placed


def normalized(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [-1, 1], as upstream (x / 255 - 0.5) / 0.5."""
    tensor = (rgb.astype(np.float32) / 255.0 - 0.5) / 0.5
    return tensor.transpose(2, 0, 1)[None].copy()


def load_image(path: str | Path, width: int, height: int) -> LoadedImage:
    """Read ``path`` and return it at exactly ``width`` x ``height`` as the network input."""
    rgb, placed = read_rgb(path, width, height)
    return LoadedImage(normalized(rgb), rgb, Path(path), placed.original, placed.scale, placed.offset)
