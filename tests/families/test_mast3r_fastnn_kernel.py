"""The fused FastNN-Lite kernel (Triton): same neighbours and matches as the tiled path and the reference data.

Compiled on a GPU; on a CPU-only machine run by Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
which checks the kernel's logic: tiling, splits, masking, first-index ties. bench/gpu_bench.py checks on the
device that its matches equal the cuBLAS-based reference at full size.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from export_engine.errors import BackendError, ModelInputError
from export_engine.families.mast3r import fastnn_kernel
from export_engine.families.mast3r.fastnn import (
    CapturedCorrespondences,
    CapturedMatcher,
    MatchConfig,
    ReciprocalMatcher,
    extract_correspondences,
    fast_reciprocal_nn,
    matcher_reciprocal_nn,
    nearest_by_dot,
)
from export_engine.families.mast3r.matching_reference import extract_correspondences_reference

pytest.importorskip("triton", reason="triton (the fused kernel's compiler, interpreted here) is not installed")


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1: the fused kernel cannot run", allow_module_level=True)


TILES = [fastnn_kernel.DEFAULT_TILES, fastnn_kernel.Tiles(32, 128, 4, 64)]
# The query-stationary kernel from the first row on: 1 or 2 rows a thread, one warp, a few programs (small
# blocks keep the interpreter quick and still split rows into blocks and keys into ranges).
STATIONARY = [
    fastnn_kernel.Tiles(stationary=1, stationary_warps=1, stationary_programs=8, stationary_from=1),
    fastnn_kernel.Tiles(stationary=2, stationary_warps=1, stationary_programs=3, stationary_from=1),
]


# The reference-data tests: a launch shape never changes the neighbours (tested above), and where no GPU runs
# them, each program of a persistent grid is interpreted, so a small grid keeps them quick.
REFERENCE_TILES = (
    fastnn_kernel.DEFAULT_TILES
    if DEVICE.type == "cuda"
    else fastnn_kernel.Tiles(64, 32, 2, target_programs=8, prune_programs=8, prune_bound_programs=8)
)
# (m, n, d) cases; the query-stationary kernel's are smaller (one interpreted step per key)
SHAPES = [(1, 5, 3), (7, 300, 24), (70, 1000, 24), (130, 4097, 8)]
STATIONARY_SHAPES = [(1, 5, 3), (7, 130, 24), (70, 200, 24), (130, 90, 8)]


@pytest.mark.parametrize(
    ("tiles", "m", "n", "d"),
    [(t, *shape) for t in TILES for shape in SHAPES] + [(t, *shape) for t in STATIONARY for shape in STATIONARY_SHAPES],
)
def test_fused_equals_tiles(m: int, n: int, d: int, tiles: fastnn_kernel.Tiles) -> None:
    gen = torch.Generator().manual_seed(m * 31 + n)
    queries, keys = torch.randn(m, d, generator=gen).to(DEVICE), torch.randn(n, d, generator=gen).to(DEVICE)
    got = fastnn_kernel.nearest_by_dot_fused(queries, fastnn_kernel.transposed(keys), tiles)
    assert got.dtype == torch.int64 and got.shape == (m,)
    np.testing.assert_array_equal(got.cpu().numpy(), nearest_by_dot(queries, keys).cpu().numpy())


@pytest.mark.parametrize("tiles", STATIONARY)
def test_query_stationary_ties_resolve_to_first_index_across_ranges(tiles: fastnn_kernel.Tiles) -> None:
    keys = torch.randn(300, 24, generator=torch.Generator().manual_seed(4))
    keys[299] = keys[17]  # the same maximum in the first and in the last key range
    keys[150] = keys[17]
    queries = torch.stack([keys[17], keys[299] * 2.0, keys[123]])
    got = fastnn_kernel.nearest_by_dot_fused(queries.to(DEVICE), fastnn_kernel.transposed(keys.to(DEVICE)), tiles)
    assert got.tolist() == [17, 17, 123]


def test_each_launch_runs_one_kernel_by_its_row_count() -> None:
    """Below `stationary_from` rows the tl.dot kernel computes, from it on the query-stationary one; a table
    alternating between them fills every row correctly."""
    gen = torch.Generator().manual_seed(9)
    source, keys = torch.randn(90, 24, generator=gen).to(DEVICE), torch.randn(200, 24, generator=gen).to(DEVICE)
    tiles = fastnn_kernel.Tiles(32, 64, 1, 8, stationary=1, stationary_warps=1, stationary_programs=4,
                                stationary_from=40)  # fmt: skip
    table = fastnn_kernel.NearestTable(source, keys, 90, tiles)
    for first, count in ((0, 30), (30, 60)):  # 30 rows: tl.dot kernel; 60 rows: query-stationary
        rows = torch.arange(first, first + count, dtype=torch.int32, device=DEVICE)
        table.compute(rows, torch.tensor(count, dtype=torch.int32, device=DEVICE))
    np.testing.assert_array_equal(table.table[:90].cpu().numpy(), nearest_by_dot(source, keys).cpu().numpy())
    assert int(table.computed) == 90


def test_query_stationary_pairs_equal_the_reference() -> None:
    desc1, desc2 = (d.to(DEVICE) for d in _smooth_pair(16, 24, noise=0.4, seed=7))
    tiles = fastnn_kernel.Tiles(
        32, 32, 1, 4, stationary=1, stationary_warps=1, stationary_programs=4, stationary_from=8
    )
    got = matcher_reciprocal_nn(ReciprocalMatcher(desc1, desc2, MatchConfig(kernel="fused", tiles=tiles)), 4)
    want = fast_reciprocal_nn(desc1.cpu(), desc2.cpu(), 4, kernel="tiles")
    assert len(want[0]) > 10
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.cpu().numpy(), w.numpy())


@pytest.mark.parametrize("tiles", TILES)
def test_fused_ties_resolve_to_first_index_across_splits(tiles: fastnn_kernel.Tiles) -> None:
    keys = torch.randn(5000, 24, generator=torch.Generator().manual_seed(1))
    keys[4999] = keys[17]  # same maximum in the first and in the last split
    keys[2500] = keys[17]
    queries = torch.stack([keys[17], keys[4999] * 2.0, keys[123]])
    assert fastnn_kernel.plan_splits(3, 5000, tiles)[0] > 1  # the tie really crosses splits
    got = fastnn_kernel.nearest_by_dot_fused(queries.to(DEVICE), fastnn_kernel.transposed(keys.to(DEVICE)), tiles)
    assert got.tolist() == [17, 17, 123]


@pytest.mark.parametrize("tiles", TILES)
def test_plan_splits_covers_every_key_once(tiles: fastnn_kernel.Tiles) -> None:
    for m, n in [(1, 64), (3, 196608), (3072, 196608), (100000, 1000), (5, 63)]:
        splits, per_split = fastnn_kernel.plan_splits(m, n, tiles)
        assert per_split % tiles.block_n == 0 and splits * per_split >= n > (splits - 1) * per_split


def test_fused_matches_reference_data(mast3r_ref: Path) -> None:
    with np.load(mast3r_ref / "matching.npz") as data:
        desc1, desc2 = torch.from_numpy(data["desc1"]), torch.from_numpy(data["desc2"])
        expected = data["dot_xy1"], data["dot_xy2"]
    config = MatchConfig(kernel="fused", tiles=REFERENCE_TILES)
    got = matcher_reciprocal_nn(ReciprocalMatcher(desc1.to(DEVICE), desc2.to(DEVICE), config), 8)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g.cpu().numpy(), e)


def test_fused_symmetric_reference(mast3r_ref: Path) -> None:
    with np.load(mast3r_ref / "outputs.npz") as out, np.load(mast3r_ref / "symmetric.npz") as sym:
        descs = [out["view1_desc"][0], out["view2_desc"][0], sym["res22_desc"][0], sym["res12_desc"][0]]
        confs = [out["view1_desc_conf"][0], out["view2_desc_conf"][0], sym["res22_desc_conf"][0]]
        confs.append(sym["res12_desc_conf"][0])
        expected = [sym[k] for k in ("corres_xy1", "corres_xy2", "corres_conf")]
    tensors = [torch.from_numpy(d).to(DEVICE) for d in descs]
    # unpruned on the CPU (the interpreter is slow on the pruned search's passes; the pair reference test and
    # the pruned-against-unpruned tests cover it there), pruned where a GPU runs it
    tiles = REFERENCE_TILES if DEVICE.type == "cuda" else dataclasses.replace(REFERENCE_TILES, prune_block=(0, 0))
    config = MatchConfig(kernel="fused", tiles=tiles)
    got = extract_correspondences(tensors, [torch.from_numpy(c) for c in confs], 8, config)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g.cpu().numpy(), e)


@pytest.mark.gpu
def test_captured_correspondences_reproduce_the_symmetric_reference(mast3r_ref: Path) -> None:
    """Both map pairs, both directions, every round as one CUDA graph: the reference's correspondences, also on
    a second replay with other maps of the same shapes, and clear refusals."""
    if DEVICE.type != "cuda":
        pytest.skip("needs a CUDA GPU: CapturedCorrespondences records a CUDA graph")
    with np.load(mast3r_ref / "outputs.npz") as out, np.load(mast3r_ref / "symmetric.npz") as sym:
        descs = [out["view1_desc"][0], out["view2_desc"][0], sym["res22_desc"][0], sym["res12_desc"][0]]
        confs = [out["view1_desc_conf"][0], out["view2_desc_conf"][0], sym["res22_desc_conf"][0]]
        confs.append(sym["res12_desc_conf"][0])
        expected = [sym[k] for k in ("corres_xy1", "corres_xy2", "corres_conf")]
    tensors = [torch.from_numpy(d).cuda() for d in descs]
    conf_tensors = [torch.from_numpy(c) for c in confs]
    captured = CapturedCorrespondences(tuple(tensors[0].shape), tuple(tensors[1].shape))
    for g, e in zip(captured(tensors, conf_tensors), expected, strict=True):
        np.testing.assert_array_equal(g.cpu().numpy(), e)
    flipped = [t.flip(0).contiguous() for t in tensors]  # other maps, same shapes: the graph is replayed afresh
    want = extract_correspondences(flipped, conf_tensors, 8, MatchConfig(kernel="fused"))
    for g, w in zip(captured(flipped, conf_tensors), want, strict=True):
        assert torch.equal(g.cpu(), w.cpu())
    with pytest.raises(ModelInputError, match="recorded shape"):
        captured([t[:, :-1] for t in tensors], [c[:, :-1] for c in conf_tensors])
    with pytest.raises(ModelInputError, match="4 descriptor maps"):
        captured(tensors[:2], conf_tensors[:2])


@pytest.mark.gpu
@pytest.mark.parametrize("captured_rounds", [6, 1])
def test_captured_correspondences_equal_the_reference_on_synthetic_maps(captured_rounds: int) -> None:
    """The two map pairs run on streams of their own (parallel branches of the graphs), each pair's two
    directions in order on its stream; the same correspondences as the reference, with one recorded graph or
    with the later rounds replayed from the second."""
    if DEVICE.type != "cuda":
        pytest.skip("needs a CUDA GPU: CapturedCorrespondences records a CUDA graph")
    gen = torch.Generator().manual_seed(3)
    maps = [*_smooth_pair(96, 128, noise=0.4, seed=5), *_smooth_pair(96, 128, noise=0.4, seed=6)]
    maps = [m.cuda() for m in (maps[0], maps[1], maps[3], maps[2])]  # 11, 21, 22, 12
    confs = [1 + torch.rand(96, 128, generator=gen) for _ in range(4)]
    captured = CapturedCorrespondences(
        (96, 128, 24), (96, 128, 24), config=MatchConfig(captured_rounds=captured_rounds)
    )
    assert captured._recorded._groups == [[0, 1], [2, 3]] and len(captured._recorded._streams) == 2
    want = extract_correspondences_reference([m.cpu() for m in maps], confs, 8)
    for _ in range(2):
        got = captured(maps, confs)
        assert len(got[0]) > 100
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g.cpu().numpy(), np.asarray(w))
    assert sum(int(r.sum()) for r in captured.rows_per_step if r is not None) > 0
    if captured_rounds == 1:
        assert captured.rest_replays == 2  # seeds are still active after one round


def test_captured_correspondences_need_cuda() -> None:
    if DEVICE.type == "cuda":
        pytest.skip("this machine has CUDA: test_captured_correspondences_reproduce_the_symmetric_reference covers it")
    with pytest.raises(BackendError, match="needs CUDA"):
        CapturedCorrespondences((8, 8, 24), (8, 8, 24), device="cpu")


def test_auto_uses_fused_only_on_cuda_and_fused_refuses_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    assert MatchConfig().use_fused(torch.device("cpu")) is False  # interpreting is for tests, never automatic
    assert MatchConfig(kernel="fused").use_fused(DEVICE) is True
    with pytest.raises(BackendError, match="fp32 only"):
        MatchConfig(kernel="fused", precision="fp16").use_fused(DEVICE)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="kernel='fused' cannot run"):
        MatchConfig(kernel="fused").use_fused(torch.device("cpu"))


@pytest.mark.parametrize("d", [17, 24, 31, 32])
@pytest.mark.parametrize("tail_fma", [True, False])
def test_dot_with_fma_tail_equals_padded_dot(d: int, tail_fma: bool) -> None:
    """Features past 16 by explicit fma (16 < D < 32) or a dot padded to 32: the same neighbours as the BLAS."""
    gen = torch.Generator().manual_seed(d)
    queries, keys = torch.randn(70, d, generator=gen).to(DEVICE), torch.randn(640, d, generator=gen).to(DEVICE)
    tiles = fastnn_kernel.Tiles(32, 64, 4, 8, tail_fma=tail_fma)
    dot, padded, tail = fastnn_kernel._dot_features(d, tiles)
    assert dot + tail == d and padded >= dot and (tail > 0) == (tail_fma and d < 32)
    got = fastnn_kernel.nearest_by_dot_fused(queries, fastnn_kernel.transposed(keys), tiles)
    np.testing.assert_array_equal(got.cpu().numpy(), nearest_by_dot(queries, keys).cpu().numpy())


def _smooth_pair(height: int, width: int, noise: float, seed: int) -> list[torch.Tensor]:
    """Two unit (H, W, 24) maps sharing a blocky random field (8 px cells), each with its own noise: many
    seeds need more than one round, as on real descriptor maps."""
    gen = torch.Generator().manual_seed(seed)
    field = torch.randn(height // 8 + 1, width // 8 + 1, 24, generator=gen)
    field = field.repeat_interleave(8, 0).repeat_interleave(8, 1)[:height, :width]
    maps = [field + noise * torch.randn(field.shape, generator=gen) for _ in range(2)]
    return [torch.nn.functional.normalize(m, dim=2) for m in maps]


# the round loop's tests: a small persistent grid keeps them quick under the interpreter
LOOP_TILES = fastnn_kernel.Tiles(32, 128, 4, 8)


def _tables(desc1: torch.Tensor, desc2: torch.Tensor, tiles: fastnn_kernel.Tiles = LOOP_TILES) -> tuple:
    flat1, flat2 = desc1.reshape(-1, desc1.shape[-1]), desc2.reshape(-1, desc2.shape[-1])
    rows = max(flat1.shape[0], flat2.shape[0])
    return fastnn_kernel.NearestTable(flat1, flat2, rows, tiles), fastnn_kernel.NearestTable(flat2, flat1, rows, tiles)


@pytest.mark.parametrize("max_iter", [1, 2, 10])
def test_device_round_loop_equals_host_loop(max_iter: int) -> None:
    """The per-seed flags of the device loop reproduce the host loop's chains, converged flags included."""
    desc1, desc2 = _smooth_pair(48, 64, noise=0.6, seed=3)
    host = ReciprocalMatcher(desc1, desc2, MatchConfig(kernel="tiles"))
    seeds = host.grid_seeds(4)
    want = host.chains(seeds, max_iter)
    nn12, nn21 = _tables(desc1.to(DEVICE), desc2.to(DEVICE))
    *got, rows = fastnn_kernel.chains_on_device(nn12, nn21, seeds.to(DEVICE), max_iter)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.cpu().numpy(), w.numpy())
    assert int(rows.sum()) == int(nn12.computed + nn21.computed) == host.rows_computed
    assert rows.shape == (2 * max_iter + 1,) and int(rows[0]) == seeds.numel()
    if max_iter == 1:
        assert not bool(got[2].all())  # some seeds need more rounds: unconverged ones are reported
    # A converged table is remembered: a second walk claims and computes nothing.
    *again, rows_again = fastnn_kernel.chains_on_device(nn12, nn21, seeds.to(DEVICE), max_iter)
    assert int(rows_again.sum()) == 0
    for g, w in zip(again, got, strict=True):
        assert torch.equal(g, w)


