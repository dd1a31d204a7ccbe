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
    SEM: tl.constexpr,  # memory order of the atomics: "relaxed" (kernel boundaries order everything else)
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
            best, arg = keep_larger(best, arg, sim, cols[None, :])  # an earlier key in this column slot keeps a tie
        row_best, row_arg = first_max(best, arg)  # first index among the slots holding the row maximum
        # Across key ranges: one 64-bit atomic max per row of (score, first index) (see pack).
        tl.atomic_max(packed_ptr + slots, pack(row_best, row_arg), mask=slot_ok, sem=SEM)


@triton.jit
def pack(score, index):
    # (score, index) as one int64 whose signed order is (score, then the smaller index): the score's bits are
    # made to order as signed integers (negative floats get their magnitude bits flipped; + 0.0 turns -0.0
    # into 0.0, which compares equal), and the low word is 0xFFFFFFFF - index.
    bits = (score + 0.0).to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (4294967295 - index.to(tl.int64))


@triton.jit
def packed_index(packed):
    # The index in a value of pack (int64).
    return 4294967295 - (packed & 4294967295)


@triton.jit
def keep_larger(best, arg, value, index):
    # Running maximum: a later value wins only on a strictly larger value, so an earlier index keeps a tie.
    better = value > best
    return tl.where(better, value, best), tl.where(better, index, arg)


@triton.jit
def first_max(values, indices):
    # Per row (axis 1): the maximum and the smallest index among the entries holding it.
    top = tl.max(values, axis=1)
    return top, tl.min(tl.where(values == top[:, None], indices, 2147483647), axis=1)


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
    SEM: tl.constexpr,
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
            best, arg = keep_larger(best, arg, sim, j)
        tl.atomic_max(packed_ptr + slots, pack(best, arg), mask=slot_ok, sem=SEM)


@triton.jit
def finish_rows(
    rows_ptr,
    count_ptr,
    packed_ptr,  # int64 per slot, reset to EMPTY for the next launch
    table_ptr,  # int32: table[rows[i]] = nearest key of row i
    probe_ptr,  # int64 per slot: the pruned search's probe blocks, also reset (when PROBE)
    EMPTY: tl.constexpr,
    BLOCK: tl.constexpr,
    PROBE: tl.constexpr,
):
    count = tl.load(count_ptr)
    for first in range(tl.program_id(0) * BLOCK, count, tl.num_programs(0) * BLOCK):
        slots = first + tl.arange(0, BLOCK)
        ok = slots < count
        packed = tl.load(packed_ptr + slots, mask=ok, other=0)
        arg = packed_index(packed).to(tl.int32)
        tl.store(table_ptr + tl.load(rows_ptr + slots, mask=ok, other=0), arg, mask=ok)
        tl.store(packed_ptr + slots, tl.full((BLOCK,), EMPTY, tl.int64), mask=ok)
        if PROBE:
            tl.store(probe_ptr + slots, tl.full((BLOCK,), EMPTY, tl.int64), mask=ok)


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
    SEM: tl.constexpr,
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
        old = tl.atomic_cas(claim_ptr + key, tl.full((BLOCK,), -1, tl.int32), tl.full((BLOCK,), -2, tl.int32),
                             sem=SEM)  # fmt: skip
        claimed = active & (old == -1)
        # One atomic per program for its claimed rows (a per-lane atomic on the one counter serialises them).
        taken = claimed.to(tl.int32)
        first = tl.atomic_add(count_ptr, tl.sum(taken, axis=0), sem=SEM)
        tl.store(rows_ptr + first + tl.cumsum(taken, axis=0) - taken, key, mask=claimed)


# --- pruned search: key blocks whose bound says they cannot hold a row's nearest neighbour are skipped ---------
#
# Keys are grouped into spatial blocks (NearestTable.prune). For block b with centroid c_b and radius r_b (the
# largest |k - c_b| over its keys), every key k in it has q . k <= q . c_b + |q| r_b; the radius array carries a
# margin that covers every fp32 rounding of both sides. A row's lower bound L is the best similarity among the
# keys of one block (the one whose centroid scores highest), so a block whose upper bound is below L holds
# neither the row's maximum nor a key tied with it, and the rows that remain are computed exactly as
# nearest_rows computes them.


@triton.jit
def pruned_count(count_ptr, FROM: tl.constexpr):
    # The launch's rows, or 0 where there are fewer than FROM: small launches run unpruned (nearest_rows).
    count = tl.load(count_ptr)
    return tl.where(count >= FROM, count, 0)


