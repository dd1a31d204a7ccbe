"""2-D rotary position embedding ("RoPE100"), written for export.

For a head vector of dimension D, the first D/2 entries rotate with the patch row (y), the last D/2 with the
column (x). Inside each half of size M = D/2, entries i and i + M/2 form a rotation pair ("rotate-half"
convention) with angle theta_i = F0 * pos * base^(-2i/M), i = 0 .. M/2 - 1.

Upstream's fallback builds a table of length ``positions.max() + 1`` (a host sync and data-dependent size)
and caches it in a Python dict. Here cos/sin are computed straight from positions that are themselves built
with ``arange`` from the static grid size, so nothing depends on data. As upstream, the angles are computed
in float32 and only then cast to the token dtype (cos/sin in that dtype): the float64 reference depends on it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grid_positions(h: int, w: int, device: torch.device | None = None) -> Tensor:
    """Integer (y, x) of every patch, row-major (token t = y*w + x): int64 (h*w, 2)."""
    ys = torch.arange(h, device=device).view(h, 1).expand(h, w)
    xs = torch.arange(w, device=device).view(1, w).expand(h, w)
    return torch.stack((ys, xs), dim=-1).reshape(h * w, 2)


def rope_tables(positions: Tensor, head_dim: int, base: float, f0: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin tables (..., N, head_dim) for ``positions`` (..., N, 2) of (y, x).

    Layout per token: [y-half: cos(theta_0..theta_{q-1}) twice | x-half: the same for x], q = head_dim / 4,
    so that ``tokens * cos + rotate_half(tokens) * sin`` applies the rotation.
    """
    half = head_dim // 2  # M: dims per axis
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.float32, device=positions.device) / half))
    pos = positions.to(torch.float32)
    if f0 != 1.0:
        pos = pos * f0
    angles_y = (pos[..., 0:1] * inv_freq).to(dtype)  # (..., N, M/2)
    angles_x = (pos[..., 1:2] * inv_freq).to(dtype)
    angles = torch.cat((angles_y, angles_y, angles_x, angles_x), dim=-1)  # (..., N, D)
    return angles.cos(), angles.sin()


def rotate_half(tokens: Tensor) -> Tensor:
    """[y1, y2, x1, x2] -> [-y2, y1, -x2, x1] (each quarter of the head dim)."""
    y1, y2, x1, x2 = tokens.chunk(4, dim=-1)
    return torch.cat((-y2, y1, -x2, x1), dim=-1)


def apply_rope(tokens: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``tokens`` (B, heads, N, D) with tables (N, D) or (B, 1, N, D)."""
    return tokens * cos + rotate_half(tokens) * sin


def rope_2d(tokens: Tensor, positions: Tensor, base: float = 100.0, f0: float = 1.0) -> Tensor:
    """One RoPE2D application: tokens (B, heads, N, D), positions (N, 2) or (B, N, 2) of (y, x)."""
    cos, sin = rope_tables(positions, tokens.shape[-1], base, f0, tokens.dtype)
    if positions.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return apply_rope(tokens, cos, sin)