def test_rounds_in_parts_equal_the_whole_loop() -> None:
    """The loop run as rounds 0-1 and then 2-9 (as the two recorded graphs run it) gives the whole loop's chains
    and rows per step; a seed is still active after two rounds, none after ten; bad round ranges are refused."""
    desc1, desc2 = (d.to(DEVICE) for d in _smooth_pair(24, 40, noise=0.6, seed=3))
    seeds = ReciprocalMatcher(desc1, desc2, MatchConfig(kernel="tiles")).grid_seeds(4).to(DEVICE)
    *want, want_rows = fastnn_kernel.chains_on_device(*_tables(desc1, desc2), seeds, 10)
    chains = fastnn_kernel.DeviceChains(*_tables(desc1, desc2), seeds, 10)
    chains.start()
    chains.rounds(0, 2)
    assert bool(chains.any_active())
    chains.rounds(2, 10)
    assert not bool(chains.any_active())
    for g, w in zip(chains.outputs(), want, strict=True):
        assert torch.equal(g, w)
    assert torch.equal(chains.counts, want_rows)
    for first, stop in ((3, 2), (-1, 2), (0, 11)):
        with pytest.raises(ValueError, match="outside 0 to 10"):
            chains.rounds(first, stop)


@pytest.mark.parametrize(("max_iter", "split"), [(10, 2), (3, 3), (1, 0)])
def test_paired_walks_equal_the_two_walks_in_turn(max_iter: int, split: int) -> None:
    """A map pair's forward and backward walks in lockstep (the backward one a step behind, one launch per step for
    both), run in two parts as the recorded graphs run them, give each walk's chains as the two walks one after
    the other do, computing each row once (the same rows in all); bad step ranges are refused."""
    desc1, desc2 = (d.to(DEVICE) for d in _smooth_pair(24, 40, noise=0.6, seed=3))
    host = ReciprocalMatcher(desc1, desc2, MatchConfig(kernel="tiles"))
    seeds1, seeds2 = host.grid_seeds(4).to(DEVICE), host.swapped().grid_seeds(4).to(DEVICE)
    nn12, nn21 = _tables(desc1, desc2)
    *want_fwd, _ = fastnn_kernel.chains_on_device(nn12, nn21, seeds1, max_iter)
    *want_bwd, _ = fastnn_kernel.chains_on_device(nn21, nn12, seeds2, max_iter)
    want_rows = int(nn12.computed + nn21.computed)
    nn12, nn21 = _tables(desc1, desc2)
    paired = fastnn_kernel.PairedChains(nn12, nn21, seeds1, seeds2, max_iter)
    middle = 2 * split + 1 if split < max_iter else paired.steps
    paired.run(0, middle)
    paired.run(middle, paired.steps)
    for got, want in zip(paired.outputs(), (want_fwd, want_bwd), strict=True):
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
    assert int(paired.counts.sum()) == int(nn12.computed + nn21.computed) == want_rows
    assert paired.counts.shape == (2 * max_iter + 2,) and int(paired.counts[0]) == seeds1.numel()
    with pytest.raises(ValueError, match="outside 0 to"):
        paired.run(1, paired.steps + 1)


