"""``export-engine match-many``: match an image collection with a MASt3R artifact into COLMAP and hloc files.

    report = match_many("mast3r-hybrid-512x384", ["photos/"], Path("out"), MatchManyConfig(pairs="swin:10"))

Everything that can be wrong with the input is found before any work: the artifact's model, every image
(readable, names unique, at least two), a --token-slots too small for one batch, the pair strategy and every
name a pairs file gives, the camera mode, the optional tools (pycolmap, h5py) that were asked for, and an
existing ``DIR/database.db`` (resumed when it holds this same run, else refused and left untouched). Then the
images are encoded once each and the pairs decoded and matched in batches (:mod:`export_engine.sfm.executor`),
written to ``DIR/database.db`` as they complete; ``DIR/pairs.txt`` first, hloc's ``features.h5`` /
``matches.h5`` at the end, then optionally COLMAP's geometric verification and incremental mapper.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from export_engine.artifacts.store import read_manifest
from export_engine.errors import UsageError
from export_engine.families.mast3r.images import fit
from export_engine.families.mast3r.match import MatchConfig
from export_engine.progress import peak_rss_gib
from export_engine.sfm import colmap, distributed, hloc
from export_engine.sfm.collection import CollectionImage, list_images
from export_engine.sfm.database import (
    ColmapDatabase,
    ImageEntry,
    cameras_for,
    check_run,
    pair_id,
    read_run,
    reading,
)
from export_engine.sfm.executor import GIB, Executor, load_for_matching
from export_engine.sfm.pairs import PairStrategy, parse_strategy, select_pairs
from export_engine.sfm.schedule import encodes, order_for_reuse, plan

log = logging.getLogger(__name__)

DATABASE = "database.db"
PROGRESS_SECONDS = 2.0


@dataclass(frozen=True)
class MatchManyConfig:
    pairs: str = "swin:10"  # a strategy (see export_engine.sfm.pairs) or a pairs file
    match: MatchConfig = field(default_factory=MatchConfig)  # subsample, border, min_desc_conf, recorded
    camera_mode: str = "per-image"  # per-image | single | auto (one camera per distinct size and focal)
    gpu_memory: float | None = None  # GiB for the whole run on CUDA (default 3/4 of free); host GiB on the CPU
    batch: int = 16  # pairs per decoder run
    encode_batch: int = 16  # images per encoder run
    token_slots: int | None = None  # keep at most this many images' tokens (default: what gpu_memory holds)
    workers: int = 8  # image-decoding threads
    matchers: int | None = None  # matcher threads, each with its own recorded matcher and stream (None: 3 on a GPU)
    hloc: bool = True  # features.h5 + matches.h5 (needs h5py)
    verify: bool = False  # COLMAP two-view geometric verification (needs pycolmap)
    reconstruct: bool = False  # COLMAP incremental mapper into DIR/sparse (needs pycolmap)
    commit_seconds: float = 1.0
    ray: str | None = None  # match on Ray workers: "local" (a Ray started here), "auto" or a cluster address
    ray_workers: int | None = None  # Ray workers (default: one per GPU of the cluster, else 2 on the CPU)
    ray_chunk: int = 256  # pairs sent to a Ray worker at a time (whole batches): what a lost worker redoes

    def __post_init__(self) -> None:
        if min(self.batch, self.encode_batch, self.workers, 1 if self.matchers is None else self.matchers) < 1:
            raise UsageError(f"--batch, --encode-batch, --workers and --matchers must be >= 1, got {self.batch}, "
                             f"{self.encode_batch}, {self.workers}, {self.matchers}")  # fmt: skip
        if self.match.subsample < 1:
            raise UsageError("--subsample must be at least 1")
        if self.token_slots is not None and self.token_slots < 2:
            raise UsageError(f"--token-slots must be at least 2, got {self.token_slots}")
        if self.gpu_memory is not None and self.gpu_memory <= 0:
            raise UsageError(f"--gpu-memory must be a positive number of GiB, got {self.gpu_memory}")
        if self.ray_workers is not None and self.ray_workers < 1:
            raise UsageError(f"--ray-workers must be at least 1, got {self.ray_workers}")


@dataclass
class MatchManyReport:
    out: Path
    images: int
    pairs: int
    computed: int  # pairs matched by this run
    resumed: int  # pairs already in the database
    matches: int  # matches of the pairs of this run
    encodes: int  # encoder runs per image (more than the images when tokens were evicted and encoded again)
    token_slots: int
    seconds: float
    stages: dict[str, float]
    peak_gpu_gib: float | None  # device memory used above the start, at its highest (None: CPU)
    peak_host_gib: float
    verified: int | None = None
    workers: dict[str, dict[str, float]] | None = None  # Ray workers: pairs, pairs/s, encodes, lost (0 / 1)
    requeued: int = 0  # pairs sent again to another Ray worker after theirs was lost

    @property
    def pairs_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "out": str(self.out), "pairs_per_second": round(self.pairs_per_second, 2)}

    def text(self) -> str:
        per_pair = self.matches / self.computed if self.computed else 0.0
        stages = ", ".join(f"{k} {v:.2f}" for k, v in self.stages.items())
        memory = f"peak host {self.peak_host_gib:.2f} GiB"
        if self.peak_gpu_gib is not None:
            memory += f", peak GPU {self.peak_gpu_gib:.2f} GiB"
        return (
            f"{self.out}: {self.images} images, {self.pairs} pairs ({self.computed} matched now, {self.resumed} "
            f"resumed), {per_pair:.0f} matches/pair, {self.pairs_per_second:.1f} pairs/s over {self.seconds:.1f} s; "
            f"{self.encodes} encodes into {self.token_slots} token slots; stage seconds: {stages}; {memory}"
            + (f"; {self.verified} pairs verified" if self.verified is not None else "")
            + (f"; Ray workers: {self._workers_text()}" if self.workers else "")
        )

    def _workers_text(self) -> str:
        parts = [f"{name} {w['pairs']:.0f} pairs at {w['pairs_per_second']:.1f} pairs/s, {w['encodes']:.0f} encodes"
                 + (" (lost)" if w["lost"] else "") for name, w in (self.workers or {}).items()]  # fmt: skip
        lost = sum(1 for w in (self.workers or {}).values() if w["lost"])
        return ", ".join(parts) + (f"; {lost} lost, {self.requeued} pairs sent again" if lost else "")


def match_many(artifact: str | Path, inputs: Sequence[str | Path], out: Path, config: MatchManyConfig,
               on_pair: Callable[[int], None] | None = None) -> MatchManyReport:  # fmt: skip
    """Match the collection ``inputs`` (folders and/or files) into ``out`` (see the module docstring).
    ``on_pair(matches)`` is called from the writer thread after each stored pair (it may raise to stop)."""
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    if manifest.get("model") != "mast3r":
        raise UsageError(f"{artifact} is a {manifest.get('model')} artifact; match-many needs a mast3r artifact")
    strategy = parse_strategy(config.pairs)
    if config.verify or config.reconstruct:
        colmap.pycolmap_module("--verify" if config.verify else "--reconstruct")
    if config.hloc:
        hloc.h5py_module()
    if config.ray is not None:
        distributed.ray_module()
    images = list_images(inputs)
    _check_token_slots(config, len(images))
    names = [image.name for image in images]
    width, height = _resolution(manifest)
    entries = [_entry(image, width, height) for image in images]
    cameras_for(entries, config.camera_mode)
    run = _fingerprint(artifact, entries, strategy, config)
    database_path = out / DATABASE
    pairs = None if strategy.needs_descriptors else select_pairs(strategy, names)  # a pairs file's names checked
    if database_path.exists():
        stored = check_run(database_path, run)
        pairs = [tuple(p) for p in stored["pair_list"]]  # retrieval's pairs without the retrieval pass
        log.info("%s holds this run: resuming", database_path)
    if pairs is None and config.ray is not None:
        raise UsageError(f"--pairs {config.pairs} needs an encoder pass over every image before the pairs are known; "
                         "--ray takes complete, swin, logwin or a pairs file")  # fmt: skip
    return _execute(artifact, images, entries, out, config, run, pairs, strategy, on_pair)


def _execute(artifact: Path, images: Sequence[CollectionImage], entries: Sequence[ImageEntry], out: Path,
             config: MatchManyConfig, run: dict[str, Any], pairs: list[Any] | None, strategy: PairStrategy,
             on_pair: Callable[[int], None] | None) -> MatchManyReport:  # fmt: skip
    started = time.perf_counter()
    database_path = out / DATABASE
    if pairs is not None and database_path.exists() and _done_before(database_path) >= {_pid(p) for p in pairs}:
        log.info("%s: every pair is matched already", database_path)
        report = MatchManyReport(out, len(images), len(pairs), 0, len(pairs), 0, 0, 0, 0.0, {}, None,
                                 round(peak_rss_gib(), 3))  # fmt: skip
        return _afterwards(report, images, entries, config)
    if config.ray is not None:
        assert pairs is not None  # retrieval is refused with --ray before any work
        return _execute_on_ray(artifact, images, entries, out, config, run, pairs, on_pair)
    free = _device_free()
    executor = Executor(load_for_matching(artifact), [i.path for i in images], config.match, config.batch,
                        config.encode_batch, config.workers, free, config.matchers)  # fmt: skip
    executor.warm_up()
    budget = executor.budget(config.gpu_memory, len(images))
    if config.token_slots is not None:
        budget = replace(budget, slots=min(budget.slots, config.token_slots))
    executor.allocate(budget.slots)
    log.info("tokens: %d slots of %.1f MiB within %.2f GiB (%.2f GiB for the graphs)", budget.slots,
             budget.token_bytes / 2**20, budget.budget_bytes / GIB, budget.fixed_bytes / GIB)  # fmt: skip
    resident: dict[int, int] = {}
    names = [e.name for e in entries]
    if pairs is None:  # retrieval: one encoder pass gives the descriptors; the first images stay resident
        slots = [i if i < budget.slots else -1 for i in range(len(images))]
        descriptors = executor.fill(range(len(images)), slots)
        resident = {i: i for i in range(min(budget.slots, len(images)))}
        pairs = select_pairs(strategy, names, descriptors)
    out.mkdir(parents=True, exist_ok=True)
    if database_path.exists():
        database = ColmapDatabase.resume(database_path, entries, run)
    else:
        database = ColmapDatabase.create(database_path, entries, config.camera_mode, {**run, "pair_list": pairs})
    hloc.write_pairs(out / "pairs.txt", names, pairs)
    done = database.done_pairs()
    todo = [p for p in order_for_reuse(pairs, len(images), budget.slots) if _pid(p) not in done]
    steps = plan(todo, budget.slots, config.batch, resident, config.encode_batch)
    log.info("%d pairs to match (%d done before), %d encodes planned", len(todo), len(pairs) - len(todo),
             encodes(steps))  # fmt: skip
    progress = _Progress(len(todo), executor, on_pair)
    matching = time.perf_counter()
    try:
        executor.run(steps, database, progress, config.commit_seconds)
    except KeyboardInterrupt:
        log.warning("interrupted: %d pairs are in %s; run the same command again to match the rest",
                    len(done) + executor.stages.pairs, database_path)  # fmt: skip
        raise
    finally:
        database.close()
    seconds = time.perf_counter() - matching
    report = MatchManyReport(
        out, len(images), len(pairs), executor.stages.pairs, len(done), executor.stages.matches,
        executor.stages.encodes, budget.slots, round(seconds, 3),
        {k: round(v, 3) for k, v in executor.stages.seconds.items()}, progress.peak_gpu_gib(), round(peak_rss_gib(), 3),
    )  # fmt: skip
    _afterwards(report, images, entries, config)
    log.info("done in %.1f s", time.perf_counter() - started)
    return report


def _execute_on_ray(artifact: Path, images: Sequence[CollectionImage], entries: Sequence[ImageEntry], out: Path,
                    config: MatchManyConfig, run: dict[str, Any], pairs: list[Any],
                    on_pair: Callable[[int], None] | None) -> MatchManyReport:  # fmt: skip
    """The run on Ray workers (:mod:`export_engine.sfm.distributed`), written here into the one database in the
    single-process run's order, so the same pairs give the same database."""
    database_path = out / DATABASE
    setup = distributed.WorkerSetup(artifact.resolve(), tuple(i.path.resolve() for i in images), config.match,
                                    config.batch, config.encode_batch, config.workers, config.gpu_memory,
                                    config.token_slots, config.matchers)  # fmt: skip
    pool = distributed.WorkerPool(config.ray or "local", config.ray_workers, setup)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if database_path.exists():
            database = ColmapDatabase.resume(database_path, entries, run)
        else:
            database = ColmapDatabase.create(database_path, entries, config.camera_mode, {**run, "pair_list": pairs})
        hloc.write_pairs(out / "pairs.txt", [e.name for e in entries], pairs)
        done = database.done_pairs()
        todo = [p for p in order_for_reuse(pairs, len(images), pool.capacity) if _pid(p) not in done]
        chunks = distributed.chunks_of(todo, config.batch, config.ray_chunk, len(pool.actors))
        log.info("%d pairs to match (%d done before) in %d chunks over %d Ray workers", len(todo),
                 len(pairs) - len(todo), len(chunks), len(pool.actors))  # fmt: skip
        progress = _Progress(len(todo), None, on_pair)
        written = {"pairs": 0, "matches": 0, "at": time.perf_counter()}

        def write(result: distributed.PairResult) -> None:
            database.add_pair(*result)
            written["pairs"] += 1
            written["matches"] += len(result[2])
            if time.perf_counter() - written["at"] >= config.commit_seconds:
                database.commit()
                written["at"] = time.perf_counter()
            progress(len(result[2]))

        matching = time.perf_counter()
        try:
            pooled = pool.run(chunks, write)
            seconds = time.perf_counter() - matching
        except KeyboardInterrupt:
            log.warning("interrupted: %d pairs are in %s; run the same command again to match the rest",
                        len(done) + written["pairs"], database_path)  # fmt: skip
            raise
        finally:
            database.close()
    finally:
        pool.close()
    stages: dict[str, float] = {}
    for worker in pooled.workers.values():
        for stage, value in worker.stages.items():
            stages[stage] = round(stages.get(stage, 0.0) + value, 3)
    workers = {name: {"pairs": w.pairs, "pairs_per_second": round(w.pairs_per_second, 2), "encodes": w.encodes,
                      "lost": int(w.lost)} for name, w in pooled.workers.items()}  # fmt: skip
    report = MatchManyReport(
        out, len(images), len(pairs), int(written["pairs"]), len(done), int(written["matches"]),
        sum(w.encodes for w in pooled.workers.values()), pool.capacity, round(seconds, 3), stages, None,
        round(peak_rss_gib(), 3), workers=workers, requeued=pooled.requeued,
    )  # fmt: skip
    return _afterwards(report, images, entries, config)


