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
from export_engine.families.mast3r import fastnn_kernel
from export_engine.families.mast3r.fastnn import (
    MatchConfig,
    extract_correspondences,
    fast_reciprocal_nn,
    nearest_by_dot,
)

pytest.importorskip("triton", reason="triton (the fused kernel's compiler, interpreted here) is not installed")


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1: the fused kernel cannot run", allow_module_level=True)


TILES = [fastnn_kernel.DEFAULT_TILES, fastnn_kernel.Tiles(32, 128, 4, 64)]


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize(("m", "n", "d"), [(1, 5, 3), (7, 300, 24), (70, 1000, 24), (130, 4097, 8)])
def test_fused_equals_tiles(m: int, n: int, d: int, tiles: fastnn_kernel.Tiles) -> None:
    gen = torch.Generator().manual_seed(m * 31 + n)
    queries, keys = torch.randn(m, d, generator=gen).to(DEVICE), torch.randn(n, d, generator=gen).to(DEVICE)
    got = fastnn_kernel.nearest_by_dot_fused(queries, fastnn_kernel.transposed(keys), tiles)
    assert got.dtype == torch.int64 and got.shape == (m,)
    np.testing.assert_array_equal(got.cpu().numpy(), nearest_by_dot(queries, keys).cpu().numpy())


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
    got = fast_reciprocal_nn(desc1.to(DEVICE), desc2.to(DEVICE), 8, kernel="fused")
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
