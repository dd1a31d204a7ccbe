"""Small building blocks shared by the FastSAM3D encoder, prompt encoder and decoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTN_IMPLS = ("explicit", "sdpa")


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of a channels-first (B, C, D, H, W) tensor.

    Written out (mean, biased variance, rsqrt) rather than via F.layer_norm on a permuted tensor so the
    arithmetic order is the one the reference vectors were produced with.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)  # (B, 1, D, H, W)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]


class MLPBlock(nn.Module):
    """Linear -> GELU (erf) -> Linear; names `lin1` / `lin2` as in the checkpoints."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (hypernetworks and IoU head): `layers.{i}`."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, impl: str, scale_query: bool = True) -> Tensor:
    """softmax(q k^T / sqrt(c) + bias) v over the last two axes; q/k/v (..., N, c), bias (..., Nq, Nk).

    "explicit" writes MatMul/Softmax/MatMul; "sdpa" calls F.scaled_dot_product_attention with the bias as
    a float mask (one fusable node for exporters). `scale_query` picks where the explicit path scales:
    the encoder scales q before the product, the decoder divides the logits (as upstream; the two differ
    by float rounding only, ~1e-7 relative).
    """
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    c = q.shape[-1]
    if scale_query:
        logits = (q * c**-0.5) @ k.transpose(-2, -1)  # (..., Nq, Nk)
    else:
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(c)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1) @ v
