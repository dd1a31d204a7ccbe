"""MASt3R (AsymmetricMASt3R, inference path) in plain PyTorch, export-friendly.

    img1, img2 (B, 3, H, W) in [-1, 1]
      -> shared ViT encoder (patch embed 16x16, RoPE2D, pre-norm blocks, enc_norm)   (B, N, enc_dim)
      -> decoder_embed, two decoder streams (dec_blocks for view 1, dec_blocks2 for view 2), each block
         updating both streams from the previous layer's values with cross-attention to the other view
      -> per view, head input [encoder output, block 1, ..., block L (dec_norm)]
      -> downstream_head1 (view 1, in its own frame) / downstream_head2 (view 2, expressed in view 1's frame)

Module and parameter names reproduce the upstream state_dict exactly (1017 keys for the official model).
Nothing depends on data: positions come from ``arange`` over the static grid (h, w) = (H/16, W/16).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from export_engine.errors import ModelInputError
from export_engine.models.mast3r.blocks import (
    DecoderBlock,
    EncoderBlock,
    Mlp,
    PatchEmbed,
    RopeTables,
    check_attn_impl,
)
from export_engine.models.mast3r.config import MASt3RConfig
from export_engine.models.mast3r.heads import DPT, MASt3RHead
from export_engine.models.mast3r.rope import grid_positions, rope_tables


class MASt3R(nn.Module):
    def __init__(self, config: MASt3RConfig, attn_impl: str = "explicit") -> None:
        super().__init__()
        c = config
        self.config = config
        self.attn_impl = check_attn_impl(attn_impl)
        # Registration order reproduces the upstream state_dict order.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.dec_embed_dim))  # pre-training leftover, unused
        self.patch_embed = PatchEmbed(c.patch_size, c.enc_embed_dim)
        self.enc_blocks = nn.ModuleList(
            EncoderBlock(c.enc_embed_dim, c.enc_num_heads, c.mlp_ratio, c.norm_eps, attn_impl)
            for _ in range(c.enc_depth)
        )
        self.enc_norm = nn.LayerNorm(c.enc_embed_dim, eps=c.norm_eps)
        self.decoder_embed = nn.Linear(c.enc_embed_dim, c.dec_embed_dim)
        self.dec_blocks = nn.ModuleList(
            DecoderBlock(c.dec_embed_dim, c.dec_num_heads, c.mlp_ratio, c.norm_eps, attn_impl)
            for _ in range(c.dec_depth)
        )
        self.dec_norm = nn.LayerNorm(c.dec_embed_dim, eps=c.norm_eps)
        self.dec_blocks2 = nn.ModuleList(
            DecoderBlock(c.dec_embed_dim, c.dec_num_heads, c.mlp_ratio, c.norm_eps, attn_impl)
            for _ in range(c.dec_depth)
        )
        self.downstream_head1 = _build_head(c)
        self.downstream_head2 = _build_head(c)

    # ------------------------------------------------------------------------------------------------------

    def rope(self, grid: tuple[int, int], head_dim: int, like: Tensor) -> RopeTables:
        """cos/sin tables (N, head_dim) for a (h, w) token grid, in ``like``'s dtype and device."""
        positions = grid_positions(grid[0], grid[1], device=like.device)
        return rope_tables(positions, head_dim, self.config.rope_base, self.config.rope_f0, like.dtype)

    def token_grid(self, shape: tuple[int, int]) -> tuple[int, int]:
        """(H, W) image size -> (h, w) token grid; H and W must be multiples of the patch size."""
        p = self.config.patch_size
        height, width = shape
        if height % p or width % p:
            raise ModelInputError(
                f"MASt3R input of size {height}x{width} (HxW): height and width must be multiples of {p}; "
                f"crop or resize the image (e.g. 512x384)"
            )
        return height // p, width // p

    def encode(self, img: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, (H/p)*(W/p), enc_dim), after enc_norm."""
        if img.dim() != 4 or img.shape[1] != 3:
            raise ModelInputError(f"MASt3R expects images of shape (B, 3, H, W), got {tuple(img.shape)}")
        grid = self.token_grid((img.shape[-2], img.shape[-1]))
        x = self.patch_embed(img)  # (B, N, enc_dim)
        rope = self.rope(grid, self.config.enc_embed_dim // self.config.enc_num_heads, x)
        for block in self.enc_blocks:
            x = block(x, rope)
        return self.enc_norm(x)

    def decoder_outputs(
        self, feat1: Tensor, feat2: Tensor, shape1: tuple[int, int], shape2: tuple[int, int]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per view, the head inputs [encoder output, block 1, ..., block L with dec_norm]."""
        grid1, grid2 = self.token_grid(shape1), self.token_grid(shape2)
        f1, f2 = self.decoder_embed(feat1), self.decoder_embed(feat2)  # (B, N1|N2, dec_dim)
        head_dim = self.config.dec_embed_dim // self.config.dec_num_heads
        rope1, rope2 = self.rope(grid1, head_dim, f1), self.rope(grid2, head_dim, f2)
        outs1, outs2 = [feat1], [feat2]
        for block1, block2 in zip(self.dec_blocks, self.dec_blocks2, strict=True):
            # Both streams advance from the previous layer's values.
            f1, f2 = block1(f1, f2, rope1, rope2), block2(f2, f1, rope2, rope1)
            outs1.append(f1)
            outs2.append(f2)
        outs1[-1], outs2[-1] = self.dec_norm(outs1[-1]), self.dec_norm(outs2[-1])
        return outs1, outs2

    def decode(
        self, feat1: Tensor, feat2: Tensor, shape1: tuple[int, int], shape2: tuple[int, int]
    ) -> dict[str, Tensor]:
        """Encoder features of both views + their (H, W) -> the 8 outputs, channels-last (OUTPUT_NAMES)."""
        outs1, outs2 = self.decoder_outputs(feat1, feat2, shape1, shape2)
        res1 = self.downstream_head1(outs1, shape1)  # view 1 in its own frame
        res2 = self.downstream_head2(outs2, shape2)  # view 2 in view 1's frame
        return {
            "view1_pts3d": res1["pts3d"],  # (B, H1, W1, 3)
            "view1_conf": res1["conf"],  # (B, H1, W1)
            "view1_desc": res1["desc"],  # (B, H1, W1, local_feat_dim)
            "view1_desc_conf": res1["desc_conf"],  # (B, H1, W1)
            "view2_pts3d_in_other_view": res2["pts3d"],  # (B, H2, W2, 3)
            "view2_conf": res2["conf"],
            "view2_desc": res2["desc"],
            "view2_desc_conf": res2["desc_conf"],
        }

    def forward(self, img1: Tensor, img2: Tensor) -> dict[str, Tensor]:
        shape1 = (img1.shape[-2], img1.shape[-1])
        shape2 = (img2.shape[-2], img2.shape[-1])
        if shape1 == shape2:  # one batched encoder pass, as upstream (static: depends on shapes only)
            feat1, feat2 = self.encode(torch.cat((img1, img2), dim=0)).chunk(2, dim=0)
        else:
            feat1, feat2 = self.encode(img1), self.encode(img2)
        return self.decode(feat1, feat2, shape1, shape2)


