"""Fused nearest-neighbour kernel for FastNN-Lite (Triton): dot products and first-argmax in one pass.

The torch path of :func:`export_engine.families.mast3r.fastnn.nearest_by_dot` writes every ``queries x keys`` similarity
tile to device memory and reads it back for the row maximum; at 512x384 that traffic, not the arithmetic, is
what an H100 spends its time on (bench/RESULTS.md). Here a program holds a block of queries in registers, walks
its share of the keys, and keeps a running (max, first index) per query and per tile column, so similarities
never leave registers. Memory: O(m * splits) for the partial results.

Exactness: each similarity is ``sum_k q[k] * key[k]`` formed by ``tl.dot`` in IEEE fp32 (Triton's FMA matmul:
fused multiply-adds over the features in order; features padded with zeros to a power of two add exact zeros),
which is how the BLAS GEMMs of the reference compute a short (D = 24) dot product. Measured on an H100: matches
identical to the cuBLAS-based reference on the 512x384 benchmark maps and on random and tied inputs (tests).
An explicit multiply-add loop (the order fixed in our code) was also identical but 12x slower (114 vs 9.2 ms per
pair, broadcast loads per feature), so only the tl.dot form is kept.

Ties resolve to the first index, as ``torch.max(dim=1)`` and ``np.argmax`` do: within a column slot a later key
only wins on a strictly larger value, and across slots and splits the smallest index among equal maxima wins.

Triton is imported at call time (torch's CUDA builds ship it); on a CPU-only machine the kernel runs under
Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI checks its logic.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor


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


def _kernel() -> Any:
    # Triton decides at decoration time whether a kernel is interpreted, so the flag is part of the cache key.
    return _compiled_kernel(os.environ.get("TRITON_INTERPRET") == "1")


@functools.cache
def _compiled_kernel(interpret: bool) -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def nearest_kernel(
        qt_ptr,  # (D, m) fp32, queries transposed: row k holds feature k of every query
        kt_ptr,  # (D, n) fp32, keys transposed
        best_ptr,  # (splits, m) fp32 out
        arg_ptr,  # (splits, m) int32 out
        m,
        n,
        keys_per_split,
        D: tl.constexpr,  # noqa: N803 (Triton constexpr parameters are upper case by convention)
        DP: tl.constexpr,  # noqa: N803 (D rounded up to a power of two >= 16, as tl.dot needs)
        BLOCK_M: tl.constexpr,  # noqa: N803
        BLOCK_N: tl.constexpr,  # noqa: N803
    ):
        pid_m = tl.program_id(0)
        split = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < m
        feats = tl.arange(0, DP)
        start = split * keys_per_split
        stop = tl.minimum(start + keys_per_split, n)
        # The query block stays in registers; features past D are zeros on both sides and add exact zeros.
        q = tl.load(qt_ptr + feats[None, :] * m + rows[:, None], mask=row_ok[:, None] & (feats[None, :] < D),
                    other=0.0)  # fmt: skip
        best = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
        arg = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        for j in range(0, keys_per_split, BLOCK_N):  # keys_per_split is a multiple of BLOCK_N
            cols = start + j + tl.arange(0, BLOCK_N)
            col_ok = cols < stop
            k = tl.load(kt_ptr + feats[:, None] * n + cols[None, :], mask=(feats[:, None] < D) & col_ok[None, :],
                        other=0.0)  # fmt: skip
            sim = tl.dot(q, k, input_precision="ieee", out_dtype=tl.float32)  # fp32 FMAs in feature order
            sim = tl.where(col_ok[None, :], sim, float("-inf"))
            better = sim > best  # strict: an earlier key in this column slot keeps a tie
            best = tl.where(better, sim, best)
            arg = tl.where(better, cols[None, :], arg)
        row_best = tl.max(best, axis=1)
        # First index among the slots holding the row maximum (slots with no key left hold -inf, index 0).
        candidates = tl.where(best == row_best[:, None], arg, 2147483647)
        row_arg = tl.min(candidates, axis=1)
        tl.store(best_ptr + split * m + rows, row_best, mask=row_ok)
        tl.store(arg_ptr + split * m + rows, row_arg, mask=row_ok)

    return nearest_kernel


@dataclass(frozen=True)
class Tiles:
    """Launch shape: queries and keys per program step, warps, and how many programs to aim for."""

    block_m: int = 64
    block_n: int = 64
    warps: int = 4
    target_programs: int = 4 * 132  # a few per SM of an H100 (132 SMs)


# Fastest of ten launch shapes on an H100 in two runs (bench/gpu_bench.py: 1.06 and 1.07 ms for 3072 x 196608,
# against 1.13 to 2.19 ms for the others), all exact.
DEFAULT_TILES = Tiles(128, 64, 8)


def plan_splits(m: int, n: int, tiles: Tiles = DEFAULT_TILES) -> tuple[int, int]:
    """(splits, keys per split): enough programs to fill the GPU, each split a whole number of key steps."""
    row_blocks = -(-m // tiles.block_m)
    steps = max(1, -(-n // tiles.block_n))
    splits = max(1, min(steps, -(-tiles.target_programs // row_blocks)))
    keys_per_split = -(-steps // splits) * tiles.block_n
    return -(-n // keys_per_split), keys_per_split


def transposed(flat: Tensor) -> Tensor:
    """(D, n) fp32 contiguous copy of an (n, D) map: the layout the kernel reads (one feature a row)."""
    return flat.float().t().contiguous()


def nearest_by_dot_fused(queries: Tensor, keys_t: Tensor, tiles: Tiles = DEFAULT_TILES) -> Tensor:
    """Index (int64) of the largest fp32 dot product in the keys for each row of `queries` (m, D).

    `keys_t` is the (D, n) layout from :func:`transposed` (made once per map, not per call). Same contract as
    :func:`export_engine.families.mast3r.fastnn.nearest_by_dot`: the first index among equal maxima.
    """
    m, d = queries.shape
    n = keys_t.shape[1]
    if keys_t.shape[0] != d:
        raise ValueError(f"queries have {d} features, keys {keys_t.shape[0]}")
    if m == 0:
        return torch.empty(0, dtype=torch.int64, device=queries.device)
    if n >= 2**31 or m >= 2**31:
        raise ValueError(f"fused kernel indexes with int32: {m} queries x {n} keys is too many")
    qt = transposed(queries)
    splits, keys_per_split = plan_splits(m, n, tiles)
    best = torch.empty((splits, m), dtype=torch.float32, device=queries.device)
    arg = torch.empty((splits, m), dtype=torch.int32, device=queries.device)
    dp = max(16, 1 << (d - 1).bit_length())
    grid = (-(-m // tiles.block_m), splits)
    _kernel()[grid](qt, keys_t.contiguous(), best, arg, m, n, keys_per_split, D=d, DP=dp, BLOCK_M=tiles.block_m,
                    BLOCK_N=tiles.block_n, num_warps=tiles.warps)  # fmt: skip
    if splits == 1:
        return arg[0].long()
    # Splits cover increasing key ranges: the first split holding the maximum has its smallest index.
    which = best.argmax(dim=0)  # first maximal split (torch documents first-index ties)
    return arg.gather(0, which[None]).squeeze(0).long()
