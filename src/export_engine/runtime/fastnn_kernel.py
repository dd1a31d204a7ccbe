"""Fused nearest-neighbour kernels for FastNN-Lite (Triton): dot products and first-argmax without similarity tiles.

The torch path of :func:`export_engine.runtime.fastnn.nearest_by_dot` writes every ``queries x keys`` similarity
tile to device memory and reads it back for the row maximum; at 512x384 that traffic, not the arithmetic, is
what an H100 spends its time on (bench/RESULTS.md). Here a program holds a block of queries in registers, walks
its share of the keys, and keeps a running (max, first index) per query and per tile column, so similarities
never leave registers. Memory: O(m * splits) for the partial results.

Exact values: a similarity is ``sum_k q[k] * key[k]`` formed by ``tl.dot`` in IEEE fp32 (Triton's FMA matmul:
fused multiply-adds over the features in order; features padded with zeros to a power of two add exact zeros),
which is how the BLAS GEMMs of the reference compute a short (D = 24) dot product. Measured on an H100: matches
identical to the cuBLAS-based reference on the 512x384 benchmark maps and on random and tied inputs (tests).
An explicit multiply-add loop (the order fixed in our code) was also identical but 12x slower, so only the
tl.dot form is kept.

Screening (``screen=True``, the default): the fp32 FMA work is what the exact kernel spends its time on, and
almost all of it is for keys that cannot win. Two passes instead:

1. approximate similarities with FP16 tensor cores on scaled copies, q/|q| and key/max|key| (so every value is
   at most 1 and FP16's range is never an issue); the row maximum of those, ``M``;
2. the same approximations again, and the exact fp32 tile only where some key has ``approx >= M - 2 eps``.

``eps`` bounds |approx - exact| in the scaled domain: FP16 rounding of both factors (2^-11 relative, 2^-25
absolute for subnormals) gives at most (2^-10 + 2^-22) * |q^||k^| + 2^-24.01 * sqrt(D) per similarity, the fp32
accumulation of the approximation (tensor cores may truncate) and of the exact value at most (D + 2) * 2^-22,
and the scaling itself a few fp32 ulps; :func:`screen_eps` sums these with a margin. A key with
``approx < M - 2 eps`` has exact < (exact value of the key that reached M), so it is neither the maximum nor
tied with it: skipping it changes no result, ties included. Rows of zeros (all similarities 0) make every
key a candidate, which is slow but still exact.

Ties resolve to the first index, as ``torch.max(dim=1)`` and ``np.argmax`` do: within a column slot a later key
only wins on a strictly larger value, and across slots and splits the smallest index among equal maxima wins.

Triton is imported at call time (torch's CUDA builds ship it); on a CPU-only machine the kernels run under
Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI checks their logic.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor


def available(device: torch.device) -> tuple[bool, str]:
    """Whether the fused kernels can run for tensors on `device`, with the reason when they cannot."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not (interpret and device.type == "cpu"):
        return False, f"the fused kernel runs on CUDA (or under TRITON_INTERPRET=1 on CPU), not {device.type}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed (it comes with torch's CUDA builds)"
    return True, "triton"


def screen_eps(d: int) -> float:
    """Bound on |approximate - exact| scaled similarity (see the module docstring), with a 25 % margin."""
    rounding = (2**-10 + 2**-22) + 2**-24.01 * math.sqrt(d)
    accumulation = 2 * (d + 2) * 2**-22
    return 1.25 * (rounding + accumulation + 2**-20)


def _kernels() -> Any:
    # Triton decides at decoration time whether a kernel is interpreted, so the flag is part of the cache key.
    return _compiled(os.environ.get("TRITON_INTERPRET") == "1")


