"""match-many end to end on the tiny MASt3R artifact (CPU): outputs COLMAP and hloc read, evictions,
retrieval, a run killed mid-way and resumed, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export_engine.cli import main
from export_engine.errors import UsageError
from export_engine.families.mast3r.match import MatchConfig
from export_engine.sfm.hloc import pair_key
from export_engine.sfm.run import MatchManyConfig, match_many

pycolmap = pytest.importorskip("pycolmap", reason="pycolmap (the [sfm] extra) reads the database back")
h5py = pytest.importorskip("h5py", reason="h5py (the [sfm] extra) writes hloc's files")

SRC = Path(__file__).resolve().parents[2] / "src"
CONFIG = MatchManyConfig(pairs="swin:2", match=MatchConfig(subsample=4), batch=3, encode_batch=2, workers=2)


@pytest.fixture(scope="module")
def finished(tiny_mast3r_artifact: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    argv = ["match-many", str(tiny_mast3r_artifact), str(photos), "--pairs", "swin:2", "--out", str(out),
            "--subsample", "4", "--batch", "3", "--encode-batch", "2", "--workers", "2", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    return out


def _tables(database: Path) -> dict[str, list[tuple]]:
    tables = ("cameras", "rigs", "frames", "frame_data", "images", "keypoints", "matches", "export_engine_pairs",
              "export_engine_pixels", "export_engine_run")  # fmt: skip
    with sqlite3.connect(database) as db:
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall()) for t in tables}


def test_colmap_and_hloc_read_consistent_ids_and_counts(finished: Path, photos: Path) -> None:
    names = ["im0.jpg", "im1.jpg", "im2.jpg", "im3.jpg", "im4.jpg", "sub/turned.jpg", "z.png"]
    lines = (finished / "pairs.txt").read_text().splitlines()
    assert lines[:3] == ["im0.jpg im1.jpg", "im0.jpg im2.jpg", "im1.jpg im2.jpg"] and len(lines) == 11
    with pycolmap.Database.open(str(finished / "database.db")) as db, \
            h5py.File(finished / "features.h5") as features, h5py.File(finished / "matches.h5") as matches:  # fmt: skip
        images = {image.name: image for image in db.read_all_images()}
        assert sorted(images) == names and [images[n].image_id for n in names] == list(range(1, 8))
        turned = db.read_camera(images["sub/turned.jpg"].camera_id)
        assert (turned.width, turned.height) == (128, 192)  # EXIF orientation applied
        first = db.read_camera(images["im0.jpg"].camera_id)
        assert first.has_prior_focal_length and first.params[0] == pytest.approx(28 / 36 * 192)
        total = 0
        for line in lines:
            a, b = line.split()
            found = db.read_matches(images[a].image_id, images[b].image_id)
            kp_a, kp_b = db.read_keypoints(images[a].image_id), db.read_keypoints(images[b].image_id)
            assert len(found) > 0 and found[:, 0].max() < len(kp_a) and found[:, 1].max() < len(kp_b)
            assert len(np.unique(found[:, 0])) == len(found)  # one match per keypoint of a pair
            group = matches[pair_key(a, b)]
            matches0 = group["matches0"][()]
            assert len(matches0) == len(kp_a) and (matches0 >= 0).sum() == len(found)
            np.testing.assert_array_equal(matches0[found[:, 0]], found[:, 1])
            assert (group["matching_scores0"][()][found[:, 0]] > 0).all()
            total += len(found)
        assert db.num_matches() == total
        for name in names:
            kp = db.read_keypoints(images[name].image_id)
            assert len(np.unique(kp, axis=0)) == len(kp)  # one keypoint per pixel across all pairs
            camera = db.read_camera(images[name].camera_id)
            assert (kp >= 0).all() and (kp[:, 0] <= camera.width).all() and (kp[:, 1] <= camera.height).all()
            np.testing.assert_allclose(features[name]["keypoints"][()], kp - 0.5)  # hloc: pixel centres at 0
            assert tuple(features[name]["image_size"][()]) == (camera.width, camera.height)


def _matches_by_pair(out: Path) -> dict[tuple[str, str], set]:
    """Each pair's matches as sets of (x1, y1, x2, y2) in original coordinates (independent of keypoint order)."""
    with pycolmap.Database.open(str(out / "database.db")) as db:
        images = {i.name: i.image_id for i in db.read_all_images()}
        result = {}
        for line in (out / "pairs.txt").read_text().splitlines():
            a, b = line.split()
            kp_a, kp_b = db.read_keypoints(images[a]), db.read_keypoints(images[b])
            found = db.read_matches(images[a], images[b])
            result[a, b] = {(*kp_a[i], *kp_b[j]) for i, j in found}
    return result


