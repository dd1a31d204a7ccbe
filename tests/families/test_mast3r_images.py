from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export_engine.errors import ModelInputError
from export_engine.families.mast3r.images import fit, load_image, upstream_size


@pytest.mark.parametrize(
    ("size", "resized_crop"),
    [((4032, 3024), (512, 384)), ((1920, 1080), (512, 288)), ((3072, 4080), (384, 512))],
)
def test_upstream_sizes_from_the_spec(size: tuple[int, int], resized_crop: tuple[int, int]) -> None:
    _, (left, top, right, bottom) = upstream_size(*size, long_side=512)
    assert (right - left, bottom - top) == resized_crop


def _photo(path: Path, w: int, h: int) -> Path:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, rng.integers(0, 255, (h, w))], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def test_load_image_matches_artifact_resolution(tmp_path: Path) -> None:
    img = load_image(_photo(tmp_path / "a.png", 1024, 768), 512, 384)
    assert img.tensor.shape == (1, 3, 384, 512) and img.tensor.dtype == np.float32
    assert -1.0 <= img.tensor.min() and img.tensor.max() <= 1.0
    wide = load_image(_photo(tmp_path / "b.png", 1920, 1080), 512, 384)  # other aspect: cover + crop
    assert wide.tensor.shape == (1, 3, 384, 512) and wide.original_size == (1920, 1080)
    portrait = load_image(_photo(tmp_path / "c.png", 600, 800), 384, 512)
    assert portrait.rgb.shape == (512, 384, 3)


def test_load_image_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelInputError, match="not found"):
        load_image(tmp_path / "missing.png", 512, 384)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ModelInputError, match="could not be read"):
        load_image(tmp_path / "bad.png", 512, 384)


@pytest.mark.parametrize("size", [(800, 600), (600, 800), (1000, 500), (640, 480)])
def test_fit_predicts_the_loaders_geometry_without_decoding(tmp_path: Path, size: tuple[int, int]) -> None:
    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    loaded = load_image(path, 512, 384)
    placed = fit(size, 512, 384)
    assert loaded.rgb.shape == (384, 512, 3)
    assert (loaded.scale, loaded.offset, loaded.original_size) == (placed.scale, placed.offset, placed.original)
    assert placed.upstream == (size[0] * 3 == size[1] * 4)  # only 4:3 landscape gives 512x384 the upstream way
