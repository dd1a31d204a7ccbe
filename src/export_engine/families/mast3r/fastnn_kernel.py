"""FastNN-Lite on the device (Triton): fused nearest-neighbour kernel and a round loop with no host syncs.

Nearest neighbours. The torch path of :func:`export_engine.families.mast3r.fastnn.nearest_by_dot` writes every
``queries x keys`` similarity tile to device memory and reads it back for the row maximum; at 512x384 that
traffic, not the arithmetic, is what a Hopper GPU spends its time on. Here a program holds a block of queries in
registers, walks a range of keys, and keeps a running (max, first index) per query and per tile column, so
similarities never leave registers. The kernel is persistent: it reads the number of rows from device memory and
divides (row block, key range) work items over a fixed grid, so a launch needs no host-side count, late rounds
with a few dozen rows still spread their keys over every SM, and a launch with no rows returns at once.

Exactness: each similarity is ``sum_k q[k] * key[k]`` formed by fp32 fused multiply-adds over the features in
order, starting from zero, which is how the BLAS GEMMs of the reference compute a short (D = 24) dot product:
``tl.dot`` in IEEE fp32 (Triton's FMA matmul) over the first features, then, when D lies between 16 and 32,
explicit ``fma`` steps for the features past 16 (no padding to 32: a quarter less arithmetic at D = 24).
Measured on an H100 and an H200: matches identical to the cuBLAS-based reference on the 512x384 benchmark maps
and on random and tied inputs (tests). Ties resolve to the first index, as ``torch.max(dim=1)`` and
``np.argmax`` do: within a column slot a later key only wins on a strictly larger value, and across slots and
key ranges the smallest index among equal maxima wins.

Pruned search. Where a table knows its keys' map shape (``NearestTable(key_shape=...)``, as the matcher gives
it), most keys are never compared: keys are grouped into small spatial blocks with a centroid and a radius, a
row's lower bound comes from one probe group of blocks, and only the blocks whose upper bound reaches it are
computed, with the same arithmetic and tie rule as above (:class:`_KeyBlocks` has the bound and its rounding
margins). On smooth descriptor maps a few percent of the blocks remain; a launch that would keep too many runs
unpruned. A launch is six kernels: probe (each row's best group centroid), lower bound (the best key of that
group), bound pass (every block's upper bound against it; kept pairs counted per block and written as one entry
per row and step of blocks, a bit per block kept), scan (each block's place and its chunks of pairs), placing
(the pairs grouped by block) and the exact pass (a chunk of one block's pairs at a time).

Round loop. :func:`chains_on_device` walks every seed 1 -> 2 -> 1 for a fixed number of rounds with per-seed
"active" flags. Rows still unknown are claimed in the per-pixel neighbour tables by atomic compare-and-swap
(-1 -> -2) and appended to a row list by an atomic counter, so de-duplication and compaction need no sort and
no host sync; once every seed has converged, the remaining launches find no rows and return. The whole loop
can therefore be recorded in CUDA graphs (:class:`export_engine.families.mast3r.fastnn.CapturedMatcher`): the first
rounds in one, the rest in a second that is replayed only where a seed is still active after the first. A map
pair's two directions (the symmetric mode) walk in lockstep (:class:`PairedChains`), one launch per step for both.

Triton is imported at call time (torch's CUDA builds ship it); on a CPU-only machine the kernels run under
Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI checks their logic.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor
log = logging.getLogger(__name__)

UNKNOWN, CLAIMED = -1, -2  # neighbour table entries that are not an index (yet)
_EMPTY = -(2**63)  # packed (score, index) slot before any key range reported
# Pruned search: bound margins, relative to |q| and the largest key concerned; an fp32 dot product of D terms is
# within about D 2**-24 |q| |k| of its exact value (1.5e-6 at D = 24), so 2e-4 covers every rounding of either side
# many times over; it grows with D beyond 500 features. For norms outside (2**-50, 2**50), whose squares are not
# normal fp32 numbers, no bound is claimed (nothing is skipped).
_MARGIN = 2e-4
_SMALLEST, _LARGEST = 2.0**-50, 2.0**50
# Centroid scores on tensor cores (TF32): each input keeps 10 of its 23 mantissa bits (truncated at worst: relative
# error below 2**-10), so a product is within about 2**-9 of its fp32 value and q . c within 2**-9 |q| |c| (Cauchy-
# Schwarz; |c| <= the block's largest |k|); the upper bound adds twice that, and the exact lower bound is unchanged.
_TF32_MARGIN = 2.0**-8


def _margin(d: int) -> float:
    return max(_MARGIN, 8 * d * 2.0**-24)


def available(device: torch.device) -> tuple[bool, str]:
    """Whether the fused kernel can run for tensors on `device`, with the reason when it cannot."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not (interpret and device.type == "cpu"):
        return False, f"the fused kernel runs on CUDA (or under TRITON_INTERPRET=1 on CPU), not {device.type}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed (it comes with torch's CUDA builds)"
    return True, "triton"


