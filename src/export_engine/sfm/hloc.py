"""hloc's files, from the finished COLMAP database: ``pairs.txt``, ``features.h5`` and ``matches.h5``.

hloc's layout: ``features.h5`` has a group per image name with ``keypoints`` (N, 2) float32 in original image
pixels with the first pixel's centre at (0, 0) (COLMAP's coordinates minus 0.5; hloc adds the 0.5 back when it
imports them) and ``image_size`` (W, H); ``matches.h5`` a group per pair, ``name0/name1`` with any ``/`` inside
a name replaced by ``-`` (hloc's ``names_to_pair``), holding ``matches0`` (N0,) int32 (the index of the
matched keypoint of image 1 for each keypoint of image 0, -1 where none) and ``matching_scores0`` (N0,)
float16. The h5 files are written to temporary names and renamed into place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from export_engine.atomic import replacing
from export_engine.errors import BackendError
from export_engine.sfm.database import image_ids_of, read_keypoints, read_matches, reading


def pair_key(name0: str, name1: str) -> str:
    """hloc's ``names_to_pair``: the matches.h5 group of a pair."""
    return "/".join((name0.replace("/", "-"), name1.replace("/", "-")))


def write_pairs(path: Path, names: Sequence[str], pairs: Sequence[tuple[int, int]]) -> Path:
    with replacing(path) as tmp:
        Path(tmp).write_text("".join(f"{names[i]} {names[j]}\n" for i, j in pairs))
    return path


def h5py_module() -> object:
    try:
        import h5py
    except ImportError as err:
        raise BackendError(
            "writing hloc's features.h5 / matches.h5 needs h5py: pip install 'export-engine[sfm]' (or pass --no-hloc)"
        ) from err
    return h5py


def write_hloc(database: Path, out: Path, names: Sequence[str], sizes: Sequence[tuple[int, int]]) -> tuple[Path, Path]:
    """``out/features.h5`` and ``out/matches.h5`` from ``database`` (names and sizes in image id order)."""
    h5py = h5py_module()
    with reading(database) as db:
        keypoints = read_keypoints(db)
        matches = read_matches(db)
    features, matched = out / "features.h5", out / "matches.h5"
    with replacing(features) as tmp, h5py.File(tmp, "w") as f:  # type: ignore[attr-defined]
        for image_id, name in enumerate(names, 1):
            group = f.create_group(name)
            group.create_dataset("keypoints", data=keypoints[image_id] - np.float32(0.5))
            group.create_dataset("image_size", data=np.asarray(sizes[image_id - 1], dtype=np.int64))
    with replacing(matched) as tmp, h5py.File(tmp, "w") as f:  # type: ignore[attr-defined]
        for pid, (found, scores) in sorted(matches.items()):
            id0, id1 = image_ids_of(pid)
            matches0 = np.full(len(keypoints[id0]), -1, dtype=np.int32)
            scores0 = np.zeros(len(keypoints[id0]), dtype=np.float16)
            matches0[found[:, 0]] = found[:, 1].astype(np.int32)
            scores0[found[:, 0]] = scores
            group = f.require_group(pair_key(names[id0 - 1], names[id1 - 1]))
            group.create_dataset("matches0", data=matches0)
            group.create_dataset("matching_scores0", data=scores0)
    return features, matched