def _afterwards(report: MatchManyReport, images: Sequence[CollectionImage], entries: Sequence[ImageEntry],
                config: MatchManyConfig) -> MatchManyReport:  # fmt: skip
    """hloc's files, COLMAP's verification and mapper, as asked, once every pair is in the database."""
    database_path = report.out / DATABASE
    if config.hloc:
        hloc.write_hloc(database_path, report.out, [e.name for e in entries], [e.size for e in entries])
    if config.verify:
        report.verified = colmap.verify(database_path, report.out / "pairs.txt")
    if config.reconstruct:
        colmap.reconstruct(database_path, _image_root(images), report.out / "sparse")
    return report


def _check_token_slots(config: MatchManyConfig, n_images: int) -> None:
    """--token-slots holds the images of any batch (as the memory budget must), found before any work."""
    need = min(2 * config.batch, n_images)
    if config.token_slots is not None and config.token_slots < need:
        raise UsageError(f"--token-slots {config.token_slots} cannot hold the images of one batch of {config.batch} "
                         f"pairs: give --token-slots {need} or more, or a smaller --batch")  # fmt: skip


def _pid(pair: Sequence[int]) -> int:
    return pair_id(pair[0] + 1, pair[1] + 1)


def _done_before(path: Path) -> set[int]:
    with reading(path) as db:
        return {row[0] for row in db.execute("SELECT pair_id FROM export_engine_pairs")}