@triton.jit
def _row_block(work, row_blocks, count, rows_ptr, src_ptr, feats, D: tl.constexpr, BLOCK_M: tl.constexpr):
    # Work item -> (block range, slots, which slots hold a row, the rows' features (zeros past D)).
    split, slots, slot_ok, rows = work_rows(work, row_blocks, count, rows_ptr, BLOCK_M)
    q = tl.load(src_ptr + rows[:, None] * D + feats[None, :], mask=slot_ok[:, None] & (feats[None, :] < D), other=0.0)
    return split, slots, slot_ok, q


@triton.jit
def _centroid_scores(q, cent_t_ptr, start, nb, feats, CB: tl.constexpr, PRECISION: tl.constexpr):
    # q . c for the CB blocks from `start` ((DQ, nb) centroids, zero-padded features); -inf past the last block.
    # In "tf32" (tensor cores) each input keeps 10 mantissa bits: the radii carry the margin for that (block_keys).
    blocks = start + tl.arange(0, CB)
    ok = blocks < nb
    c = tl.load(cent_t_ptr + feats.to(tl.int64)[:, None] * nb + blocks[None, :], mask=ok[None, :], other=0.0)
    s = tl.dot(q, c, input_precision=PRECISION, out_dtype=tl.float32)
    return blocks, ok, tl.where(ok[None, :], s, float("-inf"))


@triton.jit
def prune_probe(
    src_ptr,  # (N, D) fp32 rows
    rows_ptr,
    count_ptr,
    cent_t_ptr,  # (DQ, ng) fp32 centroids of the probe groups (G consecutive blocks), features past D zero
    probe_ptr,  # int64 per slot: atomic max of (centroid score, first group), EMPTY before
    ng,
    D: tl.constexpr,
    DQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CB: tl.constexpr,  # groups per dot
    TARGET: tl.constexpr,  # work items to aim for (row blocks x group ranges), as nearest_rows
    PRECISION: tl.constexpr,  # of the centroid scores: "ieee" or "tf32" (any group is a valid probe)
    FROM: tl.constexpr,  # launches of fewer rows run unpruned
    SEM: tl.constexpr,
):
    # Each row's probe: the group of blocks whose centroid scores highest (first on ties; any group would be valid).
    count = pruned_count(count_ptr, FROM)
    row_blocks, splits, per_split = plan(count, ng, BLOCK_M, CB, TARGET)
    feats = tl.arange(0, DQ)
    for work in range(tl.program_id(0), row_blocks * splits, tl.num_programs(0)):
        split, slots, slot_ok, q = _row_block(work, row_blocks, count, rows_ptr, src_ptr, feats, D, BLOCK_M)
        best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        arg = tl.zeros((BLOCK_M,), tl.int32)
        for start in range(split * per_split, tl.minimum(split * per_split + per_split, ng), CB):
            groups, _, s = _centroid_scores(q, cent_t_ptr, start, ng, feats, CB, PRECISION)
            top, first = first_max(s, groups[None, :])
            best, arg = keep_larger(best, arg, top, first)
        tl.atomic_max(probe_ptr + slots, pack(best, arg), mask=slot_ok, sem=SEM)


