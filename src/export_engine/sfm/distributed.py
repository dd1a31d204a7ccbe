"""``match-many --ray``: the pairs of a collection matched by Ray actors, one per GPU (or N on the CPU), merged
by the driver into the one database of the single-process run.

    driver   order the pairs as the single-process run does -> chunks -> per round, contiguous runs of chunks,
             one per worker
    worker   a Ray actor holding the loaded artifact and an :class:`~export_engine.sfm.executor.Executor`; each
             chunk it is sent is planned against the tokens it still holds, so an image is encoded once per worker
    driver   results written in chunk order through :class:`~export_engine.sfm.database.ColmapDatabase`

Chunks are whole runs of ``batch`` pairs of the single-process order, and the driver writes them in that order,
so the decoder sees the same batches and the keypoints are numbered as the single-process run numbers them
(first seen, in write order): the same pairs give the same database. A worker that dies (its actor lost, its
node gone) has its unfinished chunks handed to the workers left; a worker that runs out of work takes the last
queued chunk of the busiest one. Images and the artifact are read by path on the workers: on a cluster they live
on a filesystem every node sees, and export-engine is installed on every node.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from export_engine.errors import BackendError, UsageError
from export_engine.families.mast3r.match import MatchConfig
from export_engine.sfm.schedule import Pair, Step, plan

log = logging.getLogger(__name__)

# Chunks in flight per worker: the next one waits in the actor's queue while the driver takes in the last.
IN_FLIGHT = 2
# Chunks per worker at least (where the pairs allow): the unit of balancing and of what a lost worker redoes.
CHUNKS_PER_WORKER = 4
# Pairs a worker is given per round: results that arrive ahead of the write order wait in the driver's memory
# (some tens of KiB a pair), so a round bounds them; images at a group's edges are encoded once more per round.
ROUND_PAIRS = 2048
INSTALL = "pip install 'export-engine[ray]' (or pip install 'ray[serve]>=2.40')"
PairResult = tuple[int, int, np.ndarray, np.ndarray, np.ndarray]


def ray_module() -> Any:
    """Ray, or a one-line BackendError saying how to install it (checked before any work)."""
    try:
        import ray
    except ImportError as err:
        raise BackendError(f"--ray needs Ray, which is not installed: {INSTALL}") from err
    return ray


@dataclass(frozen=True)
class WorkerSetup:
    """What every worker loads: the artifact, the images (by path) and the single-process run's knobs."""

    artifact: Path
    paths: tuple[Path, ...]
    match: MatchConfig
    batch: int
    encode_batch: int
    workers: int  # image-decoding threads per worker
    gpu_memory: float | None
    token_slots: int | None
    matchers: int | None = None  # matcher threads per worker (None: the executor's default)


@dataclass
class ChunkResult:
    pairs: list[PairResult]
    seconds: float  # the worker's time on this chunk
    encodes: int  # the worker's encoder runs per image so far
    stages: dict[str, float]  # the worker's stage seconds so far


class MatchWorker:
    """One Ray actor's state: the loaded artifact, its token pool and which images the pool holds."""

    def __init__(self, setup: WorkerSetup) -> None:
        from export_engine.sfm.executor import Executor, load_for_matching

        free = _device_free()
        self.setup = setup
        self.executor = Executor(load_for_matching(setup.artifact), setup.paths, setup.match, setup.batch,
                                 setup.encode_batch, setup.workers, free, setup.matchers)  # fmt: skip
        self.executor.warm_up()
        budget = self.executor.budget(setup.gpu_memory, len(setup.paths))
        if setup.token_slots is not None:
            budget = replace(budget, slots=min(budget.slots, setup.token_slots))
        self.executor.allocate(budget.slots)
        self.slots = budget.slots
        self.resident: dict[int, int] = {}

    def capacity(self) -> int:
        return self.slots

    def match(self, pairs: Sequence[Pair]) -> ChunkResult:
        start = time.perf_counter()
        steps = plan(list(pairs), self.slots, self.setup.batch, self.resident, self.setup.encode_batch)
        sink = _Collect()
        self.executor.run(steps, sink, lambda _: None, float("inf"))
        self.resident = resident_after(steps, self.resident)
        stages = self.executor.stages
        return ChunkResult(sink.pairs, time.perf_counter() - start, stages.encodes, dict(stages.seconds))


