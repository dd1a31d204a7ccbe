"""FastSAM3D image encoder: a 3D ViT with dense global attention and decomposed relative positions.

Released configuration: 128^3 volume -> 16^3 patches -> 8x8x8 tokens of width 768 -> 6 blocks (the first
two MLP-only) -> neck -> image embedding (B, 384, 8, 8, 8). Spec: specs/fastsam3d.md section 3.
Key names match `image_encoder.*` of the official checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export_engine.models.fastsam3d.config import FastSAM3DConfig
from export_engine.models.fastsam3d.layers import LayerNorm3d, MLPBlock


class PatchEmbed3D(nn.Module):
    """Non-overlapping Conv3d patchify; output channels-last (B, D, H, W, C) in the input's axis order."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (B, C, g, g, g)
        return x.permute(0, 2, 3, 4, 1)  # (B, g, g, g, C)


class RelPosAttention3D(nn.Module):
    """Global multi-head self-attention over all g^3 tokens with the decomposed relative-position bias.

    The bias reproduces upstream's broadcasting quirk: for query (qd,qh,qw) and key (kd,kh,kw)

        bias = q(qd,qh,qw).R_d[qd,kw] + q(qd,qh,kd).R_h[qh,kw] + q(qd,qh,kh).R_w[kh,kw]

    with R_X[a, b] = T_X[a - b + g - 1]. The official weights were trained with it: the textbook formula
    changes block outputs by O(1). Written with broadcast MatMuls (no einsum) for TensorRT.
    """

    def __init__(self, dim: int, num_heads: int, grid: int, qkv_bias: bool, use_rel_pos: bool, attn_impl: str,
                 sparse_segment: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.sparse_segment = sparse_segment  # > 0: the sparse variant (see _sparse); 0: dense
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_impl = attn_impl
        self.use_rel_pos = use_rel_pos
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if use_rel_pos:
            self.rel_pos_d = nn.Parameter(torch.zeros(2 * grid - 1, self.head_dim))
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, self.head_dim))

    def forward(self, x: Tensor) -> Tensor:
        b, d, h, w, dim = x.shape
        n = d * h * w
        # qkv channels read as (3, heads, head_dim), q first, head-major.
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, nh, N, c)

        if self.sparse_segment:
            out = self._sparse(q, k, v)  # (B, nh, N, c) in group order: no scatter back, as upstream
        elif self.attn_impl == "sdpa":
            bias = None
            if self.use_rel_pos:
                t_d, t_h, t_w = self._rel_pos_terms(q, (d, h, w))
                bias = (t_d + t_h + t_w).reshape(b, self.num_heads, n, n)  # float mask (B, nh, N, N)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nh, N, c)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, nh, N, N)
            if self.use_rel_pos:
                t_d, t_h, t_w = self._rel_pos_terms(q, (d, h, w))
                grid7 = logits.reshape(b * self.num_heads, d, h, w, d, h, w)  # (B*nh, qd,qh,qw, kd,kh,kw)
                logits = (grid7 + t_d + t_h + t_w).reshape(b, self.num_heads, n, n)
            out = logits.softmax(dim=-1) @ v  # (B, nh, N, c)

        # Merge heads head-major: (B, nh, D, H, W, c) -> (B, D, H, W, nh*c).
        out = out.reshape(b, self.num_heads, d, h, w, self.head_dim).permute(0, 2, 3, 4, 1, 5)
        return self.proj(out.reshape(b, d, h, w, dim))

    def _sparse(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The "3D sparse flash attention" variant: tokens grouped by residue, G_r = {r, r + S, r + 2S, ...}
        for r < min(S, N), plain softmax attention inside each group (scale c^-1/2, no bias or mask; the
        relative-position tables are not read), group outputs concatenated in group order (all of G_0, then
        G_1, ...) and returned in that order: upstream reshapes them straight to (B, D, H, W, C), so the
        output at a position holds another token's result (for N = 8^3, S = 64: axes (D,H,W) -> (H,W,D)).

        With N = L*S + e the first e groups hold L + 1 tokens, the others L (none when N < S, where every
        group is one token and the result is v). Every index is static: uniform groups are a reshape and a
        transpose, ragged ones two constant gathers; each block is 4-D attention with heads x groups as heads.
        """
        b, nh, c = q.shape[0], q.shape[1], q.shape[3]
        n, s = int(q.shape[2]), self.sparse_segment  # static per artifact: the volume size is fixed
        length, extra = divmod(n, s)
        blocks = []
        if extra:  # groups 0..extra-1: tokens r + j*S, j = 0..length
            index = torch.arange(extra, device=q.device)[:, None] + s * torch.arange(length + 1, device=q.device)
            blocks.append(tuple(t[:, :, index] for t in (q, k, v)))  # (B, nh, extra, length+1, c)
        if length:  # groups extra..min(S,N)-1: tokens r + j*S, j < length
            if extra:
                start = torch.arange(extra, s, device=q.device)[:, None]
                index = start + s * torch.arange(length, device=q.device)
                blocks.append(tuple(t[:, :, index] for t in (q, k, v)))  # (B, nh, S-extra, length, c)
            else:  # uniform: (B, nh, L, S, c) -> (B, nh, S, L, c), no gather
                blocks.append(tuple(t.reshape(b, nh, length, s, c).transpose(2, 3) for t in (q, k, v)))
        outs = []
        for bq, bk, bv in blocks:
            groups, size = bq.shape[2], bq.shape[3]
            bq, bk, bv = (t.reshape(b, nh * groups, size, c) for t in (bq, bk, bv))
            if self.attn_impl == "sdpa":
                out = F.scaled_dot_product_attention(bq, bk, bv)
            else:
                out = ((bq * self.scale) @ bk.transpose(-2, -1)).softmax(dim=-1) @ bv
            outs.append(out.reshape(b, nh, groups * size, c))
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]

    def _rel_pos_terms(self, q: Tensor, size: tuple[int, int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """The three bias terms, each broadcastable to (B*nh, qd, qh, qw, kd, kh, kw)."""
        d, h, w = size
        c = self.head_dim
        # index[a, b] = a - b + g - 1 gathers R_X[a, b] = T_X[a - b + g - 1], (g, g, c), from each (2g-1, c)
        # table. Built here, not stored as a buffer: a constant to exporters, and nothing to re-create
        # when the model is materialised from the meta device.
        coords = torch.arange(d, device=q.device)
        index = coords[:, None] - coords[None, :] + (d - 1)
        r_d, r_h, r_w = self.rel_pos_d[index], self.rel_pos_h[index], self.rel_pos_w[index]
        # Unscaled q as one row vector per token: (B*nh, D, H, W, 1, c).
        q_rows = q.reshape(-1, d, h, w, 1, c)
        # A_X[.., d, h, w, k] = q(d,h,w) . R_X[x, k], x = the query's own X coordinate; matmul against
        # R_X^T (x, c, k) broadcast over the other two query axes. Each result (B*nh, D, H, W, g).
        a_d = (q_rows @ r_d.transpose(1, 2).reshape(d, 1, 1, c, -1)).squeeze(-2)
        a_h = (q_rows @ r_h.transpose(1, 2).reshape(h, 1, c, -1)).squeeze(-2)
        a_w = (q_rows @ r_w.transpose(1, 2)).squeeze(-2)
        # Upstream's placement: the trailing key index always lands on kw; the query's w index is reused
        # as kd (A_h) and kh (A_w).
        t_d = a_d[:, :, :, :, None, None, :]  # (B*nh, qd, qh, qw, 1, 1, kw)
        t_h = a_h[:, :, :, None, :, None, :]  # (B*nh, qd, qh, 1, kd, 1, kw)
        t_w = a_w[:, :, :, None, None, :, :]  # (B*nh, qd, qh, 1, 1, kh, kw)
        return t_d, t_h, t_w


class MLPOnlyBlock(nn.Module):
    """Leading `skip_layer` blocks: x <- LN2(x); x <- x + MLP(x) (the residual wraps the NORMALISED x)."""

    def __init__(self, dim: int, mlp_dim: int, eps: float) -> None:
        super().__init__()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLPBlock(dim, mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm2(x)
        return x + self.mlp(x)


class AttentionBlock(nn.Module):
    """x <- x + Attn(LN1(x)); x <- LN2(x); x <- x + MLP(x).

    Not the pre-norm ViT block (x + MLP(LN2(x))): FastSAM3D normalises the residual stream itself before
    the MLP, and the released weights depend on it.
    """

    def __init__(self, cfg: FastSAM3DConfig, attn_impl: str) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.encoder_layernorm_eps)
        sparse = cfg.sparse_segment_size if cfg.encoder_attention == "sparse" else 0
        self.attn = RelPosAttention3D(dim, cfg.encoder_num_heads, cfg.grid, cfg.qkv_bias, cfg.use_rel_pos, attn_impl,
                                      sparse)  # fmt: skip
        self.norm2 = nn.LayerNorm(dim, eps=cfg.encoder_layernorm_eps)
        self.mlp = MLPBlock(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        x = self.norm2(x)
        return x + self.mlp(x)


class ImageEncoder3D(nn.Module):
    """(B, in_chans, S, S, S) z-normalised volume -> image embedding (B, prompt_embed_dim, g, g, g)."""

    def __init__(self, cfg: FastSAM3DConfig, attn_impl: str = "explicit") -> None:
        super().__init__()
        dim, g, out = cfg.encoder_embed_dim, cfg.grid, cfg.prompt_embed_dim
        self.patch_embed = PatchEmbed3D(cfg.patch_size, cfg.in_chans, dim)
        self.pos_embed: nn.Parameter | None = nn.Parameter(torch.zeros(1, g, g, g, dim)) if cfg.use_abs_pos else None
        mlp_dim = int(dim * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(
            MLPOnlyBlock(dim, mlp_dim, cfg.encoder_layernorm_eps)
            if i < cfg.skip_layer
            else AttentionBlock(cfg, attn_impl)
            for i in range(cfg.encoder_depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(dim, out, kernel_size=1, bias=False),
            LayerNorm3d(out, eps=cfg.layernorm3d_eps),
            nn.Conv3d(out, out, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out, eps=cfg.layernorm3d_eps),
        )

    def forward(self, image: Tensor) -> Tensor:
        x = self.embed_patches(image)
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))  # (B, C_out, g, g, g)

    def embed_patches(self, image: Tensor) -> Tensor:
        x = self.patch_embed(image)  # (B, g, g, g, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x

    def forward_intermediates(self, image: Tensor) -> dict[str, Tensor]:
        """Every stage output (for parity checks): patch_embed_plus_pos, block{i}_out, image_embedding."""
        out: dict[str, Tensor] = {}
        x = out["patch_embed_plus_pos"] = self.embed_patches(image)
        for i, block in enumerate(self.blocks):
            x = out[f"block{i}_out"] = block(x)
        out["image_embedding"] = self.neck(x.permute(0, 4, 1, 2, 3))
        return out
