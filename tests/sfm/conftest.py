"""A small photo collection for the match-many tests: JPEGs (one with a 35 mm focal length in EXIF, one turned by
its EXIF orientation) in a folder and a subfolder, a PNG, and a file that is not an image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export_engine.calibration.synthetic import structured_image


def _write(path: Path, seed: int, orientation: int = 1, focal35: int = 0) -> Path:
    rgb = ((structured_image(128, 192, seed).transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    if focal35:
        exif.get_ifd(0x8769)[0xA405] = focal35
    Image.fromarray(rgb).save(path, exif=exif) if path.suffix == ".jpg" else Image.fromarray(rgb).save(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    (folder / "sub").mkdir()
    for k in range(5):
        _write(folder / f"im{k}.jpg", k, focal35=28 if k == 0 else 0)
    _write(folder / "sub" / "turned.jpg", 9, orientation=6)  # stored 192x128, seen 128x192
    _write(folder / "z.png", 11)
    (folder / "notes.txt").write_text("not an image")
    return folder