@dataclass(frozen=True)
class Tiles:
    """Launch shape: queries and keys per program step, warps, and the persistent grid's program count."""

    block_m: int = 64
    block_n: int = 64
    warps: int = 4
    target_programs: int = 4 * 132  # a few per SM of an H100 / H200 (132 SMs)
    tail_fma: bool = True  # features past 16 (16 < D < 32) by explicit fma instead of padding the dot to 32
    # Query-stationary kernel (nearest_rows_stationary) for launches of at least `stationary_from` rows: rows
    # per thread (0: off), its warps and programs. Compiled for sm_90 it issues 8 FMAs per key load at 8 rows a
    # thread (253 registers, no spills; 78 % of its loop's instructions are FMAs, against 66 % for the tl.dot
    # kernel with its shared-memory loads and barriers); not yet timed on a GPU, so off by default.
    stationary: int = 0
    stationary_warps: int = 2
    stationary_programs: int = 4 * 132
    stationary_from: int = 1024
    # Pruned search (NearestTable with the keys' map shape, not with the query-stationary kernel): keys in
    # spatial blocks of prune_block pixels (64 keys at most; (0, 0): off), bound passes over prune_rows rows a
    # work item (block ranges split as nearest_rows splits keys), the exact pass in chunks of up to prune_pairs
    # (row, block) pairs of one block, and room for prune_capacity pairs per key (a launch that keeps more runs
    # unpruned). Timings below are kernel time per symmetric pass on the H200 (512x384, subsample 8) unless said.
    # (8 x 4 keys: the first round's 3072 rows took 0.47 ms (3.6 % of (row, block) pairs computed) against 0.48
    # with 8 x 8 (7.8 %) and 0.88 unpruned; 4 x 4 keeps a third of the keys to compute, but the exact pass costs
    # by the chunk, not the key (1.18 against 1.15 ms) and the bound pass doubles (1.50 against 0.89 ms).)
    prune_block: tuple[int, int] = (8, 4)
    prune_rows: int = 64
    prune_pairs: int = 32  # (chunks of 16 pairs: 1.55 against 1.11 ms for the exact pass; 64 on 2 warps: slower)
    # A step of the symmetric pass holds both walks' rows of a map pair (6139 at 512x384, about 1.1 M kept pairs):
    # with room for 6 pairs per key its launches overflowed and ran unpruned (8.1 against 4.1 ms a pass).
    prune_capacity: int = 9
    prune_programs: int = 16 * 132  # the exact pass's grid (measured on the H200: 528 to 8448 alike)
    prune_warps: int = 1  # (0.51 ms for the first round's 3072 rows against 0.61 with 2 warps, 0.84 with 4)
    # centroid scores on tensor cores, with the margin for it (see _TF32_MARGIN); on the H200 the pair took 2.46
    # against 2.57 ms with FP32 scores in the final run, and less in five of six runs (3.7 against 3.6 % of pairs kept)
    prune_tf32: bool = True
    # the bound passes' grid, warps and blocks per step (528 programs of 4 warps were as fast as 1056 or 2112
    # programs, 2 or 8 warps; 32 blocks a step: 5.68 ms a symmetric pass against 5.87 with 64 and 5.91 with 16)
    prune_bound_programs: int = 4 * 132
    prune_bound_warps: int = 4
    prune_cb: int = 32
    # launches of fewer rows run unpruned: the bound passes cost more than they save there (on the H200 a 171-row
    # launch took 0.071 ms unpruned against 0.092 pruned; the pair 2.75 ms from 256 rows against 3.05 from 1)
    prune_from: int = 256
    # each row's lower bound comes from a probe group of this many adjacent blocks (the probe scores the groups'
    # centroids, then the bound takes the best of the group's keys): a power of two, 1 to 8 (1 and 2 alike:
    # 4.81 and 4.78 ms a symmetric pass as recorded graphs)
    prune_probe_group: int = 2
    # memory order of the kernels' atomics: "relaxed" is enough (they only need atomicity, kernel boundaries order
    # the rest); "acq_rel", Triton's default, took 8.91 against 8.40 ms
    atomic_sem: str = "relaxed"
    # rows per step of the lower bounds' pass, a power of two (16: 0.50 against 0.34 ms)
    prune_bound_rows: int = 8

    def __post_init__(self) -> None:
        bh, bw = self.prune_block
        if bh < 0 or bw < 0 or bh * bw > 64 or (bh * bw == 0 and bh + bw > 0):
            raise ValueError(f"prune_block must be (0, 0) or hold 1 to 64 keys, got {self.prune_block}")
        if self.prune_rows < 16 or self.prune_pairs < 16 or self.prune_capacity < 1 or self.prune_programs < 1:
            raise ValueError(f"prune_rows and prune_pairs must be >= 16 and prune_capacity >= 1, got {self}")
        if self.prune_from < 1:
            raise ValueError(f"prune_from must be >= 1, got {self.prune_from}")
        if self.prune_cb not in (16, 32, 64) or self.prune_bound_programs < 1:
            raise ValueError(f"prune_cb must be 16, 32 or 64 and prune_bound_programs >= 1, got {self}")
        group = self.prune_probe_group
        if not 1 <= group <= 8 or group & (group - 1):
            raise ValueError(f"prune_probe_group must be 1, 2, 4 or 8, got {group}")
        if not 1 <= self.prune_bound_rows <= 64 or self.prune_bound_rows & (self.prune_bound_rows - 1):
            raise ValueError(f"prune_bound_rows must be a power of two from 1 to 64, got {self.prune_bound_rows}")
        if self.atomic_sem not in ("relaxed", "acq_rel"):
            raise ValueError(f"atomic_sem must be 'relaxed' or 'acq_rel', got {self.atomic_sem!r}")


