"""FastSAM3D mask decoder (SAM-Med3D's 3D two-way decoder): tokens x image embedding -> 4 mask logits + IoU.

Spec: specs/fastsam3d.md section 6. Key names match `mask_decoder.*` of the official checkpoint.
Shapes below for B prompt sets with N clicks: T = 1 IoU token + M mask tokens + (N + 1) sparse tokens,
image tokens N_img = g^3, C = prompt_embed_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export_engine.models.fastsam3d.config import FastSAM3DConfig
from export_engine.models.fastsam3d.layers import MLP, LayerNorm3d, MLPBlock, attention


class DecoderAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections to an internal width C / downsample_rate."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int, attn_impl: str) -> None:
        super().__init__()
        internal = dim // downsample_rate
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.q_proj = nn.Linear(dim, internal)
        self.k_proj = nn.Linear(dim, internal)
        self.v_proj = nn.Linear(dim, internal)
        self.out_proj = nn.Linear(internal, dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = self._split_heads(self.q_proj(q))  # (B, heads, Nq, c)
        k = self._split_heads(self.k_proj(k))  # (B, heads, Nk, c)
        v = self._split_heads(self.v_proj(v))
        out = attention(q, k, v, None, self.attn_impl, scale_query=False)  # (B, heads, Nq, c)
        out = out.transpose(1, 2).flatten(2)  # (B, Nq, heads*c), head-major
        return self.out_proj(out)

    def _split_heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)


class TwoWayBlock(nn.Module):
    """Token self-attention, token->image cross-attention, token MLP, image->token cross-attention."""

    def __init__(self, cfg: FastSAM3DConfig, skip_first_layer_pe: bool, attn_impl: str) -> None:
        super().__init__()
        dim, heads, rate = cfg.prompt_embed_dim, cfg.decoder_num_heads, cfg.attention_downsample_rate
        eps = cfg.decoder_layernorm_eps
        self.self_attn = DecoderAttention(dim, heads, 1, attn_impl)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn_token_to_image = DecoderAttention(dim, heads, rate, attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLPBlock(dim, cfg.decoder_mlp_dim, act=nn.ReLU)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.norm4 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn_image_to_token = DecoderAttention(dim, heads, rate, attn_impl)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        # queries (B, T, C), keys (B, N_img, C)
        if self.skip_first_layer_pe:  # layer 0: no PE and no residual
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer3D(nn.Module):
    def __init__(self, cfg: FastSAM3DConfig, attn_impl: str) -> None:
        super().__init__()
        dim = cfg.prompt_embed_dim
        self.layers = nn.ModuleList(
            TwoWayBlock(cfg, skip_first_layer_pe=(i == 0), attn_impl=attn_impl)
            for i in range(cfg.decoder_transformer_depth)
        )
        self.final_attn_token_to_image = DecoderAttention(
            dim, cfg.decoder_num_heads, cfg.attention_downsample_rate, attn_impl
        )
        self.norm_final_attn = nn.LayerNorm(dim, eps=cfg.decoder_layernorm_eps)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """image, image_pe (B, C, g, g, g); tokens (B, T, C) -> (tokens (B, T, C), image (B, N_img, C))."""
        keys = image.flatten(2).transpose(1, 2)  # (B, N_img, C), row-major over the grid
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens  # the initial tokens double as the query positional encoding
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


@dataclass
class MaskDecoderResult:
    """Every decoder output for all M = num_multimask_outputs + 1 mask tokens."""

    low_res_masks: Tensor  # (B, M, 4g, 4g, 4g) logits
    iou_predictions: Tensor  # (B, M), raw (no sigmoid)
    tokens_out: Tensor  # (B, T, C): two-way transformer token output
    image_tokens_out: Tensor  # (B, N_img, C): two-way transformer image output
    upscaled_embedding: Tensor  # (B, C/8, 4g, 4g, 4g)


class MaskDecoder3D(nn.Module):
    def __init__(self, cfg: FastSAM3DConfig, attn_impl: str = "explicit") -> None:
        super().__init__()
        dim = cfg.prompt_embed_dim
        self.num_mask_tokens = cfg.num_mask_tokens
        self.transformer = TwoWayTransformer3D(cfg, attn_impl)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(dim // 4, eps=cfg.layernorm3d_eps),
            nn.GELU(),
            nn.ConvTranspose3d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(dim, cfg.iou_head_hidden_dim, self.num_mask_tokens, cfg.iou_head_depth)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor) -> MaskDecoderResult:
        """image_embedding (1 or B, C, g, g, g), image_pe (1, C, g, g, g), sparse (B, N+1, C),
        dense (B, C, g, g, g) -> all M masks and IoU predictions."""
        b = sparse.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # (1+M, C)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)  # (B, T, C)

        # Upstream repeats a batch-1 embedding for B prompt sets (repeat_interleave); expand is the same
        # for batch 1 and the identity for batch B, and keeps B dynamic in an exported graph.
        image = image_embedding.expand(b, -1, -1, -1, -1) + dense  # (B, C, g, g, g)
        pos = image_pe.expand(b, -1, -1, -1, -1)
        tokens_out, image_tokens = self.transformer(image, pos, tokens)

        iou_token_out = tokens_out[:, 0, :]  # (B, C)
        mask_tokens_out = tokens_out[:, 1 : 1 + self.num_mask_tokens, :]  # (B, M, C)

        image_grid = image_tokens.transpose(1, 2).reshape(image.shape)  # (B, C, g, g, g)
        upscaled = self.output_upscaling(image_grid)  # (B, C/8, 4g, 4g, 4g)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (B, M, C/8)
        masks = (hyper_in @ upscaled.flatten(2)).reshape(
            b, self.num_mask_tokens, *upscaled.shape[2:]
        )  # (B, M, 4g, 4g, 4g)
        iou_pred = self.iou_prediction_head(iou_token_out)  # (B, M)
        return MaskDecoderResult(masks, iou_pred, tokens_out, image_tokens, upscaled)


def upscale_masks(low_res_masks: Tensor, size: int | tuple[int, int, int]) -> Tensor:
    """Trilinear (align_corners=False, i.e. ONNX Resize half_pixel) resize of (B, M, s, s, s) logits."""
    if isinstance(size, int):
        size = (size, size, size)
    return F.interpolate(low_res_masks, size=size, mode="trilinear", align_corners=False)