@functools.cache
def _compiled(interpret: bool) -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def approx_max_kernel(qs_ptr, ks_ptr, out_ptr, m, n, keys_per_split,
                          DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # noqa: N803  # fmt: skip
        """Pass 1: per (split, row), the largest FP16 tensor-core similarity of the scaled copies."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        split = tl.program_id(1)
        feats = tl.arange(0, DP)
        start = split * keys_per_split
        stop = tl.minimum(start + keys_per_split, n)
        qs = tl.load(qs_ptr + feats[None, :] * m + rows[:, None], mask=rows[:, None] < m, other=0.0)
        top = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        for j in range(0, keys_per_split, BLOCK_N):
            cols = start + j + tl.arange(0, BLOCK_N)
            ks = tl.load(ks_ptr + feats[:, None] * n + cols[None, :], mask=cols[None, :] < stop, other=0.0)
            approx = tl.dot(qs, ks, out_dtype=tl.float32)
            approx = tl.where(cols[None, :] < stop, approx, float("-inf"))
            top = tl.maximum(top, tl.max(approx, axis=1))
        tl.store(out_ptr + split * m + rows, top, mask=rows < m)

    @triton.jit
    def nearest_kernel(qt_ptr, kt_ptr, qs_ptr, ks_ptr, thr_ptr, best_ptr, arg_ptr, m, n, keys_per_split,
                       D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # noqa: N803
                       SCREEN: tl.constexpr):  # noqa: N803  # fmt: skip
        """Exact fp32 first-argmax per (split, row); with SCREEN only over tiles holding a candidate key."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        split = tl.program_id(1)
        row_ok = rows < m
        feats = tl.arange(0, DP)
        start = split * keys_per_split
        stop = tl.minimum(start + keys_per_split, n)
        # Query blocks stay in registers; features past D are zeros on both sides and add exact zeros.
        q = tl.load(qt_ptr + feats[None, :] * m + rows[:, None], mask=row_ok[:, None] & (feats[None, :] < D),
                    other=0.0)  # fmt: skip
        if SCREEN:
            qs = tl.load(qs_ptr + feats[None, :] * m + rows[:, None], mask=row_ok[:, None], other=0.0)
            thr = tl.load(thr_ptr + rows, mask=row_ok, other=float("inf"))
        best = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
        arg = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        for j in range(0, keys_per_split, BLOCK_N):  # keys_per_split is a multiple of BLOCK_N
            cols = start + j + tl.arange(0, BLOCK_N)
            col_ok = cols < stop
            keep = col_ok[None, :] & row_ok[:, None]
            if SCREEN:
                ks = tl.load(ks_ptr + feats[:, None] * n + cols[None, :], mask=col_ok[None, :], other=0.0)
                keep = keep & (tl.dot(qs, ks, out_dtype=tl.float32) >= thr[:, None])
            if tl.max(keep.to(tl.int32)) > 0:
                k = tl.load(kt_ptr + feats[:, None] * n + cols[None, :],
                            mask=(feats[:, None] < D) & col_ok[None, :], other=0.0)  # fmt: skip
                sim = tl.dot(q, k, input_precision="ieee", out_dtype=tl.float32)  # fp32 FMAs in feature order
                sim = tl.where(keep, sim, float("-inf"))
                better = sim > best  # strict: an earlier key in this column slot keeps a tie
                best = tl.where(better, sim, best)
                arg = tl.where(better, cols[None, :], arg)
        row_best = tl.max(best, axis=1)
        # First index among the slots holding the row maximum (slots never written hold -inf, index 0).
        candidates = tl.where(best == row_best[:, None], arg, 2147483647)
        row_arg = tl.min(candidates, axis=1)
        tl.store(best_ptr + split * m + rows, row_best, mask=row_ok)
        tl.store(arg_ptr + split * m + rows, row_arg, mask=row_ok)

    return approx_max_kernel, nearest_kernel


@dataclass(frozen=True)
class Tiles:
    """Launch shape: queries and keys per program step, warps, and how many programs to aim for."""

    block_m: int = 64
    block_n: int = 64
    warps: int = 4
    target_programs: int = 4 * 132  # a few per SM of an H100 (132 SMs)


DEFAULT_TILES = Tiles()


def plan_splits(m: int, n: int, tiles: Tiles = DEFAULT_TILES) -> tuple[int, int]:
    """(splits, keys per split): enough programs to fill the GPU, each split a whole number of key steps."""
    row_blocks = -(-m // tiles.block_m)
    steps = max(1, -(-n // tiles.block_n))
    splits = max(1, min(steps, -(-tiles.target_programs // row_blocks)))
    keys_per_split = -(-steps // splits) * tiles.block_n
    return -(-n // keys_per_split), keys_per_split


def _padded(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())  # tl.dot needs a power of two >= 16


def transposed(flat: Tensor) -> Tensor:
    """(D, n) fp32 contiguous copy of an (n, D) map: the layout the kernels read (one feature a row)."""
    return flat.float().t().contiguous()


def _scaled_half(flat: Tensor, scale: Tensor) -> Tensor:
    """(DP, n) fp16: rows of `flat` times `scale` (per row), transposed and zero-padded to DP features."""
    n, d = flat.shape
    out = torch.zeros((_padded(d), n), dtype=torch.float16, device=flat.device)
    out[:d] = (flat.float() * scale[:, None]).t().to(torch.float16)
    return out


@dataclass(frozen=True)
class FusedKeys:
    """One descriptor map prepared for the kernels, once: fp32 transposed, and the scaled FP16 copy."""

    exact: Tensor  # (D, n) fp32
    half: Tensor  # (DP, n) fp16, key / max |key|

    @classmethod
    def from_flat(cls, flat: Tensor) -> FusedKeys:
        norms = flat.float().norm(dim=1)
        kmax = norms.max() if norms.numel() else torch.ones((), device=flat.device)
        scale = torch.where(kmax > 0, 1.0 / kmax, torch.ones_like(kmax)).expand(flat.shape[0])
        return cls(transposed(flat), _scaled_half(flat, scale))


def nearest_by_dot_fused(queries: Tensor, keys: FusedKeys, tiles: Tiles = DEFAULT_TILES, screen: bool = True) -> Tensor:
    """Index (int64) of the largest fp32 dot product in `keys` for each row of `queries` (m, D).

    Same contract as :func:`export_engine.runtime.fastnn.nearest_by_dot`: the first index among equal maxima.
    """
    m, d = queries.shape
    n = keys.exact.shape[1]
    if keys.exact.shape[0] != d:
        raise ValueError(f"queries have {d} features, keys {keys.exact.shape[0]}")
    if m == 0:
        return torch.empty(0, dtype=torch.int64, device=queries.device)
    if n >= 2**31 or m >= 2**31:
        raise ValueError(f"fused kernel indexes with int32: {m} queries x {n} keys is too many")
    approx_max, nearest = _kernels()
    dp = _padded(d)
    qt = transposed(queries)
    splits, keys_per_split = plan_splits(m, n, tiles)
    grid = (-(-m // tiles.block_m), splits)
    best = torch.empty((splits, m), dtype=torch.float32, device=queries.device)
    arg = torch.empty((splits, m), dtype=torch.int32, device=queries.device)
    qs, thr = qt, best  # placeholders, unread without screening
    if screen:
        norms = queries.float().norm(dim=1)
        qs = _scaled_half(queries, torch.where(norms > 0, 1.0 / norms, torch.ones_like(norms)))
        tops = torch.empty((splits, m), dtype=torch.float32, device=queries.device)
        approx_max[grid](qs, keys.half, tops, m, n, keys_per_split, DP=dp, BLOCK_M=tiles.block_m,
                         BLOCK_N=tiles.block_n, num_warps=tiles.warps)  # fmt: skip
        thr = tops.amax(dim=0) - 2 * screen_eps(d)
    nearest[grid](qt, keys.exact, qs, keys.half, thr, best, arg, m, n, keys_per_split, D=d, DP=dp,
                  BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, SCREEN=screen, num_warps=tiles.warps)  # fmt: skip
    if splits == 1:
        return arg[0].long()
    # Splits cover increasing key ranges: the first split holding the maximum has its smallest index.
    which = best.argmax(dim=0)  # first maximal split (torch documents first-index ties)
    return arg.gather(0, which[None]).squeeze(0).long()
