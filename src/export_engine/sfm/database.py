"""A COLMAP database written with sqlite3: cameras, rigs and frames, images, keypoints and matches.

Facts of COLMAP's schema this follows (COLMAP 3.12+, which pycolmap 3.12+ reads; older versions ignore the rig
tables): ids start at 1; a pair's id is ``id1 * 2147483647 + id2`` with ``id1 < id2`` (the matches of a pair
stored that way are (index in image id1, index in image id2)); keypoints are a float32 (N, 2) blob of (x, y)
with the image's top-left corner at (0, 0), so the first pixel's centre is (0.5, 0.5); matches are a uint32
(M, 2) blob; camera parameters a float64 blob; ``prior_focal_length`` 1 when the focal length is known (EXIF).
Each camera is its own rig (sensor type 0, a camera) and each image its own frame.

Keypoints: an image's keypoints are the pixels of its network input grid that any of its pairs matched, one
keypoint per pixel across all pairs, so that COLMAP's tracks run through them. A pixel keeps its index once
given (new pixels are appended), so matches written earlier stay valid while later pairs add keypoints.

Resumable: the pairs done so far, with their match scores, are in a table of our own; keypoints, matches and
that table change in one transaction per commit, so a run killed at any moment leaves a database whose
matches are complete for every pair it records as done, and a rerun computes only the others. A fingerprint
of the run (artifact, images, pair strategy, settings) is stored too: a database of another run is refused.

Thread safety: a database object may be shared by threads; its methods run one at a time under its lock (in a
run, the writer thread of :mod:`export_engine.sfm.executor` is the only one that writes).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export_engine.errors import ArtifactError, UsageError

log = logging.getLogger(__name__)

MAX_IMAGE_ID = 2147483647  # COLMAP's kMaxNumImages (int32 max): the pair id multiplier
SIMPLE_RADIAL = 2  # COLMAP camera model id; params f, cx, cy, k
CAMERA_SENSOR = 0  # COLMAP SensorType::CAMERA
FOCAL_PRIOR_FACTOR = 1.2  # COLMAP's default focal length without EXIF: 1.2 * max(W, H)
CAMERA_MODES = ("per-image", "single", "auto")
BUSY_TIMEOUT_S = 60.0  # how long a commit waits for another connection's lock before it fails

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS rigs (rig_id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    ref_sensor_id INTEGER NOT NULL, ref_sensor_type INTEGER NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS rig_ref_sensor_assignment ON rigs(ref_sensor_id, ref_sensor_type);
CREATE TABLE IF NOT EXISTS rig_sensors (rig_id INTEGER NOT NULL, sensor_id INTEGER NOT NULL,
    sensor_type INTEGER NOT NULL, sensor_from_rig BLOB,
    FOREIGN KEY(rig_id) REFERENCES rigs(rig_id) ON DELETE CASCADE);
CREATE UNIQUE INDEX IF NOT EXISTS rig_sensor_assignment ON rig_sensors(sensor_id, sensor_type);
CREATE TABLE IF NOT EXISTS cameras (camera_id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, model INTEGER NOT NULL,
    width INTEGER NOT NULL, height INTEGER NOT NULL, params BLOB, prior_focal_length INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS frames (frame_id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, rig_id INTEGER NOT NULL,
    FOREIGN KEY(rig_id) REFERENCES rigs(rig_id) ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS frame_data (frame_id INTEGER NOT NULL, data_id INTEGER NOT NULL,
    sensor_id INTEGER NOT NULL, sensor_type INTEGER NOT NULL,
    FOREIGN KEY(frame_id) REFERENCES frames(frame_id) ON DELETE CASCADE);
CREATE UNIQUE INDEX IF NOT EXISTS frame_sensor_assignment ON frame_data(data_id, sensor_type);
CREATE TABLE IF NOT EXISTS images (image_id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, name TEXT NOT NULL UNIQUE,
    camera_id INTEGER NOT NULL, CONSTRAINT image_id_check CHECK(image_id >= 0 and image_id < {MAX_IMAGE_ID}),
    FOREIGN KEY(camera_id) REFERENCES cameras(camera_id));
CREATE UNIQUE INDEX IF NOT EXISTS index_name ON images(name);
CREATE TABLE IF NOT EXISTS pose_priors (pose_prior_id INTEGER PRIMARY KEY NOT NULL, corr_data_id INTEGER NOT NULL,
    corr_sensor_id INTEGER NOT NULL, corr_sensor_type INTEGER NOT NULL, position BLOB, position_covariance BLOB,
    gravity BLOB, coordinate_system INTEGER NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS pose_prior_data_assignment
    ON pose_priors(corr_data_id, corr_sensor_id, corr_sensor_type);
CREATE TABLE IF NOT EXISTS keypoints (image_id INTEGER PRIMARY KEY NOT NULL, rows INTEGER NOT NULL,
    cols INTEGER NOT NULL, data BLOB, FOREIGN KEY(image_id) REFERENCES images(image_id) ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS descriptors (image_id INTEGER PRIMARY KEY NOT NULL, type INTEGER NOT NULL,
    rows INTEGER NOT NULL, cols INTEGER NOT NULL, data BLOB,
    FOREIGN KEY(image_id) REFERENCES images(image_id) ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS matches (pair_id INTEGER PRIMARY KEY NOT NULL, rows INTEGER NOT NULL,
    cols INTEGER NOT NULL, data BLOB);
CREATE TABLE IF NOT EXISTS two_view_geometries (pair_id INTEGER PRIMARY KEY NOT NULL, rows INTEGER NOT NULL,
    cols INTEGER NOT NULL, data BLOB, config INTEGER NOT NULL, F BLOB, E BLOB, H BLOB, qvec BLOB, tvec BLOB,
    camera1 BLOB, camera2 BLOB);
CREATE TABLE IF NOT EXISTS export_engine_run (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS export_engine_pixels (image_id INTEGER PRIMARY KEY NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS export_engine_pairs (pair_id INTEGER PRIMARY KEY NOT NULL, matches INTEGER NOT NULL,
    scores BLOB NOT NULL);
"""


