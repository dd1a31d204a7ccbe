"""COLMAP's own steps on the written database, through pycolmap (the ``[sfm]`` extra): two-view geometric
verification of every matched pair, and the incremental mapper into ``DIR/sparse/``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from export_engine.errors import BackendError

log = logging.getLogger(__name__)


def pycolmap_module(what: str) -> Any:
    try:
        import pycolmap
    except ImportError as err:
        raise BackendError(f"{what} needs pycolmap: pip install 'export-engine[sfm]'") from err
    if not log.isEnabledFor(logging.DEBUG) and hasattr(pycolmap, "logging"):
        pycolmap.logging.minloglevel = 1  # COLMAP's per-step INFO lines only with --debug; warnings stay
    return pycolmap


def verify(database: Path, pairs: Path) -> int:
    """COLMAP's two-view geometric verification of the pairs in ``pairs``; returns how many pairs are verified
    (an inlier geometry was found)."""
    pycolmap = pycolmap_module("--verify")
    pycolmap.verify_matches(str(database), str(pairs), pycolmap.TwoViewGeometryOptions())
    with pycolmap.Database.open(str(database)) as db:
        verified = db.num_verified_image_pairs()
    log.info("two-view geometric verification: %d pairs with an inlier geometry", verified)
    return int(verified)


def reconstruct(database: Path, images: Path, out: Path) -> Path:
    """The incremental mapper into ``out`` (one numbered folder per model, COLMAP's layout); returns ``out``."""
    pycolmap = pycolmap_module("--reconstruct")
    out.mkdir(parents=True, exist_ok=True)
    models = pycolmap.incremental_mapping(str(database), str(images), str(out))
    if not models:
        log.warning("the incremental mapper found no model (too few verified pairs or matches)")
    for index, model in models.items():
        log.info("model %d: %d images registered, %d points", index, model.num_reg_images(), model.num_points3D())
    return out