def test_more_matcher_threads_write_the_same_database(tiny_mast3r_artifact: Path, photos: Path, finished: Path,
                                                      tmp_path: Path) -> None:  # fmt: skip
    """Matcher threads finish batches in any order; the writer stores pairs in the plan's order, so keypoint ids
    and the whole database are those of the one-thread run."""
    out = tmp_path / "threads"
    argv = ["match-many", str(tiny_mast3r_artifact), str(photos), "--pairs", "swin:2", "--out", str(out),
            "--subsample", "4", "--batch", "3", "--encode-batch", "2", "--workers", "2", "--matchers", "3",
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert _tables(out / "database.db") == _tables(finished / "database.db")


def test_matchers_below_one_are_refused() -> None:
    with pytest.raises(UsageError, match="--matchers must be >= 1"):
        MatchManyConfig(matchers=0)


def test_the_writer_stores_pairs_in_the_plans_order_whatever_order_they_come_in() -> None:
    import queue
    import random
    import threading

    from export_engine.sfm.executor import Executor
    from export_engine.sfm.stages import Stages

    class Sink:
        def __init__(self) -> None:
            self.added: list[tuple[int, int]] = []

        def add_pair(self, i: int, j: int, *rest: object) -> None:
            self.added.append((i, j))

        def commit(self) -> None:
            pass

    sizes = [3, 1, 4, 2]  # pairs per batch
    items = [(seq, b, n, (seq, b, np.zeros(b), np.zeros(b), np.zeros(b, np.float32)))
             for seq, n in enumerate(sizes) for b in range(n)]  # fmt: skip
    random.Random(3).shuffle(items)
    matched: queue.Queue = queue.Queue()
    for item in [*items, None]:
        matched.put(item)
    executor = Executor.__new__(Executor)  # the writer needs only its stop flag and stages
    executor._stop, executor.stages = threading.Event(), Stages()
    sink = Sink()
    executor._write_loop(matched, sink, lambda _: None, commit_seconds=60.0)
    assert sink.added == [(seq, b) for seq, n in enumerate(sizes) for b in range(n)]
    assert executor.stages.pairs == sum(sizes)


def test_evicted_images_are_encoded_again_with_the_same_matches(tiny_mast3r_artifact: Path, photos: Path,
                                                                finished: Path, tmp_path: Path) -> None:  # fmt: skip
    config = MatchManyConfig(**{**CONFIG.__dict__, "pairs": "complete", "token_slots": 4, "batch": 2})
    small = match_many(tiny_mast3r_artifact, [photos], tmp_path / "small", config)
    assert small.token_slots == 4 and small.encodes > 7 and small.computed == 21
    full = _matches_by_pair(finished)
    assert {k: v for k, v in _matches_by_pair(tmp_path / "small").items() if k in full} == full


def test_retrieval_pairs_from_the_encoder_pass(tiny_mast3r_artifact: Path, photos: Path, tmp_path: Path) -> None:
    config = MatchManyConfig(**{**CONFIG.__dict__, "pairs": "retrieval:2", "hloc": False})
    report = match_many(tiny_mast3r_artifact, [photos], tmp_path / "r", config)
    assert 7 <= report.pairs <= 14 and report.encodes == 7  # every image once: the retrieval pass kept them
    again = match_many(tiny_mast3r_artifact, [photos], tmp_path / "r", config)  # resumed: pairs from the database
    assert again.computed == 0 and again.resumed == report.pairs


_KILLER = """
import os, signal, sys
from pathlib import Path
from export_engine.families.mast3r.match import MatchConfig
from export_engine.sfm.run import MatchManyConfig, match_many
config = MatchManyConfig(pairs="swin:2", match=MatchConfig(subsample=4), batch=3, encode_batch=2, workers=2,
                         commit_seconds=0.0)
stored = []
def kill_after_five(matches):
    stored.append(matches)
    if len(stored) == 5:
        os.kill(os.getpid(), signal.SIGKILL)
match_many(Path(sys.argv[1]), [Path(sys.argv[2])], Path(sys.argv[3]), config, on_pair=kill_after_five)
"""


def test_killed_run_resumes_to_the_uninterrupted_database(tiny_mast3r_artifact: Path, photos: Path,
                                                          finished: Path, tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    killed = subprocess.run([sys.executable, "-c", _KILLER, str(tiny_mast3r_artifact), str(photos), str(out)],
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    with sqlite3.connect(out / "database.db") as db:
        assert db.execute("SELECT COUNT(*) FROM export_engine_pairs").fetchone()[0] == 5  # committed per pair
    assert not (out / "features.h5").exists()
    resumed = match_many(tiny_mast3r_artifact, [photos], out, CONFIG)
    assert (resumed.computed, resumed.resumed) == (6, 5)
    assert _tables(out / "database.db") == _tables(finished / "database.db")


def test_interrupted_run_keeps_the_pairs_done(tiny_mast3r_artifact: Path, photos: Path, tmp_path: Path) -> None:
    def interrupt(matches: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        match_many(tiny_mast3r_artifact, [photos], tmp_path / "out", CONFIG, on_pair=interrupt)
    with sqlite3.connect(tmp_path / "out" / "database.db") as db:
        done = db.execute("SELECT COUNT(*) FROM export_engine_pairs").fetchone()[0]
        stored = db.execute("SELECT COUNT(*) FROM matches").fetchone()[0]
    assert done == stored == 1  # the first pair, committed as the writer stopped


def _fail(argv: list[str], code: int, capsys: pytest.CaptureFixture, needle: str) -> None:
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_bad_input_gets_one_line_and_leaves_the_database(
    tiny_mast3r_artifact: Path, photos: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    art = str(tiny_mast3r_artifact)
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = (out / "database.db").read_bytes()
    common = ["--out", str(out), "--quiet", "--subsample", "4"]
    unreadable = tmp_path / "broken"
    shutil.copytree(photos, unreadable)
    (unreadable / "im3.jpg").write_bytes(b"\xff\xd8 truncated")
    _fail(["match-many", art, str(unreadable), *common], 4, capsys, "im3.jpg could not be read")
    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copy(photos / "im1.jpg", twin / "im1.jpg")
    _fail(["match-many", art, str(photos / "im1.jpg"), str(twin / "im1.jpg"), *common], 4, capsys,
          "two images are named 'im1.jpg'")  # fmt: skip
    (tmp_path / "empty").mkdir()
    _fail(["match-many", art, str(tmp_path / "empty"), *common], 4, capsys, "0 image(s) found")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("im0.jpg im1.jpg\nim0.jpg gone.jpg\n")
    _fail(["match-many", art, str(photos), "--pairs", str(pairs), *common], 2, capsys, "gone.jpg (line 2)")
    other = tmp_path / "fastsam3d"
    shutil.copytree(tiny_mast3r_artifact, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "model": "fastsam3d"}))
    _fail(["match-many", str(other), str(photos), *common], 2, capsys, "needs a mast3r artifact")
    _fail(["match-many", art, str(photos), "--pairs", "swin:3", *common], 9, capsys, "holds another run")
    _fail(["match-many", art, str(photos), "--pairs", "swin:2", "--camera-mode", "rig", *common], 2, capsys,
          "--camera-mode 'rig'")  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:  # pycolmap not installed: "import pycolmap" fails
        patch.setitem(sys.modules, "pycolmap", None)
        _fail(["match-many", art, str(photos), "--pairs", "swin:2", "--verify", *common], 8, capsys,
              "--verify needs pycolmap: pip install 'export-engine[sfm]'")  # fmt: skip
    assert (out / "database.db").read_bytes() == before


def test_too_few_token_slots_are_refused_before_any_work(
    tiny_mast3r_artifact: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the artifact was loaded")

    monkeypatch.setattr("export_engine.runtime.session.load", no_load)
    out = tmp_path / "out"
    argv = ["match-many", str(tiny_mast3r_artifact), str(photos), "--out", str(out), "--quiet", "--subsample", "4",
            "--batch", "3", "--token-slots", "2"]  # fmt: skip
    _fail(argv, 2, capsys, "--token-slots 2 cannot hold the images of one batch of 3 pairs: give --token-slots 6")
    assert not out.exists()


def test_the_database_holds_what_matcher_match_finds(tiny_mast3r_artifact: Path, photos: Path, finished: Path) -> None:
    """Batched decoder, token pool and matcher thread give the pair-by-pair API's matches, in original pixels."""
    from export_engine.families.mast3r.match import Matcher
    from export_engine.runtime.session import load

    matcher = Matcher(load(tiny_mast3r_artifact), MatchConfig(subsample=4))
    stored = _matches_by_pair(finished)
    for a, b in [("im0.jpg", "im1.jpg"), ("im3.jpg", "sub/turned.jpg"), ("sub/turned.jpg", "z.png")]:
        result = matcher.match(photos / a, photos / b)
        both = np.concatenate([result.xy1_original, result.xy2_original], axis=1) + 0.5  # COLMAP's convention
        expected = {tuple(np.round(m, 2)) for m in both.astype(np.float32).astype(np.float64)}
        got = {tuple(np.round(np.asarray(m, np.float64), 2)) for m in stored[a, b]}
        assert got == expected and len(expected) > 10


def test_matcher_threads_default_to_three_on_a_gpu_and_one_on_the_cpu() -> None:
    from export_engine.sfm.executor import matcher_threads

    assert MatchManyConfig().matchers is None
    assert (matcher_threads(None, True), matcher_threads(None, False)) == (3, 1)
    assert (matcher_threads(3, False), matcher_threads(1, True)) == (3, 1)