def pair_id(image_id1: int, image_id2: int) -> int:
    """COLMAP's pair id (the smaller image id first)."""
    low, high = min(image_id1, image_id2), max(image_id1, image_id2)
    return low * MAX_IMAGE_ID + high


def image_ids_of(pair: int) -> tuple[int, int]:
    return pair // MAX_IMAGE_ID, pair % MAX_IMAGE_ID


@dataclass(frozen=True)
class ImageEntry:
    """An image as the database lays it out: its name, camera and the grid its keypoints sit on."""

    name: str
    size: tuple[int, int]  # (W, H) of the original image after EXIF orientation
    focal_px: float | None
    grid: tuple[int, int]  # (W, H) of the network input: keypoint pixels are y * W + x on it
    scale: tuple[float, float]  # grid pixel -> original pixel: (xy + offset + 0.5) / scale (COLMAP coordinates)
    offset: tuple[int, int]


def cameras_for(images: Sequence[ImageEntry], mode: str) -> tuple[list[tuple[int, int, float, bool]], list[int]]:
    """Cameras (W, H, focal, focal known) and each image's camera index, under ``mode`` (see CAMERA_MODES)."""
    if mode not in CAMERA_MODES:
        raise UsageError(f"--camera-mode {mode!r}: choose one of {', '.join(CAMERA_MODES)}")

    def camera(entry: ImageEntry) -> tuple[int, int, float, bool]:
        focal = entry.focal_px if entry.focal_px else FOCAL_PRIOR_FACTOR * max(entry.size)
        return entry.size[0], entry.size[1], round(float(focal), 6), entry.focal_px is not None

    if mode == "single":
        sizes = {e.size for e in images}
        if len(sizes) > 1:
            raise UsageError(f"--camera-mode single needs one image size, found {len(sizes)} ({sorted(sizes)[:3]}"
                             "...); use per-image or auto")  # fmt: skip
        return [camera(images[0])], [0] * len(images)
    if mode == "per-image":
        return [camera(e) for e in images], list(range(len(images)))
    cameras: dict[tuple[int, int, float, bool], int] = {}
    owners = [cameras.setdefault(camera(e), len(cameras)) for e in images]
    return list(cameras), owners