def test_claims_are_unique_when_seeds_share_a_neighbour() -> None:
    """Many seeds asking for the same row in one step compute it once (compare-and-swap claim)."""
    keys = torch.nn.functional.normalize(torch.randn(200, 24, generator=torch.Generator().manual_seed(4)), dim=1)
    desc2 = keys.reshape(10, 20, 24)
    desc1 = keys[:1].expand(60, 24).reshape(6, 10, 24).contiguous()  # every pixel of image 1 is the same
    nn12, nn21 = _tables(desc1.to(DEVICE), desc2.to(DEVICE))
    seeds = torch.arange(60, device=DEVICE)
    _, idx2, _, rows = fastnn_kernel.chains_on_device(nn12, nn21, seeds, 3)
    assert int(rows[0]) == 60 and int(rows[1]) == 1  # one image-2 row for 60 identical image-1 points
    assert torch.all(idx2 == 0)


def test_refresh_forgets_neighbours_and_rereads_keys() -> None:
    gen = torch.Generator().manual_seed(5)
    source, keys = torch.randn(40, 24, generator=gen).to(DEVICE), torch.randn(300, 24, generator=gen).to(DEVICE)
    table = fastnn_kernel.NearestTable(source, keys, 40, TILES[1])
    rows = torch.arange(40, dtype=torch.int32, device=DEVICE)
    table.compute(rows, torch.tensor(40, dtype=torch.int32, device=DEVICE))
    np.testing.assert_array_equal(table.table[:40].cpu().numpy(), nearest_by_dot(source, keys).cpu().numpy())
    keys.copy_(torch.randn(300, 24, generator=gen))
    table.refresh()
    assert bool((table.table[:40] == fastnn_kernel.UNKNOWN).all()) and int(table.table[40]) == 0
    assert int(table.computed) == 0
    table.compute(rows, torch.tensor(0, dtype=torch.int32, device=DEVICE))  # no rows: nothing changes
    assert bool((table.table[:40] == fastnn_kernel.UNKNOWN).all())
    table.compute(rows, torch.tensor(40, dtype=torch.int32, device=DEVICE))
    np.testing.assert_array_equal(table.table[:40].cpu().numpy(), nearest_by_dot(source, keys).cpu().numpy())
    with pytest.raises(ValueError, match="exceeds"):
        table.compute(torch.arange(41, dtype=torch.int32, device=DEVICE), torch.tensor(1, device=DEVICE))


