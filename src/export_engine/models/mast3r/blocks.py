"""Transformer pieces of the MASt3R encoder/decoder (CroCo layout, state-dict names kept).

Attention comes in two interchangeable implementations chosen at construction:
* ``"explicit"``: MatMul -> scale -> Softmax -> MatMul, the scale applied after q·kᵀ exactly as upstream;
* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels, not bit-equal).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from export_engine.errors import UsageError
from export_engine.models.mast3r.rope import apply_rope

ATTN_IMPLS = ("explicit", "sdpa")
RopeTables = tuple[Tensor, Tensor]  # (cos, sin), each (N, head_dim)


def check_attn_impl(attn_impl: str) -> str:
    if attn_impl not in ATTN_IMPLS:
        raise UsageError(f"unknown attn_impl {attn_impl!r}; valid: {list(ATTN_IMPLS)}")
    return attn_impl


def attention(q: Tensor, k: Tensor, v: Tensor, attn_impl: str) -> Tensor:
    """q (B, heads, Nq, d), k/v (B, heads, Nk, d) -> (B, heads, Nq, d)."""
    if attn_impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, heads, Nq, Nk)
    return scores.softmax(dim=-1) @ v


def merge_heads(x: Tensor) -> Tensor:
    """(B, heads, N, d) -> (B, N, heads*d), head-major."""
    b, heads, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, heads * d)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_impl: str) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_impl = check_attn_impl(attn_impl)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: RopeTables) -> Tensor:
        b, n, c = x.shape
        # (B, N, 3C) -> (3, B, heads, N, d): layout [q | k | v], each [head][d]
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = apply_rope(q, *rope)
        k = apply_rope(k, *rope)
        return self.proj(merge_heads(attention(q, k, v, self.attn_impl)))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_impl: str) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_impl = check_attn_impl(attn_impl)
        self.projq = nn.Linear(dim, dim)
        self.projk = nn.Linear(dim, dim)
        self.projv = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, heads, N, d)

    def forward(self, query: Tensor, memory: Tensor, qrope: RopeTables, krope: RopeTables) -> Tensor:
        q = apply_rope(self._heads(self.projq(query)), *qrope)  # (B, heads, Nq, d)
        k = apply_rope(self._heads(self.projk(memory)), *krope)  # (B, heads, Nk, d)
        v = self._heads(self.projv(memory))
        return self.proj(merge_heads(attention(q, k, v, self.attn_impl)))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, attn_impl: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads, attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, rope: RopeTables) -> Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Self-attention, cross-attention to the other view's (normalised) tokens, MLP; all pre-norm."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, attn_impl: str) -> None:
        super().__init__()
        # Registration order reproduces the upstream state_dict order.
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads, attn_impl)
        self.cross_attn = CrossAttention(dim, num_heads, attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_y = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, y: Tensor, xrope: RopeTables, yrope: RopeTables) -> Tensor:
        x = x + self.attn(self.norm1(x), xrope)
        y = self.norm_y(y)
        x = x + self.cross_attn(self.norm2(x), y, xrope, yrope)
        return x + self.mlp(self.norm3(x))


class PatchEmbed(nn.Module):
    """Conv k=s=patch, then tokens row-major: (B, 3, H, W) -> (B, (H/p)*(W/p), C)."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, img: Tensor) -> Tensor:
        return self.proj(img).flatten(2).transpose(1, 2)
