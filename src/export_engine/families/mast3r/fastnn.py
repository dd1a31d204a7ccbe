"""FastNN-Lite: MASt3R reciprocal nearest-neighbour matching on the device, with the reference's exact results.

Same algorithm as :mod:`export_engine.families.mast3r.matching_reference` (upstream ``fast_reciprocal_NNs`` with
``dist='dot'``); what changes is where and how often work is done:

* Nearest neighbours are tiles of ``queries x keys`` similarities (one fp32 matmul each) folded into a running
  (max, first argmax) per query, so memory is O(tile + pixels): no N1 x N2 matrix ever exists. On CUDA the
  fused Triton kernel of :mod:`export_engine.families.mast3r.fastnn_kernel` does the same without writing any tile
  (``MatchConfig.kernel``).
* On CUDA, blocks of keys whose similarity bound shows they cannot hold a row's nearest neighbour (or a key
  tied with it) are skipped (the pruned search of :mod:`export_engine.families.mast3r.fastnn_kernel`).
* A pixel's nearest neighbour never changes, so each one is computed once and remembered in a per-pixel table
  (one per direction). Seeds whose chains meet, and the reverse run of :func:`extract_correspondences`
  (B -> A reads the same two tables as A -> B), ask for rows already known and cost nothing.
* With the fused kernel the whole round loop runs on the device with no host sync
  (:func:`export_engine.families.mast3r.fastnn_kernel.chains_on_device`): ``max_iter`` rounds of per-seed
  flags, where only the rows still unknown are claimed and computed, so converged seeds cost nothing and the
  loop can be recorded in CUDA graphs (:class:`CapturedMatcher`; :class:`CapturedCorrespondences` for the
  symmetric pass, whose map pairs walk both directions in lockstep): the first rounds in one, the rest in a
  second replayed only while a seed is still active.
  The torch-tile path (CPU) compacts the active seeds and unknown rows each round instead, a few host syncs per
  round and none per tile.
* De-duplication and the (idx1, idx2) order come from ``torch.unique`` on packed int64 keys, as upstream's
  ``np.unique`` on the same packing; the recorded graphs do the same with fixed-size buffers
  (:func:`sorted_unique`), so a call syncs once.

Ties: upstream takes ``torch.max(dim=1)`` over the similarity row (blocked: a running maximum that moves only
on a strictly larger value), i.e. the first index among equal maxima, which is also what ``np.argmax`` does.
Here every tile keeps its first maximum and later tiles only win on a strictly larger value: the same index.

Exactness: indices equal the reference's whenever both see the same fp32 similarity values. BLAS rounding
depends on the GEMM shape in small-shape paths (measured, D = 24: MKL when a thread gets fewer than 4 rows or
16 columns, cuBLAS for 1 row or fewer than 64 columns; 1-ulp differences up to 1.8e-7). This code pads every
matmul out of those paths (see :func:`nearest_by_dot`), so a pixel's neighbour does not depend on its batch.
The reference, like upstream, runs rounds with 1-3 active seeds through those paths; only a top-2 similarity
gap below ~2e-7 in such a round could make the two differ (as upstream differs between CPU and GPU). Verified
equal: matching.npz, symmetric.npz, synthetic 128x96 and 512x384 maps, on CPU and on an H100 (where CUDA,
CPU and both implementations all agreed). TF32 is switched off around the matmuls on CUDA.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch

from export_engine.errors import BackendError, ModelInputError
from export_engine.families.mast3r import fastnn_kernel
from export_engine.runners import gpu_gate

log = logging.getLogger(__name__)

Tensor = torch.Tensor
_Out = TypeVar("_Out")

# CPU tiles are capped at this side: measured (3072 queries x 196608 keys, D = 24, 2 cores) 0.33-0.38 s with
# 1024-2048 tiles against 1.7 s with 8192 x 8192 tiles, whose 256 MB similarity block does not stay in cache.
_CPU_TILE = 2048
_ROW_QUANTUM = 4  # matmul row counts are multiples of this (see nearest_by_dot)
_MIN_KEYS = 64  # and key tiles at least this wide, where there are that many keys


@dataclass(frozen=True)
class MatchConfig:
    """Knobs of the nearest-neighbour search (not of the seeding).

    `block_size` bounds a similarity tile to block_size**2 values (upstream's budget; on CPU the side is
    further capped at 2048 for the cache). `precision="fp16"` rounds the descriptors to fp16 and accumulates
    in fp32: not bit-equal to the fp32 reference (98 % of the matches shared on the 512x384 bench), and only
    ~7 % faster on an H100, where writing and reducing the fp32 similarity tiles dominates.
    """

    max_iter: int = 10
    block_size: int = 8192
    precision: Literal["fp32", "fp16"] = "fp32"
    # "fused": the Triton kernel of fastnn_kernel (dot products and argmax in registers, no similarity tiles);
    # "tiles": torch matmul tiles; "auto": "fused" where it can run (CUDA with triton, fp32), else "tiles".
    kernel: Literal["auto", "fused", "tiles"] = "auto"
    tiles: fastnn_kernel.Tiles = fastnn_kernel.DEFAULT_TILES  # the fused kernel's launch shape
    # CapturedMatcher / CapturedCorrespondences: rounds in the first CUDA graph; the rest are in a second graph,
    # replayed only where a seed is still active after the first (a converged pair skips their launches). On the
    # H200's 512x384 benchmark pair every seed had converged after 5 rounds; 6 leaves one round of room (pair
    # 2.45 ms against 2.68 with all 10 rounds in one graph, and 2.68 with 4, where the second graph always ran).
    captured_rounds: int = 6

    def __post_init__(self) -> None:
        if self.max_iter < 1 or self.block_size < 1 or self.captured_rounds < 1:
            raise ModelInputError(
                f"max_iter, block_size and captured_rounds must be >= 1, got {self.max_iter}, {self.block_size}, "
                f"{self.captured_rounds}"
            )
        if self.precision not in ("fp32", "fp16"):
            raise ModelInputError(f"precision must be 'fp32' or 'fp16', got {self.precision!r}")
        if self.kernel not in ("auto", "fused", "tiles"):
            raise ModelInputError(f"kernel must be 'auto', 'fused' or 'tiles', got {self.kernel!r}")

    def use_fused(self, device: torch.device) -> bool:
        """Whether the fused kernel computes the neighbours on `device` (raises if "fused" cannot run there)."""
        if self.kernel == "tiles":
            return False
        runnable, why = fastnn_kernel.available(device)
        if self.kernel == "fused":
            if not runnable or self.precision != "fp32":
                reason = why if not runnable else "it computes in fp32 only"
                raise BackendError(f"FastNN-Lite kernel='fused' cannot run: {reason}; use kernel='tiles' or 'auto'")
            return True
        return runnable and device.type == "cuda" and self.precision == "fp32"


@contextlib.contextmanager
def _ieee_fp32_matmul(device: torch.device) -> Iterator[None]:
    """Disable TF32 for CUDA matmuls inside the block (upstream croco enables it globally at import).

    torch refuses to mix its legacy (`allow_tf32`) and new (`fp32_precision`) flags, so the flag family the
    process already uses is the one saved and restored. Process-global: not safe against other threads.
    """
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    try:
        legacy: bool | None = bool(matmul.allow_tf32)
    except RuntimeError:  # the process set the new API: stay on it
        legacy = None
    if legacy is not None:
        matmul.allow_tf32 = False
    else:
        previous = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        if legacy is not None:
            matmul.allow_tf32 = legacy
        else:
            matmul.fp32_precision = previous


def _similarity(queries: Tensor, keys: Tensor, out: Tensor | None) -> Tensor:
    """(m, n) dot products; fp16 inputs only reach here on CUDA and come back as fp32."""
    if queries.dtype == torch.float16:
        return torch.mm(queries, keys.T, out_dtype=torch.float32)
    if out is None:
        return queries @ keys.T
    return torch.mm(queries, keys.T, out=out)


def nearest_by_dot(queries: Tensor, keys: Tensor, block_size: int = 8192) -> Tensor:
    """Index (int64) in `keys` (n, D) of the largest dot product for each row of `queries` (m, D).

    Equal maxima resolve to the first index. A similarity tile holds at most block_size**2 values (upstream's
    budget): block_size queries x block_size keys, or fewer queries x more keys, so that the late rounds, with
    few active seeds, take one or two wide tiles instead of hundreds of thin ones (GPU launch overhead).
    Every matmul has a row count that is a multiple of 4 (short blocks are padded with copies of their last
    row) and, when n allows, the full tile width of >= 64 keys (the last tile is moved back to end at n): the BLAS
    libraries round a dot product differently in their small-shape paths (measured: MKL when a thread gets
    fewer than 4 rows or 16 columns, cuBLAS for 1 row or fewer than 64 columns; 1-ulp differences), and this
    keeps a pixel's neighbour independent of which rows it was batched with.
    """
    m, n = queries.shape[0], keys.shape[0]
    tile = min(block_size, _CPU_TILE) if queries.device.type == "cpu" else block_size
    tile_q = _round_up(min(tile, max(m, 1)), _ROW_QUANTUM)
    tile_k = min(n, max(tile, tile * tile // tile_q, _MIN_KEYS))
    out = torch.empty(m, dtype=torch.int64, device=queries.device)
    buffer = None if queries.dtype == torch.float16 else queries.new_empty(tile_q * tile_k)
    fold = _fold_tile_sparse if queries.device.type == "cpu" else _fold_tile_dense
    key_starts = [min(j, n - tile_k) for j in range(0, n, tile_k)]  # last tile overlaps: strict > ignores repeats
    for i in range(0, m, tile_q):
        block = queries[i : i + tile_q]
        rows = block.shape[0]
        if rows % _ROW_QUANTUM:
            block = torch.cat([block, block[-1:].expand(_ROW_QUANTUM - rows % _ROW_QUANTUM, -1)])
        padded = block.shape[0]
        best_dtype = torch.float32 if buffer is None else buffer.dtype
        best = torch.full((padded,), -torch.inf, dtype=best_dtype, device=queries.device)
        arg = torch.zeros(padded, dtype=torch.int64, device=queries.device)
        for j in key_starts:
            view = None if buffer is None else buffer[: padded * tile_k].view(padded, tile_k)
            fold(_similarity(block, keys[j : j + tile_k], view), j, best, arg)
        out[i : i + rows] = arg[:rows]
    return out


def _round_up(value: int, quantum: int) -> int:
    return -(-value // quantum) * quantum


def _fold_tile_dense(sim: Tensor, offset: int, best: Tensor, arg: Tensor) -> None:
    """Running (max, argmax) update without host syncs (GPU): max with indices over the whole tile."""
    values, indices = sim.max(dim=1)  # first index among equal maxima
    better = values > best  # strict: an earlier tile keeps a tie
    torch.maximum(best, values, out=best)  # = where(better, values, best): inputs are finite
    torch.where(better, indices.add_(offset), arg, out=arg)


def _fold_tile_sparse(sim: Tensor, offset: int, best: Tensor, arg: Tensor) -> None:
    """Same update on CPU, where the argmax pass costs ~5x the max pass (measured 320 vs 60 ms for 600 M
    values): take the row maxima only, and the argmax of just the rows whose best improved."""
    values = sim.amax(dim=1)
    better = values > best
    rows = better.nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    if 2 * rows.numel() > sim.shape[0]:  # most rows improved (always so on the first tile): no gather
        best.copy_(torch.where(better, values, best))
        arg.copy_(torch.where(better, sim.argmax(dim=1) + offset, arg))
        return
    best[rows] = values[rows]
    arg[rows] = sim.index_select(0, rows).argmax(dim=1) + offset  # same values, first index of the max


class _MemoNN:
    """Nearest neighbour in `keys` of each row of `source`, computed on first request and then remembered."""

    def __init__(self, source: Tensor, keys: Tensor, config: MatchConfig) -> None:
        self.source, self.keys, self.config = source, keys, config
        self.table = torch.full((source.shape[0],), -1, dtype=torch.int64, device=source.device)
        self._wanted = torch.zeros(source.shape[0], dtype=torch.bool, device=source.device)
        self.rows_computed = 0

    def __call__(self, rows: Tensor) -> Tensor:
        # Rows asked for and not known yet, sorted and unique: a mask over all rows and one nonzero (one host
        # sync), instead of boolean indexing plus torch.unique's sort (two syncs and a sort per round).
        self._wanted.zero_()
        self._wanted[rows] = True
        self._wanted &= self.table < 0
        missing = self._wanted.nonzero().squeeze(1)
        if missing.numel() > 0:
            self.table[missing] = nearest_by_dot(self.source[missing], self.keys, self.config.block_size)
            self.rows_computed += int(missing.numel())
        return self.table[rows]


def _check_map(name: str, desc: object) -> Tensor:
    if not isinstance(desc, Tensor):
        raise ModelInputError(f"{name} must be a torch.Tensor (H, W, D), got {type(desc).__name__}")
    if desc.ndim != 3 or min(desc.shape) < 1:
        raise ModelInputError(f"{name} must be a non-empty (H, W, D) descriptor map, got shape {tuple(desc.shape)}")
    if not desc.dtype.is_floating_point:
        raise ModelInputError(f"{name} must be floating point (float32 expected), got {desc.dtype}")
    if desc.shape[0] * desc.shape[1] >= 2**31:
        raise ModelInputError(f"{name}: {desc.shape[0]} x {desc.shape[1]} pixels do not fit int32 flat indices")
    return desc


class ReciprocalMatcher:
    """Reciprocal matching between two descriptor maps, remembering every nearest neighbour it computed.

    :meth:`swapped` gives the matcher for (desc2, desc1) sharing the same remembered neighbours.
    """

    def __init__(self, desc1: Tensor, desc2: Tensor, config: MatchConfig | None = None) -> None:
        desc1, desc2 = _check_map("desc1", desc1), _check_map("desc2", desc2)
        if desc1.shape[2] != desc2.shape[2] or desc1.device != desc2.device or desc1.dtype != desc2.dtype:
            raise ModelInputError(
                f"descriptor maps disagree: {tuple(desc1.shape)} {desc1.dtype} on {desc1.device} vs "
                f"{tuple(desc2.shape)} {desc2.dtype} on {desc2.device} (need the same D, dtype and device)"
            )
        if not (torch.isfinite(desc1).all() and torch.isfinite(desc2).all()):
            raise ModelInputError("descriptor maps contain NaN or inf; nearest neighbours would be meaningless")
        self.config = config or MatchConfig()
        self.rows_per_step: Tensor | None = None  # fused path: rows computed at each step of the last chains()
        self.shape1 = (int(desc1.shape[0]), int(desc1.shape[1]))
        self.shape2 = (int(desc2.shape[0]), int(desc2.shape[1]))
        flat1, flat2 = (self._compute_dtype(d.reshape(-1, d.shape[2])) for d in (desc1, desc2))
        self._nn12: _MemoNN | fastnn_kernel.NearestTable
        self._nn21: _MemoNN | fastnn_kernel.NearestTable
        if self.config.use_fused(desc1.device):
            # Row lists hold at most one entry per seed: the grid seeds of the smaller subsample we serve (1).
            rows = max(flat1.shape[0], flat2.shape[0])
            tiles = self.config.tiles
            self._nn12 = fastnn_kernel.NearestTable(flat1, flat2, rows, tiles, key_shape=self.shape2)
            self._nn21 = fastnn_kernel.NearestTable(flat2, flat1, rows, tiles, key_shape=self.shape1)
        else:
            self._nn12 = _MemoNN(flat1, flat2, self.config)
            self._nn21 = _MemoNN(flat2, flat1, self.config)

    def _compute_dtype(self, flat: Tensor) -> Tensor:
        if self.config.precision == "fp16":
            half = flat.to(torch.float16).contiguous()
            # fp16 products are exact in fp32, so CPU (no fp16 -> fp32 GEMM) gets the same semantics upcast.
            return half if half.device.type == "cuda" else half.float()
        return flat.contiguous() if flat.dtype == torch.float64 else flat.float().contiguous()

    @property
    def device(self) -> torch.device:
        return self._nn12.table.device

    @property
    def rows_computed(self) -> int:
        """Nearest-neighbour rows computed so far, both directions (a host sync on the fused path)."""
        nn12, nn21 = self._nn12, self._nn21
        if isinstance(nn12, fastnn_kernel.NearestTable) and isinstance(nn21, fastnn_kernel.NearestTable):
            return int(nn12.computed + nn21.computed)
        assert isinstance(nn12, _MemoNN) and isinstance(nn21, _MemoNN)  # both directions use one kind
        return nn12.rows_computed + nn21.rows_computed

    def swapped(self) -> ReciprocalMatcher:
        other = object.__new__(ReciprocalMatcher)
        other.config, other.shape1, other.shape2 = self.config, self.shape2, self.shape1
        other.rows_per_step = None
        other._nn12, other._nn21 = self._nn21, self._nn12
        return other

    def grid_seeds(self, subsample: int) -> Tensor:
        """Flat int64 indices y * W1 + x of x, y in subsample//2, subsample//2 + subsample, ... (sorted)."""
        if subsample < 1:
            raise ModelInputError(f"subsample must be >= 1, got {subsample}")
        height, width = self.shape1
        start = subsample // 2  # torch.arange refuses start > end where range() gives nothing
        ys = torch.arange(start, max(start, height), subsample, device=self.device)
        xs = torch.arange(start, max(start, width), subsample, device=self.device)
        return (ys[:, None] * width + xs[None, :]).reshape(-1)

    def chains(self, seeds: Tensor, max_iter: int) -> tuple[Tensor, Tensor, Tensor]:
        """Walk each seed 1 -> 2 -> 1 until reciprocal; returns (idx1, idx2, converged) per seed, int64/bool."""
        if isinstance(self._nn12, fastnn_kernel.NearestTable) and isinstance(self._nn21, fastnn_kernel.NearestTable):
            idx1, idx2, converged, self.rows_per_step = fastnn_kernel.chains_on_device(
                self._nn12, self._nn21, seeds, max_iter
            )
            return idx1, idx2, converged
        with _ieee_fp32_matmul(self.device):
            return self._chains(seeds, max_iter)

    def _chains(self, seeds: Tensor, max_iter: int) -> tuple[Tensor, Tensor, Tensor]:
        assert isinstance(self._nn12, _MemoNN) and isinstance(self._nn21, _MemoNN)
        n = seeds.numel()
        idx1, prev1 = seeds.clone(), seeds.clone()
        idx2 = torch.full_like(seeds, -1)
        prev2 = idx2.clone()
        active = torch.arange(n, device=seeds.device)
        rounds = 0
        while active.numel() > 0:
            found2 = self._nn12(idx1[active])
            idx2[active] = found2
            active = active[found2 != prev2[active]]  # image-2 point unchanged since last round: reciprocal
            found1 = self._nn21(idx2[active])
            idx1[active] = found1
            active = active[found1 != prev1[active]]  # back where the round started: reciprocal
            rounds += 1
            if rounds >= max_iter:
                break
            prev1[active], prev2[active] = idx1[active], idx2[active]
        converged = torch.ones(n, dtype=torch.bool, device=seeds.device)
        converged[active] = False
        log.debug(
            "fastnn: %d seeds, %d rounds, %d not converged, %d NN rows computed so far",
            n,
            rounds,
            active.numel(),
            self.rows_computed,
        )
        return idx1, idx2, converged


