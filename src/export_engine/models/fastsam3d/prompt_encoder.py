"""FastSAM3D prompt encoder (SAM-Med3D's 3D prompt encoder): clicks -> sparse tokens, mask -> dense map.

Spec: specs/fastsam3d.md section 4. Key names match `prompt_encoder.*` of the official checkpoint,
including the persistent buffer `pe_layer.positional_encoding_gaussian_matrix` (it must be loaded: a fresh
model draws it at random).
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from export_engine.models.fastsam3d.config import FastSAM3DConfig
from export_engine.models.fastsam3d.layers import LayerNorm3d


class PositionEmbeddingRandom3D(nn.Module):
    """Random-Fourier features: u in [0,1]^3 -> [sin(2 pi (2u-1) G), cos(...), sin(...)] (3 x F channels).

    The third block repeats the first; that is how upstream reaches 3F = embed_dim channels.
    """

    positional_encoding_gaussian_matrix: Tensor

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, num_pos_feats))

    def encode(self, coords: Tensor) -> Tensor:
        """(..., 3) normalised coordinates -> (..., 3F)."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords), torch.sin(coords)], dim=-1)

    def dense(self, grid: int) -> Tensor:
        """The image-side encoding (1, 3F, g, g, g) of the token centres.

        Quirk kept from upstream: the first coordinate comes from tensor axis 1 and the second from axis 0
        (token (i, j, k) is encoded at u = ((j+.5)/g, (i+.5)/g, (k+.5)/g)); the weights expect it.
        """
        device = self.positional_encoding_gaussian_matrix.device
        centres = (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) / grid  # (g,)
        i = centres[:, None, None].expand(grid, grid, grid)
        j = centres[None, :, None].expand(grid, grid, grid)
        k = centres[None, None, :].expand(grid, grid, grid)
        pe = self.encode(torch.stack([j, i, k], dim=-1))  # (g, g, g, 3F)
        return pe.permute(3, 0, 1, 2).unsqueeze(0)  # (1, 3F, g, g, g)


class PromptEncoder3D(nn.Module):
    def __init__(self, cfg: FastSAM3DConfig) -> None:
        super().__init__()
        dim = cfg.prompt_embed_dim
        self.embed_dim = dim
        self.grid = cfg.grid
        self.input_image_size = cfg.img_size
        self.pe_layer = PositionEmbeddingRandom3D(dim // 3)
        # Index 0: negative click (label 0), index 1: positive click (label 1). Boxes are unsupported
        # upstream (they would index point_embeddings[2..3], which do not exist).
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, dim), nn.Embedding(1, dim)])
        self.not_a_point_embed = nn.Embedding(1, dim)
        mid = cfg.mask_in_chans
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mid // 4, kernel_size=2, stride=2),
            LayerNorm3d(mid // 4, eps=cfg.layernorm3d_eps),
            nn.GELU(),
            nn.Conv3d(mid // 4, mid, kernel_size=2, stride=2),
            LayerNorm3d(mid, eps=cfg.layernorm3d_eps),
            nn.GELU(),
            nn.Conv3d(mid, dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, dim)

    def dense_pe(self) -> Tensor:
        """(1, C, g, g, g) positional encoding of the image tokens; a constant of the model."""
        return self.pe_layer.dense(self.grid)

    def embed_points(self, coords: Tensor, labels: Tensor) -> Tensor:
        """(B, N, 3) voxel coords in (d, h, w) tensor order + (B, N) labels -> sparse tokens (B, N+1, C).

        Labels: 1 positive, 0 negative, -1 not-a-point; other values get the positional encoding only.
        A padding point ((0,0,0), label -1) is always appended, as upstream does when no box is given.
        Label handling is arithmetic on masks (no boolean indexing) so it exports as plain Where/Mul/Add.
        """
        coords = coords.to(torch.float32) + 0.5  # voxel centres (the padding point is NOT shifted)
        pad_coords = torch.zeros_like(coords[:, :1, :])  # (B, 1, 3)
        pad_labels = torch.full_like(labels[:, :1], -1)  # (B, 1)
        coords = torch.cat([coords, pad_coords], dim=1)  # (B, N+1, 3)
        labels = torch.cat([labels, pad_labels], dim=1).unsqueeze(-1)  # (B, N+1, 1)

        # No axis swap here (unlike dense_pe): upstream divides (d, h, w) by the input size as is.
        pe = self.pe_layer.encode(coords / self.input_image_size)  # (B, N+1, C)
        pe = torch.where(labels == -1, torch.zeros_like(pe), pe)
        is_pad = (labels == -1).to(pe.dtype)
        is_neg = (labels == 0).to(pe.dtype)
        is_pos = (labels == 1).to(pe.dtype)
        negative, positive = (cast(nn.Embedding, m).weight for m in self.point_embeddings)
        return pe + is_pad * self.not_a_point_embed.weight + is_neg * negative + is_pos * positive

    def embed_mask(self, mask_input: Tensor) -> Tensor:
        """(B, 1, 4g, 4g, 4g) previous low-res logits -> dense embedding (B, C, g, g, g)."""
        return self.mask_downscaling(mask_input)

    def no_mask_dense(self, batch: int) -> Tensor:
        """`no_mask_embed` broadcast to (batch, C, g, g, g) (the mask_input=None path)."""
        g = self.grid
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(batch, -1, g, g, g)

    def forward(
        self,
        coords: Tensor,
        labels: Tensor,
        mask_input: Tensor | None,
        has_mask_input: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Returns (sparse (B, N+1, C), dense (B, C, g, g, g)).

        `mask_input=None` is a Python-level branch (a different graph). `has_mask_input` ((B,) or (B, 1)
        float 0/1, optional) blends the mask branch with `no_mask_embed` in one graph, SAM-export style.
        """
        sparse = self.embed_points(coords, labels)
        if mask_input is None:
            return sparse, self.no_mask_dense(coords.shape[0])
        dense = self.embed_mask(mask_input)
        if has_mask_input is not None:
            flag = has_mask_input.to(dense.dtype).reshape(-1, 1, 1, 1, 1)
            no_mask = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1)
            dense = flag * dense + (1 - flag) * no_mask
        return sparse, dense
