"""Pictures for people: orthogonal slices with a mask overlay (FastSAM3D), images with match lines (MASt3R)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from export_engine.atomic import replacing


def _gray(slice2d: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = np.clip((slice2d.astype(np.float64) - lo) / max(hi - lo, 1e-12), 0, 1)
    return np.repeat((scaled * 255).astype(np.uint8)[..., None], 3, axis=-1)


def _save(image: object, path: Path) -> Path:
    with replacing(path) as tmp:
        image.save(tmp, format="PNG")  # type: ignore[attr-defined]
    return path


def plot_slices(
    volume: np.ndarray, mask: np.ndarray, clicks: Sequence[tuple[Sequence[float], bool]], path: str | Path
) -> Path:
    """Axial, coronal and sagittal slices through the last click, mask in red, clicks as dots."""
    from PIL import Image, ImageDraw

    lo, hi = np.percentile(volume, [1, 99])
    centre = [int(np.round(c)) for c in (clicks[-1][0] if clicks else np.array(volume.shape) // 2)]
    panels = []
    for axis in range(3):
        index = [slice(None)] * 3
        index[axis] = centre[axis]  # type: ignore[call-overload]
        rgb = _gray(volume[tuple(index)], lo, hi)
        overlay = mask[tuple(index)].astype(bool)
        rgb[overlay] = (0.5 * rgb[overlay] + 0.5 * np.array([255, 0, 0])).astype(np.uint8)
        panel = Image.fromarray(rgb).resize((256, 256), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(panel)
        rest = [a for a in range(3) if a != axis]
        for point, positive in clicks:
            if abs(point[axis] - centre[axis]) <= 2:
                y = point[rest[0]] * 256 / volume.shape[rest[0]]
                x = point[rest[1]] * 256 / volume.shape[rest[1]]
                draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(0, 255, 0) if positive else (255, 0, 255))
        panels.append(panel)
    sheet = Image.new("RGB", (256 * 3 + 8, 256), (0, 0, 0))
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * 260, 0))
    return _save(sheet, Path(path))


def plot_matches(
    image1: np.ndarray, image2: np.ndarray, xy1: np.ndarray, xy2: np.ndarray, path: str | Path, max_lines: int = 300
) -> Path:
    """Both images side by side (uint8 (H, W, 3)) with a line per match (a subset when there are many)."""
    from PIL import Image, ImageDraw

    h = max(image1.shape[0], image2.shape[0])
    canvas = Image.new("RGB", (image1.shape[1] + image2.shape[1], h), (0, 0, 0))
    canvas.paste(Image.fromarray(image1), (0, 0))
    canvas.paste(Image.fromarray(image2), (image1.shape[1], 0))
    draw = ImageDraw.Draw(canvas)
    picks: Sequence[int] | np.ndarray = (
        np.linspace(0, len(xy1) - 1, num=min(len(xy1), max_lines)).astype(int) if len(xy1) else []
    )
    rng = np.random.default_rng(0)
    for i in picks:
        colour = tuple(int(c) for c in rng.integers(64, 256, size=3))
        (x1, y1), (x2, y2) = xy1[i], xy2[i]
        draw.line((x1, y1, x2 + image1.shape[1], y2), fill=colour, width=1)
    return _save(canvas, Path(path))
