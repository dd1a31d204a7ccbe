"""FastNN-Lite and the plain reference: upstream's matches exactly, block-size independence, memory, bad inputs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from export_engine.errors import ModelInputError
from export_engine.families.mast3r import fastnn
from export_engine.families.mast3r.fastnn import (
    MatchConfig,
    ReciprocalMatcher,
    _merge,
    _merge_on_device,
    _merged_pairs,
    extract_correspondences,
    fast_reciprocal_nn,
    matcher_reciprocal_nn,
    nearest_by_dot,
    pack_pairs,
    sorted_unique,
)
from export_engine.families.mast3r.matching_reference import (
    bruteforce_nn,
    extract_correspondences_reference,
    filter_border_matches,
    reciprocal_nn_reference,
)

# (subsample, ret_xy, reference keys) of matching.npz (matching.json "cases")
MATCHING_CASES = {
    "dot": (8, True, ("dot_xy1", "dot_xy2")),
    "dot_idx": (8, False, ("dot_idx1", "dot_idx2")),
    "kdtree": (8, True, ("kdtree_xy1", "kdtree_xy2")),  # upstream's L2 KDTree gave the dot result
    "dot_s4": (4, True, ("dot_s4_xy1", "dot_s4_xy2")),
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """These tests are about exact results, not speed: one thread keeps them fast on a busy shared machine
    (measured there: 5 s with one thread, 45-60 s with two, where a descheduled OpenMP thread stalls each of
    the thousands of small block-64 tiles). test_fast_equals_reference_with_two_threads covers two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def smooth_pair(height: int, width: int, dim: int = 24, noise: float = 0.3, seed: int = 0) -> list[torch.Tensor]:
    """Unit (H, W, D) maps: a bilinear random field plus noise; desc2 the field shifted by (5, 3) px, new noise."""
    gen = torch.Generator().manual_seed(seed)
    dx, dy, cell = 5, 3, 16
    coarse = torch.randn(1, dim, (height + dy) // cell + 2, (width + dx) // cell + 2, generator=gen)
    field = F.interpolate(coarse, scale_factor=cell, mode="bilinear", align_corners=False)[0]
    field = field / field.std()
    maps = [field[:, :height, :width], field[:, dy : dy + height, dx : dx + width]]
    noisy = [m + noise * torch.randn(m.shape, generator=gen) for m in maps]
    return [F.normalize(m, dim=0).permute(1, 2, 0).contiguous() for m in noisy]


@pytest.fixture(scope="module")
def matching(mast3r_ref: Path) -> dict[str, np.ndarray]:
    with np.load(mast3r_ref / "matching.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def symmetric(mast3r_ref: Path) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, np.ndarray]]:
    """(descs 11, 21, 22, 12), (desc_confs in the same order), expected corres_* arrays."""
    with np.load(mast3r_ref / "outputs.npz") as out, np.load(mast3r_ref / "symmetric.npz") as sym:
        descs = [out["view1_desc"][0], out["view2_desc"][0], sym["res22_desc"][0], sym["res12_desc"][0]]
        confs = [out["view1_desc_conf"][0], out["view2_desc_conf"][0], sym["res22_desc_conf"][0]]
        confs.append(sym["res12_desc_conf"][0])
        expected = {k: sym[k] for k in ("corres_xy1", "corres_xy2", "corres_conf")}
    return descs, confs, expected


def _assert_same(got: tuple[torch.Tensor | np.ndarray, ...], expected: tuple[np.ndarray, ...]) -> None:
    for g, e in zip(got, expected, strict=True):
        arr = g.cpu().numpy() if isinstance(g, torch.Tensor) else np.asarray(g)
        assert arr.dtype == e.dtype and arr.shape == e.shape
        np.testing.assert_array_equal(arr, e)


# --- upstream reference data -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(MATCHING_CASES))
@pytest.mark.parametrize("block_size", [64, 8192])
def test_reference_reproduces_matching_npz(matching: dict, case: str, block_size: int) -> None:
    subsample, ret_xy, keys = MATCHING_CASES[case]
    got = reciprocal_nn_reference(matching["desc1"], matching["desc2"], subsample, ret_xy, block_size=block_size)
    _assert_same(got, (matching[keys[0]], matching[keys[1]]))


@pytest.mark.parametrize("case", sorted(MATCHING_CASES))
@pytest.mark.parametrize("block_size", [64, 1000, 8192])
def test_fast_reproduces_matching_npz(matching: dict, case: str, block_size: int) -> None:
    subsample, ret_xy, keys = MATCHING_CASES[case]
    desc1, desc2 = torch.from_numpy(matching["desc1"]), torch.from_numpy(matching["desc2"])
    got = fast_reciprocal_nn(desc1, desc2, subsample, block_size=block_size, ret_xy=ret_xy)
    _assert_same(got, (matching[keys[0]], matching[keys[1]]))


def test_reference_reproduces_symmetric_npz(symmetric: tuple) -> None:
    descs, confs, expected = symmetric
    got = extract_correspondences_reference(descs, confs, subsample=8)
    _assert_same(got, (expected["corres_xy1"], expected["corres_xy2"], expected["corres_conf"]))


@pytest.mark.parametrize("block_size", [64, 1000, 8192])
def test_fast_reproduces_symmetric_npz(symmetric: tuple, block_size: int) -> None:
    descs, confs, expected = symmetric
    tensors = [torch.from_numpy(d) for d in descs]
    got = extract_correspondences(tensors, [torch.from_numpy(c) for c in confs], 8, MatchConfig(block_size=block_size))
    # conf equality is bit-exact too: the sqrt is correctly rounded like upstream's np.sqrt
    _assert_same(got, (expected["corres_xy1"], expected["corres_xy2"], expected["corres_conf"]))


# --- fast == reference beyond the reference data --------------------------------------------------------------


@pytest.mark.parametrize(
    ("subsample", "ret_xy", "block_sizes"), [(8, True, (64, 1000, 8192)), (8, False, (8192,)), (4, True, (1000,))]
)
def test_fast_equals_reference_on_128x96_maps(subsample: int, ret_xy: bool, block_sizes: tuple[int, ...]) -> None:
    desc1, desc2 = smooth_pair(96, 128)
    expected = reciprocal_nn_reference(desc1, desc2, subsample, ret_xy)
    assert len(expected[0]) > 100
    for block_size in block_sizes:  # tiny tiles cost Python overhead: 64 only once
        _assert_same(fast_reciprocal_nn(desc1, desc2, subsample, block_size=block_size, ret_xy=ret_xy), expected)


def test_fast_equals_reference_with_two_threads() -> None:
    """MKL splits a matmul between threads and rounds differently when a thread gets < 4 rows: still equal."""
    desc1, desc2 = smooth_pair(96, 128, seed=2)
    torch.set_num_threads(2)
    try:
        expected = reciprocal_nn_reference(desc1, desc2, 8)
        _assert_same(fast_reciprocal_nn(desc1, desc2, 8), expected)
        _assert_same(fast_reciprocal_nn(desc1, desc2, 8, block_size=1000), expected)
    finally:
        torch.set_num_threads(1)


def test_iteration_is_exercised_and_max_iter_drops_unconverged() -> None:
    desc1, desc2 = smooth_pair(96, 128, noise=0.6, seed=3)
    full = reciprocal_nn_reference(desc1, desc2, 8)
    for max_iter in (1, 2):
        expected = reciprocal_nn_reference(desc1, desc2, 8, max_iter=max_iter)
        assert len(expected[0]) < len(full[0])  # some seeds need more rounds than that
        _assert_same(fast_reciprocal_nn(desc1, desc2, 8, max_iter=max_iter), expected)


@pytest.mark.parametrize("pixel_tol", [0.0, 1.5, 3.0])
def test_explicit_seeds_and_pixel_tol_follow_reference(matching: dict, pixel_tol: float) -> None:
    rng = np.random.default_rng(7)
    xs, ys = rng.integers(0, 32, 60), rng.integers(0, 40, 60)
    expected = reciprocal_nn_reference(matching["desc1"], matching["desc2"], (xs, ys), pixel_tol=pixel_tol)
    desc1, desc2 = torch.from_numpy(matching["desc1"]), torch.from_numpy(matching["desc2"])
    got = fast_reciprocal_nn(desc1, desc2, init_xy1=(torch.from_numpy(xs), torch.from_numpy(ys)), pixel_tol=pixel_tol)
    _assert_same(got, expected)


def test_no_seeds_gives_empty_results() -> None:
    desc1, desc2 = smooth_pair(8, 8)
    expected = reciprocal_nn_reference(desc1, desc2, 32)  # first seed row would be y = 16 > H
    assert expected[0].shape == (0, 2)
    _assert_same(fast_reciprocal_nn(desc1, desc2, 32), expected)


def test_border_filter_agrees() -> None:
    desc1, desc2 = smooth_pair(48, 64)
    xy1, xy2 = fast_reciprocal_nn(desc1, desc2, 4)
    kept = fastnn.filter_border_matches(xy1, xy2, (48, 64), (48, 64))
    expected = filter_border_matches(xy1.numpy(), xy2.numpy(), (48, 64), (48, 64))
    _assert_same(kept, expected)
    assert 0 < len(kept[0]) < len(xy1)
    assert int(kept[0].min()) >= 3 and int(kept[0][:, 0].max()) < 64 - 3 and int(kept[0][:, 1].max()) < 48 - 3


# --- ties --------------------------------------------------------------------------------------------------


def test_torch_max_returns_first_index_like_numpy_argmax() -> None:
    """The fact both implementations rely on (torch documents it; checked here on long rows)."""
    sim = torch.zeros(4, 100_003)
    sim[:, [17, 50_000, 100_002]] = 1.0
    assert sim.max(dim=1).indices.tolist() == [17] * 4 == np.argmax(sim.numpy(), axis=1).tolist()


@pytest.fixture(params=["cpu_update", "gpu_update"])
def tile_update(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the CPU tile update and again with the GPU one (sync-free, dense) on CPU tensors."""
    if request.param == "gpu_update":
        monkeypatch.setattr(fastnn, "_fold_tile_sparse", fastnn._fold_tile_dense)
    return str(request.param)


@pytest.mark.parametrize("block_size", [1, 7, 16, 8192])
def test_ties_resolve_to_first_index_across_tiles(block_size: int, tile_update: str) -> None:
    keys = torch.zeros(100, 4)
    keys[[13, 57, 99]] = 0.5  # three equal best keys, in different tiles for small blocks
    queries = torch.ones(6, 4)
    assert nearest_by_dot(queries, keys, block_size).tolist() == [13] * 6
    assert bruteforce_nn(queries, keys, block_size).tolist() == [13] * 6


@pytest.mark.parametrize("block_size", [16, 64, 1000, 8192])
def test_blockwise_nearest_equals_full_argmax(block_size: int, tile_update: str) -> None:
    gen = torch.Generator().manual_seed(11)
    queries = F.normalize(torch.randn(101, 24, generator=gen), dim=1)
    keys = F.normalize(torch.randn(3001, 24, generator=gen), dim=1)
    expected = (queries @ keys.T).argmax(dim=1)
    assert torch.equal(nearest_by_dot(queries, keys, block_size), expected)
    assert torch.equal(nearest_by_dot(queries[7:9], keys, block_size), expected[7:9])  # 2 rows: padded to 4


def test_duplicate_descriptors_match_like_reference() -> None:
    desc1, desc2 = smooth_pair(40, 48, seed=5)
    desc2[10:20, 10:20] = desc2[10, 10]  # a plateau of exact ties in image 2
    desc1[4:12, 4:12] = desc1[4, 4]
    _assert_same(fast_reciprocal_nn(desc1, desc2, 4), reciprocal_nn_reference(desc1, desc2, 4))


# --- memory and reuse --------------------------------------------------------------------------------------


def test_similarity_tiles_stay_block_sized(monkeypatch: pytest.MonkeyPatch) -> None:
    """No N1 x N2 matrix: every similarity tile is at most block x block (plus row padding to 4)."""
    largest = [0]
    inner = fastnn._similarity

    def recording(queries: torch.Tensor, keys: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        sim = inner(queries, keys, out)
        largest[0] = max(largest[0], sim.numel())
        return sim

    monkeypatch.setattr(fastnn, "_similarity", recording)
    desc1, desc2 = smooth_pair(96, 128)
    fast_reciprocal_nn(desc1, desc2, 8, block_size=64)
    n_pixels = 96 * 128
    assert 0 < largest[0] <= 64 * 64 < n_pixels * n_pixels // 1000


def test_runs_where_a_full_similarity_matrix_could_not_exist() -> None:
    """512x384 maps: an N1 x N2 fp32 matrix would take 155 GB, more than this machine's memory."""
    desc1, desc2 = smooth_pair(384, 512, noise=0.1)
    n_pixels = 384 * 512
    assert n_pixels * n_pixels * 4 > 100e9
    xy1, xy2 = fast_reciprocal_nn(desc1, desc2, subsample=64, block_size=2048)
    assert len(xy1) == 48  # 6 x 8 seeds, all reciprocal at this noise level
    assert torch.all((xy2 - xy1).abs().sum(dim=1) <= 16)  # near the (5, 3) px shift


@pytest.mark.gpu
def test_cuda_memory_is_linear_in_pixels() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    def extra(height: int, width: int) -> int:
        desc1, desc2 = (d.cuda() for d in smooth_pair(height, width, noise=0.1))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fast_reciprocal_nn(desc1, desc2, subsample=8, block_size=1024)
        return torch.cuda.max_memory_allocated() - base

    small, large = extra(192, 256), extra(384, 512)
    per_pixel = [small / (2 * 192 * 256), large / (2 * 384 * 512)]  # bytes per pixel and direction
    print(f"extra CUDA memory: {small / 2**20:.1f} MiB at 192x256, {large / 2**20:.1f} MiB at 384x512 "
          f"({per_pixel[0]:.0f} and {per_pixel[1]:.0f} B per pixel and direction)")  # fmt: skip
    # Per pixel and direction: the keys transposed (96 B), the pruned search's keys in blocks (96 B), its kept pairs
    # (36 B) and entries (72 B), neighbour tables and per-row state (~30 B): ~330 B, nowhere near an N1 x N2 matrix
    # (155 GB at 384x512). Measured on an H100: 249 B at 192x256 and 353 B at 384x512 (5.7x the memory for 4x the
    # pixels), so the bound is the per-pixel one, at both sizes, with the ratio kept well under a quadratic's.
    assert max(per_pixel) < 400, per_pixel
    assert large < 8 * small  # four times the pixels; an N1 x N2 term would make it sixteen


def test_neighbours_are_computed_once_and_shared_with_the_reverse_direction() -> None:
    desc1, desc2 = smooth_pair(48, 64)
    matcher = ReciprocalMatcher(desc1, desc2)
    first = matcher_reciprocal_nn(matcher, 8)
    rows = matcher.rows_computed
    assert rows > 0
    _assert_same(matcher_reciprocal_nn(matcher, 8), tuple(t.numpy() for t in first))
    assert matcher.rows_computed == rows  # everything was remembered
    backward = matcher_reciprocal_nn(matcher.swapped(), 8)
    _assert_same(backward, reciprocal_nn_reference(desc2, desc1, 8))
    assert matcher.rows_computed < 2 * rows  # the reverse run reused the forward run's neighbours


def test_fp16_option_is_close_but_not_promised_exact() -> None:
    desc1, desc2 = smooth_pair(96, 128)
    exact = fast_reciprocal_nn(desc1, desc2, 8)
    half = fast_reciprocal_nn(desc1, desc2, 8, precision="fp16")
    pairs = {tuple(p) for p in torch.cat(exact, dim=1).tolist()}
    half_pairs = {tuple(p) for p in torch.cat(half, dim=1).tolist()}
    assert len(pairs & half_pairs) >= 0.9 * len(pairs)


# --- bad inputs --------------------------------------------------------------------------------------------


def _maps() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(8, 8, 4), torch.rand(8, 8, 4)


@pytest.mark.parametrize(
    ("desc1", "desc2", "match"),
    [
        (np.zeros((8, 8, 4), np.float32), torch.rand(8, 8, 4), "torch.Tensor"),
        (torch.rand(64, 4), torch.rand(8, 8, 4), r"\(H, W, D\)"),
        (torch.rand(0, 8, 4), torch.rand(8, 8, 4), "non-empty"),
        (torch.zeros(8, 8, 4, dtype=torch.int32), torch.rand(8, 8, 4), "floating point"),
        (torch.rand(8, 8, 4), torch.rand(8, 8, 5), "same D"),
        (torch.rand(8, 8, 4), torch.rand(8, 8, 4, dtype=torch.float64), "dtype"),
        (torch.full((8, 8, 4), float("nan")), torch.rand(8, 8, 4), "NaN"),
    ],
)
def test_bad_maps_raise(desc1: object, desc2: object, match: str) -> None:
    with pytest.raises(ModelInputError, match=match):
        fast_reciprocal_nn(cast(Any, desc1), cast(Any, desc2))


def test_bad_arguments_raise() -> None:
    desc1, desc2 = _maps()
    with pytest.raises(ModelInputError, match="subsample"):
        fast_reciprocal_nn(desc1, desc2, subsample=0)
    with pytest.raises(ModelInputError, match="max_iter"):
        fast_reciprocal_nn(desc1, desc2, max_iter=0)
    with pytest.raises(ModelInputError, match="block_size"):
        fast_reciprocal_nn(desc1, desc2, block_size=0)
    with pytest.raises(ModelInputError, match="precision"):
        MatchConfig(precision=cast(Any, "int8"))
    with pytest.raises(ModelInputError, match="pixel_tol"):
        fast_reciprocal_nn(desc1, desc2, pixel_tol=2.0)
    with pytest.raises(ModelInputError, match="init_xy1"):
        fast_reciprocal_nn(desc1, desc2, init_xy1=(torch.tensor([8]), torch.tensor([0])))
    with pytest.raises(ModelInputError, match="pixel_tol"):
        reciprocal_nn_reference(desc1, desc2, 8, pixel_tol=2.0)
    with pytest.raises(ModelInputError, match="same D"):
        reciprocal_nn_reference(desc1, torch.rand(8, 8, 3))


def test_bad_symmetric_inputs_raise() -> None:
    desc1, desc2 = _maps()
    conf = torch.rand(8, 8)
    with pytest.raises(ModelInputError, match="4 descriptor maps"):
        extract_correspondences([desc1, desc2], [conf, conf])
    with pytest.raises(ModelInputError, match="image 1 maps disagree"):
        extract_correspondences([desc1, desc2, desc2, desc1], [torch.rand(8, 7), conf, conf, conf])
    with pytest.raises(ModelInputError, match="image 2 maps disagree"):
        extract_correspondences([desc1, torch.rand(6, 8, 4), desc2, desc1], [conf] * 4)


@pytest.mark.parametrize("n", [0, 1, 2, 500])
def test_sorted_unique_without_a_sync_equals_unique_with_first_positions(n: int) -> None:
    """The fixed-size de-duplication a CUDA graph records: torch.unique's keys and np.unique's first indices."""
    gen = torch.Generator().manual_seed(n)
    keys = pack_pairs(torch.randint(0, 30, (n,), generator=gen), torch.randint(0, 4, (n,), generator=gen))
    valid = torch.rand(n, generator=gen) < 0.7
    unique, first, count = sorted_unique(keys, valid)
    assert unique.shape == (n + 1,) and first.shape == (n + 1,)
    want, want_first = np.unique(keys[valid].numpy(), return_index=True)
    assert int(count) == len(want)
    np.testing.assert_array_equal(unique[: int(count)].numpy(), want)
    np.testing.assert_array_equal(first[: int(count)].numpy(), np.flatnonzero(valid.numpy())[want_first])
    assert bool((unique[int(count) :] == torch.iinfo(torch.int64).max).all())


def test_merge_without_a_sync_equals_the_merge() -> None:
    """The symmetric mode's merge as the recorded graphs run it (fixed-size buffers, then one count) gives the
    eager merge's pairs and confidences, on runs with repeated and unconverged chains."""
    gen = torch.Generator().manual_seed(21)
    shape1, shape2 = (6, 7), (5, 9)
    runs = []
    for seeds_in, others_in, count in ((shape1, shape2, 40), (shape2, shape1, 30)) * 2:
        seeds = torch.randint(0, seeds_in[0] * seeds_in[1], (count,), generator=gen)
        others = torch.randint(0, others_in[0] * others_in[1], (count,), generator=gen)
        runs.append((seeds, others, torch.rand(count, generator=gen) < 0.8))
    confs = [1 + torch.rand(shape, generator=gen) for shape in (shape1, shape2, shape2, shape1)]
    want = _merge(runs, (shape1, shape2), confs)
    *merged, count = _merge_on_device(runs)
    got = _merged_pairs(merged, int(count), [r[0].numel() + 1 for r in runs], (shape1, shape2), confs)
    assert len(want[0]) > 50
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