def _build_head(c: MASt3RConfig) -> MASt3RHead:
    dpt = DPT(
        hooks=c.hooks,
        dim_tokens=(c.enc_embed_dim, c.dec_embed_dim, c.dec_embed_dim, c.dec_embed_dim),
        layer_dims=c.dpt_layer_dims,
        feature_dim=c.dpt_feature_dim,
        last_dim=c.dpt_last_dim,
        num_channels=4,  # x, y, z, conf
        patch_size=c.patch_size,
    )
    in_dim = c.enc_embed_dim + c.dec_embed_dim
    out_dim = (c.local_feat_dim + int(c.two_confs)) * c.patch_size**2
    local_mlp = Mlp(in_dim, int(c.hidden_dim_factor * in_dim), out_dim)
    return MASt3RHead(dpt, local_mlp, c.local_feat_dim, (c.depth_mode, c.conf_mode, c.desc_conf_mode), c.two_confs)


def expected_state_dict_shapes(config: MASt3RConfig) -> dict[str, tuple[int, ...]]:
    """Every state_dict key with its shape, in upstream order, without allocating weights (meta device)."""
    with torch.device("meta"):
        model = MASt3R(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def count_parameters(config: MASt3RConfig) -> int:
    """Unique parameters (aliases counted once), computed on the meta device."""
    with torch.device("meta"):
        model = MASt3R(config)
    return sum(p.numel() for p in model.parameters())