def _device_free() -> int | None:
    """Free device memory before the artifact loads, where a CUDA device is visible."""
    import torch

    return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None


def _resolution(manifest: dict[str, Any]) -> tuple[int, int]:
    graphs = {g["name"]: g for g in manifest["graphs"]}
    _, _, height, width = graphs["encoder"]["inputs"][0]["shape"]
    return int(width), int(height)


def _entry(image: CollectionImage, width: int, height: int) -> ImageEntry:
    placed = fit(image.size, width, height)
    return ImageEntry(image.name, image.size, image.focal_px, (width, height), placed.scale, placed.offset)


def _fingerprint(artifact: Path, entries: Sequence[ImageEntry], strategy: PairStrategy,
                 config: MatchManyConfig) -> dict[str, Any]:  # fmt: skip
    """What makes two runs the same run: a database written under another fingerprint is refused."""
    pairs = str(strategy)
    if strategy.path is not None:
        pairs = f"file sha256 {hashlib.sha256(strategy.path.read_bytes()).hexdigest()}"
    return {
        "artifact": hashlib.sha256((artifact / "manifest.json").read_bytes()).hexdigest(),
        "images": [[e.name, *e.size] for e in entries],
        "pairs": pairs,
        "matching": {
            "subsample": config.match.subsample,
            "border": config.match.border,
            "min_desc_conf": config.match.min_desc_conf,
        },
        "camera_mode": config.camera_mode,
    }


