"""match-many --ray on a local Ray (CPU, two workers, the tiny MASt3R artifact): the database equals the
single-process one, a worker killed mid-run has its pairs redone, an interrupted run resumes, and --ray without
Ray says how to install it."""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from export_engine.cli import main
from export_engine.errors import BackendError, UsageError
from export_engine.families.mast3r.match import MatchConfig
from export_engine.sfm.distributed import chunks_of, groups_of, resident_after
from export_engine.sfm.run import MatchManyConfig, match_many
from export_engine.sfm.schedule import plan

# 7 images, complete: 21 pairs in chunks of one batch of 2 (11 chunks), so a killed worker has chunks left
CONFIG = MatchManyConfig(pairs="complete", match=MatchConfig(subsample=4), batch=2, encode_batch=2, workers=1,
                         hloc=False, ray_chunk=2)  # fmt: skip
TABLES = ("cameras", "images", "keypoints", "matches", "export_engine_pairs", "export_engine_pixels")


def _tables(database: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(database) as db:
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall()) for t in TABLES}


def test_chunks_are_whole_batches_and_groups_contiguous() -> None:
    order = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    chunks = chunks_of(order * 4, 4, 10)  # 60 pairs: at most 10 a chunk, in whole batches of 4
    assert [len(c) for c in chunks] == [8] * 7 + [4] and [p for c in chunks for p in c] == order * 4
    assert [len(c) for c in chunks_of(order, 2, 256, 2)] == [2] * 7 + [1]  # a few chunks a worker
    assert [list(g) for g in groups_of(5, 2)] == [[0, 1], [2, 3, 4]]
    assert [list(g) for g in groups_of(9, 2, 2)] == [[0, 1, 4, 5], [2, 3, 6, 7, 8]]  # rounds of 2 a worker
    steps = plan([(0, 1), (1, 2), (2, 3)], 2, 1)
    assert resident_after(steps, {}) == {2: 0, 3: 1}  # 0 and then 1 evicted, furthest next use first


def test_ray_missing_says_how_to_install(tiny_mast3r_artifact: Path, photos: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    real = builtins.__import__

    def no_ray(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    out = tmp_path / "out"
    argv = ["match-many", str(tiny_mast3r_artifact), str(photos), "--out", str(out), "--ray", "--no-hloc", "--quiet"]
    assert main(argv) == BackendError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'export-engine[ray]'" in err[0]
    assert not out.exists()  # refused before any work


def test_ray_refuses_retrieval_before_any_work(tiny_mast3r_artifact: Path, photos: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="Ray (the [ray] extra) is checked first")
    with pytest.raises(UsageError, match="--ray takes complete"):
        match_many(tiny_mast3r_artifact, [photos], tmp_path / "out", replace(CONFIG, pairs="retrieval:2", ray="local"))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    ray = pytest.importorskip("ray", reason="Ray (the [ray] extra) runs the workers")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # not a Ray running here
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def single(tiny_mast3r_artifact: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    match_many(tiny_mast3r_artifact, [photos], out, CONFIG)
    return out / "database.db"


def test_ray_database_equals_single_process_with_a_worker_killed(local_ray: Any, single: Path,
                                                                 tiny_mast3r_artifact: Path, photos: Path,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    killed: list[str] = []

    def kill_second_worker(matches: int) -> None:
        if not killed:  # after the first pair is written: the second worker still has chunks queued
            name = next(n for n in local_ray.util.list_named_actors() if n.endswith("-1"))
            local_ray.kill(local_ray.get_actor(name))
            killed.append(name)

    report = match_many(tiny_mast3r_artifact, [photos], tmp_path / "out", replace(CONFIG, ray="local"),
                        on_pair=kill_second_worker)  # fmt: skip
    assert killed and report.workers is not None and report.workers["w1"]["lost"] == 1
    assert report.requeued > 0 and report.computed == report.pairs == 21
    assert _tables(tmp_path / "out" / "database.db") == _tables(single)
    assert "1 lost" in report.text() and "pairs/s" in report.text()


def test_ray_run_interrupted_resumes_into_the_same_database(local_ray: Any, single: Path,
                                                            tiny_mast3r_artifact: Path, photos: Path,
                                                            tmp_path: Path) -> None:  # fmt: skip
    seen: list[int] = []

    def stop_after_five(matches: int) -> None:
        seen.append(matches)
        if len(seen) == 5:
            raise KeyboardInterrupt

    config = replace(CONFIG, ray="local", commit_seconds=0.0)
    with pytest.raises(KeyboardInterrupt):
        match_many(tiny_mast3r_artifact, [photos], tmp_path / "out", config, on_pair=stop_after_five)
    report = match_many(tiny_mast3r_artifact, [photos], tmp_path / "out", config)
    assert (report.resumed, report.computed) == (5, 16)  # pairs already in the database are not sent
    assert _tables(tmp_path / "out" / "database.db") == _tables(single)