class _Keypoints:
    """One image's keypoints: grid pixel -> keypoint index (append-only) and the pixels in index order."""

    def __init__(self, entry: ImageEntry, pixels: np.ndarray | None = None) -> None:
        self.entry = entry
        self.index = np.full(entry.grid[0] * entry.grid[1], -1, dtype=np.int64)
        self.pixels = np.zeros(0, dtype=np.int64) if pixels is None else pixels.astype(np.int64)
        self.index[self.pixels] = np.arange(len(self.pixels))
        self.dirty = False

    def indices(self, pixels: np.ndarray) -> np.ndarray:
        """Keypoint indices of ``pixels``, giving new pixels the next indices in first-seen order."""
        new = pixels[self.index[pixels] < 0]
        if len(new):
            _, first = np.unique(new, return_index=True)
            fresh = new[np.sort(first)]
            self.index[fresh] = np.arange(len(self.pixels), len(self.pixels) + len(fresh))
            self.pixels = np.concatenate([self.pixels, fresh])
            self.dirty = True
        return self.index[pixels]

    def coordinates(self) -> np.ndarray:
        """(N, 2) float32 keypoints in COLMAP's convention (original image, first pixel's centre at 0.5)."""
        width = self.entry.grid[0]
        xy = np.stack([self.pixels % width, self.pixels // width], axis=1).astype(np.float64)
        offset, scale = np.asarray(self.entry.offset, np.float64), np.asarray(self.entry.scale, np.float64)
        return ((xy + offset + 0.5) / scale).astype(np.float32)


class ColmapDatabase:
    """``DIR/database.db`` of one run (see the module docstring). :meth:`create` or :meth:`resume`, then
    :meth:`add_pair` per pair and :meth:`commit` now and then, then :meth:`close`."""

    def __init__(self, path: Path, images: Sequence[ImageEntry], connection: sqlite3.Connection) -> None:
        self.path = path
        self.images = list(images)
        self._db = connection
        self._keypoints = [_Keypoints(e) for e in self.images]
        self._pending: list[tuple[int, np.ndarray, np.ndarray]] = []
        self._lock = threading.RLock()
        for image_id, blob in self._db.execute("SELECT image_id, data FROM export_engine_pixels"):
            entry = self.images[image_id - 1]
            self._keypoints[image_id - 1] = _Keypoints(entry, np.frombuffer(blob, dtype=np.int32))

    @classmethod
    def create(
        cls, path: Path, images: Sequence[ImageEntry], camera_mode: str, run: Mapping[str, Any]
    ) -> ColmapDatabase:
        """A new database with every camera and image, built beside ``path`` and renamed into place."""
        cameras, owners = cameras_for(images, camera_mode)
        staging = path.with_name(f".{path.name}.partial")
        staging.unlink(missing_ok=True)
        try:
            with closing(sqlite3.connect(staging)) as db, db:
                db.executescript(_SCHEMA)
                for camera_id, (width, height, focal, known) in enumerate(cameras, 1):
                    params = np.array([focal, width / 2, height / 2, 0.0], dtype=np.float64)
                    db.execute("INSERT INTO cameras VALUES (?, ?, ?, ?, ?, ?)",
                               (camera_id, SIMPLE_RADIAL, width, height, params.tobytes(), int(known)))  # fmt: skip
                    db.execute("INSERT INTO rigs VALUES (?, ?, ?)", (camera_id, camera_id, CAMERA_SENSOR))
                for image_id, (entry, owner) in enumerate(zip(images, owners, strict=True), 1):
                    db.execute("INSERT INTO images VALUES (?, ?, ?)", (image_id, entry.name, owner + 1))
                    db.execute("INSERT INTO frames VALUES (?, ?)", (image_id, owner + 1))
                    db.execute("INSERT INTO frame_data VALUES (?, ?, ?, ?)",
                               (image_id, image_id, owner + 1, CAMERA_SENSOR))  # fmt: skip
                    db.execute("INSERT INTO keypoints VALUES (?, 0, 2, ?)", (image_id, b""))
                db.executemany("INSERT INTO export_engine_run VALUES (?, ?)",
                               [(k, json.dumps(v, sort_keys=True)) for k, v in run.items()])  # fmt: skip
            staging.replace(path)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        log.info("%s: %d images, %d cameras (%s)", path, len(images), len(cameras), camera_mode)
        return cls(path, images, _connect(path))

    @classmethod
    def resume(cls, path: Path, images: Sequence[ImageEntry], run: Mapping[str, Any]) -> ColmapDatabase:
        """Reopen the database of this same run (``run`` equal to what :meth:`create` stored), else refuse."""
        check_run(path, run)
        return cls(path, images, _connect(path))

    def done_pairs(self) -> set[int]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT pair_id FROM export_engine_pairs")}

    def add_pair(self, i: int, j: int, pixels1: np.ndarray, pixels2: np.ndarray, scores: np.ndarray) -> None:
        """Matches of images i < j (0-based, name order) as grid pixels of each, with their scores; stored at
        the next :meth:`commit`."""
        if not i < j:
            raise ValueError(f"pairs are (i, j) with i < j, got ({i}, {j})")
        with self._lock:
            found = np.stack([self._keypoints[i].indices(pixels1), self._keypoints[j].indices(pixels2)], axis=1)
            self._pending.append((pair_id(i + 1, j + 1), found.astype(np.uint32), np.asarray(scores, np.float32)))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def commit(self) -> None:
        """Write the pairs added since the last commit and the keypoints they added, in one transaction. When it
        fails, nothing of it is stored and the next commit writes it all again."""
        with self._lock:
            self._commit()

    def _commit(self) -> None:
        if not self._pending:
            return
        dirty = [(image_id, book) for image_id, book in enumerate(self._keypoints, 1) if book.dirty]
        try:
            self._write(dirty)
        except sqlite3.Error as err:
            raise ArtifactError(
                f"{self.path}: could not store {len(self._pending)} pairs ({err}); the pairs stored before are "
                "kept: run the same command again to match the rest"
            ) from err
        # clean only once the transaction is in: a COMMIT that fails (the database locked by a reader past the
        # busy timeout, a full disk) rolls the keypoints back too, and the next commit must write them again, else
        # it would store matches indexing keypoints the database does not hold
        for _, book in dirty:
            book.dirty = False
        self._pending.clear()

    def _write(self, dirty: Sequence[tuple[int, _Keypoints]]) -> None:
        with self._db:
            for image_id, book in dirty:
                xy = book.coordinates()
                self._db.execute("UPDATE keypoints SET rows = ?, cols = 2, data = ? WHERE image_id = ?",
                                 (len(xy), xy.tobytes(), image_id))  # fmt: skip
                self._db.execute("INSERT OR REPLACE INTO export_engine_pixels VALUES (?, ?)",
                                 (image_id, book.pixels.astype(np.int32).tobytes()))  # fmt: skip
            for pid, found, scores in self._pending:
                # a pair without matches gets its empty row too, as COLMAP's matcher writes it: COLMAP's
                # verification would otherwise try to match the pair itself, from descriptors there are none of
                self._db.execute("INSERT OR REPLACE INTO matches VALUES (?, ?, 2, ?)",
                                 (pid, len(found), found.tobytes()))  # fmt: skip
                self._db.execute("INSERT OR REPLACE INTO export_engine_pairs VALUES (?, ?, ?)",
                                 (pid, len(found), scores.tobytes()))  # fmt: skip

    def close(self) -> None:
        with self._lock:
            try:
                self._commit()
            finally:
                self._db.close()


def _connect(path: Path) -> sqlite3.Connection:
    # handed to the writer thread once, used only there; a reader (COLMAP's GUI, a script) holding the database
    # for a while makes a commit wait up to BUSY_TIMEOUT_S instead of failing the run
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
    db.execute("PRAGMA synchronous = NORMAL")
    return db


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def read_run(path: Path) -> dict[str, Any]:
    """The run fingerprint stored in a database; a database not written by match-many is refused."""
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT key, value FROM export_engine_run").fetchall()
    except sqlite3.DatabaseError as err:
        raise ArtifactError(
            f"{path} is not a database of an export-engine match-many run ({err}); it is left untouched: "
            "give another --out"
        ) from err
    return {key: json.loads(value) for key, value in rows}


def check_run(path: Path, run: Mapping[str, Any]) -> dict[str, Any]:
    """The run stored in ``path`` when it is ``run`` (every key equal), else ArtifactError; read-only."""
    stored = read_run(path)
    for key, value in run.items():
        if key not in stored or stored[key] != json.loads(json.dumps(value, sort_keys=True)):
            raise ArtifactError(
                f"{path} holds another run (its {key!r} differs: {_short(stored.get(key))} there, "
                f"{_short(value)} now); it is left untouched: give another --out, or remove it to start over"
            )
    return stored


@contextmanager
def reading(path: Path) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        yield db


def read_keypoints(db: sqlite3.Connection) -> dict[int, np.ndarray]:
    """image id -> (N, 2) float32 keypoints (COLMAP convention)."""
    return {
        image_id: np.frombuffer(data or b"", dtype=np.float32).reshape(rows, cols)[:, :2]
        for image_id, rows, cols, data in db.execute("SELECT image_id, rows, cols, data FROM keypoints")
    }


def read_matches(db: sqlite3.Connection) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """pair id -> ((M, 2) uint32 keypoint indices, (M,) float32 scores), for every pair done (M may be 0)."""
    found = {pid: np.frombuffer(data, np.uint32).reshape(rows, 2)
             for pid, rows, data in db.execute("SELECT pair_id, rows, data FROM matches")}  # fmt: skip
    empty = np.zeros((0, 2), np.uint32)
    return {
        pid: (found.get(pid, empty), np.frombuffer(scores, np.float32))
        for pid, _, scores in db.execute("SELECT pair_id, matches, scores FROM export_engine_pairs")
    }