class _Collect:
    """The executor's sink on a worker: the pairs go back to the driver, which writes them."""

    def __init__(self) -> None:
        self.pairs: list[PairResult] = []

    def add_pair(self, i: int, j: int, pixels1: np.ndarray, pixels2: np.ndarray, scores: np.ndarray) -> None:
        self.pairs.append((i, j, pixels1, pixels2, scores))

    def commit(self) -> None:
        pass


def resident_after(steps: Sequence[Step], resident: dict[int, int]) -> dict[int, int]:
    """image -> slot once ``steps`` ran from ``resident``: an image encoded into a slot replaces its holder."""
    slot_of = dict(resident)
    for step in steps:
        for image, slot in step.encode:
            for other in [o for o, s in slot_of.items() if s == slot]:
                del slot_of[other]
            slot_of[image] = slot
    return slot_of


def chunks_of(order: Sequence[Pair], batch: int, chunk_pairs: int, workers: int = 1) -> list[list[Pair]]:
    """``order`` cut into chunks of whole decoder batches (the single-process run's batches), at most
    ``chunk_pairs`` pairs and small enough to give every worker a few (so one that finishes early takes work)."""
    size = min(chunk_pairs, -(-len(order) // (CHUNKS_PER_WORKER * workers)))
    size = max(batch, size // batch * batch)
    return [list(order[k : k + size]) for k in range(0, len(order), size)]


def groups_of(n_chunks: int, n_workers: int, per_round: int | None = None) -> list[deque[int]]:
    """The chunks of each round (``per_round`` chunks a worker; None: one round) cut into contiguous runs, one
    per worker: neighbours in the pair order share images, and the driver, writing in order, holds at most
    about a round of results that arrived early."""
    span = n_chunks if per_round is None else per_round * n_workers
    groups: list[deque[int]] = [deque() for _ in range(n_workers)]
    for start in range(0, n_chunks, max(span, 1)):
        size = min(span, n_chunks - start)
        bounds = [start + round(k * size / n_workers) for k in range(n_workers + 1)]
        for k, group in enumerate(groups):
            group.extend(range(bounds[k], bounds[k + 1]))
    return groups


@dataclass
class WorkerStats:
    pairs: int = 0
    seconds: float = 0.0
    encodes: int = 0
    stages: dict[str, float] = field(default_factory=dict)
    lost: bool = False

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0


@dataclass
class PoolReport:
    workers: dict[str, WorkerStats]
    requeued: int  # pairs sent again after their worker was lost


class WorkerPool:
    """The Ray workers of one run: made with Ray started (or reached) and the workers loaded; :attr:`capacity`
    (the fewest token slots of a worker: what the single-process run on such a device orders the pairs by),
    :meth:`run`, :meth:`close`."""

    def __init__(self, address: str, count: int | None, setup: WorkerSetup) -> None:
        ray = ray_module()
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            try:
                # "local" is Ray's own word for a new Ray started here, never one already running on the machine
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as err:
                raise BackendError(f"--ray {address}: could not start or reach Ray ({_first_line(err)}); give "
                                   "auto, a cluster's address (ray://host:10001) or no address for a Ray "
                                   "started here") from err  # fmt: skip
        resources_now = ray.cluster_resources()
        gpus = int(resources_now.get("GPU", 0))
        count = count or gpus or 2
        have = gpus or int(resources_now.get("CPU", 0))
        if count > have:  # actors that can never be placed would wait for ever
            self.close()
            raise UsageError(f"--ray-workers {count}: the Ray cluster has {have} {'GPUs' if gpus else 'CPUs'}, one "
                             "a worker; give at most that many")  # fmt: skip
        resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        self.name = f"export-engine-match-{uuid.uuid4().hex[:8]}"
        actor = ray.remote(**resources)(MatchWorker)
        self.actors = {f"w{k}": actor.options(name=f"{self.name}-{k}").remote(setup) for k in range(count)}
        log.info("Ray: %d workers (%s each) on %s", count, "1 GPU" if gpus else "1 CPU", address)
        try:
            self.capacity = min(ray.get([a.capacity.remote() for a in self.actors.values()]))
        except ray.exceptions.RayError as err:
            self.close()
            raise BackendError(f"a Ray worker could not start: {_first_line(err)}") from err

    def run(self, chunks: Sequence[list[Pair]], write: Callable[[PairResult], None]) -> PoolReport:
        """Every chunk matched by some worker and handed to ``write`` pair by pair, in chunk order."""
        ray = self.ray
        names = list(self.actors)
        per_round = max(1, ROUND_PAIRS // max(1, len(chunks[0]) if chunks else 1))
        queues = dict(zip(names, groups_of(len(chunks), len(names), per_round), strict=True))
        stats = {n: WorkerStats() for n in names}
        in_flight: dict[Any, tuple[str, int]] = {}
        done: dict[int, list[PairResult]] = {}
        written, requeued = 0, 0
        while written < len(chunks):
            for name in [n for n in names if not stats[n].lost]:
                while sum(w == name for w, _ in in_flight.values()) < IN_FLIGHT and _next(queues, name):
                    chunk = queues[name].popleft()
                    in_flight[self.actors[name].match.remote(chunks[chunk])] = (name, chunk)
            if not in_flight:
                raise BackendError(f"every Ray worker was lost; the {sum(map(len, chunks[:written]))} pairs matched "
                                   "so far are kept: run the same command again to match the rest")  # fmt: skip
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            name, chunk = in_flight.pop(ref)
            try:
                result: ChunkResult = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                lost = [chunk, *queues[name]] + [c for r, (w, c) in list(in_flight.items()) if w == name]
                for r in [r for r, (w, _) in in_flight.items() if w == name]:
                    del in_flight[r]
                queues[name].clear()
                stats[name].lost = True
                requeued += sum(len(chunks[c]) for c in lost)
                _hand_out(sorted(lost), queues, [n for n in names if not stats[n].lost])
                log.warning("Ray worker %s lost (%s): %d chunks sent to the others", name, _first_line(err), len(lost))
                continue
            except ray.exceptions.RayTaskError as err:
                raise BackendError(f"Ray worker {name} failed: {_first_line(err)}") from err
            worker = stats[name]
            worker.pairs += len(result.pairs)
            worker.seconds += result.seconds
            worker.encodes, worker.stages = result.encodes, result.stages
            done[chunk] = result.pairs
            while written in done:
                for pair in done.pop(written):
                    write(pair)
                written += 1
        return PoolReport(stats, requeued)

    def close(self) -> None:
        for actor in getattr(self, "actors", {}).values():
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()


def _next(queues: dict[str, deque[int]], name: str) -> bool:
    """Whether ``name`` has a chunk queued, taking the last queued chunk of the busiest worker when it has none."""
    if queues[name]:
        return True
    busiest = max(queues, key=lambda n: len(queues[n]))
    if len(queues[busiest]) > 1:
        queues[name].append(queues[busiest].pop())
    return bool(queues[name])


def _hand_out(lost: Sequence[int], queues: dict[str, deque[int]], alive: Sequence[str]) -> None:
    """A lost worker's chunks to the front of the queues of the workers left, one after the other: the writer
    waits for the earliest of them."""
    for k, chunk in enumerate(sorted(lost)[::-1]):
        if alive:
            queues[alive[k % len(alive)]].appendleft(chunk)


def _first_line(err: BaseException) -> str:
    text = str(getattr(err, "cause", None) or err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


def _device_free() -> int | None:
    """Free device memory before the artifact loads, where a CUDA device is visible (the worker's own GPU)."""
    import torch

    return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None
