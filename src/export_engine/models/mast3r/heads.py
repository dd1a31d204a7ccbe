"""MASt3R's per-view head: a DPT for 3-D points + confidence, an MLP for dense descriptors, post-processing.

State-dict names follow upstream (``dpt.scratch.layer1_rn``, ``dpt.act_postprocess.0.1``,
``head_local_features.fc1`` ...). Two upstream quirks are kept on purpose so that official checkpoints load
with ``strict=True``:
* ``dpt.scratch.layer_rn`` is a ModuleList holding the *same* Conv2d objects as ``layer1_rn``..``layer4_rn``
  (each weight appears under two names);
* ``dpt.scratch.refinenet4.resConfUnit1`` exists but is never run (refinenet4 gets a single input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export_engine.models.mast3r.blocks import Mlp
from export_engine.models.mast3r.config import Mode


def upsample2x(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class Upsample2x(nn.Module):
    """Parameter-free ×2 bilinear upsampling (align_corners=True); a module so ``dpt.head`` indices match."""

    def forward(self, x: Tensor) -> Tensor:
        return upsample2x(x)


class ResidualConvUnit(nn.Module):
    """x + conv2(relu(conv1(relu(x)))) with 3x3 biased convs (ReLU out of place: the skip keeps raw x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """("refinenet") a [+ RCU1(skip)] -> RCU2 -> ×2 upsample -> 1x1 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(channels, channels, 1)
        self.resConfUnit1 = ResidualConvUnit(channels)
        self.resConfUnit2 = ResidualConvUnit(channels)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        return self.out_conv(upsample2x(self.resConfUnit2(x)))


class DPTScratch(nn.Module):
    def __init__(self, layer_dims: tuple[int, ...], features: int) -> None:
        super().__init__()
        self.layer1_rn = nn.Conv2d(layer_dims[0], features, 3, padding=1, bias=False)
        self.layer2_rn = nn.Conv2d(layer_dims[1], features, 3, padding=1, bias=False)
        self.layer3_rn = nn.Conv2d(layer_dims[2], features, 3, padding=1, bias=False)
        self.layer4_rn = nn.Conv2d(layer_dims[3], features, 3, padding=1, bias=False)
        # Same objects again under a second name (upstream state_dict has both; see module docstring).
        self.layer_rn = nn.ModuleList([self.layer1_rn, self.layer2_rn, self.layer3_rn, self.layer4_rn])
        self.refinenet1 = FeatureFusionBlock(features)
        self.refinenet2 = FeatureFusionBlock(features)
        self.refinenet3 = FeatureFusionBlock(features)
        self.refinenet4 = FeatureFusionBlock(features)


class DPT(nn.Module):
    """Dense prediction from 4 hooked token sets -> (B, num_channels, H, W)."""

    def __init__(
        self,
        hooks: tuple[int, ...],
        dim_tokens: tuple[int, int, int, int],
        layer_dims: tuple[int, int, int, int],
        feature_dim: int,
        last_dim: int,
        num_channels: int,
        patch_size: int,
    ) -> None:
        super().__init__()
        self.hooks = tuple(hooks)
        self.patch_size = patch_size
        self.scratch = DPTScratch(layer_dims, feature_dim)
        self.head = nn.Sequential(
            nn.Conv2d(feature_dim, feature_dim // 2, 3, padding=1),
            Upsample2x(),
            nn.Conv2d(feature_dim // 2, last_dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(last_dim, num_channels, 1),
        )
        d0, d1, d2, d3 = layer_dims
        self.act_postprocess = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(dim_tokens[0], d0, 1), nn.ConvTranspose2d(d0, d0, 4, stride=4)),  # 4h
                nn.Sequential(nn.Conv2d(dim_tokens[1], d1, 1), nn.ConvTranspose2d(d1, d1, 2, stride=2)),  # 2h
                nn.Sequential(nn.Conv2d(dim_tokens[2], d2, 1)),  # h
                nn.Sequential(nn.Conv2d(dim_tokens[3], d3, 1), nn.Conv2d(d3, d3, 3, stride=2, padding=1)),  # h/2
            ]
        )

    def forward(self, tokens: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        h, w = image_size[0] // self.patch_size, image_size[1] // self.patch_size
        levels = []
        for i, hook in enumerate(self.hooks):
            x = tokens[hook]  # (B, N, C), token t = y*w + x
            x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)  # (B, C, h, w)
            x = self.act_postprocess[i](x)  # (B, layer_dims[i], {4h, 2h, h, ceil(h/2)}, ...)
            levels.append(self.scratch.layer_rn[i](x))  # (B, F, ...)
        s = self.scratch
        path4 = s.refinenet4(levels[3])  # (B, F, 2*ceil(h/2), 2*ceil(w/2))
        path4 = path4[:, :, : levels[2].shape[2], : levels[2].shape[3]]  # crop to (h, w) for odd grids
        path3 = s.refinenet3(path4, levels[2])  # (B, F, 2h, 2w)
        path2 = s.refinenet2(path3, levels[1])  # (B, F, 4h, 4w)
        path1 = s.refinenet1(path2, levels[0])  # (B, F, 8h, 8w)
        return self.head(path1)  # (B, num_channels, H, W)


class MASt3RHead(nn.Module):
    """``Cat_MLP_LocalFeatures_DPT_Pts3d``: DPT (xyz + conf) and a token MLP (descriptors + desc conf)."""

    def __init__(
        self,
        dpt: DPT,
        local_mlp: Mlp,
        local_feat_dim: int,
        modes: tuple[Mode, Mode, Mode],
        two_confs: bool,
    ) -> None:
        super().__init__()
        self.dpt = dpt
        self.head_local_features = local_mlp
        self.patch_size = dpt.patch_size
        self.local_feat_dim = local_feat_dim
        self.depth_mode, self.conf_mode, self.desc_conf_mode = modes
        self.two_confs = two_confs

    def local_features(self, tokens: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        """(B, local_feat_dim + two_confs, H, W) from encoder output ++ last decoder output."""
        p = self.patch_size
        feat = self.head_local_features(torch.cat((tokens[0], tokens[-1]), dim=-1))  # (B, N, C*p*p)
        b, _, c = feat.shape
        grid = feat.transpose(1, 2).reshape(b, c, image_size[0] // p, image_size[1] // p)  # (B, C*p*p, h, w)
        # Output channel k, pixel (p*y + i, p*x + j) <- feature k*p*p + i*p + j of token (y, x) (CRD order).
        return F.pixel_shuffle(grid, p)

    def forward(self, tokens: list[Tensor], image_size: tuple[int, int]) -> dict[str, Tensor]:
        dense = self.dpt(tokens, image_size)  # (B, 4, H, W): x, y, z, conf_raw
        local = self.local_features(tokens, image_size)  # (B, D [+1], H, W)
        # Channels are picked in NCHW and each piece is made channels-last on its own. Upstream permutes first
        # and then slices: same numbers, but TensorRT-RTX 1.7.1 cannot build a dynamic-batch engine for
        # Transpose(0,2,3,1) -> Gather(axis 3) -> Exp (Myelin stride-order check), while Gather on axis 1 builds.
        d = self.local_feat_dim
        conf = positive_conf(dense[:, 3], self.conf_mode)  # (B, H, W)
        desc = local[:, :d].permute(0, 2, 3, 1)  # (B, H, W, D)
        out = {
            "pts3d": points_from_raw(dense[:, 0:3].permute(0, 2, 3, 1), self.depth_mode),  # (B, H, W, 3)
            "conf": conf,
            "desc": desc / desc.norm(dim=-1, keepdim=True),  # no epsilon, as upstream
        }
        out["desc_conf"] = positive_conf(local[:, d], self.desc_conf_mode) if self.two_confs else conf
        return out


def points_from_raw(xyz: Tensor, depth_mode: Mode) -> Tensor:
    """Direction of xyz times f(|xyz|): expm1 for 'exp' (upstream's metric model), d² for 'square'."""
    mode = depth_mode[0]
    if mode == "linear":
        return xyz
    d = xyz.norm(dim=-1, keepdim=True)
    direction = xyz / d.clip(min=1e-8)
    return direction * (torch.expm1(d) if mode == "exp" else d.square())


def positive_conf(raw: Tensor, conf_mode: Mode) -> Tensor:
    """vmin + exp(raw), clipped at vmax (the clip is dropped when vmax is inf, its only official value)."""
    _, vmin, vmax = conf_mode
    conf = raw.exp()
    if vmax != float("inf"):
        conf = conf.clip(max=vmax - vmin)
    return conf + vmin if vmin != 0 else conf