def _pruned_against_unpruned(desc1: torch.Tensor, desc2: torch.Tensor, tiles: fastnn_kernel.Tiles,
                             step: int = 3) -> fastnn_kernel.NearestTable:  # fmt: skip
    """The pruned table's neighbours for every `step`-th row of desc1, asserted equal to the unpruned kernel's."""
    flat1, flat2 = (d.reshape(-1, d.shape[-1]).to(DEVICE).contiguous() for d in (desc1, desc2))
    rows = torch.arange(0, flat1.shape[0], step, dtype=torch.int32, device=DEVICE)
    count = torch.tensor(rows.numel(), dtype=torch.int32, device=DEVICE)
    unpruned = dataclasses.replace(tiles, prune_block=(0, 0))
    want = fastnn_kernel.NearestTable(flat1, flat2, rows.numel(), unpruned)
    want.compute(rows, count)
    got = fastnn_kernel.NearestTable(flat1, flat2, rows.numel(), tiles, key_shape=tuple(desc2.shape[:2]))
    got.compute(rows, count)
    np.testing.assert_array_equal(got.table[rows.long()].cpu().numpy(), want.table[rows.long()].cpu().numpy())
    assert int(got.computed) == rows.numel()
    return got


# Small maps leave more pairs per key than full-size ones (fewer rows per block skipped): room for them here.
PRUNE_TILES = fastnn_kernel.Tiles(
    64,
    32,
    2,
    8,
    prune_rows=32,
    prune_pairs=16,
    prune_capacity=64,
    prune_programs=8,
    prune_bound_programs=8,
    prune_from=1,
)