@triton.jit
def prune_bound(
    src_ptr,
    rows_ptr,
    count_ptr,
    probe_ptr,
    kblk_ptr,  # (D, nslots) fp32 keys in block order, one feature a row, zeros where a block has no key
    kidx_ptr,  # int32 per block slot: the key's index, -1 for none
    low_ptr,  # fp32 per slot: the row's lower bound
    nslots,  # block slots: ng * GN
    D: tl.constexpr,
    GN: tl.constexpr,  # key slots of a probe group (its G blocks' slots, adjacent in block order)
    BLOCK_M: tl.constexpr,
    MARGIN: tl.constexpr,
    SMALLEST: tl.constexpr,  # |q| or the probe group's |k|max outside (SMALLEST, LARGEST): no lower bound
    LARGEST: tl.constexpr,
    FROM: tl.constexpr,
):
    # Best similarity (any summation order: the margins cover it) among the keys of each row's probe group, all
    # GN keys at once, one feature a step.
    count = pruned_count(count_ptr, FROM)
    keys = tl.arange(0, GN)
    for first in range(tl.program_id(0) * BLOCK_M, count, tl.num_programs(0) * BLOCK_M):
        slots = first + tl.arange(0, BLOCK_M)
        ok = slots < count
        rows = tl.load(rows_ptr + slots, mask=ok, other=0).to(tl.int64)
        packed = tl.load(probe_ptr + slots, mask=ok, other=0)
        pos = packed_index(packed)[:, None] * GN + keys[None, :]  # int64 (rows, keys)
        sim = tl.zeros((BLOCK_M, GN), tl.float32)
        key_sq = tl.zeros((BLOCK_M, GN), tl.float32)
        q_sq = tl.zeros((BLOCK_M,), tl.float32)
        for f in tl.static_range(D):
            q_f = tl.load(src_ptr + rows * D + f, mask=ok, other=0.0)
            k_f = tl.load(kblk_ptr + f * nslots + pos, mask=ok[:, None], other=0.0)
            sim += q_f[:, None] * k_f
            key_sq += k_f * k_f
            q_sq += q_f * q_f
        valid = tl.load(kidx_ptr + pos, mask=ok[:, None], other=-1) >= 0
        best = tl.max(tl.where(valid, sim, float("-inf")), axis=1)
        # minus the margin for this sum's rounding, relative to the probe group's largest key (see block_keys)
        q_norm, k_norm = tl.sqrt(q_sq), tl.sqrt(tl.max(key_sq, axis=1))
        # Where a norm leaves (SMALLEST, LARGEST), its square is not a normal fp32 number (or products leave the
        # range where rounding is relative): no bound is claimed, -inf keeps every block for the row.
        sane = (q_norm > SMALLEST) & (q_norm < LARGEST) & (k_norm > SMALLEST) & (k_norm < LARGEST)
        sane = sane & (best > float("-inf")) & (best < float("inf"))
        tl.store(low_ptr + slots, tl.where(sane, best - MARGIN * q_norm * k_norm, float("-inf")), mask=ok)


@triton.jit
def prune_pairs(
    src_ptr,
    rows_ptr,
    count_ptr,
    cent_t_ptr,  # (DQ, nb) fp32 block centroids
    rad_ptr,  # fp32 per block: radius plus the rounding margin
    low_ptr,  # fp32 per slot: the row's lower bound (prune_bound)
    counts_ptr,  # int32 per block: rows whose bound keeps it (added to; prune_scan zeroes it)
    emitted_ptr,  # int64 scalar: entries written so far (prune_scan zeroes it)
    entry_slot_ptr,  # int32 per entry: the row's slot
    entry_first_ptr,  # int32 per entry: the first block of the entry's CB blocks
    entry_bits_ptr,  # int64 per entry: bit i set where the bound keeps block first + i
    entry_capacity,
    nb,
    D: tl.constexpr,
    DQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CB: tl.constexpr,  # <= 64: the blocks of an entry's bits
    TARGET: tl.constexpr,
    PRECISION: tl.constexpr,  # of the centroid scores (the radii's margin covers "tf32")
    FROM: tl.constexpr,
    SEM: tl.constexpr,
):
    # The (row, block) pairs the bound keeps, in one pass: counted per block, and written as one entry per row and
    # step of CB blocks that keeps any (the row's slot, the step's first block, a bit per block kept), so a step
    # writes at most BLOCK_M entries, placed by a running count over its rows; place_pairs expands them.
    # (On the H200 writing each pair with its rank among the step's 64 x 64 bound tests took 113 us of the bound
    # pass's 114 on a 3072-row launch against 39 without writing: the ranks and the scattered stores.)
    count = pruned_count(count_ptr, FROM)
    row_blocks, splits, per_split = plan(count, nb, BLOCK_M, CB, TARGET)
    feats = tl.arange(0, DQ)
    bit = tl.arange(0, CB).to(tl.int64)
    for work in range(tl.program_id(0), row_blocks * splits, tl.num_programs(0)):
        split, slots, slot_ok, q = _row_block(work, row_blocks, count, rows_ptr, src_ptr, feats, D, BLOCK_M)
        low = tl.load(low_ptr + slots, mask=slot_ok, other=float("inf"))
        norm = tl.sqrt(tl.sum(q * q, axis=1))
        for start in range(split * per_split, tl.minimum(split * per_split + per_split, nb), CB):
            blocks, block_ok, s = _centroid_scores(q, cent_t_ptr, start, nb, feats, CB, PRECISION)
            rad = tl.load(rad_ptr + blocks, mask=block_ok, other=0.0)
            # (a NaN bound, from an infinite norm or radius, keeps the block)
            keep = slot_ok[:, None] & block_ok[None, :] & ~((s + norm[:, None] * rad[None, :]) < low[:, None])
            per_block = tl.sum(keep.to(tl.int32), axis=0)
            tl.atomic_add(counts_ptr + blocks, per_block, mask=per_block > 0, sem=SEM)
            bits = tl.sum(tl.where(keep, tl.full((BLOCK_M, CB), 1, tl.int64) << bit[None, :], 0), axis=1)
            has = (bits != 0).to(tl.int32)
            entries = tl.sum(has, axis=0)
            if entries > 0:
                at = tl.atomic_add(emitted_ptr, entries.to(tl.int64), sem=SEM) + (tl.cumsum(has, axis=0) - has)
                put = (has != 0) & (at < entry_capacity)
                tl.store(entry_slot_ptr + at, slots, mask=put)
                tl.store(entry_first_ptr + at, tl.zeros_like(slots) + start, mask=put)
                tl.store(entry_bits_ptr + at, bits, mask=put)


