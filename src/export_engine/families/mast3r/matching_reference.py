"""MASt3R reciprocal nearest-neighbour matching, written plainly: the baseline FastNN-Lite is checked against.

This follows the upstream algorithm (``mast3r/fast_nn.py`` ``fast_reciprocal_NNs`` with ``dist='dot'`` and
``sparse_ga.extract_correspondences``) step by step, with the same
work per round, so that it reproduces ``matching.npz`` / ``symmetric.npz`` and serves as the timing baseline:

1. Seeds: pixels (x, y) with x, y in S/2, S/2 + S, ... on image 1, as sorted unique flat indices y * W1 + x.
2. Nearest neighbours by brute force: similarity = A @ B.T in the descriptors' dtype, NN = first index of the
   row maximum. One matmul when |A| * |B| <= block_size**2, otherwise tiles of block_size x block_size with a
   running maximum that only moves on a strictly larger value (so the first index wins ties, as unblocked).
3. The host loop (numpy): each round sends the still-active seeds 1 -> 2 -> 1; a seed stops when its image-2
   point did not change since the last round, or when it came back to the image-1 point it started the round
   from. After ``max_iter`` rounds the still-active seeds are dropped.
4. The converged pairs are de-duplicated and sorted by (index in image 1, index in image 2).

Upstream's brute-force matcher also computes the column-wise (reverse) argmax of every tile and throws it
away; this baseline does not, so timings against it understate the gain over upstream.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from export_engine.errors import ModelInputError

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor


def seed_grid(height: int, width: int, subsample: int) -> np.ndarray:
    """Flat int32 indices y * width + x of the seeds x, y in subsample//2, subsample//2 + subsample, ... (sorted)."""
    if subsample < 1:
        raise ModelInputError(f"subsample must be >= 1, got {subsample}")
    ys = np.arange(subsample // 2, height, subsample, dtype=np.int64)
    xs = np.arange(subsample // 2, width, subsample, dtype=np.int64)
    return (ys[:, None] * width + xs[None, :]).ravel().astype(np.int32)


def bruteforce_nn(queries: torch.Tensor, keys: torch.Tensor, block_size: int | None = 8192) -> np.ndarray:
    """Index in `keys` (N, D) of the largest dot product with each row of `queries` (M, D); first index on ties.

    torch.max(dim=1) returns the first maximal index (documented, and checked in the tests), like np.argmax.
    """
    if queries.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    m, n = queries.shape[0], keys.shape[0]
    if block_size is None or m * n <= block_size * block_size:
        return (queries @ keys.T).max(dim=1).indices.cpu().numpy()
    best = torch.full((m,), -torch.inf, dtype=queries.dtype, device=queries.device)
    arg = torch.zeros(m, dtype=torch.int64, device=queries.device)
    for i in range(0, m, block_size):
        for j in range(0, n, block_size):
            values, indices = (queries[i : i + block_size] @ keys[j : j + block_size].T).max(dim=1)
            better = values > best[i : i + block_size]  # strict: an earlier tile keeps a tie
            best[i : i + block_size][better] = values[better]
            arg[i : i + block_size][better] = indices[better] + j
    return arg.cpu().numpy()


def _as_torch(desc: ArrayLike, device: str | torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(desc)) if isinstance(desc, np.ndarray) else desc
    return tensor.to(device)


def _check_maps(desc1: ArrayLike, desc2: ArrayLike) -> None:
    if desc1.ndim != 3 or desc2.ndim != 3 or desc1.shape[2] != desc2.shape[2]:
        raise ModelInputError(
            f"descriptor maps must be (H, W, D) with the same D, got {tuple(desc1.shape)} and {tuple(desc2.shape)}"
        )


def merge_corres(
    idx1: np.ndarray, idx2: np.ndarray, shape1: tuple[int, int], shape2: tuple[int, int], ret_xy: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique (idx1, idx2) pairs sorted lexicographically: (x, y) int64 rows or int32 flat indices, and the
    position of each pair's first occurrence.

    Upstream packs the two int32 indices into one int64 (idx1 in the high half) and calls np.unique (which
    sorts stably when asked for first occurrences).
    """
    keys = (idx1.astype(np.int64) << 32) | idx2.astype(np.int64)
    keys, first = np.unique(keys, return_index=True)
    flat1 = (keys >> 32).astype(np.int32)
    flat2 = (keys & 0xFFFFFFFF).astype(np.int32)
    if ret_xy:
        out1: np.ndarray = np.stack([flat1 % shape1[1], flat1 // shape1[1]], axis=1).astype(np.int64)
        out2: np.ndarray = np.stack([flat2 % shape2[1], flat2 // shape2[1]], axis=1).astype(np.int64)
    else:
        out1, out2 = flat1, flat2
    return out1, out2, first


def reciprocal_nn_reference(
    desc1: ArrayLike,
    desc2: ArrayLike,
    subsample_or_initxy1: int | tuple[np.ndarray, np.ndarray] = 8,
    ret_xy: bool = True,
    pixel_tol: float = 0.0,
    block_size: int | None = 8192,
    device: str | torch.device = "cpu",
    max_iter: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Upstream ``fast_reciprocal_NNs(desc1, desc2, subsample_or_initxy1, ret_xy, pixel_tol, dist='dot')``.

    An integer subsample seeds the grid and iterates up to `max_iter` rounds (upstream: 10). Explicit seeds
    ``(x, y)`` run one round; with ``pixel_tol > 0`` a seed is kept when the pixel it comes back to lies
    within `pixel_tol` (Euclidean, pixels) of it, and the seed itself is returned for image 1.
    """
    _check_maps(desc1, desc2)
    h1, w1, dim = desc1.shape
    h2, w2, _ = desc2.shape
    if isinstance(subsample_or_initxy1, int) and pixel_tol == 0:
        seeds = seed_grid(h1, w1, subsample_or_initxy1)
    elif isinstance(subsample_or_initxy1, int):
        raise ModelInputError("pixel_tol > 0 needs explicit seed coordinates (x, y), not an integer subsample")
    else:
        x1, y1 = (np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v) for v in subsample_or_initxy1)
        seeds = np.unique(x1 + w1 * y1).astype(np.int32)
        max_iter = 1
    pts1 = _as_torch(desc1, device).reshape(-1, dim)
    pts2 = _as_torch(desc2, device).reshape(-1, dim)

    xy1 = seeds.copy()
    xy2 = np.full_like(xy1, -1)
    old_xy1, old_xy2 = xy1.copy(), xy2.copy()
    notyet = np.ones(len(xy1), dtype=bool)
    rounds = 0
    while notyet.any():
        query1 = torch.from_numpy(xy1[notyet].astype(np.int64)).to(pts1.device)
        xy2[notyet] = bruteforce_nn(pts1[query1], pts2, block_size)
        notyet &= old_xy2 != xy2  # image-2 point unchanged since last round: reciprocal pair found
        query2 = torch.from_numpy(xy2[notyet].astype(np.int64)).to(pts2.device)
        xy1[notyet] = bruteforce_nn(pts2[query2], pts1, block_size)
        notyet &= old_xy1 != xy1  # came back to where the round started: reciprocal pair found
        rounds += 1
        if rounds >= max_iter:
            break
        old_xy1[:] = xy1
        old_xy2[:] = xy2
    log.debug("reference matching: %d seeds, %d rounds, %d not converged", len(seeds), rounds, int(notyet.sum()))

    if pixel_tol > 0:
        yx_old = np.stack(np.unravel_index(old_xy1, (h1, w1)), axis=-1).astype(np.float64)
        yx_new = np.stack(np.unravel_index(xy1, (h1, w1)), axis=-1).astype(np.float64)
        converged = np.linalg.norm(yx_old - yx_new, axis=-1) < pixel_tol
        xy1 = old_xy1  # explicit seeds: report the seed, not where it came back to
    else:
        converged = ~notyet
    out1, out2, _ = merge_corres(xy1[converged], xy2[converged], (h1, w1), (h2, w2), ret_xy=ret_xy)
    return out1, out2


def border_mask(xy: np.ndarray, shape: tuple[int, int], border: int = 3) -> np.ndarray:
    """True for (x, y) rows at least `border` pixels inside an image of `shape` (H, W) (upstream README)."""
    height, width = shape
    x, y = xy[:, 0], xy[:, 1]
    return (x >= border) & (x < width - border) & (y >= border) & (y < height - border)


def filter_border_matches(
    xy1: np.ndarray, xy2: np.ndarray, shape1: tuple[int, int], shape2: tuple[int, int], border: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the matches whose points are at least `border` px away from every edge in both images."""
    keep = border_mask(xy1, shape1, border) & border_mask(xy2, shape2, border)
    return xy1[keep], xy2[keep]


def extract_correspondences_reference(
    descs: Sequence[ArrayLike],
    qconfs: Sequence[ArrayLike],
    subsample: int = 8,
    block_size: int | None = 8192,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upstream ``sparse_ga.extract_correspondences`` for the four maps (11, 21, 22, 12) of a symmetric pass.

    Both descriptor pairs (11, 21) and (12, 22) are matched in both directions; all pairs are merged (the
    first occurrence keeps its confidence) and the confidence is sqrt(qconf1 * qconf2), float32.
    """
    if len(descs) != 4 or len(qconfs) != 4:
        raise ModelInputError(f"need 4 descriptor maps and 4 confidence maps, got {len(descs)} and {len(qconfs)}")
    d11, d21, d22, d12 = descs
    q11, q21, q22, q12 = (np.asarray(q.cpu() if isinstance(q, torch.Tensor) else q) for q in qconfs)
    if not (d11.shape[:2] == d12.shape[:2] == q11.shape == q12.shape):
        raise ModelInputError(f"image 1 maps disagree: {d11.shape}, {d12.shape}, {q11.shape}, {q12.shape}")
    if not (d21.shape[:2] == d22.shape[:2] == q21.shape == q22.shape):
        raise ModelInputError(f"image 2 maps disagree: {d21.shape}, {d22.shape}, {q21.shape}, {q22.shape}")
    idx1, idx2, conf1, conf2 = [], [], [], []
    for desc_a, desc_b, conf_a, conf_b in ((d11, d21, q11, q21), (d12, d22, q12, q22)):
        a_fwd, b_fwd = reciprocal_nn_reference(desc_a, desc_b, subsample, False, 0.0, block_size, device)
        b_bwd, a_bwd = reciprocal_nn_reference(desc_b, desc_a, subsample, False, 0.0, block_size, device)
        idx1.append(np.concatenate([a_fwd, a_bwd]))
        idx2.append(np.concatenate([b_fwd, b_bwd]))
        conf1.append(conf_a.ravel()[idx1[-1]])
        conf2.append(conf_b.ravel()[idx2[-1]])
    shape1 = (int(d11.shape[0]), int(d11.shape[1]))
    shape2 = (int(d22.shape[0]), int(d22.shape[1]))
    xy1, xy2, first = merge_corres(np.concatenate(idx1), np.concatenate(idx2), shape1, shape2, ret_xy=True)
    conf = np.sqrt(np.concatenate(conf1)[first] * np.concatenate(conf2)[first])
    return xy1, xy2, conf