# Among the fastest exact launch shapes on an H200 (bench/gpu_bench.py sweeps them on 3072 x 196608: 0.89 to
# 0.92 ms, about 32 TFLOP/s of useful FP32, in two runs, level with 64x64/4w; 0.94 to 1.0 for 128x64/8w, 1.27 to
# 1.33 with the dot padded to 32). On a whole pair, whose later rounds hold a few hundred rows, it took 5.06 ms
# against 5.76 for 64x64/4w in the first of those runs (more programs with work when a round is small).
DEFAULT_TILES = Tiles(64, 32, 2)


def _dot_features(d: int, tiles: Tiles) -> tuple[int, int, int]:
    """(features in tl.dot, its padded width, features by explicit fma) for D features."""
    tail = d - 16 if tiles.tail_fma and 16 < d < 32 else 0
    dot = d - tail
    return dot, max(16, 1 << (dot - 1).bit_length()), tail


def plan_splits(count: int, n: int, tiles: Tiles = DEFAULT_TILES) -> tuple[int, int]:
    """(key ranges, keys per range) the kernel uses for `count` rows over `n` keys (the device computes the
    same from the count it reads): as many work items as the grid has programs, never more (measured on the
    H200: 540 items on 528 programs take a second wave and ~2x the time of 504), each range whole key steps."""
    row_blocks = -(-count // tiles.block_m)
    steps = -(-n // tiles.block_n)
    splits = max(1, min(steps, tiles.target_programs // max(row_blocks, 1)))
    keys_per_split = -(-steps // splits) * tiles.block_n
    return -(-n // keys_per_split), keys_per_split


def _kernels() -> Any:
    """The kernels module, imported on first use (it imports triton)."""
    from export_engine.families.mast3r import fastnn_triton

    return fastnn_triton


def transposed(flat: Tensor) -> Tensor:
    """(D, n) fp32 contiguous copy of an (n, D) map: the layout the kernel reads (one feature a row)."""
    return flat.float().t().contiguous()


class NearestTable:
    """Nearest neighbour in `keys` (n, D) of each row of `source` (N, D), filled on the device as rows are asked.

    ``table[i]`` is the neighbour of row i, -1 while unknown (-2 while claimed by a round in flight); one spare
    entry at the end always holds 0 (inactive lanes' compare-and-swap target). Buffers are allocated once, so
    a CUDA graph can record :meth:`compute` and replay it on new maps copied into the same `source` / `keys`.
    """

    def __init__(
        self,
        source: Tensor,
        keys: Tensor,
        max_rows: int,
        tiles: Tiles = DEFAULT_TILES,
        keys_t: Tensor | None = None,
        key_shape: tuple[int, int] | None = None,
    ) -> None:
        if source.shape[1] != keys.shape[1]:
            raise ValueError(f"rows have {source.shape[1]} features, keys {keys.shape[1]}")
        if source.shape[0] >= 2**31 - 1 or keys.shape[0] >= 2**31:
            raise ValueError(f"the kernel indexes with int32: {source.shape[0]} x {keys.shape[0]} is too many")
        if tiles.stationary and keys.shape[0] * keys.shape[1] >= 2**31:
            raise ValueError(f"the query-stationary kernel indexes keys with int32: {tuple(keys.shape)} is too many")
        self.source, self.keys, self.tiles = source, keys, tiles
        self.keys_t = transposed(keys) if keys_t is None else keys_t
        # Row-major keys for the query-stationary kernel: the caller's own buffer where it already is one.
        plain = keys.is_contiguous() and keys.dtype == torch.float32
        self._keys_rows = keys if plain or not tiles.stationary else keys.float().contiguous()
        self.table = torch.full((source.shape[0] + 1,), UNKNOWN, dtype=torch.int32, device=source.device)
        self.table[-1] = 0
        self.computed = torch.zeros((), dtype=torch.int64, device=source.device)  # rows computed so far
        # Per row of a launch: the running (score, index) maximum over its key ranges, packed in 64 bits.
        self._packed = torch.full((max(max_rows, 1),), _EMPTY, dtype=torch.int64, device=source.device)
        self.max_rows = max_rows
        self._blocks: _KeyBlocks | None = None
        # (the blocks re-read `keys` on refresh: only where the caller's buffer is the layout they read)
        if key_shape is not None and tiles.prune_block[0] > 0 and not tiles.stationary and plain:
            blocks = _KeyBlocks(keys, key_shape, max_rows, tiles)
            try:
                blocks.refresh(keys)
                self._blocks = blocks
            except Exception as err:  # a Triton that cannot compile the pruned search: the unpruned one is exact
                _cannot_prune(err)

    @property
    def spare(self) -> int:
        return self.source.shape[0]

    def refresh(self) -> None:
        """Forget every neighbour and re-read `keys` (after new maps were copied into `source` and `keys`)."""
        self.keys_t.copy_(self.keys.t())
        if self._keys_rows is not self.keys:
            self._keys_rows.copy_(self.keys)
        self.table[:-1].fill_(UNKNOWN)
        self.computed.zero_()
        if self._blocks is not None:
            self._blocks.refresh(self.keys)

    def compute(self, rows: Tensor, count: Tensor) -> None:
        """Neighbours of the first `count` (int32 device scalar) entries of `rows` into the table; no host sync."""
        if rows.numel() > self.max_rows:
            raise ValueError(f"row list of {rows.numel()} exceeds the {self.max_rows} rows the buffers hold")
        kernels = _kernels()
        t = self.tiles
        d, n = self.source.shape[1], self.keys.shape[0]
        dot, dp, _ = _dot_features(d, t)
        limit = 2**31 - 1  # row counts from here on go to the query-stationary kernel
        dense_count = count
        if self._blocks is not None:
            try:
                dense_count = self._blocks.search(kernels, self.source, rows, count, self._packed)
            except Exception as err:  # a Triton that cannot compile the pruned search: the unpruned one is exact too
                if self._blocks.launched:
                    raise
                _cannot_prune(err)
                self._blocks, dense_count = None, count
        elif t.stationary:
            limit = t.stationary_from
            kernels.nearest_rows_stationary[(t.stationary_programs,)](
                self.source, self._keys_rows, rows, count, self._packed, n, limit, D=d,
                BLOCK_M=32 * t.stationary_warps * t.stationary, TARGET=t.stationary_programs, SEM=t.atomic_sem,
                num_warps=t.stationary_warps,
            )  # fmt: skip
        kernels.nearest_rows[(t.target_programs,)](
            self.source, self.keys_t, rows, dense_count, self._packed, n, limit, D=d, DOT_D=dot, DP=dp,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, TARGET=t.target_programs, EVEN_N=n % t.block_n == 0,
            SEM=t.atomic_sem, num_warps=t.warps,
        )  # fmt: skip
        grid = (max(1, min(1024, -(-rows.numel() // 256))),)
        probe = self._packed if self._blocks is None else self._blocks.probe
        kernels.finish_rows[grid](rows, count, self._packed, self.table, probe, EMPTY=_EMPTY, BLOCK=256,
                                  PROBE=self._blocks is not None, num_warps=4)  # fmt: skip
        self.computed += count

    @property
    def pairs(self) -> Tensor | None:
        """(row, key block) pairs the last launch computed exactly (int32 device scalar; 0 when it ran unpruned),
        or None without pruning."""
        return None if self._blocks is None else self._blocks.total


def _cannot_prune(err: Exception) -> None:
    log.warning("FastNN-Lite: the pruned search cannot run here (%s); using the unpruned kernel",
                " ".join(str(err).split())[:200])  # fmt: skip


class _KeyBlocks:
    """The keys of an (H, W) map in spatial blocks, with each block's centroid and radius, for the pruned search.

    For a row q and a block with centroid c and radius r (the largest |k - c| of its keys), every key of the block
    has q . k <= q . c + |q| r. A row's lower bound is the best similarity among the keys of its probe group (the
    group of prune_probe_group adjacent blocks whose centroid scores highest; any group gives a valid bound): a
    block whose upper bound is below it holds neither the row's nearest key nor one tied with it, and is skipped.
    Both sides carry a margin far above the fp32 rounding of every
    term (a dot product of D = 24 terms is within 1.5e-6 |q| |k| of its exact value): the upper bound adds
    m |q| |k|max of the block, the lower bound subtracts m |q| |k|max of the probe group (m = 2e-4 up to about 500
    features, see _margin; no bound where a norm leaves normal fp32), so what is skipped
    is skipped for every summation order; the pairs that remain are computed with nearest_rows's arithmetic and
    tie rule, so the neighbours are the unpruned search's. Buffers are fixed, so a CUDA graph can record the
    search and :meth:`refresh` (the blocks of new keys; the owner calls it once before the first search).
    """

    def __init__(self, keys: Tensor, shape: tuple[int, int], max_rows: int, tiles: Tiles) -> None:
        height, width = shape
        n, d = keys.shape
        if height * width != n:
            raise ValueError(f"key map shape {shape} does not hold {n} keys")
        self.tiles = tiles
        bh, bw = tiles.prune_block
        self.bn = 1 << (bh * bw - 1).bit_length()  # block slots, a power of two (tl.arange)
        by, bx = -(-height // bh), -(-width // bw)
        self.nb = by * bx
        # probe groups: G blocks adjacent in block order; the last group is padded with empty blocks
        self.group = tiles.prune_probe_group
        self.ng = -(-self.nb // self.group)
        padded = self.ng * self.group
        device = keys.device
        # Slot s of block (i, j) holds pixel (i * bh + s // bw, j * bw + s % bw), -1 outside the map or past bh * bw.
        slot = torch.arange(self.bn, device=device)
        y = torch.arange(by, device=device)[:, None, None] * bh + (slot // bw)[None, None, :]
        x = torch.arange(bx, device=device)[None, :, None] * bw + (slot % bw)[None, None, :]
        inside = (y < height) & (x < width) & (slot < bh * bw)[None, None, :]
        index = torch.where(inside, y * width + x, -1).to(torch.int32).reshape(-1)
        self.index = torch.cat([index, index.new_full(((padded - self.nb) * self.bn,), -1)]).contiguous()
        self.dq = max(16, 1 << (d - 1).bit_length())
        margin = _margin(d)
        self.margins = dict(MARGIN=margin, SMALLEST=_SMALLEST, LARGEST=_LARGEST)  # the lower bound's
        self.precision = "tf32" if tiles.prune_tf32 else "ieee"  # of the centroid scores
        # the upper bound's margin, carried by the radii: fp32 rounding, and TF32 inputs where the scores use them
        self.upper_margin = margin + (_TF32_MARGIN if tiles.prune_tf32 else 0.0)
        self.scan_block = min(8192, max(16, 1 << (self.nb - 1).bit_length()))  # the scan in one step where it fits
        self.slots = padded * self.bn
        self.keys = torch.zeros(d, self.slots, dtype=torch.float32, device=device)  # one feature a row
        self.cent_t = torch.zeros(self.dq, self.nb, dtype=torch.float32, device=device)
        self.radius = torch.zeros(self.nb, dtype=torch.float32, device=device)
        # A group's centroid: its blocks' centroids weighted by their keys (a group holds at least its first block).
        sizes = (self.index.view(padded, self.bn) >= 0).sum(dim=1).float().view(self.ng, self.group)
        self._group_weights = (sizes / sizes.sum(dim=1, keepdim=True)).view(1, self.ng, self.group)
        self._cent_padded = torch.zeros(self.dq, padded, dtype=torch.float32, device=device)
        self.group_cent_t = self.cent_t if self.group == 1 else torch.zeros(self.dq, self.ng, device=device)
        rows = max(max_rows, 1)
        self.probe = torch.full((rows,), _EMPTY, dtype=torch.int64, device=device)
        self.low = torch.zeros(rows, dtype=torch.float32, device=device)
        self.counts = torch.zeros(self.nb, dtype=torch.int32, device=device)
        self.cursor = torch.zeros(self.nb, dtype=torch.int32, device=device)
        self.starts = torch.zeros(self.nb + 1, dtype=torch.int32, device=device)
        self.chunk_first = torch.zeros(self.nb, dtype=torch.int32, device=device)
        self.emitted = torch.zeros((), dtype=torch.int64, device=device)
        self.total = torch.zeros((), dtype=torch.int32, device=device)
        self.entries = torch.zeros((), dtype=torch.int32, device=device)
        self.chunks = torch.zeros((), dtype=torch.int32, device=device)
        self.dense = torch.zeros((), dtype=torch.int32, device=device)
        self.capacity = min(tiles.prune_capacity * n, 2**31 - 1)
        self.launched = False  # a search has been launched (compile errors after that are not expected: raised)
        # The kept pairs as the bound pass writes them: an entry per row and step of blocks that keeps any (a bit per
        # block; an entry holds one pair at least, so half the pairs' room, which the benchmark maps leave ample).
        self.entry_capacity = max(1, self.capacity // 2)
        self.entry_slot = torch.zeros(self.entry_capacity, dtype=torch.int32, device=device)
        self.entry_first = torch.zeros(self.entry_capacity, dtype=torch.int32, device=device)
        self.entry_bits = torch.zeros(self.entry_capacity, dtype=torch.int64, device=device)
        # Then their slots grouped by block for the exact pass, which takes them in chunks of up to prune_pairs pairs
        # of one block (a block's pairs open one chunk more at most).
        self.pair_slot = torch.zeros(self.capacity, dtype=torch.int32, device=device)
        most = self.nb + self.capacity // tiles.prune_pairs + 1
        self.chunk_block, self.chunk_start, self.chunk_stop = (
            torch.zeros(most, dtype=torch.int32, device=device) for _ in range(3)
        )

    def refresh(self, keys: Tensor) -> None:
        """Re-read the keys into blocks: centroids, radii (with the rounding margin), the probe groups' centroids."""
        grid = (min(self.nb, self.tiles.target_programs),)
        _kernels().block_keys[grid](keys, self.index, self.keys, self.cent_t, self.radius, self.nb, self.slots,
                                    D=keys.shape[1],
                                    DQ=self.dq, BN=self.bn, num_warps=2, **{**self.margins,
                                    "MARGIN": self.upper_margin})  # fmt: skip
        if self.group > 1:
            self._cent_padded[:, : self.nb].copy_(self.cent_t)
            grouped = self._cent_padded.view(self.dq, self.ng, self.group)
            torch.sum(grouped * self._group_weights, dim=2, out=self.group_cent_t)

    def search(self, kernels: Any, source: Tensor, rows: Tensor, count: Tensor, packed: Tensor) -> Tensor:
        """Launch the pruned search of the first `count` rows into `packed`; returns the row count the unpruned
        kernel must take (0, or `count` when it is below prune_from or the kept pairs overflowed the buffers)."""
        t, d = self.tiles, source.shape[1]
        # the exact pass's split of the features is nearest_rows's (on the H200 an fma step per feature instead
        # of tl.dot took longer: 3.25 against 3.07 ms per pair)
        dot, dp, _ = _dot_features(d, t)
        grid = (t.prune_bound_programs,)
        # (the centroid scores pad the features to DQ: measured on the H200, a tl.dot over 16 and an fma tail, as
        # the exact pass does, took longer: 0.78 against 0.68 ms per pair for these passes)
        bound = dict(D=d, DQ=self.dq, BLOCK_M=t.prune_rows, CB=t.prune_cb, TARGET=t.prune_bound_programs,
                     PRECISION=self.precision, FROM=t.prune_from, SEM=t.atomic_sem,
                     num_warps=t.prune_bound_warps)  # fmt: skip
        kernels.prune_probe[grid](source, rows, count, self.group_cent_t, self.probe, self.ng, **bound)
        kernels.prune_bound[grid](source, rows, count, self.probe, self.keys, self.index, self.low, self.slots, D=d,
                                  GN=self.bn * self.group, BLOCK_M=t.prune_bound_rows, FROM=t.prune_from, num_warps=4,
                                  **self.margins)  # fmt: skip
        kernels.prune_pairs[grid](source, rows, count, self.cent_t, self.radius, self.low, self.counts, self.emitted,
                                  self.entry_slot, self.entry_first, self.entry_bits, self.entry_capacity, self.nb,
                                  **bound)  # fmt: skip
        kernels.prune_scan[(1,)](self.counts, self.starts, self.cursor, self.chunk_first, self.chunks, self.total,
                                 self.emitted, self.entries, count, self.dense, self.nb, self.capacity,
                                 self.entry_capacity, BLOCK=self.scan_block, FROM=t.prune_from, CH=t.prune_pairs,
                                 num_warps=8)  # fmt: skip
        kernels.place_pairs[(t.prune_bound_programs,)](
            self.entry_slot, self.entry_first, self.entry_bits, self.entries, self.starts, self.cursor,
            self.chunk_first, self.chunks, self.pair_slot, self.chunk_block, self.chunk_start, self.chunk_stop, self.nb,
            BLOCK=128, CH=t.prune_pairs, SEM=t.atomic_sem, num_warps=4,
        )  # fmt: skip
        kernels.pair_rows[(t.prune_programs,)](
            source, rows, self.keys, self.index, self.pair_slot, self.chunk_block, self.chunk_start, self.chunk_stop,
            self.chunks, count, packed, self.slots, D=d, DOT_D=dot, DP=dp, BN=self.bn,
            CH=t.prune_pairs, SEM=t.atomic_sem, num_warps=t.prune_warps,
        )  # fmt: skip
        self.launched = True
        return self.dense


def nearest_by_dot_fused(queries: Tensor, keys_t: Tensor, tiles: Tiles = DEFAULT_TILES) -> Tensor:
    """Index (int64) of the largest fp32 dot product in the keys for each row of `queries` (m, D).

    `keys_t` is the (D, n) layout from :func:`transposed`. Same contract as
    :func:`export_engine.families.mast3r.fastnn.nearest_by_dot`: the first index among equal maxima.
    """
    m, d = queries.shape
    if keys_t.shape[0] != d:
        raise ValueError(f"queries have {d} features, keys {keys_t.shape[0]}")
    if m == 0:
        return torch.empty(0, dtype=torch.int64, device=queries.device)
    table = NearestTable(queries.float().contiguous(), keys_t.t(), m, tiles, keys_t=keys_t.contiguous())
    rows = torch.arange(m, dtype=torch.int32, device=queries.device)
    table.compute(rows, torch.tensor(m, dtype=torch.int32, device=queries.device))
    return table.table[:m].long()


class DeviceChains:
    """The round loop's state on the device: each seed walked 1 -> 2 -> 1 until reciprocal, without a host sync.

    Same per-seed rule as the host loop of :meth:`export_engine.families.mast3r.fastnn.ReciprocalMatcher.chains`:
    a seed stops when its image-2 point is unchanged since the previous round or its image-1 point is back where
    the round started. :meth:`start` claims the seeds' rows, :meth:`rounds` runs rounds `first` to `stop` - 1 (a
    CUDA graph can record some rounds and another graph the rest), :meth:`outputs` reads the result.
    :meth:`advance_step` runs one step's lookups and claims only, appending the claimed rows to `rows` (which
    another walk over the same tables may share: :class:`PairedChains`).
    """

    def __init__(self, nn12: NearestTable, nn21: NearestTable, seeds: Tensor, max_iter: int,
                 rows: Tensor | None = None) -> None:  # fmt: skip
        n = seeds.numel()
        if n > min(nn12.max_rows, nn21.max_rows):
            raise ValueError(f"{n} seeds exceed the {min(nn12.max_rows, nn21.max_rows)} rows the tables were sized for")
        self.nn12, self.nn21, self.n, self.max_iter = nn12, nn21, n, max_iter
        device = seeds.device
        self.idx1 = seeds.to(torch.int32)
        self.prev1 = self.idx1.clone()
        self.idx2 = torch.full_like(self.idx1, -1)
        self.prev2 = self.idx2.clone()
        self.active = torch.ones(n, dtype=torch.int8, device=device)
        # rows computed at each step: image 1's seeds, then per round image 2's rows and image 1's
        self.counts = torch.zeros(2 * max_iter + 1, dtype=torch.int32, device=device)
        self.rows = torch.empty(max(n, 1), dtype=torch.int32, device=device) if rows is None else rows

    @property
    def steps(self) -> int:
        """Steps of the walk: the seeds' rows, then two a round."""
        return 2 * self.max_iter + 1

    def advance_step(self, step: int, count: Tensor) -> NearestTable | None:
        """Step `step`'s lookups and claims (0: the seeds' rows of image 1; then per round image 2's rows and image
        1's): the rows it claims are appended to `rows`, counted by `count` (an int32 device scalar); returns the
        table they belong to (None for the last step, which claims nothing)."""
        if step == 0:
            self._advance(self.idx1, self.idx1, self.prev2, self.prev1, None, self.nn12, count, False)
            return self.nn12
        round_, half = divmod(step - 1, 2)
        if half == 0:
            self._advance(self.idx1, self.idx2, self.prev2, self.prev1, self.nn12, self.nn21, count, False)
            return self.nn21
        last = round_ == self.max_iter - 1
        claim = None if last else self.nn12
        self._advance(self.idx2, self.idx1, self.prev1, self.prev2, self.nn21, claim, count, not last)
        return claim

    def _advance(self, src: Tensor, dst: Tensor, prev_dst: Tensor, prev_src: Tensor, look: NearestTable | None,
                 claim: NearestTable | None, count: Tensor, update_prev: bool) -> None:  # fmt: skip
        if not self.n:
            return
        table = (look or claim or self.nn12).table
        target = claim or self.nn12
        _kernels().advance[(-(-self.n // 1024),)](
            src, dst, prev_dst, prev_src, self.active, table, target.table, self.rows, count, self.n, target.spare,
            LOOKUP=look is not None, UPDATE_PREV=update_prev, CLAIM=claim is not None, BLOCK=1024,
            SEM=self.nn12.tiles.atomic_sem, num_warps=4,
        )  # fmt: skip

    def _step(self, step: int) -> None:
        claim = self.advance_step(step, self.counts[step])
        if claim is not None and self.n:
            claim.compute(self.rows, self.counts[step])

    def run(self, first: int, stop: int) -> None:
        """Steps `first` to `stop` - 1 (of 0 to steps - 1)."""
        if not (0 <= first <= stop <= self.steps):
            raise ValueError(f"steps {first} to {stop} are outside 0 to {self.steps}")
        for step in range(first, stop):
            self._step(step)

    def start(self) -> None:
        """Claim and compute every seed's row of image 1."""
        self.run(0, 1)

    def rounds(self, first: int, stop: int) -> None:
        """Rounds `first` to `stop` - 1 (of 0 to max_iter - 1)."""
        if not (0 <= first <= stop <= self.max_iter):
            raise ValueError(f"rounds {first} to {stop} are outside 0 to {self.max_iter}")
        self.run(2 * first + 1, 2 * stop + 1)

    def outputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """(idx1, idx2, converged) per seed: int64, int64, bool."""
        return self.idx1.long(), self.idx2.long(), self.active == 0

    def any_active(self) -> Tensor:
        """Whether a seed has not converged yet (bool device scalar)."""
        return self.active.any()


class PairedChains:
    """A map pair's two walks (seeds on image 1's grid over (nn12, nn21), and on image 2's over (nn21, nn12)) in
    lockstep, the second one step behind, so that each step's rows of both walks belong to one table and are
    computed in one launch: 2 * max_iter + 2 steps instead of two walks of 2 * max_iter + 1 one after the other
    (on the H200 the symmetric pass's small late steps cost about as much as their launches). Each seed follows
    the same rule as in :class:`DeviceChains`, and a row is computed once whichever walk claims it first, so the
    results are those of the two walks in turn.
    """

    def __init__(self, nn12: NearestTable, nn21: NearestTable, seeds1: Tensor, seeds2: Tensor, max_iter: int) -> None:
        rows = torch.empty(max(seeds1.numel() + seeds2.numel(), 1), dtype=torch.int32, device=seeds1.device)
        self.forward = DeviceChains(nn12, nn21, seeds1, max_iter, rows)
        self.backward = DeviceChains(nn21, nn12, seeds2, max_iter, rows)
        self.rows, self.max_iter = rows, max_iter
        self.counts = torch.zeros(self.steps, dtype=torch.int32, device=seeds1.device)  # rows computed per step

    @property
    def steps(self) -> int:
        return self.forward.steps + 1

    def run(self, first: int, stop: int) -> None:
        """Steps `first` to `stop` - 1 of both walks: step s is the forward walk's step s and the backward's s - 1."""
        if not (0 <= first <= stop <= self.steps):
            raise ValueError(f"steps {first} to {stop} are outside 0 to {self.steps}")
        for step in range(first, stop):
            claims = []
            if step < self.forward.steps:
                claims.append(self.forward.advance_step(step, self.counts[step]))
            if step >= 1:
                claims.append(self.backward.advance_step(step - 1, self.counts[step]))
            tables = {id(t): t for t in claims if t is not None}
            assert len(tables) <= 1, "both walks claim rows of the same table at each step"
            for table in tables.values():
                table.compute(self.rows, self.counts[step])

    def outputs(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Each walk's (idx1, idx2, converged), forward first."""
        return [self.forward.outputs(), self.backward.outputs()]

    def any_active(self) -> Tensor:
        return self.forward.any_active() | self.backward.any_active()


def chains_on_device(
    nn12: NearestTable, nn21: NearestTable, seeds: Tensor, max_iter: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Walk each seed 1 -> 2 -> 1 until reciprocal, `max_iter` rounds at most, without a host sync.

    Returns (idx1, idx2, converged) per seed (int64, int64, bool) and the rows computed at each step (int32,
    2 * max_iter + 1 steps). See :class:`DeviceChains`.
    """
    chains = DeviceChains(nn12, nn21, seeds, max_iter)
    chains.start()
    chains.rounds(0, max_iter)
    return (*chains.outputs(), chains.counts)