@triton.jit
def prune_scan(
    counts_ptr,  # int32 per block, zeroed here for the next launch
    starts_ptr,  # out: int32 per block and one more: where each block's pairs start, then the number of pairs
    cursor_ptr,  # out: int32 per block, the same starts (place_pairs advances them)
    chunk_first_ptr,  # out: int32 per block: its first chunk (a chunk: up to CH of a block's pairs)
    chunks_ptr,  # out: int32 scalar: chunks of this launch, 0 when the pairs exceed capacity
    total_ptr,  # out: int32 scalar: pairs of this launch, 0 when they exceed capacity
    emitted_ptr,  # int64 scalar: prune_pairs' entries, zeroed here for the next launch
    entries_ptr,  # out: int32 scalar: the entries to expand, 0 when they or the pairs exceed capacity
    count_ptr,  # the launch's row count
    dense_ptr,  # out: int32: the row count when it is below FROM or the pairs exceed capacity (nearest_rows takes
    # the launch), else 0
    nb,
    capacity,
    entry_capacity,
    BLOCK: tl.constexpr,
    FROM: tl.constexpr,  # >= 1
    CH: tl.constexpr,
):
    count = tl.load(count_ptr)
    small = count < FROM
    carry = tl.zeros((), tl.int64)
    chunks = tl.zeros((), tl.int32)
    # (a small launch, or one with no rows, counted nothing: the counts are still zero and nothing is read)
    for start in range(0, tl.where(small, 0, nb), BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < nb
        c = tl.load(counts_ptr + offs, mask=ok, other=0)
        first = tl.minimum(carry + tl.cumsum(c.to(tl.int64), axis=0) - c, capacity).to(tl.int32)
        tl.store(starts_ptr + offs, first, mask=ok)
        tl.store(cursor_ptr + offs, first, mask=ok)
        per = (c + CH - 1) // CH
        tl.store(chunk_first_ptr + offs, chunks + tl.cumsum(per, axis=0) - per, mask=ok)
        tl.store(counts_ptr + offs, tl.zeros((BLOCK,), tl.int32), mask=ok)
        carry += tl.sum(c.to(tl.int64), axis=0)
        chunks += tl.sum(per, axis=0)
    emitted = tl.load(emitted_ptr)
    over = (carry > capacity) | (emitted > entry_capacity)
    tl.store(starts_ptr + nb, tl.minimum(carry, capacity).to(tl.int32))
    tl.store(chunks_ptr, tl.where(over, 0, chunks))
    tl.store(total_ptr, tl.where(over, 0, carry).to(tl.int32))
    tl.store(entries_ptr, tl.where(over, 0, emitted).to(tl.int32))
    tl.store(dense_ptr, tl.where(over | small, count, 0))
    tl.store(emitted_ptr, tl.zeros((), tl.int64))


@triton.jit
def place_pairs(
    entry_slot_ptr,  # prune_pairs' entries
    entry_first_ptr,
    entry_bits_ptr,
    entries_ptr,  # int32: how many (0 when they or the pairs overflowed)
    starts_ptr,  # prune_scan's
    cursor_ptr,  # int32 per block: the block's next free place (the starts, advanced here)
    chunk_first_ptr,
    chunks_ptr,
    pair_slot_ptr,  # out: the pairs' slots grouped by block
    chunk_block_ptr,  # out: int32 per chunk: its block
    chunk_start_ptr,  # out: int32 per chunk: its first pair
    chunk_stop_ptr,  # out: int32 per chunk: past its last pair
    nb,
    BLOCK: tl.constexpr,
    CH: tl.constexpr,
    SEM: tl.constexpr,
):
    # Each entry's pairs to their block's next free places, one kept block (the lowest bit left) a step, as long as
    # any entry of the step has one left.
    entries = tl.load(entries_ptr)
    for first in range(tl.program_id(0) * BLOCK, entries, tl.num_programs(0) * BLOCK):
        i = first + tl.arange(0, BLOCK)
        ok = i < entries
        slot = tl.load(entry_slot_ptr + i, mask=ok, other=0)
        start = tl.load(entry_first_ptr + i, mask=ok, other=0)
        bits = tl.load(entry_bits_ptr + i, mask=ok, other=0)
        while tl.max((bits != 0).to(tl.int32), axis=0) > 0:
            kept = bits != 0
            lowest = bits & -bits  # a power of two (-2**63 for bit 63): its float64 exponent is the bit
            bit = ((lowest.to(tl.float64).to(tl.int64, bitcast=True) >> 52) & 2047) - 1023
            block = start + bit.to(tl.int32)
            pos = tl.atomic_add(cursor_ptr + block, tl.full((BLOCK,), 1, tl.int32), mask=kept, sem=SEM)
            tl.store(pair_slot_ptr + pos, slot, mask=kept)
            bits = bits ^ lowest
    # Each chunk's block and pairs (a block's chunks are numbered from chunk_first, one per CH of its pairs).
    if tl.load(chunks_ptr) > 0:
        for first in range(tl.program_id(0) * BLOCK, nb, tl.num_programs(0) * BLOCK):
            blocks = first + tl.arange(0, BLOCK)
            ok = blocks < nb
            begin = tl.load(starts_ptr + blocks, mask=ok, other=0)
            end = tl.load(starts_ptr + blocks + 1, mask=ok, other=0)
            per = (end - begin + CH - 1) // CH
            at = tl.load(chunk_first_ptr + blocks, mask=ok, other=0)
            for j in range(0, tl.max(per, axis=0)):
                mine = ok & (j < per)
                tl.store(chunk_block_ptr + at + j, blocks, mask=mine)
                tl.store(chunk_start_ptr + at + j, begin + j * CH, mask=mine)
                tl.store(chunk_stop_ptr + at + j, tl.minimum(begin + (j + 1) * CH, end), mask=mine)


@triton.jit
def pair_rows(
    src_ptr,
    rows_ptr,
    kblk_ptr,
    kidx_ptr,
    pair_slot_ptr,  # the kept pairs' slots, grouped by block (place_pairs)
    chunk_block_ptr,  # int32 per chunk: its block
    chunk_start_ptr,  # int32 per chunk: its first pair
    chunk_stop_ptr,  # int32 per chunk: past its last pair
    chunks_ptr,
    count_ptr,  # the launch's rows: a pair naming another slot is ignored
    packed_ptr,  # int64 per slot, as nearest_rows
    nslots,
    D: tl.constexpr,
    DOT_D: tl.constexpr,  # features in tl.dot, the rest by fma steps
    DP: tl.constexpr,
    BN: tl.constexpr,
    CH: tl.constexpr,  # pairs per chunk
    SEM: tl.constexpr,
):
    # The kept pairs, a chunk at a time (up to CH pairs of one block): the block's keys against the chunk's rows,
    # with nearest_rows's arithmetic (the same fp32 values) and tie rule. The next chunk's description is read
    # while this one computes (its loads wait on nothing of this chunk's).
    chunks = tl.load(chunks_ptr)
    count = tl.load(count_ptr)
    feats = tl.arange(0, DP)
    keys = tl.arange(0, BN)
    chunk = tl.program_id(0)
    block = tl.load(chunk_block_ptr + chunk, mask=chunk < chunks, other=0)
    start = tl.load(chunk_start_ptr + chunk, mask=chunk < chunks, other=0)
    stop = tl.load(chunk_stop_ptr + chunk, mask=chunk < chunks, other=0)
    for _ in range(tl.program_id(0), chunks, tl.num_programs(0)):
        p = start + tl.arange(0, CH)
        p_ok = p < stop
        slots = tl.load(pair_slot_ptr + p, mask=p_ok, other=0)
        following = chunk + tl.num_programs(0)
        next_block = tl.load(chunk_block_ptr + following, mask=following < chunks, other=0)
        next_start = tl.load(chunk_start_ptr + following, mask=following < chunks, other=0)
        next_stop = tl.load(chunk_stop_ptr + following, mask=following < chunks, other=0)
        pos = block.to(tl.int64) * BN + keys
        index = tl.load(kidx_ptr + pos)
        p_ok = p_ok & (slots >= 0) & (slots < count)
        rows = tl.load(rows_ptr + slots, mask=p_ok, other=0).to(tl.int64)
        k = tl.load(kblk_ptr + feats[:, None] * nslots + pos[None, :], mask=feats[:, None] < DOT_D, other=0.0)
        q = tl.load(src_ptr + rows[:, None] * D + feats[None, :], mask=p_ok[:, None] & (feats[None, :] < DOT_D),
                    other=0.0)  # fmt: skip
        sim = tl.dot(q, k, input_precision="ieee", out_dtype=tl.float32)
        for t in tl.static_range(D - DOT_D):
            q_t = tl.load(src_ptr + rows * D + (DOT_D + t), mask=p_ok, other=0.0)
            k_t = tl.load(kblk_ptr + (DOT_D + t) * nslots + pos)
            sim = tl.fma(q_t[:, None], k_t[None, :], sim)
        # (a NaN similarity, from maps that are not finite, counts as -inf, as it never wins in nearest_rows;
        # a padding slot never wins, even where every similarity is -inf: the index stays a key's)
        sim = tl.where((index[None, :] >= 0) & (sim == sim), sim, float("-inf"))
        row_best, row_arg = first_max(sim, tl.where(index >= 0, index, 2147483647)[None, :])
        packed = pack(row_best, row_arg)
        # A row's pairs are spread over many programs: read its running maximum (from L2) first, and only an
        # improvement takes the atomic (which still decides between programs that both improve).
        seen = tl.load(packed_ptr + slots, mask=p_ok, other=0, cache_modifier=".cg")
        tl.atomic_max(packed_ptr + slots, packed, mask=p_ok & (packed > seen), sem=SEM)
        chunk, block, start, stop = following, next_block, next_start, next_stop


@triton.jit
def block_keys(
    keys_ptr,  # (n, D) fp32 keys
    kidx_ptr,  # int32 per block slot: the key's index, -1 for none
    kblk_ptr,  # out: (D, nslots) fp32 keys in block order, one feature a row (on the H200 the exact pass took
    # 100 against 199 us on a 3072-row launch with this layout instead of one key a row), zeros for no key
    cent_t_ptr,  # out: (DQ, nb) fp32 centroids (features past D stay zero)
    rad_ptr,  # out: fp32 per block: radius + MARGIN x the block's largest |k|
    nb,
    nslots,
    D: tl.constexpr,
    DQ: tl.constexpr,
    BN: tl.constexpr,
    MARGIN: tl.constexpr,
    SMALLEST: tl.constexpr,
    LARGEST: tl.constexpr,
):
    # One block a step: its keys gathered, centroid, radius (largest |k - c|) and the rounding margin. The margin
    # covers, relative to the block's largest key, the fp32 rounding of q . k, q . c, |q| and the radius, and the
    # TF32 rounding of q . c's inputs where the centroid scores use it.
    feats = tl.arange(0, DQ)
    slots = tl.arange(0, BN)
    for block in range(tl.program_id(0), nb, tl.num_programs(0)):
        pos = slots.to(tl.int64) + block * BN
        index = tl.load(kidx_ptr + pos)
        valid = index >= 0
        inside = valid[:, None] & (feats[None, :] < D)
        k = tl.load(keys_ptr + tl.where(valid, index, 0).to(tl.int64)[:, None] * D + feats[None, :], mask=inside,
                    other=0.0)  # fmt: skip
        tl.store(kblk_ptr + feats[None, :].to(tl.int64) * nslots + pos[:, None], k, mask=feats[None, :] < D)
        centroid = tl.sum(k, axis=0) / tl.sum(valid.to(tl.float32), axis=0)
        spread = tl.where(inside, k - centroid[None, :], 0.0)
        radius = tl.sqrt(tl.max(tl.sum(spread * spread, axis=1), axis=0))
        largest = tl.sqrt(tl.max(tl.sum(k * k, axis=1), axis=0))
        tl.store(cent_t_ptr + feats.to(tl.int64) * nb + block, centroid, mask=feats < D)
        # A block whose norms under- or overflow fp32 gets an infinite radius: it is never skipped.
        sane = (largest > SMALLEST) & (largest < LARGEST) & (radius < LARGEST)
        tl.store(rad_ptr + block, tl.where(sane, radius + MARGIN * largest, float("inf")))