def _image_root(images: Sequence[CollectionImage]) -> Path:
    """The folder the names are relative to (for the mapper's point colours)."""
    name, path = images[0].name, images[0].path
    return Path(str(path)[: -len(name)]) if str(path).endswith(name) else path.parent


class _Progress:
    """Writer-thread hook: a log line every few seconds with pairs/s and ETA, the device memory high-water mark,
    and the caller's own hook."""

    def __init__(self, total: int, executor: Executor | None, hook: Callable[[int], None] | None) -> None:
        self.total, self.executor, self.hook = total, executor, hook
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.start_free = executor.free_at_start if executor is not None else None
        self.min_free = self.start_free
        self._sample()

    def _sample(self) -> None:
        free = self.executor.free_memory() if self.executor is not None else None
        if free is not None and self.min_free is not None:
            self.min_free = min(self.min_free, free)

    def peak_gpu_gib(self) -> float | None:
        self._sample()
        if self.start_free is None or self.min_free is None:
            return None
        return round((self.start_free - self.min_free) / GIB, 3)

    def __call__(self, matches: int) -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self.last >= PROGRESS_SECONDS or self.done == self.total:
            self._sample()
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            log.info("pairs %d/%d (%.0f%%)  %.1f pairs/s  ETA %.0f s", self.done, self.total,
                     100.0 * self.done / max(self.total, 1), rate, eta)  # fmt: skip
            self.last = now
        if self.hook is not None:
            self.hook(matches)


def read_report_run(path: Path) -> dict[str, Any]:
    """The stored run of ``path/database.db`` (for tools and tests)."""
    return read_run(path / DATABASE)