@pytest.mark.parametrize(
    ("block", "step", "cb", "group", "sem"),
    [((8, 4), 5, 64, 2, "relaxed"), ((3, 5), 19, 32, 4, "relaxed"), ((3, 5), 23, 16, 1, "acq_rel")],
)
def test_pruned_search_equals_unpruned_and_skips_blocks(
    block: tuple[int, int], step: int, cb: int, group: int, sem: str
) -> None:
    """Spatial key blocks (partial ones at the map's edges too, and blocks of fewer keys than their slots) whose
    bound is below a row's probe similarity are skipped, and the neighbours stay those of the unpruned search;
    probes of one block or of groups (169 blocks in groups of 4: the last group is padded), either atomics."""
    desc1, desc2 = _smooth_pair(37, 61, noise=0.2, seed=11)
    tiles = dataclasses.replace(PRUNE_TILES, prune_block=block, prune_cb=cb, prune_probe_group=group, atomic_sem=sem)
    table = _pruned_against_unpruned(desc1, desc2, tiles, step=step)
    blocks = table._blocks
    assert blocks is not None and table.pairs is not None and int(blocks.dense) == 0
    rows = -(-37 * 61 // step)
    assert 0 < int(table.pairs) < 0.7 * rows * blocks.nb  # pruning happened


def test_kept_pairs_are_grouped_by_block_in_chunks_and_the_buffers_reset() -> None:
    """The bound pass counts the kept (row, block) pairs per block and writes them as entries (a row, a step's first
    block, a bit per block kept); the placing pass groups exactly those pairs by block, in block order, and names
    each chunk's block (a chunk: up to prune_pairs pairs of one block); counts and the entry cursor are zero for
    the next launch."""
    desc1, desc2 = _smooth_pair(37, 61, noise=0.2, seed=11)
    table = _pruned_against_unpruned(desc1, desc2, dataclasses.replace(PRUNE_TILES, prune_block=(3, 5)), step=7)
    blocks = table._blocks
    assert blocks is not None
    total, chunk = int(blocks.total), PRUNE_TILES.prune_pairs
    assert total > 0 and int(blocks.dense) == 0
    starts = blocks.starts.long().cpu()
    assert int(starts[0]) == 0 and int(starts[-1]) == total and bool((starts[1:] >= starts[:-1]).all())
    sizes = starts[1:] - starts[:-1]
    grouped_block = torch.repeat_interleave(torch.arange(blocks.nb), sizes)
    entries = int(blocks.entries)
    assert 0 < entries <= total
    bits = blocks.entry_bits[:entries].cpu()
    kept = ((bits[:, None] >> torch.arange(64)) & 1).bool()  # (entries, 64): the blocks each entry keeps
    assert bool(kept.any(dim=1).all())  # an entry keeps one block at least
    entry_rows, offsets = kept.nonzero(as_tuple=True)
    found_slot = blocks.entry_slot[:entries].cpu().long()[entry_rows]
    found_block = blocks.entry_first[:entries].cpu().long()[entry_rows] + offsets
    as_key = [found_slot * blocks.nb + found_block, blocks.pair_slot[:total].cpu().long() * blocks.nb + grouped_block]
    assert torch.equal(torch.sort(as_key[0]).values, torch.sort(as_key[1]).values)  # the same pairs
    assert torch.unique(as_key[0]).numel() == total  # each once
    per_block = -(-sizes // chunk)
    assert int(blocks.chunks) == int(per_block.sum())
    assert torch.equal(blocks.chunk_first.long().cpu(), torch.cumsum(per_block, 0) - per_block)
    want = torch.repeat_interleave(torch.arange(blocks.nb), per_block)
    n_chunks = int(blocks.chunks)
    assert torch.equal(blocks.chunk_block[:n_chunks].long().cpu(), want)
    within = torch.arange(n_chunks) - torch.repeat_interleave(blocks.chunk_first.long().cpu(), per_block)
    begin = starts[:-1][want] + within * chunk
    assert torch.equal(blocks.chunk_start[:n_chunks].long().cpu(), begin)
    assert torch.equal(blocks.chunk_stop[:n_chunks].long().cpu(), torch.minimum(begin + chunk, starts[1:][want]))
    assert int(blocks.counts.abs().sum()) == 0 and int(blocks.emitted) == 0


def test_placing_expands_every_bit_of_an_entry_including_the_sign_bit() -> None:
    """Entries whose bits include bit 63 (a negative int64) and several bits each: every pair lands in its block's
    range once, and each chunk (up to CH pairs of a block) names its block."""
    from export_engine.families.mast3r import fastnn_triton

    nb, chunk = 130, 2
    slots = torch.tensor([5, 6, 7, 8], dtype=torch.int32)
    first = torch.tensor([0, 64, 0, 66], dtype=torch.int32)
    bits = torch.tensor([-(2**63) | 1, 0b101, 2**62 | 1, -(2**63) | 2**40], dtype=torch.int64)
    pairs = [(int(s), int(f) + b) for s, f, m in zip(slots, first, bits, strict=True) for b in range(64)
             if (int(m) >> b) & 1 and int(f) + b < nb]  # fmt: skip
    counts = torch.bincount(torch.tensor([b for _, b in pairs]), minlength=nb)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)]).to(torch.int32)
    per = -(-counts // chunk)
    chunk_first = (torch.cumsum(per, 0) - per).to(torch.int32)
    pair_slot = torch.full((len(pairs),), -1, dtype=torch.int32)
    chunk_block, chunk_start, chunk_stop = (torch.full((int(per.sum()),), -1, dtype=torch.int32) for _ in range(3))
    args = [t.to(DEVICE) for t in (slots, first, bits, torch.tensor(4, dtype=torch.int32), starts, starts[:-1].clone(),
                                   chunk_first, torch.tensor(int(per.sum()), dtype=torch.int32), pair_slot,
                                   chunk_block, chunk_start, chunk_stop)]  # fmt: skip
    fastnn_triton.place_pairs[(2,)](*args, nb, BLOCK=16, CH=chunk, SEM="relaxed", num_warps=1)
    got_slot, got_chunks = args[8].cpu(), args[9].cpu()
    placed = sorted((int(s), int(b)) for b in range(nb) for s in got_slot[int(starts[b]) : int(starts[b + 1])])
    assert placed == sorted(pairs) and len(pairs) == 8  # the last one at block 66 + 63 = 129
    assert torch.equal(got_chunks.long(), torch.repeat_interleave(torch.arange(nb), per))


def test_probe_groups_score_the_mean_of_their_keys() -> None:
    """A probe group's centroid is the mean of its blocks' keys (blocks weighted by their key counts); the last
    group of 169 blocks in groups of 4 holds one block and three empty ones."""
    _, desc2 = _smooth_pair(37, 61, noise=0.2, seed=11)
    flat2 = desc2.reshape(-1, 24).to(DEVICE).contiguous()
    tiles = dataclasses.replace(PRUNE_TILES, prune_block=(3, 5), prune_probe_group=4)
    table = fastnn_kernel.NearestTable(flat2[:4], flat2, 4, tiles, key_shape=(37, 61))
    blocks = table._blocks
    assert blocks is not None and (blocks.nb, blocks.ng) == (169, 43)
    index = blocks.index.view(blocks.ng, -1).cpu()
    for g in (0, 17, 42):
        members = index[g][index[g] >= 0].long()
        want = flat2.cpu()[members].mean(dim=0)
        torch.testing.assert_close(blocks.group_cent_t[:24, g].cpu(), want, rtol=1e-5, atol=1e-6)
    assert index[42][index[42] >= 0].tolist() == [37 * 61 - 1]  # the corner block alone, its one pixel


def test_pruned_search_keeps_ties_and_first_indices() -> None:
    """Maps rounded to quarters: every similarity is exact in any summation order, and many rows have the same
    maximum in several blocks (exact duplicates of the best key placed before and after it too). The first index
    wins, as with the unpruned search and argmax (which, unlike BLAS on the CPU, gives every such pair the same
    value: the interpreter's tl.dot rounds by column position, so only exact inputs test ties here)."""
    desc1, desc2 = (torch.round(d * 4) / 4 for d in _smooth_pair(16, 40, noise=0.2, seed=12))
    flat1, flat2 = desc1.reshape(-1, 24).clone(), desc2.reshape(-1, 24).clone()
    for source, target in ((500, 3), (500, 610), (77, 78), (77, 400)):
        flat2[target] = flat2[source]
    flat1[:4] = torch.stack([flat2[500], flat2[77], 2 * flat2[500], 0.5 * flat2[77]])
    table = _pruned_against_unpruned(flat1.reshape(16, 40, 24), flat2.reshape(16, 40, 24), PRUNE_TILES, step=2)
    sim = flat1[::2] @ flat2.T
    assert int((sim == sim.amax(1, keepdim=True)).sum(1).gt(1).sum()) > 30  # rows with tied maxima
    np.testing.assert_array_equal(table.table[:-1:2].cpu().numpy(), sim.argmax(1).numpy())


def test_launches_below_prune_from_run_unpruned() -> None:
    """A launch of fewer rows than prune_from runs unpruned (the bound passes cost more than they save there); the
    next launch of enough rows on the same table prunes again."""
    desc1, desc2 = _smooth_pair(16, 24, noise=0.2, seed=14)
    flat1, flat2 = (d.reshape(-1, 24).to(DEVICE).contiguous() for d in (desc1, desc2))
    tiles = dataclasses.replace(PRUNE_TILES, prune_from=40)
    table = fastnn_kernel.NearestTable(flat1, flat2, 48, tiles, key_shape=(16, 24))
    assert table._blocks is not None
    for rows, pruned in ((torch.arange(0, 384, 12), False), (torch.arange(0, 384, 8), True)):  # 32, then 48 rows
        rows = rows.to(torch.int32).to(DEVICE)
        table.compute(rows, torch.tensor(rows.numel(), dtype=torch.int32, device=DEVICE))
        assert int(table._blocks.dense) == (0 if pruned else rows.numel())
        assert (int(table.pairs or 0) > 0) == pruned
        want = nearest_by_dot(flat1[rows.long()], flat2).cpu().numpy()
        np.testing.assert_array_equal(table.table[rows.long()].cpu().numpy(), want)


def test_pruned_search_runs_unpruned_when_pairs_overflow() -> None:
    """Random keys leave nothing to skip; with room for fewer pairs than kept, the launch runs unpruned."""
    gen = torch.Generator().manual_seed(13)
    desc1, desc2 = (torch.nn.functional.normalize(torch.randn(16, 24, 24, generator=gen), dim=2) for _ in range(2))
    table = _pruned_against_unpruned(desc1, desc2, dataclasses.replace(PRUNE_TILES, prune_capacity=1), step=2)
    assert table._blocks is not None and int(table._blocks.dense) > 0 and int(table.pairs or 0) == 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the infinite norms
@pytest.mark.parametrize(("q_scale", "k_scale"), [(2.0**-80, 1.0), (2.0**80, 2.0**-80), (1e20, -1.0)])
def test_pruned_search_claims_no_bound_where_norms_leave_fp32(q_scale: float, k_scale: float) -> None:
    """Finite maps whose norms' squares under- or overflow fp32 (the similarities themselves stay finite): nothing
    is skipped, the neighbours are the unpruned search's; later launches (none, then other rows) stay exact."""
    desc1 = _smooth_pair(6, 6, noise=0.2, seed=1)[0] * q_scale
    desc2 = _smooth_pair(12, 16, noise=0.2, seed=2)[1] * k_scale
    tiles = dataclasses.replace(PRUNE_TILES, prune_block=(3, 5))
    table = _pruned_against_unpruned(desc1, desc2, tiles, step=1)
    assert table.pairs is not None and int(table.pairs) == 36 * table._blocks.nb  # type: ignore[union-attr]
    rows = torch.arange(36, dtype=torch.int32, device=DEVICE)
    table.compute(rows, torch.tensor(0, dtype=torch.int32, device=DEVICE))  # no rows: the table is unchanged
    before = table.table.clone()
    table.table[:36:2] = fastnn_kernel.UNKNOWN
    table.compute(rows[::2].contiguous(), torch.tensor(18, dtype=torch.int32, device=DEVICE))
    assert torch.equal(table.table, before)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets NaN and inf
@pytest.mark.parametrize("case", ["all NaN", "some NaN and inf"])
def test_pruned_search_names_a_key_for_every_row_of_maps_that_are_not_finite(case: str) -> None:
    """The matcher reports maps with NaN or inf after its CUDA graph ran on them, so the search must still write
    a key's index for every row (an index outside the keys would make the next round read out of bounds)."""
    desc1 = _smooth_pair(6, 6, noise=0.2, seed=1)[0]
    desc2 = _smooth_pair(12, 16, noise=0.2, seed=2)[1]
    if case == "all NaN":
        desc1, desc2 = torch.full_like(desc1, float("nan")), torch.full_like(desc2, float("nan"))
    else:
        desc1[0, :2], desc2[0, 0, 3], desc2[5, 9], desc2[11, 15, 0] = float("nan"), float("nan"), float("inf"), -3e38
    flat1, flat2 = (d.reshape(-1, 24).to(DEVICE).contiguous() for d in (desc1, desc2))
    rows = torch.arange(36, dtype=torch.int32, device=DEVICE)
    for tiles in (dataclasses.replace(PRUNE_TILES, prune_block=(3, 5)), dataclasses.replace(PRUNE_TILES,
                  prune_block=(0, 0))):  # fmt: skip
        table = fastnn_kernel.NearestTable(flat1, flat2, 36, tiles, key_shape=(12, 16))
        table.compute(rows, torch.tensor(36, dtype=torch.int32, device=DEVICE))
        got = table.table[:36].cpu()
        assert bool(((got >= 0) & (got < 12 * 16)).all()), (tiles.prune_block, got.tolist())


@pytest.mark.parametrize("kernel", ["block_keys", "prune_probe"])
def test_pruned_search_that_cannot_compile_falls_back_to_the_unpruned_kernel(
    kernel: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from export_engine.families.mast3r import fastnn_triton

    class Broken:
        def __getitem__(self, grid: object) -> object:
            def launch(*args: object, **kwargs: object) -> None:
                raise RuntimeError("PassManager::run failed")

            return launch

    monkeypatch.setattr(fastnn_triton, kernel, Broken())
    desc1, desc2 = _smooth_pair(12, 16, noise=0.2, seed=3)
    with caplog.at_level("WARNING"):
        table = _pruned_against_unpruned(desc1, desc2, PRUNE_TILES, step=4)
    assert table.pairs is None  # unpruned from now on
    assert "pruned search cannot run here (PassManager::run failed)" in caplog.text


def test_pruning_settings_are_checked() -> None:
    for bad in (
        {"prune_block": (9, 8)},
        {"prune_block": (0, 4)},
        {"prune_rows": 8},
        {"prune_capacity": 0},
        {"prune_cb": 48},
        {"prune_cb": 128},
        {"prune_bound_programs": 0},
        {"prune_probe_group": 3},
        {"prune_probe_group": 16},
        {"prune_bound_rows": 12},
    ):
        with pytest.raises(ValueError, match="prune"):
            fastnn_kernel.Tiles(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="atomic_sem"):
        fastnn_kernel.Tiles(atomic_sem="seq_cst")
    with pytest.raises(ValueError, match="does not hold"):
        fastnn_kernel.NearestTable(torch.zeros(4, 24), torch.zeros(30, 24), 4, PRUNE_TILES, key_shape=(5, 5))


def test_captured_matcher_needs_cuda() -> None:
    if DEVICE.type == "cuda":
        pytest.skip("this machine has CUDA: test_captured_matcher_replays_pairs covers it")
    with pytest.raises(BackendError, match="needs CUDA"):
        CapturedMatcher((8, 8, 24), (8, 8, 24), device="cpu")


@pytest.mark.gpu
def test_captured_matcher_replays_pairs() -> None:
    if DEVICE.type != "cuda":
        pytest.skip("needs a CUDA GPU: the matcher records a CUDA graph")
    captured = CapturedMatcher((96, 128, 24), (96, 128, 24), subsample=8)
    for seed in (0, 1, 2):
        desc1, desc2 = (d.cuda() for d in _smooth_pair(96, 128, noise=0.4, seed=seed))
        got = captured(desc1, desc2)
        want = fast_reciprocal_nn(desc1, desc2, 8, kernel="tiles")
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
        assert captured.rows_per_step is not None and int(captured.rows_per_step[0]) == 12 * 16
    with pytest.raises(ModelInputError, match="recorded shape"):
        captured(torch.zeros(96, 127, 24, device="cuda"), desc2)
    with pytest.raises(ModelInputError, match="NaN"):
        captured(torch.full((96, 128, 24), float("nan"), device="cuda"), desc2)


@pytest.mark.gpu
@pytest.mark.parametrize(("max_iter", "captured_rounds"), [(1, 6), (2, 1), (10, 1), (10, 3), (10, 10)])
def test_captured_matcher_replays_later_rounds_only_while_seeds_are_active(max_iter: int, captured_rounds: int) -> None:
    """The first captured_rounds rounds are one CUDA graph and the rest another, replayed only while a seed is
    active: the matches and rows per step of the whole loop, whether the second graph ran or was skipped."""
    if DEVICE.type != "cuda":
        pytest.skip("needs a CUDA GPU: the matcher records CUDA graphs")
    config = MatchConfig(max_iter=max_iter, captured_rounds=captured_rounds)
    captured = CapturedMatcher((96, 128, 24), (96, 128, 24), 8, config)
    for call, seed in enumerate((0, 3), start=1):
        desc1, desc2 = (d.cuda() for d in _smooth_pair(96, 128, noise=0.4, seed=seed))
        got = captured(desc1, desc2)
        for g, w in zip(got, fast_reciprocal_nn(desc1, desc2, 8, max_iter=max_iter, kernel="tiles"), strict=True):
            assert torch.equal(g, w)
        matcher = ReciprocalMatcher(desc1, desc2, MatchConfig(max_iter=max_iter, kernel="fused"))
        matcher.chains(matcher.grid_seeds(8), max_iter)
        assert matcher.rows_per_step is not None and torch.equal(captured.rows_per_step, matcher.rows_per_step)
        if captured_rounds >= max_iter:
            assert captured.rest_replays == 0  # one graph holds every round
        elif captured_rounds == 1:
            assert captured.rest_replays == call  # seeds are still active after one round
