"""Triton kernels of FastNN-Lite (see :mod:`export_engine.families.mast3r.fastnn_kernel` for the design).

Imported only when a kernel is launched: importing this module imports triton, and triton decides at that
moment whether the kernels run compiled or under its interpreter (``TRITON_INTERPRET=1``).
"""

# ruff: noqa: N803 (Triton constexpr parameters are upper case by convention)

import triton
import triton.language as tl


@triton.jit
def plan(count, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TARGET: tl.constexpr):
    # Same arithmetic as plan_splits (host): row blocks, key ranges and keys per range for `count` rows.
    row_blocks = tl.cdiv(count, BLOCK_M)
    steps = tl.cdiv(n, BLOCK_N)
    splits = tl.maximum(tl.minimum(steps, TARGET // tl.maximum(row_blocks, 1)), 1)
    keys_per_split = tl.cdiv(steps, splits) * BLOCK_N
    return row_blocks, tl.cdiv(n, keys_per_split), keys_per_split


@triton.jit
def work_rows(work, row_blocks, count, rows_ptr, BLOCK_M: tl.constexpr):
    # Work item -> (key range, the row block's slots, which slots hold a row, the rows as int64).
    block = work % row_blocks
    slots = block * BLOCK_M + tl.arange(0, BLOCK_M)
    slot_ok = slots < count
    rows = tl.load(rows_ptr + slots, mask=slot_ok, other=0).to(tl.int64)
    return work // row_blocks, slots, slot_ok, rows


@triton.jit
def nearest_rows(
    src_ptr,  # (N, D) fp32 row-major: the rows that ask (gathered through rows_ptr)
    kt_ptr,  # (D, n) fp32, keys transposed: row k holds feature k of every key
    rows_ptr,  # int32 row list, `count` entries
    count_ptr,  # int32 scalar on the device
    packed_ptr,  # int64 per slot: atomic max of (ordered score << 32 | 0xFFFFFFFF - index)
    n,
    limit,  # launches whose row count is >= limit do nothing here (the query-stationary kernel takes them)
    D: tl.constexpr,
    DOT_D: tl.constexpr,  # features in tl.dot (the first ones)
    DP: tl.constexpr,  # DOT_D rounded up to a power of two >= 16, as tl.dot needs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TARGET: tl.constexpr,
    EVEN_N: tl.constexpr,  # n is a multiple of BLOCK_N: no key masks
):
    count = tl.load(count_ptr)
    count = tl.where(count < limit, count, 0)
    row_blocks, splits, keys_per_split = plan(count, n, BLOCK_M, BLOCK_N, TARGET)
    feats = tl.arange(0, DP)
    # Work items (row block, key range): neighbouring programs take neighbouring row blocks of one key
    # range, so the keys they stream are shared in L2.
    for work in range(tl.program_id(0), row_blocks * splits, tl.num_programs(0)):
        split, slots, slot_ok, rows = work_rows(work, row_blocks, count, rows_ptr, BLOCK_M)
        # Features past DOT_D are zeros on both sides of the dot and add exact zeros.
        q = tl.load(src_ptr + rows[:, None] * D + feats[None, :], mask=slot_ok[:, None] & (feats[None, :] < DOT_D),
                    other=0.0)  # fmt: skip
        start = split * keys_per_split
        stop = tl.minimum(start + keys_per_split, n)
        best = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
        arg = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        for j in range(start, stop, BLOCK_N):
            cols = j + tl.arange(0, BLOCK_N)
            col_ok = cols < stop
            if EVEN_N:
                k = tl.load(kt_ptr + feats[:, None] * n + cols[None, :], mask=feats[:, None] < DOT_D, other=0.0)
            else:
                k = tl.load(kt_ptr + feats[:, None] * n + cols[None, :],
                            mask=(feats[:, None] < DOT_D) & col_ok[None, :], other=0.0)  # fmt: skip
            sim = tl.dot(q, k, input_precision="ieee", out_dtype=tl.float32)  # fp32 FMAs in feature order
            for t in tl.static_range(D - DOT_D):  # the chain goes on: feature DOT_D + t, one fma each
                q_t = tl.load(src_ptr + rows * D + (DOT_D + t), mask=slot_ok, other=0.0)
                k_t = tl.load(kt_ptr + (DOT_D + t) * n + cols, mask=col_ok, other=0.0)
                sim = tl.fma(q_t[:, None], k_t[None, :], sim)
            if not EVEN_N:
                sim = tl.where(col_ok[None, :], sim, float("-inf"))
            better = sim > best  # strict: an earlier key in this column slot keeps a tie
            best = tl.where(better, sim, best)
            arg = tl.where(better, cols[None, :], arg)
        row_best = tl.max(best, axis=1)
        # First index among the slots holding the row maximum.
        row_arg = tl.min(tl.where(best == row_best[:, None], arg, 2147483647), axis=1)
        # Across key ranges: one 64-bit atomic max per row of (score, first index) (see pack).
        tl.atomic_max(packed_ptr + slots, pack(row_best, row_arg), mask=slot_ok)


@triton.jit
def pack(score, index):
    # (score, index) as one int64 whose signed order is (score, then the smaller index): the score's bits are
    # made to order as signed integers (negative floats get their magnitude bits flipped; + 0.0 turns -0.0
    # into 0.0, which compares equal), and the low word is 0xFFFFFFFF - index.
    bits = (score + 0.0).to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (4294967295 - index.to(tl.int64))


@triton.jit
def nearest_rows_stationary(
    src_ptr,  # (N, D) fp32 row-major: the rows that ask (gathered through rows_ptr)
    k_ptr,  # (n, D) fp32 row-major keys: one key's features are adjacent
    rows_ptr,  # int32 row list, `count` entries
    count_ptr,  # int32 scalar on the device
    packed_ptr,  # int64 per slot, as nearest_rows
    n,
    limit,  # launches whose row count is below limit do nothing here (nearest_rows takes them)
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program: 32 x warps x rows per thread
    TARGET: tl.constexpr,
):
    # Query-stationary: each thread keeps its rows' D features in registers for a whole key range and reads
    # each key once, as scalars every lane of the warp loads alike (one cached transaction a feature), so a
    # thread does (rows per thread) FMAs per load; the similarity is the same FMA chain in feature order as
    # nearest_rows computes, and a later key only wins on a strictly larger value.
    count = tl.load(count_ptr)
    count = tl.where(count >= limit, count, 0)
    row_blocks, splits, keys_per_split = plan(count, n, BLOCK_M, 1, TARGET)  # key ranges of any length
    for work in range(tl.program_id(0), row_blocks * splits, tl.num_programs(0)):
        split, slots, slot_ok, rows = work_rows(work, row_blocks, count, rows_ptr, BLOCK_M)
        q = ()
        for f in tl.static_range(D):
            q = q + (tl.load(src_ptr + rows * D + f, mask=slot_ok, other=0.0),)  # noqa: RUF005 (JIT tuples)
        start = split * keys_per_split
        stop = tl.minimum(start + keys_per_split, n)
        best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        arg = tl.zeros((BLOCK_M,), tl.int32)
        for j in range(start, stop):
            key = k_ptr + j * D  # int32: NearestTable keeps n * D below 2**31 for this kernel
            sim = q[0] * tl.load(key)
            for f in tl.static_range(1, D):
                sim = tl.fma(q[f], tl.load(key + f), sim)
            better = sim > best
            best = tl.where(better, sim, best)
            arg = tl.where(better, j, arg)
        tl.atomic_max(packed_ptr + slots, pack(best, arg), mask=slot_ok)


@triton.jit
def finish_rows(
    rows_ptr,
    count_ptr,
    packed_ptr,  # int64 per slot, reset to EMPTY for the next launch
    table_ptr,  # int32: table[rows[i]] = nearest key of row i
    EMPTY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    count = tl.load(count_ptr)
    for first in range(tl.program_id(0) * BLOCK, count, tl.num_programs(0) * BLOCK):
        slots = first + tl.arange(0, BLOCK)
        ok = slots < count
        packed = tl.load(packed_ptr + slots, mask=ok, other=0)
        arg = (4294967295 - (packed & 4294967295)).to(tl.int32)
        tl.store(table_ptr + tl.load(rows_ptr + slots, mask=ok, other=0), arg, mask=ok)
        tl.store(packed_ptr + slots, tl.full((BLOCK,), EMPTY, tl.int64), mask=ok)


@triton.jit
def advance(
    from_ptr,  # int32 per seed: this side's point (read when LOOKUP)
    to_ptr,  # int32 per seed: the other side's point (written when LOOKUP, else read as the claim key)
    prev_to_ptr,  # int32 per seed: the other side's point at the start of the round
    prev_from_ptr,  # int32 per seed: this side's point at the start of the round (written when UPDATE_PREV)
    active_ptr,  # int8 per seed
    table_ptr,  # int32 neighbour table of this direction (read when LOOKUP)
    claim_ptr,  # int32 neighbour table of the next direction; entry `claim_none` always holds 0
    rows_ptr,  # int32 row list for the next direction
    count_ptr,  # int32 scalar, starts at 0
    n_seeds,
    claim_none,
    LOOKUP: tl.constexpr,
    UPDATE_PREV: tl.constexpr,
    CLAIM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_seeds
    active = ok & (tl.load(active_ptr + offs, mask=ok, other=0) != 0)
    if LOOKUP:
        here = tl.load(from_ptr + offs, mask=active, other=0)
        found = tl.load(table_ptr + here, mask=active, other=0)
        tl.store(to_ptr + offs, found, mask=active)
        active = active & (found != tl.load(prev_to_ptr + offs, mask=active, other=0))  # unchanged: reciprocal
        tl.store(active_ptr + offs, active.to(tl.int8), mask=ok)
        if UPDATE_PREV:
            tl.store(prev_to_ptr + offs, found, mask=active)
            tl.store(prev_from_ptr + offs, here, mask=active)
        key = found
    else:
        key = tl.load(to_ptr + offs, mask=ok, other=0)
    if CLAIM:
        # Inactive lanes compare-and-swap the spare entry (never UNKNOWN) and so claim nothing.
        key = tl.where(active, key, claim_none)
        old = tl.atomic_cas(claim_ptr + key, tl.full((BLOCK,), -1, tl.int32), tl.full((BLOCK,), -2, tl.int32))
        claimed = active & (old == -1)
        slot = tl.atomic_add(count_ptr + tl.zeros((BLOCK,), tl.int32), 1, mask=claimed)
        tl.store(rows_ptr + slot, key, mask=claimed)
