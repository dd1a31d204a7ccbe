"""The many-pair matcher: images decoded ahead by worker threads, each image encoded once in batches into a
fixed pool of token slots, the decoder on batches of pairs, FastNN-Lite on threads (and CUDA streams) of its
own, and the database written by another thread as pairs complete.

    main thread       read images (worker pool) -> encode -> tokens into slots -> decode a batch of pairs
    matcher threads   ``matchers`` of them, each taking whole batches: FastNN-Lite per pair (a recorded
                      CUDA-graph matcher of its own on CUDA), filters
    writer thread     keypoints and matches into the database in the plan's order, committed every
                      ``commit_seconds``; progress

On CUDA the decoder's next batch runs while the matcher threads match earlier ones on streams of their own
(the matcher's seeds keep few SMs busy, so the two overlap on the device); each pair's matching waits on the host
for its match count, and a second matcher thread queues its pair's kernels during that wait. Queues between the
threads are bounded, so memory stays what the budget allowed. Everything that records CUDA graphs (the encoder's
and decoder's first runs, the recorded matchers) is done in :meth:`Executor.warm_up`, before any other thread
starts: a capture must not see another thread's CUDA calls.

Thread safety: an Executor's public methods run one at a time under its lock (a second caller waits); the
threads it starts share only the bounded queues, the stop flag and :class:`Stages` (whose additions take a lock).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from export_engine.errors import UsageError
from export_engine.families.mast3r.images import read_rgb
from export_engine.families.mast3r.match import MatchConfig, Nearest, nearest_for, unfiltered_matches
from export_engine.sfm.schedule import Step
from export_engine.sfm.stages import Budget, Stages, serialised

log = logging.getLogger(__name__)

GIB = 1024**3
WARM_UP_RUNS = 3
# Decoded batches waiting for the matcher: one is enough for the decoder to run a batch ahead of the matcher;
# the matched pairs waiting for the writer are two batches' worth (host memory).
QUEUE_BATCHES = 1
# The decoder's outputs that matching reads (the session is loaded to compute only these: on ONNX Runtime the DPT
# heads' points and confidences, 38 % of the decoder's FLOPs at 512x384, are never computed; an engine computes all)
DECODER_OUTPUTS = ("view1_desc", "view2_desc", "view1_desc_conf", "view2_desc_conf")
_ITEMSIZE = {"float32": 4, "float16": 2, "int64": 8, "int32": 4}
# Device memory beyond what warm-up measures (matching temporaries, allocator rounding): a margin, not a model.
_MARGIN = 0.25 * GIB


class PairSink(Protocol):
    """Where matched pairs go: the database (:class:`~export_engine.sfm.database.ColmapDatabase`), or on a Ray
    worker a list sent back to the driver."""

    def add_pair(self, i: int, j: int, pixels1: np.ndarray, pixels2: np.ndarray, scores: np.ndarray) -> None: ...

    def commit(self) -> None: ...


class _StopError(Exception):
    """Another thread failed or the run was interrupted: unwind quietly (the first failure is re-raised)."""


# CUDA stream priority of the matcher threads (lower is higher; the decoder's stream has 0). High priority (-1)
# helped while one matcher was the bottleneck; with three matchers and the pruned decoder, equal priority measured
# the same or slightly better on an H100 (288 against 282 pairs/s; two threads: 263 against 261).
MATCHER_PRIORITY = 0
GPU_MATCHERS = 3  # matcher threads by default on a GPU (see matcher_threads)


def load_for_matching(artifact: Any) -> Any:
    """The artifact loaded as the executor runs it: CUDA graphs, the decoder computing only DECODER_OUTPUTS."""
    from export_engine.runtime.session import load

    return load(artifact, cuda_graph=True, outputs={"decoder": DECODER_OUTPUTS})


def matcher_threads(requested: int | None, on_device: bool) -> int:
    """Matcher threads: ``requested``, else :data:`GPU_MATCHERS` on a GPU and one on the CPU (where threads share
    the same cores). On a GPU each thread's FastNN-Lite overlaps the others' and the decoder's work. Measured on an
    H100, 1945 pairs: 239 pairs/s with one thread, 263-267 with two, 279-288 with three, 284 with four (peak GPU
    memory 8.3, 10.5 and 10.8 GiB for two, three and four)."""
    if requested is not None:
        return max(1, int(requested))
    return GPU_MATCHERS if on_device else 1


class Executor:
    """Runs a plan (:mod:`export_engine.sfm.schedule`) over a loaded MASt3R session (see the module docstring)."""

    def __init__(self, session: Any, paths: Sequence[Any], match: MatchConfig, batch: int, encode_batch: int,
                 workers: int, free_at_start: int | None = None, matchers: int | None = None) -> None:  # fmt: skip
        import torch

        self.encoder, self.decoder = session.runners["encoder"], session.runners["decoder"]
        self.on_device = all(callable(getattr(r, "run", None)) for r in (self.encoder, self.decoder))
        self.device = torch.device("cuda" if self.on_device else "cpu")
        image_meta, token_meta = session.graphs["encoder"]["inputs"][0], session.graphs["encoder"]["outputs"][0]
        _, _, self.height, self.width = image_meta["shape"]
        self.image_dtype = getattr(torch, image_meta["dtype"])
        _, self.tokens_n, self.tokens_d = token_meta["shape"]
        self.token_dtype = getattr(torch, token_meta["dtype"])
        self.token_bytes = int(self.tokens_n * self.tokens_d * _ITEMSIZE[token_meta["dtype"]])
        read = [o for o in session.graphs["decoder"]["outputs"] if o["name"] in DECODER_OUTPUTS]
        self.pair_bytes = sum(math.prod(o["shape"][1:]) * _ITEMSIZE[o["dtype"]] for o in read)
        self.paths, self.match, self.batch, self.encode_batch = list(paths), match, batch, encode_batch
        self.workers = max(1, workers)
        self.matchers = matcher_threads(matchers, self.on_device)  # each with its own recorded matcher and stream
        self.stages = Stages()
        self.pool: Any = None
        self._nearests: list[Nearest] = []
        # device memory free before the session loaded (its weights count against the budget), else now
        self.free_at_start = free_at_start if self.on_device and free_at_start else self.free_memory()
        self._stop = threading.Event()
        self._failure: list[BaseException] = []
        self._lock = threading.RLock()

    # --- memory ---------------------------------------------------------------------------------------------

    def free_memory(self) -> int | None:
        if not self.on_device:
            return None
        import torch

        return int(torch.cuda.mem_get_info(self.device)[0])

    @serialised
    def warm_up(self) -> None:
        """First runs of the fixed batch shapes and the recorded matcher, before any worker thread exists: ONNX
        Runtime records a shape's CUDA graph on its second run (the first allocates), engines after a launch."""
        import torch

        if not self.on_device:
            return
        feats = torch.zeros((self.batch, self.tokens_n, self.tokens_d), dtype=self.token_dtype, device=self.device)
        for _ in range(WARM_UP_RUNS):
            self._encode([np.zeros((self.height, self.width, 3), np.uint8)])
            out = self.decoder.run({"feat1": feats, "feat2": feats}, copy=False)
        desc = out["view1_desc"][0].float()
        self._nearests = [nearest_for(tuple(desc.shape), self.match.subsample, self.device, self.match.recorded)
                          for _ in range(self.matchers)]  # fmt: skip
        for nearest in self._nearests:
            nearest(desc.contiguous(), desc.contiguous())
        torch.cuda.synchronize(self.device)
        self.stages = Stages()  # warm-up runs are not the run's

    @serialised
    def budget(self, gib: float | None, images: int) -> Budget:
        """Token slots within ``gib`` of memory (device memory on CUDA, measured; host memory on the CPU)."""
        kept = self.batch * self.height * self.width * 4 * 2 * 25  # desc (<= 24 channels) + conf, two views
        if self.on_device:
            assert self.free_at_start is not None
            free_now = self.free_memory()
            assert free_now is not None
            budget = gib * GIB if gib else 0.75 * self.free_at_start
            fixed = float(self.free_at_start - free_now) + _MARGIN
            # batches alive at once: queued, being matched (one a matcher), being decoded; the decoder's gathered inputs
            working = (QUEUE_BATCHES + 1 + self.matchers) * kept + 2 * self.batch * self.token_bytes
        else:
            budget = (gib or 4.0) * GIB
            fixed = 0.25 * GIB
            working = (QUEUE_BATCHES + 1) * self.batch * self.pair_bytes + 4 * self.batch * self.token_bytes
        slots = int((budget - fixed - working) // self.token_bytes)
        if slots < min(2 * self.batch, images):
            need = (fixed + working + 2 * self.batch * self.token_bytes) / GIB
            raise UsageError(
                f"--gpu-memory {budget / GIB:.2f} GiB cannot hold the tokens of one batch of {self.batch} pairs with "
                f"the graphs' own memory ({fixed / GIB:.2f} GiB); give at least {need:.2f} GiB, a smaller --batch or "
                f"fewer --matchers (now {self.matchers})"
            )
        return Budget(min(slots, images), self.token_bytes, budget, fixed)

    @serialised
    def allocate(self, slots: int) -> None:
        import torch

        shape = (slots, self.tokens_n, self.tokens_d)
        self.pool = torch.empty(shape, dtype=self.token_dtype, device=self.device)

    # --- the graphs -------------------------------------------------------------------------------------------

    def _read(self, index: int) -> np.ndarray:
        start = time.perf_counter()
        rgb, _ = read_rgb(self.paths[index], self.width, self.height)
        self.stages.add("read", time.perf_counter() - start)  # worker-seconds (several workers at once)
        return rgb

    def _timed(self, stage: str) -> Callable[[], None]:
        """Start timing ``stage``; the returned function ends it (CUDA events on the device, else host time)."""
        if self.on_device:
            import torch

            start = torch.cuda.Event(enable_timing=True)
            start.record()

            def end_device() -> None:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.stages.interval(stage, start, end)

            return end_device
        begin = time.perf_counter()
        return lambda: self.stages.add(stage, time.perf_counter() - begin)

    def _encode(self, rgbs: Sequence[np.ndarray]) -> Any:
        """Tokens (k, N, D) of k images, on the device. On CUDA the batch is padded to ``encode_batch`` (one
        recorded shape); uint8 pixels go up and are normalised there, as upstream does on the host."""
        import torch

        batch = np.stack(rgbs)
        count = len(batch)
        if self.on_device and count < self.encode_batch:
            batch = np.concatenate([batch, np.repeat(batch[-1:], self.encode_batch - count, axis=0)])
        pixels = torch.from_numpy(batch)
        if self.on_device:
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        images = ((pixels.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5).to(self.image_dtype).contiguous()
        if self.on_device:
            tokens = self.encoder.run({"images": images}, copy=False)["tokens"]
        else:
            tokens = torch.from_numpy(self.encoder({"images": images.numpy()})["tokens"])
        self.stages.encodes += count
        return tokens[:count]

    def _index(self, values: Sequence[Any]) -> Any:
        """An int64 index tensor on the device without a host sync: a copy from pageable memory would wait for
        everything queued on the stream (CUDA stages such copies synchronously), so it goes through pinned memory."""
        import torch

        index = torch.tensor(values, dtype=torch.int64)
        return index.pin_memory().to(self.device, non_blocking=True) if self.on_device else index

    def _decode(self, slots: Sequence[tuple[int, int]]) -> list[Any]:
        """view1_desc, view2_desc, view1_desc_conf, view2_desc_conf of the batch (k items), owned by the caller."""
        import torch

        count = len(slots)
        padded = list(slots) + [slots[-1]] * ((self.batch - count) if self.on_device else 0)
        first, second = self._index([a for a, _ in padded]), self._index([b for _, b in padded])
        feeds = {"feat1": self.pool.index_select(0, first), "feat2": self.pool.index_select(0, second)}
        if self.on_device:
            out = self.decoder.run(feeds, copy=False)  # the runner's buffers: copied before its next run
            taken = [out[name][:count] for name in DECODER_OUTPUTS]
            return [t.clone() if t.dtype == torch.float32 else t.float() for t in taken]
        numpy_out = self.decoder({k: v.numpy() for k, v in feeds.items()})
        return [torch.from_numpy(numpy_out[name]).float() for name in DECODER_OUTPUTS]

    # --- the run ------------------------------------------------------------------------------------------------

    @serialised
    def fill(self, images: Sequence[int], slots: Sequence[int] | None) -> Any:
        """Encode ``images`` in batches (reading ahead); tokens go to ``slots`` where given (None: not kept).
        Returns the (n, D) mean token of each image, the global descriptor of retrieval."""
        import torch

        means = []
        images = list(images)
        ahead = max(2 * self.encode_batch, 4 * self.workers)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="sfm-read") as readers:
            pending = deque(readers.submit(self._read, i) for i in images[:ahead])
            for k in range(0, len(images), self.encode_batch):
                count = min(self.encode_batch, len(images) - k)
                rgbs = [pending.popleft().result() for _ in range(count)]
                pending.extend(readers.submit(self._read, i) for i in images[ahead + k : ahead + k + count])
                done = self._timed("encode")
                tokens = self._encode(rgbs)
                if slots is not None:
                    kept = [(n, s) for n, s in enumerate(slots[k : k + count]) if s >= 0]
                    if kept:
                        rows = self._index([n for n, _ in kept])
                        self.pool.index_copy_(0, self._index([s for _, s in kept]), tokens.index_select(0, rows))
                means.append(tokens.float().mean(dim=1).cpu())
                done()
        return torch.cat(means).numpy()

    @serialised
    def run(self, steps: Sequence[Step], database: PairSink, on_pair: Callable[[int], None],
            commit_seconds: float) -> None:  # fmt: skip
        """Every step of the plan, results into ``database`` as they complete; ``on_pair(matches)`` after each
        pair is stored (the writer thread's progress hook: it may raise to stop the run)."""
        while len(self._nearests) < self.matchers:  # the CPU (no warm-up): the unrecorded matcher
            self._nearests.append(nearest_for((self.height, self.width, 1), self.match.subsample, self.device, False))
        decoded: queue.Queue[Any] = queue.Queue(QUEUE_BATCHES)
        matched: queue.Queue[Any] = queue.Queue(2 * self.batch * self.matchers)
        matchers = [
            threading.Thread(target=self._guard, args=(self._match_loop, n, decoded, matched), name=f"sfm-match-{k}")
            for k, n in enumerate(self._nearests)
        ]
        writer = threading.Thread(
            target=self._guard, args=(self._write_loop, matched, database, on_pair, commit_seconds), name="sfm-write"
        )
        for thread in [*matchers, writer]:
            thread.start()
        try:
            self._feed(steps, decoded)
            for thread in matchers:
                thread.join()
            self._put(matched, None)  # the writer's end, once every matcher is done
        except BaseException as err:
            if not isinstance(err, _StopError):
                self._failure.append(err)
            self._stop.set()
        finally:
            for thread in [*matchers, writer]:
                thread.join()
            self.stages.settle()
        if self._failure:
            raise self._failure[0]

    def _guard(self, loop: Callable[..., None], *args: Any) -> None:
        try:
            loop(*args)
        except _StopError:
            pass
        except BaseException as err:
            self._failure.append(err)
            self._stop.set()

    def _put(self, target: queue.Queue[Any], item: Any) -> None:
        while True:
            if self._stop.is_set():
                raise _StopError
            try:
                target.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def _get(self, source: queue.Queue[Any]) -> Any:
        while True:
            try:
                return source.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():
                    raise _StopError from None

    def _feed(self, steps: Sequence[Step], decoded: queue.Queue[Any]) -> None:
        import torch

        order = [image for step in steps for image, _ in step.encode]
        ahead = max(2 * self.encode_batch, 4 * self.workers)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="sfm-read") as readers:
            pending: deque[Future[np.ndarray]] = deque()
            submitted = 0
            for seq, step in enumerate(steps):
                while submitted < len(order) and len(pending) < ahead + len(step.encode):
                    pending.append(readers.submit(self._read, order[submitted]))
                    submitted += 1
                for k in range(0, len(step.encode), self.encode_batch):
                    chunk = step.encode[k : k + self.encode_batch]
                    rgbs = [pending.popleft().result() for _ in chunk]
                    done = self._timed("encode")
                    tokens = self._encode(rgbs)
                    self.pool.index_copy_(0, self._index([s for _, s in chunk]), tokens)
                    done()
                done = self._timed("decode")
                outputs = self._decode(step.slots)
                done()
                event = None
                if self.on_device:
                    event = torch.cuda.Event()
                    event.record()
                self._put(decoded, (seq, step.pairs, outputs, event))
                if self._stop.is_set():
                    raise _StopError
            for _ in range(self.matchers):
                self._put(decoded, None)  # one end for each matcher thread

    def _match_loop(self, nearest: Nearest, decoded: queue.Queue[Any], matched: queue.Queue[Any]) -> None:
        """Match each batch it takes; every pair goes to the writer tagged (batch, position, batch size)."""
        import contextlib

        import torch

        # a stream of its own per thread, so that its kernels overlap the decoder's and the other matchers'
        stream = torch.cuda.Stream(self.device, priority=MATCHER_PRIORITY) if self.on_device else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            while (item := self._get(decoded)) is not None:
                seq, pairs, outputs, event = item
                if stream is not None:
                    stream.wait_event(event)
                    for tensor in outputs:
                        tensor.record_stream(stream)  # made on the main stream, freed after this stream used them
                start = time.perf_counter()
                desc1, desc2, conf1, conf2 = outputs
                for b, (i, j) in enumerate(pairs):
                    found = unfiltered_matches(desc1[b], desc2[b], conf1[b], conf2[b], self.match, nearest)
                    pixels1 = found["xy1"][:, 1] * self.width + found["xy1"][:, 0]
                    pixels2 = found["xy2"][:, 1] * self.width + found["xy2"][:, 0]
                    # one transfer (one host sync), filtered on the host: pixel ids < 2**53 and float32 scores are
                    # exact in float64
                    columns = [pixels1.double(), pixels2.double(), found["conf"].double(), found["keep"].double()]
                    host = torch.stack(columns, 1).cpu().numpy()
                    host = host[host[:, 3] > 0]
                    result = (
                        i,
                        j,
                        host[:, 0].astype(np.int64),
                        host[:, 1].astype(np.int64),
                        host[:, 2].astype(np.float32),
                    )
                    self._put(matched, (seq, b, len(pairs), result))
                self.stages.add("match", time.perf_counter() - start)  # thread-seconds; 2 host syncs a pair

    def _write_loop(self, matched: queue.Queue[Any], database: PairSink, on_pair: Callable[[int], None],
                    commit_seconds: float) -> None:  # fmt: skip
        """Store the pairs in the plan's order, whichever matcher thread finishes first (keypoint ids are given
        in the order pairs are stored, so a run's database does not depend on the threads' timing)."""
        last = time.perf_counter()
        waiting: dict[tuple[int, int], tuple[int, Any]] = {}
        seq, position = 0, 0
        try:
            while (item := self._get(matched)) is not None:
                waiting[(item[0], item[1])] = (item[2], item[3])
                while (seq, position) in waiting:
                    size, pair = waiting.pop((seq, position))
                    seq, position = (seq, position + 1) if position + 1 < size else (seq + 1, 0)
                    start = time.perf_counter()
                    database.add_pair(*pair)
                    self.stages.pairs += 1
                    self.stages.matches += len(pair[2])
                    if start - last >= commit_seconds:
                        database.commit()
                        last = time.perf_counter()
                    self.stages.add("write", time.perf_counter() - start)
                    on_pair(len(pair[2]))
            if waiting:
                raise RuntimeError(f"{len(waiting)} matched pairs were never stored (pair {seq}:{position} missing)")
        finally:
            database.commit()  # the pairs finished so far, also when the run stops early
