"""The COLMAP database writer, read back by pycolmap: ids, counts, coordinates, and COLMAP's own geometric
verification of a synthetic plane seen under known homographies."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from export_engine.errors import ArtifactError
from export_engine.sfm import database
from export_engine.sfm.database import ColmapDatabase, ImageEntry, cameras_for, check_run, pair_id

pycolmap = pytest.importorskip("pycolmap", reason="pycolmap (the [sfm] extra) reads the database back")

SIZE = (640, 480)


def _entry(name: str, focal: float | None = None, grid: tuple[int, int] = SIZE) -> ImageEntry:
    scale = (grid[0] / SIZE[0], grid[1] / SIZE[1])
    return ImageEntry(name, SIZE, focal, grid, scale, (0, 0))


def test_pycolmap_reads_ids_counts_cameras_and_keypoints(tmp_path: Path) -> None:
    images = [_entry("a.jpg", 500.0, (64, 48)), _entry("sub/b.jpg", None, (64, 48)), _entry("c.jpg", None, (64, 48))]
    path = tmp_path / "database.db"
    db = ColmapDatabase.create(path, images, "per-image", {"run": 1})
    db.add_pair(0, 1, np.array([0, 65, 65, 130]), np.array([3, 3, 4, 5]), np.ones(4))  # pixel 65 twice in a
    db.add_pair(1, 2, np.array([4, 7]), np.array([9, 9]), np.full(2, 0.5))  # b's pixel 4 is keypoint 1 again
    db.add_pair(0, 2, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))  # done, nothing matched
    db.close()
    with pycolmap.Database.open(str(path)) as read:
        assert read.num_images() == 3 and read.num_cameras() == 3 and read.num_frames() == 3
        assert [i.name for i in read.read_all_images()] == ["a.jpg", "sub/b.jpg", "c.jpg"]
        assert [read.num_keypoints_for_image(i) for i in (1, 2, 3)] == [3, 4, 1]
        np.testing.assert_array_equal(read.read_matches(1, 2), [[0, 0], [1, 0], [1, 1], [2, 2]])
        np.testing.assert_array_equal(read.read_matches(2, 3), [[1, 0], [3, 0]])
        np.testing.assert_array_equal(read.read_matches(3, 2), [[0, 1], [0, 3]])  # swapped for the other order
        assert read.exists_matches(1, 3) and len(read.read_matches(1, 3)) == 0  # an empty row, as COLMAP's own
        # grid (64, 48) on a 640x480 image: pixel 65 = (x 1, y 1) -> (1 + 0.5) * 10 = 15 in COLMAP coordinates
        np.testing.assert_allclose(read.read_keypoints(1), [[5, 5], [15, 15], [25, 25]])
        camera = read.read_camera(1)
        assert camera.model.name == "SIMPLE_RADIAL" and camera.has_prior_focal_length
        np.testing.assert_allclose(camera.params, [500.0, 320.0, 240.0, 0.0])
        assert not read.read_camera(2).has_prior_focal_length and read.read_camera(2).params[0] == 1.2 * 640
    with sqlite3.connect(path) as raw:
        done = {row[0] for row in raw.execute("SELECT pair_id FROM export_engine_pairs")}
    assert done == {pair_id(1, 2), pair_id(2, 3), pair_id(1, 3)} and pair_id(3, 1) == pair_id(1, 3)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.jpg sub/b.jpg\na.jpg c.jpg\nsub/b.jpg c.jpg\n")
    pycolmap.verify_matches(str(path), str(pairs), pycolmap.TwoViewGeometryOptions())  # the empty pair included
    with pycolmap.Database.open(str(path)) as read:
        assert read.exists_two_view_geometry(1, 3) and len(read.read_two_view_geometry(1, 3).inlier_matches) == 0


def test_camera_modes() -> None:
    images = [_entry("a.jpg", 500.0), _entry("b.jpg", 500.0), _entry("c.jpg")]
    assert cameras_for(images, "auto")[1] == [0, 0, 1]
    assert cameras_for(images, "single")[1] == [0, 0, 0]
    assert cameras_for(images, "per-image")[1] == [0, 1, 2]


def test_another_runs_database_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "database.db"
    ColmapDatabase.create(path, [_entry("a.jpg"), _entry("b.jpg")], "per-image", {"pairs": "swin:3"}).close()
    before = path.read_bytes()
    assert check_run(path, {"pairs": "swin:3"})["pairs"] == "swin:3"
    with pytest.raises(ArtifactError, match=r"holds another run.*'pairs' differs"):
        check_run(path, {"pairs": "complete"})
    foreign = tmp_path / "colmap.db"
    with sqlite3.connect(foreign) as raw:
        raw.execute("CREATE TABLE cameras (camera_id INTEGER)")
    with pytest.raises(ArtifactError, match="not a database of an export-engine match-many run"):
        check_run(foreign, {"pairs": "swin:3"})
    assert path.read_bytes() == before


def _homography(k: int) -> np.ndarray:
    """A plane seen from another viewpoint: rotation about the optical axis, scale, shift and perspective."""
    angle, scale = 0.05 * k, 1.0 - 0.04 * k
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, -s, 12.0 * k], [s, c, -7.0 * k], [2e-5 * k, -1.5e-5 * k, 1.0]])


def test_colmap_verification_recovers_the_inliers_of_a_plane(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [_entry(f"plane{k}.jpg", 600.0) for k in range(3)]
    path = tmp_path / "database.db"
    db = ColmapDatabase.create(path, images, "per-image", {"run": "plane"})
    truth = {}
    for i, j in ((0, 1), (0, 2), (1, 2)):
        xy = rng.uniform([40, 40], [600, 440], size=(400, 2))
        h = _homography(j) @ np.linalg.inv(_homography(i))  # image i -> plane -> image j
        mapped = np.c_[xy, np.ones(len(xy))] @ h.T
        xy2 = mapped[:, :2] / mapped[:, 2:]
        inside = (xy2 >= 0).all(1) & (xy2[:, 0] < SIZE[0]) & (xy2[:, 1] < SIZE[1])
        xy, xy2 = xy[inside], xy2[inside]
        outliers = rng.permutation(len(xy)) < len(xy) // 5  # a fifth of the matches point elsewhere
        xy2[outliers] = rng.uniform([0, 0], [639, 479], size=(int(outliers.sum()), 2))
        px1 = np.round(xy - 0.5).astype(np.int64)  # keypoints are pixels; centre of pixel (x, y) is x + 0.5
        px2 = np.clip(np.round(xy2 - 0.5).astype(np.int64), 0, [639, 479])
        keep = np.unique(px1[:, 1] * 640 + px1[:, 0], return_index=True)[1]
        px1, px2, outliers = px1[keep], px2[keep], outliers[keep]
        db.add_pair(i, j, px1[:, 1] * 640 + px1[:, 0], px2[:, 1] * 640 + px2[:, 0], np.ones(len(px1)))
        truth[(i, j)] = (len(px1), ~outliers)
    db.close()
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("plane0.jpg plane1.jpg\nplane0.jpg plane2.jpg\nplane1.jpg plane2.jpg\n")
    pycolmap.verify_matches(str(path), str(pairs), pycolmap.TwoViewGeometryOptions())
    with pycolmap.Database.open(str(path)) as read:
        assert read.num_verified_image_pairs() == 3
        for (i, j), (count, inlier) in truth.items():
            geometry = read.read_two_view_geometry(i + 1, j + 1)
            found = read.read_matches(i + 1, j + 1)
            assert len(found) == count
            verified = {tuple(m) for m in geometry.inlier_matches}
            recovered = np.array([tuple(m) in verified for m in found])
            assert (recovered & inlier).sum() >= 0.95 * inlier.sum()  # the plane's matches are kept
            assert (recovered & ~inlier).sum() <= 0.15 * (~inlier).sum()  # most others are not (F admits a line)
            assert int(geometry.config) not in (0, 1)  # neither UNDEFINED nor DEGENERATE


def _look_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """World-to-camera rotation of a camera at ``position`` looking at ``target`` (y down, as COLMAP's)."""
    forward = (target - position) / np.linalg.norm(target - position)
    right = np.cross(forward, [0.0, -1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward])


def test_colmap_mapper_reconstructs_a_scene_from_the_database(tmp_path: Path) -> None:
    from export_engine.sfm.colmap import reconstruct, verify

    rng = np.random.default_rng(1)
    points = rng.uniform([-2, -1.5, 5], [2, 1.5, 9], size=(600, 3))  # a volume of points, not a plane
    centre = points.mean(0)
    images = [_entry(f"view{k}.jpg", 500.0) for k in range(5)]
    pixels: list[dict[int, int]] = []  # image -> {point: pixel id}, points that land alone on a visible pixel
    for k in range(5):
        position = np.array([-1.0 + 0.5 * k, 0.1 * k, 0.0])
        rotation = _look_at(position, centre)
        cam = (points - position) @ rotation.T
        uv = 500.0 * cam[:, :2] / cam[:, 2:] + [320.0, 240.0]  # COLMAP pixel coordinates (centres at +0.5)
        px = np.floor(uv).astype(np.int64)  # the pixel containing the projection
        visible = (cam[:, 2] > 0) & (px >= 0).all(1) & (px[:, 0] < 640) & (px[:, 1] < 480)
        ids = px[:, 1] * 640 + px[:, 0]
        unique, counts = np.unique(ids[visible], return_counts=True)
        alone = visible & np.isin(ids, unique[counts == 1])
        pixels.append({int(p): int(ids[p]) for p in np.flatnonzero(alone)})
    path = tmp_path / "database.db"
    db = ColmapDatabase.create(path, images, "single", {"run": "scene"})
    lines = []
    for i in range(5):
        for j in range(i + 1, 5):
            shared = sorted(set(pixels[i]) & set(pixels[j]))
            db.add_pair(i, j, np.array([pixels[i][p] for p in shared]), np.array([pixels[j][p] for p in shared]),
                        np.ones(len(shared)))  # fmt: skip
            lines.append(f"view{i}.jpg view{j}.jpg\n")
    db.close()
    (tmp_path / "pairs.txt").write_text("".join(lines))
    assert verify(path, tmp_path / "pairs.txt") == 10
    reconstruct(path, tmp_path, tmp_path / "sparse")
    model = pycolmap.Reconstruction(str(tmp_path / "sparse" / "0"))
    assert model.num_reg_images() == 5 and model.num_points3D() > 300
    assert model.compute_mean_reprojection_error() < 1.0


def test_a_failed_commit_is_written_whole_by_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader holding the database past the busy timeout fails a commit; the retry stores every keypoint the
    stored matches index, and the pairs it records as done are complete."""
    monkeypatch.setattr(database, "BUSY_TIMEOUT_S", 0.05)
    images = [_entry(name, None, (64, 48)) for name in ("a.jpg", "b.jpg", "c.jpg")]
    path = tmp_path / "database.db"
    db = ColmapDatabase.create(path, images, "per-image", {"run": 1})
    db.add_pair(0, 1, np.array([0, 65, 130]), np.array([3, 4, 5]), np.ones(3))
    db.add_pair(1, 2, np.array([4, 7]), np.array([9, 10]), np.ones(2))
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM keypoints").fetchall()  # a shared lock: the writer cannot commit
    with pytest.raises(ArtifactError, match=r"could not store 2 pairs .*database is locked.*run the same command"):
        db.commit()
    reader.execute("COMMIT")
    reader.close()
    db.add_pair(0, 2, np.array([0, 1]), np.array([7, 8]), np.ones(2))
    db.close()
    with pycolmap.Database.open(str(path)) as read:
        assert [read.num_keypoints_for_image(i) for i in (1, 2, 3)] == [4, 4, 4]
        for first, second, count in [(1, 2, 3), (2, 3, 2), (1, 3, 2)]:
            found = read.read_matches(first, second)
            assert len(found) == count
            assert found[:, 0].max() < read.num_keypoints_for_image(first)
            assert found[:, 1].max() < read.num_keypoints_for_image(second)
        np.testing.assert_allclose(read.read_keypoints(1), [[5, 5], [15, 15], [25, 25], [15, 5]])