def _seeds_from_xy(matcher: ReciprocalMatcher, init_xy1: tuple[Tensor, Tensor]) -> Tensor:
    x1, y1 = (torch.as_tensor(v, device=matcher.device).reshape(-1).long() for v in init_xy1)
    height, width = matcher.shape1
    if x1.shape != y1.shape or bool(((x1 < 0) | (x1 >= width) | (y1 < 0) | (y1 >= height)).any()):
        raise ModelInputError(f"init_xy1 must be two equal-length (x, y) vectors inside {width}x{height}")
    return torch.unique(x1 + width * y1)


def pack_pairs(idx1: Tensor, idx2: Tensor) -> Tensor:
    """int64 keys whose order is the (idx1, idx2) lexicographic order (idx1 in the high 32 bits)."""
    return (idx1.long() << 32) | idx2.long()


def _split_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    """The (idx1, idx2) halves of keys from :func:`pack_pairs`."""
    return keys >> 32, keys & 0xFFFFFFFF


def _unpack(keys: Tensor, shape1: tuple[int, int], shape2: tuple[int, int], ret_xy: bool) -> tuple[Tensor, Tensor]:
    idx1, idx2 = _split_keys(keys)
    if not ret_xy:
        return idx1.int(), idx2.int()
    return (
        torch.stack([idx1 % shape1[1], idx1 // shape1[1]], dim=1),
        torch.stack([idx2 % shape2[1], idx2 // shape2[1]], dim=1),
    )


_NO_PAIR = torch.iinfo(torch.int64).max  # a key no pair packs to (both indices < 2**31): sorts after every pair


def sorted_unique(keys: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.unique(keys[valid])`` without a host sync, so that a CUDA graph can record it.

    Returns a buffer of ``len(keys) + 1`` entries whose first ``count`` hold the sorted distinct keys (the rest
    hold a key no pair has), each one's first position in `keys` (like ``np.unique``'s index), and ``count``
    (int64 device scalar). A stable sort keeps equal keys in their order, so the first of each run of equal
    keys is their first occurrence.
    """
    n = keys.numel()
    ordered, order = torch.sort(torch.where(valid, keys, _NO_PAIR), stable=True)
    first = torch.ones_like(valid)
    first[1:] = ordered[1:] != ordered[:-1]
    keep = first & (ordered != _NO_PAIR)
    slot = torch.where(keep, torch.cumsum(keep, 0) - 1, n)  # dropped entries all write the spare last slot
    unique = torch.full((n + 1,), _NO_PAIR, dtype=torch.int64, device=keys.device)
    unique.scatter_(0, slot, torch.where(keep, ordered, _NO_PAIR))
    position = torch.full((n + 1,), n, dtype=torch.int64, device=keys.device)
    position.scatter_(0, slot, torch.where(keep, order, n))
    return unique, position, keep.sum()


def fast_reciprocal_nn(
    desc1: Tensor,
    desc2: Tensor,
    subsample: int = 8,
    max_iter: int = 10,
    block_size: int = 8192,
    ret_xy: bool = True,
    *,
    init_xy1: tuple[Tensor, Tensor] | None = None,
    pixel_tol: float = 0.0,
    precision: Literal["fp32", "fp16"] = "fp32",
    kernel: Literal["auto", "fused", "tiles"] = "auto",
) -> tuple[Tensor, Tensor]:
    """Reciprocal matches between (H1, W1, D) and (H2, W2, D) maps, sorted by (index 1, index 2).

    Returns two (M, 2) int64 (x, y) tensors, or with ``ret_xy=False`` two (M,) int32 flat indices y * W + x,
    on the maps' device. Explicit seeds `init_xy1` = (x, y) run one round as upstream; with ``pixel_tol > 0``
    a seed is kept when it comes back within `pixel_tol` px and is itself returned for image 1.
    """
    config = MatchConfig(max_iter=max_iter, block_size=block_size, precision=precision, kernel=kernel)
    matcher = ReciprocalMatcher(desc1, desc2, config)
    return matcher_reciprocal_nn(matcher, subsample, ret_xy, init_xy1=init_xy1, pixel_tol=pixel_tol)


def matcher_reciprocal_nn(
    matcher: ReciprocalMatcher,
    subsample: int = 8,
    ret_xy: bool = True,
    *,
    init_xy1: tuple[Tensor, Tensor] | None = None,
    pixel_tol: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """:func:`fast_reciprocal_nn` on an existing matcher (reusing the neighbours it already knows)."""
    if init_xy1 is None:
        if pixel_tol > 0:
            raise ModelInputError("pixel_tol > 0 needs explicit seeds init_xy1=(x, y), as upstream")
        seeds, max_iter = matcher.grid_seeds(subsample), matcher.config.max_iter
    else:
        seeds, max_iter = _seeds_from_xy(matcher, init_xy1), 1
    idx1, idx2, converged = matcher.chains(seeds, max_iter)
    if pixel_tol > 0:
        width = matcher.shape1[1]
        dy = (seeds // width - idx1 // width).double()
        dx = (seeds % width - idx1 % width).double()
        converged = torch.sqrt(dy * dy + dx * dx) < pixel_tol  # float64 like upstream's np.linalg.norm
        idx1 = seeds
    keys = torch.unique(pack_pairs(idx1[converged], idx2[converged]))  # sorted
    return _unpack(keys, matcher.shape1, matcher.shape2, ret_xy)


def _fused_for_capture(
    owner: str, config: MatchConfig | None, device: torch.device | str
) -> tuple[torch.device, MatchConfig]:
    device = torch.device(device)
    config = config or MatchConfig(kernel="fused")
    if device.type != "cuda" or not config.use_fused(device):
        raise BackendError(f"{owner} records a CUDA graph of the fused kernel: needs CUDA, got {device}")
    return device, config


def _refresh_tables(matcher: ReciprocalMatcher) -> None:
    """Inside a recorded step: the matcher's two neighbour tables forget the previous maps' neighbours."""
    for table in (matcher._nn12, matcher._nn21):
        assert isinstance(table, fastnn_kernel.NearestTable)
        table.refresh()


def _capture(step: Callable[[], _Out]) -> tuple[torch.cuda.CUDAGraph, _Out]:
    """``step`` recorded as a CUDA graph, with its outputs (the graph's buffers); run once before, on a side
    stream, so that the kernels compile outside the recording."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # torch records in CUDA's global capture mode: no other thread's GPU calls may run meanwhile (gpu_gate)
    with gpu_gate.exclusive(torch.cuda.current_device()), torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


class _Walk:
    """One group's runs on the device: a single run (:class:`fastnn_kernel.DeviceChains`), or a map pair's two
    directions in lockstep (:class:`fastnn_kernel.PairedChains`), its steps split after `split` rounds."""

    def __init__(self, runs: Sequence[tuple[ReciprocalMatcher, Tensor]], split: int) -> None:
        matcher, seeds = runs[0]
        nn12, nn21 = matcher._nn12, matcher._nn21
        assert isinstance(nn12, fastnn_kernel.NearestTable) and isinstance(nn21, fastnn_kernel.NearestTable)
        max_iter = matcher.config.max_iter
        self.walk: fastnn_kernel.DeviceChains | fastnn_kernel.PairedChains
        if len(runs) == 2 and runs[1][0]._nn12 is nn21 and runs[1][0]._nn21 is nn12:
            self.walk = fastnn_kernel.PairedChains(nn12, nn21, seeds, runs[1][1], max_iter)
        elif len(runs) == 1:
            self.walk = fastnn_kernel.DeviceChains(nn12, nn21, seeds, max_iter)
        else:
            raise ValueError(f"a walk holds one run or a map pair's two directions, got {len(runs)} runs")
        # the first graph's steps: the seeds' rows and the first `split` rounds (a paired backward walk is a step
        # behind and finishes its last of them in the second graph), or every step
        self.middle = 2 * split + 1 if split < max_iter else self.walk.steps

    def first(self) -> None:
        self.walk.run(0, self.middle)

    def rest(self) -> None:
        self.walk.run(self.middle, self.walk.steps)

    def outputs(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        walk = self.walk
        return walk.outputs() if isinstance(walk, fastnn_kernel.PairedChains) else [walk.outputs()]


class _RecordedRounds:
    """The device loop of some runs (matcher, seeds) recorded as two CUDA graphs over the maps in `descs`.

    The first graph re-reads the keys, forgets the previous maps' neighbours, checks the maps are finite and runs
    the first ``captured_rounds`` rounds of every run; the second runs the remaining rounds up to ``max_iter``
    and is replayed only when a seed of some run is still active after the first (a round without an active seed
    changes nothing, so skipping them is exact). Both end with `finish` on the runs' (idx1, idx2, converged),
    whose tensors (sizes fixed) end with a count; the host reads the flags and that count in one sync.
    """

    def __init__(self, matchers: Sequence[ReciprocalMatcher], runs: Sequence[tuple[ReciprocalMatcher, Tensor]],
                 descs: Sequence[Tensor], finish: Callable[[list[tuple[Tensor, Tensor, Tensor]]], tuple[Tensor, ...]]
                 ) -> None:  # fmt: skip
        self._matchers, self._runs, self._descs, self._finish = matchers, runs, descs, finish
        config = matchers[0].config
        self.split = min(config.captured_rounds, config.max_iter)
        # Runs that share neighbour tables (a map pair's two directions) walk together, in lockstep; groups that
        # share none (the two map pairs of the symmetric mode) run on streams of their own, so that they overlap.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (matcher, _) in enumerate(runs):
            a, b = id(matcher._nn12), id(matcher._nn21)
            groups.setdefault((min(a, b), max(a, b)), []).append(i)
        self._groups = list(groups.values())
        if [i for group in self._groups for i in group] != list(range(len(runs))):
            raise ValueError("runs that share neighbour tables must be adjacent")
        self._streams = [torch.cuda.Stream() for _ in self._groups] if len(self._groups) > 1 else []
        self.walks: list[_Walk] = []
        self._first, (self._outputs, self._flags) = _capture(self._record_first)
        self._rest: torch.cuda.CUDAGraph | None = None
        if self.split < config.max_iter:
            self._first.replay()  # the second graph's warm-up run reads the state the first leaves
            self._rest = _capture(self._record_rest)[0]
        self.rest_replays = 0  # how often the second graph ran

    def _record_first(self) -> tuple[list[tuple[Tensor, Tensor, Tensor]], Tensor]:
        for matcher in self._matchers:
            _refresh_tables(matcher)
        finite = torch.stack([torch.isfinite(d).all() for d in self._descs]).all()
        self.walks = [_Walk([self._runs[i] for i in group], self.split) for group in self._groups]
        self._per_group(lambda g: self.walks[g].first())
        active = torch.stack([walk.walk.any_active() for walk in self.walks]).any()
        outputs = [output for walk in self.walks for output in walk.outputs()]
        self.finished = self._finish(outputs)
        return outputs, torch.stack([finite.long(), active.long(), self.finished[-1].long()])

    def _record_rest(self) -> None:
        def rest(g: int) -> None:
            self.walks[g].rest()
            for i, new in zip(self._groups[g], self.walks[g].outputs(), strict=True):
                for output, value in zip(self._outputs[i], new, strict=True):
                    output.copy_(value)

        self._per_group(rest)
        for done, new in zip(self.finished, self._finish(self._outputs), strict=True):
            done.copy_(new)

    def _per_group(self, work: Callable[[int], None]) -> None:
        """work(g) for every group; each group on its own stream where there are several (forked from the current
        stream and joined back, which a CUDA graph records as parallel branches)."""
        if not self._streams:
            for g in range(len(self._groups)):
                work(g)
            return
        main = torch.cuda.current_stream()
        for g, stream in enumerate(self._streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                work(g)
        for stream in self._streams:
            main.wait_stream(stream)

    def replay(self) -> tuple[tuple[Tensor, ...], int]:
        """`finish`'s tensors for the maps now in `descs` and their count (ModelInputError if not finite)."""
        self._first.replay()
        finite, active, count = self._flags.tolist()
        if not finite:
            raise ModelInputError("descriptor maps contain NaN or inf; nearest neighbours would be meaningless")
        if active and self._rest is not None:
            self._rest.replay()
            self.rest_replays += 1
            count = int(self.finished[-1])
        return self.finished, count


def _pair_keys(runs: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The one run's distinct converged (idx1, idx2) keys, sorted (the first `count`), and `count`."""
    idx1, idx2, converged = runs[0]
    keys, _, count = sorted_unique(pack_pairs(idx1, idx2), converged)
    return keys, count


class CapturedMatcher:
    """FastNN-Lite for one pair of map shapes recorded as CUDA graphs: every round of every seed in one replay,
    or two where seeds are still active after ``config.captured_rounds`` rounds.

    The maps are copied into buffers the graphs own; the replay re-reads the keys, forgets the previous pair's
    neighbours, runs up to ``max_iter`` rounds of the device loop and de-duplicates the matches into a buffer
    of fixed size. The host syncs once after the first graph (maps finite, second graph needed, number of
    matches), and again only where the second graph ran. Same results as :func:`fast_reciprocal_nn` with the
    fused kernel.
    """

    def __init__(
        self,
        shape1: tuple[int, int, int],
        shape2: tuple[int, int, int],
        subsample: int = 8,
        config: MatchConfig | None = None,
        device: torch.device | str = "cuda",
    ) -> None:
        device, config = _fused_for_capture("CapturedMatcher", config, device)
        self._desc1 = torch.zeros(shape1, dtype=torch.float32, device=device)
        self._desc2 = torch.zeros(shape2, dtype=torch.float32, device=device)
        self._matcher = ReciprocalMatcher(self._desc1, self._desc2, config)
        self._seeds = self._matcher.grid_seeds(subsample)
        self._recorded = _RecordedRounds([self._matcher], [(self._matcher, self._seeds)], [self._desc1, self._desc2],
                                         _pair_keys)  # fmt: skip

    @property
    def rows_per_step(self) -> Tensor:
        """Rows computed at each step of the last replay (device tensor; see ReciprocalMatcher.rows_per_step)."""
        return self._recorded.walks[0].walk.counts

    @property
    def rest_replays(self) -> int:
        """How many calls needed the rounds after ``captured_rounds`` (a seed was still active)."""
        return self._recorded.rest_replays

    def __call__(self, desc1: Tensor, desc2: Tensor, ret_xy: bool = True) -> tuple[Tensor, Tensor]:
        """Matches of two maps of the recorded shapes, as :func:`fast_reciprocal_nn` returns them."""
        for name, desc, buffer in (("desc1", desc1, self._desc1), ("desc2", desc2, self._desc2)):
            if not isinstance(desc, Tensor) or desc.shape != buffer.shape:
                got = tuple(desc.shape) if isinstance(desc, Tensor) else type(desc).__name__
                raise ModelInputError(f"{name} must be a tensor of the recorded shape {tuple(buffer.shape)}, got {got}")
            buffer.copy_(desc)
        (keys, _), count = self._recorded.replay()
        return _unpack(keys[:count], self._matcher.shape1, self._matcher.shape2, ret_xy)


def _check_symmetric(descs: Sequence[Tensor], qconfs: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The maps (11, 21, 22, 12) and their confidences, checked: image 1's two maps and confidences agree in
    (H, W), and so do image 2's."""
    if len(descs) != 4 or len(qconfs) != 4:
        raise ModelInputError(
            f"need 4 descriptor maps (11, 21, 22, 12) and 4 confidences, got {len(descs)}, {len(qconfs)}"
        )
    d11, d21, d22, d12 = (_check_map(f"descs[{i}]", d) for i, d in enumerate(descs))
    q11, q21, q22, q12 = (torch.as_tensor(q, device=d11.device) for q in qconfs)
    if not (d11.shape[:2] == d12.shape[:2] == q11.shape == q12.shape):
        raise ModelInputError(
            f"image 1 maps disagree: descs {tuple(d11.shape)}, {tuple(d12.shape)}, confidences "
            f"{tuple(q11.shape)}, {tuple(q12.shape)}"
        )
    if not (d21.shape[:2] == d22.shape[:2] == q21.shape == q22.shape):
        raise ModelInputError(
            f"image 2 maps disagree: descs {tuple(d21.shape)}, {tuple(d22.shape)}, confidences "
            f"{tuple(q21.shape)}, {tuple(q22.shape)}"
        )
    return [d11, d21, d22, d12], [q11, q21, q22, q12]


def _hw(desc: Tensor) -> tuple[int, int]:
    return int(desc.shape[0]), int(desc.shape[1])


def _directions(matcher: ReciprocalMatcher, subsample: int) -> list[tuple[ReciprocalMatcher, Tensor]]:
    """The two runs of a map pair, in the reference's order: seeds on image 1's grid, then image 2's."""
    backward = matcher.swapped()
    return [(matcher, matcher.grid_seeds(subsample)), (backward, backward.grid_seeds(subsample))]


def _merge(runs: Sequence[tuple[Tensor, Tensor, Tensor]], shapes: Sequence[tuple[int, int]],
           qconfs: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Upstream's merge of the four runs (pair (11, 21) forward, backward, pair (12, 22) forward, backward):
    each run's converged chains de-duplicated and sorted as its own (seed image, other image) keys, all runs
    concatenated as (image 1, image 2) pairs, one entry per pair kept with the confidence of its first
    occurrence, sqrt(qconf1 * qconf2)."""
    shape1, shape2 = shapes
    q11, q21, q22, q12 = qconfs
    idx1, idx2, conf1, conf2 = [], [], [], []
    for k, (conf_a, conf_b) in enumerate(((q11, q21), (q12, q22))):
        (s_fwd, o_fwd, c_fwd), (s_bwd, o_bwd, c_bwd) = runs[2 * k], runs[2 * k + 1]
        a_fwd, b_fwd = _unpack(torch.unique(pack_pairs(s_fwd[c_fwd], o_fwd[c_fwd])), shape1, shape2, False)
        b_bwd, a_bwd = _unpack(torch.unique(pack_pairs(s_bwd[c_bwd], o_bwd[c_bwd])), shape2, shape1, False)
        idx1.append(torch.cat([a_fwd, a_bwd]).long())
        idx2.append(torch.cat([b_fwd, b_bwd]).long())
        conf1.append(conf_a.reshape(-1)[idx1[-1]])
        conf2.append(conf_b.reshape(-1)[idx2[-1]])
    all1, all2 = torch.cat(idx1), torch.cat(idx2)
    keys, inverse = torch.unique(pack_pairs(all1, all2), return_inverse=True)
    position = torch.arange(all1.numel(), device=all1.device)
    first = torch.full((keys.numel(),), all1.numel(), device=all1.device, dtype=torch.int64)
    first.scatter_reduce_(0, inverse, position, reduce="amin")  # first occurrence, like np.unique's index
    xy1, xy2 = _unpack(keys, shape1, shape2, True)
    return xy1, xy2, sqrt_rounded(torch.cat(conf1)[first] * torch.cat(conf2)[first])


def _merge_on_device(runs: Sequence[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_merge`'s pairs without a host sync (a CUDA graph records it): the merged keys (sorted, the first
    `count` entries of the buffer), each one's first position in the concatenation of the four runs' pairs, that
    concatenation's image-1 and image-2 indices (entries that hold no pair point at index 0) and `count`.
    Each run's pairs are its distinct converged chains in a buffer of fixed size, so a pair's first occurrence
    in the padded concatenation is its first occurrence in the runs' pairs."""
    idx1, idx2, valid = [], [], []
    for k in range(2):
        for run, forward in ((runs[2 * k], True), (runs[2 * k + 1], False)):
            seeds, others, converged = run
            keys = sorted_unique(pack_pairs(seeds, others), converged)[0]
            ok = keys != _NO_PAIR
            a, b = (torch.where(ok, part, 0) for part in _split_keys(keys))
            idx1.append(a if forward else b)
            idx2.append(b if forward else a)
            valid.append(ok)
    all1, all2, ok_all = torch.cat(idx1), torch.cat(idx2), torch.cat(valid)
    keys, first, count = sorted_unique(pack_pairs(all1, all2), ok_all)
    return keys, first, torch.stack([all1, all2]), count


def _merged_pairs(merged: Sequence[Tensor], count: int, segments: Sequence[int], shapes: Sequence[tuple[int, int]],
                  qconfs: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """:func:`_merge`'s result from :func:`_merge_on_device`'s tensors, its `count` and the runs' buffer sizes
    (seeds + 1 each): xy1, xy2 and each pair's confidence sqrt(qconf1 * qconf2) at its first occurrence, taken
    from the map pair its run matched ((11, 21) for runs 0 and 1, (12, 22) for runs 2 and 3)."""
    keys, first, pairs = merged[0][:count], merged[1][:count], merged[2]
    q11, q21, q22, q12 = (q.reshape(-1) for q in qconfs)
    part1, part2 = (torch.split(p, list(segments)) for p in pairs)
    conf1 = torch.cat([q[i] for q, i in zip((q11, q11, q12, q12), part1, strict=True)])
    conf2 = torch.cat([q[i] for q, i in zip((q21, q21, q22, q22), part2, strict=True)])
    xy1, xy2 = _unpack(keys, shapes[0], shapes[1], True)
    return xy1, xy2, sqrt_rounded(conf1[first] * conf2[first])


def extract_correspondences(
    descs: Sequence[Tensor],
    qconfs: Sequence[Tensor],
    subsample: int = 8,
    config: MatchConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Upstream ``sparse_ga.extract_correspondences`` for the maps (11, 21, 22, 12) of a symmetric pass.

    (11, 21) and (12, 22) are matched both ways; all pairs are merged in that order, a pair's first occurrence
    keeps its confidence sqrt(qconf1 * qconf2). Returns xy1, xy2 (M, 2) int64 (x, y) and conf (M,).
    """
    (d11, d21, d22, d12), confs = _check_symmetric(descs, qconfs)
    runs = []
    for desc_a, desc_b in ((d11, d21), (d12, d22)):
        for matcher, seeds in _directions(ReciprocalMatcher(desc_a, desc_b, config), subsample):
            runs.append(matcher.chains(seeds, matcher.config.max_iter))
    return _merge(runs, (_hw(d11), _hw(d22)), confs)


class CapturedCorrespondences:
    """:func:`extract_correspondences` for one pair of image shapes recorded as CUDA graphs: both map pairs, both
    directions, every round, in one replay, or two where seeds are still active after ``config.captured_rounds``
    rounds. The tables of a map pair are shared by its two directions, as in the eager path, and the two walk in
    lockstep (:class:`fastnn_kernel.PairedChains`: one launch per step for both; the map pairs on two streams).
    The merge of the four runs is recorded too; the host synchronises once after the first graph (maps finite,
    second graph needed, number of pairs), and again only where the second graph ran. Same results as
    :func:`extract_correspondences` with the fused kernel.
    """

    def __init__(
        self,
        shape1: tuple[int, int, int],
        shape2: tuple[int, int, int],
        subsample: int = 8,
        config: MatchConfig | None = None,
        device: torch.device | str = "cuda",
    ) -> None:
        device, config = _fused_for_capture("CapturedCorrespondences", config, device)
        shapes = (shape1, shape2, shape2, shape1)  # maps 11, 21, 22, 12
        self._descs = [torch.zeros(shape, dtype=torch.float32, device=device) for shape in shapes]
        d11, d21, d22, d12 = self._descs
        self._matchers = [ReciprocalMatcher(d11, d21, config), ReciprocalMatcher(d12, d22, config)]
        self._runs = [run for m in self._matchers for run in _directions(m, subsample)]
        self._recorded = _RecordedRounds(self._matchers, self._runs, self._descs, _merge_on_device)
        self._segments = [seeds.numel() + 1 for _, seeds in self._runs]  # each run's share of the merged pairs

    @property
    def rows_per_step(self) -> list[Tensor]:
        """Rows computed at each step of the last replay, per map pair ((11, 21), then (12, 22)); a pair's two
        directions walk in lockstep, so step s holds the forward walk's step s and the backward's s - 1 (device
        tensors)."""
        return [walk.walk.counts for walk in self._recorded.walks]

    @property
    def rest_replays(self) -> int:
        """How many calls needed the rounds after ``captured_rounds`` (a seed was still active)."""
        return self._recorded.rest_replays

    def __call__(self, descs: Sequence[Tensor], qconfs: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Correspondences of four maps of the recorded shapes, as :func:`extract_correspondences` returns them."""
        checked, confs = _check_symmetric(descs, qconfs)
        for i, (desc, buffer) in enumerate(zip(checked, self._descs, strict=True)):
            if desc.shape != buffer.shape:
                raise ModelInputError(
                    f"descs[{i}] must have the recorded shape {tuple(buffer.shape)}, got {tuple(desc.shape)}"
                )
            buffer.copy_(desc)
        merged, count = self._recorded.replay()
        shapes = (_hw(self._descs[0]), _hw(self._descs[1]))
        return _merged_pairs(merged, count, self._segments, shapes, [c.to(self._descs[0].device) for c in confs])


def sqrt_rounded(values: Tensor) -> Tensor:
    """Correctly rounded sqrt, like numpy's (upstream takes np.sqrt of the float32 products).

    torch's CPU float32 sqrt is off by one ulp for ~20 % of inputs (measured against np.sqrt, torch 2.13);
    sqrt in float64 rounded once to float32 is exact (53 >= 2 * 24 + 2 bits: double rounding is harmless).
    """
    if values.dtype == torch.float64:
        return torch.sqrt(values)
    return torch.sqrt(values.double()).to(values.dtype)


def filter_border_matches(
    xy1: Tensor, xy2: Tensor, shape1: tuple[int, int], shape2: tuple[int, int], border: int = 3
) -> tuple[Tensor, Tensor]:
    """Keep matches whose (x, y) lie at least `border` px inside both images, `shape` = (H, W) (upstream README)."""

    def inside(xy: Tensor, shape: tuple[int, int]) -> Tensor:
        x, y = xy[:, 0], xy[:, 1]
        return (x >= border) & (x < shape[1] - border) & (y >= border) & (y < shape[0] - border)

    keep = inside(xy1, shape1) & inside(xy2, shape2)
    return xy1[keep], xy2[keep]
