"""Fused nearest-neighbour kernel for FastNN-Lite (Triton): dot products and first-argmax in one pass.

The torch path of :func:`export_engine.runtime.fastnn.nearest_by_dot` writes every ``queries x keys`` similarity
tile to device memory and reads it back for the row maximum; at 512x384 that traffic, not the arithmetic, is
what an H100 spends its time on (bench/RESULTS.md). Here a program holds a block of queries in registers, walks
its share of the keys, and keeps a running (max, first index) per query and per tile column, so similarities
never leave registers. Memory: O(m * splits) for the partial results.

Exactness: each similarity is ``sum_k q[k] * key[k]`` accumulated in fp32 in the order k = 0 .. D-1 with fused
multiply-adds, starting from the first product, which is how the BLAS GEMMs that the reference runs compute a
short (D = 24) dot product; the benchmark checks that the matches are identical to the cuBLAS-based reference
on the device. Ties resolve to the first index, as ``torch.max(dim=1)`` and ``np.argmax`` do: within a column
slot a later key only wins on a strictly larger value, and across slots and splits the smallest index among
equal maxima wins.

Triton is imported at call time (torch's CUDA builds ship it); on a CPU-only machine the kernel runs under
Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI checks its logic.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

Tensor = torch.Tensor

_BLOCK_M = 64  # queries per program
_BLOCK_N = 64  # keys per step; with 4 warps, 32 similarities + 32 best values + 32 indices per thread
# Two ways to form the similarities, both fp32 products summed in feature order: "fma" (explicit multiply-adds,
# the order fixed by this code) and "dot" (tl.dot in IEEE fp32 over features zero-padded to a power of two,
# Triton's FMA matmul with shared-memory staging). bench/gpu_bench.py times both and checks both are exact.
VARIANTS = ("fma", "dot")
DEFAULT_VARIANT = "fma"
_TARGET_PROGRAMS = 4 * 132  # enough programs to fill an H100 (132 SMs) a few times over


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
        BLOCK_M: tl.constexpr,  # noqa: N803
        BLOCK_N: tl.constexpr,  # noqa: N803
        USE_DOT: tl.constexpr,  # noqa: N803 (tl.dot in IEEE fp32, D zero-padded to DP; else explicit FMAs)
        DP: tl.constexpr,  # noqa: N803
    ):
        pid_m = tl.program_id(0)
        split = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < m
        start = split * keys_per_split
        stop = tl.minimum(start + keys_per_split, n)
        best = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
        arg = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        feats = tl.arange(0, DP)
        if USE_DOT:  # the query block stays in registers; zero features past D add exact zeros
            q2 = tl.load(qt_ptr + feats[None, :] * m + rows[:, None], mask=row_ok[:, None] & (feats[None, :] < D),
                         other=0.0)  # fmt: skip
        for j in range(0, keys_per_split, BLOCK_N):  # keys_per_split is a multiple of BLOCK_N
            cols = start + j + tl.arange(0, BLOCK_N)
            col_ok = cols < stop
            if USE_DOT:
                k2 = tl.load(kt_ptr + feats[:, None] * n + cols[None, :], mask=(feats[:, None] < D) & col_ok[None, :],
                             other=0.0)  # fmt: skip
                sim = tl.dot(q2, k2, input_precision="ieee", out_dtype=tl.float32)
            else:
                # k = 0 first as a plain product, then FMAs in feature order (see the module docstring).
                q = tl.load(qt_ptr + rows, mask=row_ok, other=0.0)
                kv = tl.load(kt_ptr + cols, mask=col_ok, other=0.0)
                sim = q[:, None] * kv[None, :]
                for k in tl.static_range(1, D):
                    q = tl.load(qt_ptr + k * m + rows, mask=row_ok, other=0.0)
                    kv = tl.load(kt_ptr + k * n + cols, mask=col_ok, other=0.0)
                    sim = tl.fma(q[:, None], kv[None, :], sim)
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


def plan_splits(m: int, n: int) -> tuple[int, int]:
    """(splits, keys per split): enough programs to fill the GPU, each split a whole number of key steps."""
    row_blocks = -(-m // _BLOCK_M)
    steps = max(1, -(-n // _BLOCK_N))
    splits = max(1, min(steps, -(-_TARGET_PROGRAMS // row_blocks)))
    keys_per_split = -(-steps // splits) * _BLOCK_N
    return -(-n // keys_per_split), keys_per_split


def transposed(flat: Tensor) -> Tensor:
    """(D, n) fp32 contiguous copy of an (n, D) map: the layout the kernel reads (one feature a row)."""
    return flat.float().t().contiguous()


def nearest_by_dot_fused(queries: Tensor, keys_t: Tensor, variant: str = DEFAULT_VARIANT) -> Tensor:
    """Index (int64) of the largest fp32 dot product in the keys for each row of `queries` (m, D).

    `keys_t` is the (D, n) layout from :func:`transposed` (made once per map, not per call). Same contract as
    :func:`export_engine.runtime.fastnn.nearest_by_dot`: the first index among equal maxima.
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
    splits, keys_per_split = plan_splits(m, n)
    best = torch.empty((splits, m), dtype=torch.float32, device=queries.device)
    arg = torch.empty((splits, m), dtype=torch.int32, device=queries.device)
    grid = (-(-m // _BLOCK_M), splits)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    dp = max(16, 1 << (d - 1).bit_length())
    kernel = _kernel()
    kernel[grid](qt, keys_t.contiguous(), best, arg, m, n, keys_per_split, D=d, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
                 USE_DOT=variant == "dot", DP=dp)  # fmt: skip
    if splits == 1:
        return arg[0].long()
    # Splits cover increasing key ranges: the first split holding the maximum has its smallest index.
    which = best.argmax(dim=0)  # first maximal split (torch documents first-index ties)
    return arg.gather(0, which[None]).squeeze(0).long()
