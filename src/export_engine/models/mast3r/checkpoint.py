"""Build MASt3R from a checkpoint (official .pth, .safetensors, HF folder or repo id) or random weights."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from export_engine.errors import CheckpointError, UsageError
from export_engine.models.checkpoints import Checkpoint, load_checkpoint, match_state_dict
from export_engine.models.mast3r.blocks import check_attn_impl
from export_engine.models.mast3r.config import MASt3RConfig
from export_engine.models.mast3r.model import MASt3R, expected_state_dict_shapes

log = logging.getLogger(__name__)

# alias -> canonical: ``dpt.scratch.layer_rn`` holds the same Conv2d objects as ``layer{1..4}_rn``.
ALIASES: dict[str, str] = {
    f"{head}.dpt.scratch.layer_rn.{i}.weight": f"{head}.dpt.scratch.layer{i + 1}_rn.weight"
    for head in ("downstream_head1", "downstream_head2")
    for i in range(4)
}

_BIAS_STD = 0.02
_NORM_STD = 0.02
_MASK_TOKEN_STD = 0.02
# Scales the last DPT conv down so the exp-based outputs (expm1(|xyz|), exp(conf)) stay moderate.
_LAST_DPT_CONV = "dpt.head.4.weight"
_LAST_DPT_CONV_SCALE = 0.1


def init_random_weights(model: MASt3R, seed: int) -> None:
    """Deterministic random weights: same seed -> same values, whatever the model's dtype or device.

    Linear/Conv weights ~ N(0, 1/fan_in) (ConvTranspose: fan_in = C_in), biases ~ N(0, 0.02²),
    LayerNorm weight ~ 1 + N(0, 0.02²), bias ~ N(0, 0.02²), mask_token ~ N(0, 0.02²); ``dpt.head.4.weight``
    of both heads is then multiplied by 0.1. Aliased parameters are drawn once.
    """
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, param in model.named_parameters():  # deduplicated: aliases are visited once
            owner_name, _, kind = name.rpartition(".")
            mean, std = _init_stats(name, modules[owner_name], kind, param)
            if name.endswith(_LAST_DPT_CONV):
                std *= _LAST_DPT_CONV_SCALE
            _fill_normal(param, mean, std, generator)


def _init_stats(name: str, owner: nn.Module, kind: str, param: torch.Tensor) -> tuple[float, float]:
    if name == "mask_token":
        return 0.0, _MASK_TOKEN_STD
    if isinstance(owner, nn.LayerNorm):
        return (1.0 if kind == "weight" else 0.0), _NORM_STD
    if isinstance(owner, nn.Linear | nn.Conv2d | nn.ConvTranspose2d):
        if kind == "bias":
            return 0.0, _BIAS_STD
        # Conv2d/Linear weight (out, in/groups, *k): fan_in = in*k*k; ConvTranspose2d weight (in, out, *k).
        fan_in = param.shape[0] if isinstance(owner, nn.ConvTranspose2d) else param[0].numel()
        return 0.0, 1.0 / math.sqrt(fan_in)
    raise UsageError(f"init_random_weights: no rule for parameter {name} of {type(owner).__name__}")


def _fill_normal(param: torch.Tensor, mean: float, std: float, generator: torch.Generator) -> None:
    if param.device.type == "cpu" and param.dtype == torch.float32:
        param.normal_(mean, std, generator=generator)
    else:  # draw in float32 on the CPU so the values do not depend on dtype/device
        param.copy_(torch.empty(param.shape, dtype=torch.float32).normal_(mean, std, generator=generator))


def build_mast3r(
    config: MASt3RConfig | None = None,
    checkpoint: str | None = None,
    random_seed: int | None = None,
    attn_impl: str = "explicit",
) -> tuple[MASt3R, Checkpoint | None, MASt3RConfig]:
    """A ready-to-run MASt3R (eval mode, no grad) from exactly one of ``checkpoint`` / ``random_seed``.

    Without ``config``, the configuration comes from the checkpoint (``args.model`` constructor string of an
    official .pth, or an HF ``config.json``), else the official one.
    """
    if (checkpoint is None) == (random_seed is None):
        raise UsageError("build_mast3r needs exactly one of checkpoint or random_seed")
    check_attn_impl(attn_impl)
    if random_seed is not None:
        config = config or MASt3RConfig.official()
        model = _empty_model(config, attn_impl)
        model.to_empty(device="cpu")
        init_random_weights(model, random_seed)
        return _ready(model), None, config

    assert checkpoint is not None
    ckpt = load_checkpoint(checkpoint, state_dict_keys=("model",))
    if config is None:
        config = config_from_checkpoint(ckpt)
    state_dict = match_state_dict(
        ckpt.state_dict, expected_state_dict_shapes(config), model_name="MASt3R", aliases=ALIASES
    )
    converted = sorted({str(v.dtype) for v in state_dict.values() if v.dtype != torch.float32})
    if converted:
        log.info("MASt3R checkpoint %s: converting %s weights to float32", ckpt.source, ", ".join(converted))
        state_dict = {k: v.to(torch.float32) for k, v in state_dict.items()}
    model = _empty_model(config, attn_impl)
    # assign=True adopts the loaded tensors instead of copying them (the official file is 2.75 GB).
    model.load_state_dict(state_dict, strict=True, assign=True)
    log.info("MASt3R: loaded %d tensors from %s (sha256 %s)", len(state_dict), ckpt.source, ckpt.sha256[:12])
    return _ready(model), ckpt, config


def config_from_checkpoint(ckpt: Checkpoint) -> MASt3RConfig:
    """The configuration a checkpoint describes: its ``args.model`` string, its HF config, else official.

    Upstream's head factory hard-codes the DPT widths (256 / 128 / [96, 192, 384, 768]), so a constructor
    string cannot state them; unless the description has an explicit "dpt" section they are read from the
    tensor shapes (scratch.layer{1..4}_rn, head.2), which lets small test models load from their own files.
    """
    hf_config = ckpt.meta.get("hf_config")
    try:
        if "args_model" in ckpt.meta:
            config = MASt3RConfig.from_constructor_string(ckpt.meta["args_model"])
        elif isinstance(hf_config, dict):
            config = MASt3RConfig.from_json(hf_config)
        else:
            log.info("MASt3R checkpoint %s has no model description; assuming the official one", ckpt.source)
            config = MASt3RConfig.official()
    except UsageError as err:
        raise CheckpointError(
            f"checkpoint {ckpt.source}: its model description cannot be used ({err}); pass an explicit config"
        ) from err
    if isinstance(hf_config, dict) and ("dpt" in hf_config or "rope_base" in hf_config):
        return config
    dims = _dpt_dims_from_shapes(ckpt.state_dict)
    if dims and any(getattr(config, k) != v for k, v in dims.items()):
        log.info("MASt3R checkpoint %s: DPT widths read from tensor shapes: %s", ckpt.source, dims)
        try:
            config = dataclasses.replace(config, **dims)
        except UsageError as err:
            raise CheckpointError(f"checkpoint {ckpt.source}: DPT tensor shapes are inconsistent ({err})") from err
    return config


def _dpt_dims_from_shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    prefix = "downstream_head1.dpt."
    names = [f"{prefix}scratch.layer{i}_rn.weight" for i in range(1, 5)] + [f"{prefix}head.2.weight"]
    shapes = [tuple(state_dict[n].shape) for n in names if n in state_dict]
    if len(shapes) != len(names) or any(len(shape) != 4 for shape in shapes):
        return {}  # not a MASt3R layout: match_state_dict reports the keys
    return {
        "dpt_feature_dim": shapes[0][0],
        "dpt_layer_dims": tuple(shape[1] for shape in shapes[:4]),
        "dpt_last_dim": shapes[4][0],
    }


def _empty_model(config: MASt3RConfig, attn_impl: str) -> MASt3R:
    with torch.device("meta"):  # no default init: every weight is overwritten anyway
        return MASt3R(config, attn_impl)


def _ready(model: MASt3R) -> MASt3R:
    model.requires_grad_(False)
    return model.eval()
