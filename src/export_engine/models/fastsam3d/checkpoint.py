"""Build FastSAM3D with the official weights (or seeded random ones) and check checkpoints strictly.

The released file (`FastSAM3D.pth` / `fastsam3d.pth`) is a training container written by
FastSAM3D:train.py: weights under `model_state_dict` with the 216 keys of
shared/reference/fastsam3d/state_dict_full.json, plus epoch, optimizer / lr-scheduler state, losses,
dices, best_loss, best_dice, an argparse.Namespace `args` and `used_datas`. It loads with
`weights_only=True` once argparse.Namespace is allow-listed (models.checkpoints does that).
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from export_engine.errors import CheckpointError, UsageError
from export_engine.models.checkpoints import Checkpoint, load_checkpoint, match_state_dict
from export_engine.models.fastsam3d.config import FastSAM3DConfig
from export_engine.models.fastsam3d.layers import LayerNorm3d
from export_engine.models.fastsam3d.model import FastSAM3D

log = logging.getLogger(__name__)

STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")
_ENCODER_PREFIX = "image_encoder."


def expected_state_dict_shapes(config: FastSAM3DConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint key of `config` with its shape, in state_dict order (built on the meta device)."""
    with torch.device("meta"):
        model = FastSAM3D(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int) -> None:
    """Deterministic, finite, non-trivial weights (same scheme as the reference vectors, not the same draw).

    Linear / Conv weights N(0, 1/fan_in) (ConvTranspose3d: fan_in = input channels), biases N(0, 0.1^2),
    LayerNorm scales U(0.5, 1.5), pos_embed and rel-pos tables N(0, 0.5^2), embedding tables and the PE
    Gaussian buffer N(0, 1). Upstream zero-initialises the rel-pos tables, which would hide that path.
    Draws in state_dict order from one generator, so the same seed and config give the same weights.
    """
    gen = torch.Generator().manual_seed(seed)
    kinds = _kinds_by_name(model)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point():
            continue
        kind, fan_in = kinds.get(name, ("normal", 0))
        shape = tensor.shape
        if kind == "weight":
            value = torch.randn(shape, generator=gen) / math.sqrt(max(fan_in, 1))
        elif kind == "norm_scale":
            value = torch.rand(shape, generator=gen) + 0.5
        elif kind == "bias":
            value = torch.randn(shape, generator=gen) * 0.1
        elif kind == "position":
            value = torch.randn(shape, generator=gen) * 0.5
        else:  # embedding tables, PE Gaussian matrix
            value = torch.randn(shape, generator=gen)
        tensor.copy_(value.to(tensor.dtype))


def _kinds_by_name(model: nn.Module) -> dict[str, tuple[str, int]]:
    kinds: dict[str, tuple[str, int]] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, nn.Linear):
            kinds[prefix + "weight"] = ("weight", module.in_features)
        elif isinstance(module, nn.ConvTranspose3d):
            kinds[prefix + "weight"] = ("weight", module.in_channels)
        elif isinstance(module, nn.Conv3d):
            kernel = math.prod(module.kernel_size)
            kinds[prefix + "weight"] = ("weight", module.in_channels // module.groups * kernel)
        elif isinstance(module, nn.LayerNorm | LayerNorm3d):
            kinds[prefix + "weight"] = ("norm_scale", 0)
        elif isinstance(module, nn.Embedding):
            kinds[prefix + "weight"] = ("normal", 0)
        if not isinstance(module, nn.Embedding) and isinstance(getattr(module, "bias", None), torch.Tensor):
            kinds[prefix + "bias"] = ("bias", 0)
        for param_name, _ in module.named_parameters(recurse=False):
            if param_name == "pos_embed" or param_name.startswith("rel_pos_"):
                kinds[prefix + param_name] = ("position", 0)
    return kinds


def build_fastsam3d(
    config: FastSAM3DConfig | None = None,
    checkpoint: str | None = None,
    random_seed: int | None = None,
    attn_impl: str = "explicit",
) -> tuple[FastSAM3D, Checkpoint | None, FastSAM3DConfig]:
    """FastSAM3D in eval mode with weights from `checkpoint` or seeded random ones (exactly one of them).

    `config` None means the released configuration. Checkpoint keys and shapes are checked strictly and
    a mismatch raises CheckpointError naming a few offending keys.
    """
    if (checkpoint is None) == (random_seed is None):
        raise UsageError("build_fastsam3d needs exactly one of checkpoint= or random_seed=")
    config = config or FastSAM3DConfig.released()
    start = time.perf_counter()
    # Built on the meta device and materialised uninitialised: every tensor of the model is in its state
    # dict (no non-persistent buffers), and both branches below overwrite all of them. Skips PyTorch's
    # default init of 53M parameters.
    with torch.device("meta"):
        model = FastSAM3D(config, attn_impl=attn_impl)
    model = model.to_empty(device="cpu")
    ckpt: Checkpoint | None = None
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint, state_dict_keys=STATE_DICT_KEYS)
        expected = expected_state_dict_shapes(config)
        _reject_encoder_only(ckpt, expected)
        state_dict = match_state_dict(ckpt.state_dict, expected, model_name="FastSAM3D")
        model.load_state_dict(state_dict, strict=True)
        log.info(
            "FastSAM3D: loaded %s (sha256 %s...) in %.1fs",
            ckpt.source,
            ckpt.sha256[:12],
            time.perf_counter() - start,
        )
    elif random_seed is not None:
        init_random_weights(model, random_seed)
        log.info("FastSAM3D: random weights (seed %d) in %.1fs", random_seed, time.perf_counter() - start)
    return model.eval(), ckpt, config


def _reject_encoder_only(ckpt: Checkpoint, expected: dict[str, tuple[int, ...]]) -> None:
    """Encoder-only student files (FastSAM3D:distillation.py) carry the encoder keys without a prefix."""
    encoder_keys = {k[len(_ENCODER_PREFIX) :] for k in expected if k.startswith(_ENCODER_PREFIX)}
    keys = set(ckpt.state_dict)
    if keys and keys <= encoder_keys | {f"module.{k}" for k in encoder_keys}:
        raise CheckpointError(
            f"{ckpt.source} is an encoder-only FastSAM3D student checkpoint ({len(keys)} image-encoder keys "
            f"without the 'image_encoder.' prefix); FastSAM3D needs the combined file (FastSAM3D.pth, "
            f"keys image_encoder.* / prompt_encoder.* / mask_decoder.*)"
        )
