"""The fused FastNN-Lite kernel (Triton): same neighbours and matches as the tiled path and the reference data.

Compiled on a GPU; on a CPU-only machine run by Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
which checks the kernel's logic: tiling, splits, masking, first-index ties. bench/gpu_bench.py checks on the
device that its matches equal the cuBLAS-based reference at full size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from export_engine.errors import BackendError
from export_engine.runtime import fastnn_kernel
from export_engine.runtime.fastnn import MatchConfig, extract_correspondences, fast_reciprocal_nn, nearest_by_dot

pytest.importorskip("triton", reason="triton (the fused kernel's compiler, interpreted here) is not installed")


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1: the fused kernel cannot run", allow_module_level=True)


TILES = [fastnn_kernel.DEFAULT_TILES, fastnn_kernel.Tiles(32, 128, 4, 64)]


def fused(queries: torch.Tensor, keys: torch.Tensor, tiles: fastnn_kernel.Tiles, screen: bool) -> torch.Tensor:
    prepared = fastnn_kernel.FusedKeys.from_flat(keys.to(DEVICE))
    return fastnn_kernel.nearest_by_dot_fused(queries.to(DEVICE), prepared, tiles, screen)


@pytest.mark.parametrize("screen", [True, False])
@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize(("m", "n", "d"), [(1, 5, 3), (7, 300, 24), (70, 1000, 24), (130, 4097, 8)])
def test_fused_equals_tiles(m: int, n: int, d: int, tiles: fastnn_kernel.Tiles, screen: bool) -> None:
    gen = torch.Generator().manual_seed(m * 31 + n)
    queries, keys = torch.randn(m, d, generator=gen).to(DEVICE), torch.randn(n, d, generator=gen).to(DEVICE)
    got = fused(queries, keys, tiles, screen)
    assert got.dtype == torch.int64 and got.shape == (m,)
    np.testing.assert_array_equal(got.cpu().numpy(), nearest_by_dot(queries, keys).cpu().numpy())


@pytest.mark.parametrize("screen", [True, False])
@pytest.mark.parametrize("tiles", TILES)
def test_fused_ties_resolve_to_first_index_across_splits(tiles: fastnn_kernel.Tiles, screen: bool) -> None:
    keys = torch.randn(5000, 24, generator=torch.Generator().manual_seed(1))
    keys[4999] = keys[17]  # same maximum in the first and in the last split
    keys[2500] = keys[17]
    queries = torch.stack([keys[17], keys[4999] * 2.0, keys[123]])
    assert fastnn_kernel.plan_splits(3, 5000, tiles)[0] > 1  # the tie really crosses splits
    assert fused(queries, keys, tiles, screen).tolist() == [17, 17, 123]


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e4])
def test_screening_keeps_near_ties_exact(scale: float) -> None:
    """Keys that differ from each other far below FP16's resolution: screening must hand them all to the exact
    pass (and their fp32 order decides), at any scale of the descriptors."""
    gen = torch.Generator().manual_seed(3)
    base = torch.nn.functional.normalize(torch.randn(1, 24, generator=gen), dim=1)
    keys = torch.cat([base + 1e-6 * torch.randn(600, 24, generator=gen), torch.randn(400, 24, generator=gen)]) * scale
    queries = torch.cat([base, base + 1e-3 * torch.randn(5, 24, generator=gen), torch.zeros(1, 24)]) * scale
    got = fused(queries, keys, TILES[0], True)
    np.testing.assert_array_equal(got.cpu().numpy(), nearest_by_dot(queries, keys).numpy())
    assert got[-1] == 0  # a zero query ties every key: the first index


def test_screen_eps_bounds_the_fp16_error() -> None:
    """The documented bound holds on random unit vectors with a 25 % margin (measured error well below it)."""
    gen = torch.Generator().manual_seed(4)
    q = torch.nn.functional.normalize(torch.randn(256, 24, generator=gen, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(torch.randn(512, 24, generator=gen, dtype=torch.float64), dim=1)
    approx = q.half().double() @ k.half().double().T  # exact products of the FP16 roundings
    assert float((approx - q @ k.T).abs().max()) < fastnn_kernel.screen_eps(24) / 1.25


@pytest.mark.parametrize("tiles", TILES)
def test_plan_splits_covers_every_key_once(tiles: fastnn_kernel.Tiles) -> None:
    for m, n in [(1, 64), (3, 196608), (3072, 196608), (100000, 1000), (5, 63)]:
        splits, per_split = fastnn_kernel.plan_splits(m, n, tiles)
        assert per_split % tiles.block_n == 0 and splits * per_split >= n > (splits - 1) * per_split


def test_fused_matches_reference_data(mast3r_ref: Path) -> None:
    with np.load(mast3r_ref / "matching.npz") as data:
        desc1, desc2 = torch.from_numpy(data["desc1"]), torch.from_numpy(data["desc2"])
        expected = data["dot_xy1"], data["dot_xy2"]
    got = fast_reciprocal_nn(desc1.to(DEVICE), desc2.to(DEVICE), 8, kernel="fused")  # screened
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g.cpu().numpy(), e)


def test_fused_symmetric_reference(mast3r_ref: Path) -> None:
    with np.load(mast3r_ref / "outputs.npz") as out, np.load(mast3r_ref / "symmetric.npz") as sym:
        descs = [out["view1_desc"][0], out["view2_desc"][0], sym["res22_desc"][0], sym["res12_desc"][0]]
        confs = [out["view1_desc_conf"][0], out["view2_desc_conf"][0], sym["res22_desc_conf"][0]]
        confs.append(sym["res12_desc_conf"][0])
        expected = [sym[k] for k in ("corres_xy1", "corres_xy2", "corres_conf")]
    tensors = [torch.from_numpy(d).to(DEVICE) for d in descs]
    got = extract_correspondences(tensors, [torch.from_numpy(c) for c in confs], 8, MatchConfig(kernel="fused"))
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g.cpu().numpy(), e)


def test_auto_uses_fused_only_on_cuda_and_fused_refuses_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    assert MatchConfig().use_fused(torch.device("cpu")) is False  # interpreting is for tests, never automatic
    assert MatchConfig(kernel="fused").use_fused(DEVICE) is True
    with pytest.raises(BackendError, match="fp32 only"):
        MatchConfig(kernel="fused", precision="fp16").use_fused(DEVICE)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="kernel='fused' cannot run"):
        MatchConfig(kernel="fused").use_fused(torch.device("cpu"))
