"""FastSAM3D sizes: one frozen dataclass, the released configuration, and JSON round-tripping.

Field names follow the ``model`` section of the reference ``config.json`` (which mirrors the upstream
constructor arguments) plus the constants upstream hard-codes (LayerNorm eps values, qkv bias).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from export_engine.errors import UsageError

log = logging.getLogger(__name__)

# Keys of the reference config.json / state_dict_full.json that name a field differently.
_ALIASES = {"layer_norm_eps": "encoder_layernorm_eps"}
# Descriptive entries of the reference ``fixed_constants`` section that are not knobs (activations etc.).
_DESCRIPTIVE_CONSTANTS = frozenset(
    {"encoder_act", "decoder_mlp_act", "upscaling_act", "mask_downscaling_act", "final_upscale"}
)


@dataclass(frozen=True)
class FastSAM3DConfig:
    """Every size of the FastSAM3D network (image encoder, prompt encoder, mask decoder)."""

    # Image encoder (3D ViT, FastSAM3D:segment_anything/modeling/image_encoder3D.py).
    img_size: int = 128
    patch_size: int = 16
    in_chans: int = 1
    encoder_embed_dim: int = 768
    encoder_depth: int = 6
    encoder_num_heads: int = 6
    mlp_ratio: float = 4.0
    skip_layer: int = 2  # the first `skip_layer` blocks are MLP-only
    window_size: int = 0  # 0 = every attention block global (the only supported value)
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)  # irrelevant while window_size == 0
    layeroutput: int = 2  # upstream returns a list entry every `layeroutput` blocks (distillation only)
    # Prompt encoder and mask decoder (SAM-Med3D prompt_encoder3D.py / mask_decoder3D.py).
    prompt_embed_dim: int = 384
    mask_in_chans: int = 16
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    decoder_transformer_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    attention_downsample_rate: int = 2
    # Encoder attention: "dense" (the released encoder: global attention with relative-position bias) or
    # "sparse" (the paper's "3D sparse flash attention": plain attention inside strided token groups of
    # sparse_segment_size, no bias, output left in group order; see image_encoder.RelPosAttention3D).
    encoder_attention: str = "dense"
    sparse_segment_size: int = 64
    # Constants upstream hard-codes.
    encoder_layernorm_eps: float = 1e-6
    layernorm3d_eps: float = 1e-6
    decoder_layernorm_eps: float = 1e-5
    qkv_bias: bool = True
    use_rel_pos: bool = True
    use_abs_pos: bool = True

    def __post_init__(self) -> None:
        indexes = self.global_attn_indexes
        if not isinstance(indexes, list | tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in indexes
        ):
            raise UsageError(f"FastSAM3D config: global_attn_indexes must be a list of ints, got {indexes!r}")
        object.__setattr__(self, "global_attn_indexes", tuple(indexes))
        if self.encoder_attention not in ("dense", "sparse"):
            raise UsageError(
                f"FastSAM3D config: encoder_attention must be 'dense' or 'sparse', got {self.encoder_attention!r}"
            )
        if self.sparse_segment_size < 1:
            raise UsageError(f"FastSAM3D config: sparse_segment_size must be >= 1, got {self.sparse_segment_size}")
        _validate(self)

    # ---------------------------------------------------------------- derived sizes
    @property
    def grid(self) -> int:
        """Token grid edge g: the image embedding is (C, g, g, g)."""
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**3

    @property
    def encoder_head_dim(self) -> int:
        return self.encoder_embed_dim // self.encoder_num_heads

    @property
    def mask_input_size(self) -> int:
        """Edge of the low-res mask logits (decoder output and mask prompt input): 4 x grid."""
        return 4 * self.grid

    @property
    def num_mask_tokens(self) -> int:
        return self.num_multimask_outputs + 1

    # ---------------------------------------------------------------- constructors
    @classmethod
    def released(cls) -> FastSAM3DConfig:
        """The released FastSAM3D checkpoint: 6 x 768 encoder (6 heads, 2 MLP-only blocks), 128^3 input."""
        return cls()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FastSAM3DConfig:
        """Accept the reference ``config.json`` layout (sizes under ``model``) or a flat dict of fields.

        In the reference layouts (config.json: ``model`` + ``fixed_constants``; state_dict_full.json:
        ``config``) everything else is ignored (``name``, ``derived``, ``cases``...), and so are unknown keys
        inside those sections, with a warning. In a flat dict an unknown key is an error (a typo).
        """
        if not isinstance(data, Mapping):
            raise UsageError(f"FastSAM3D config must be a JSON object, got {type(data).__name__}")
        document = True
        if "model" in data and isinstance(data["model"], Mapping):
            values: dict[str, Any] = dict(data["model"])
            constants = data.get("fixed_constants", {})
            if isinstance(constants, Mapping):
                values.update({k: v for k, v in constants.items() if k not in _DESCRIPTIVE_CONSTANTS})
        elif "config" in data and isinstance(data["config"], Mapping):  # state_dict_full.json layout
            values = dict(data["config"])
        else:
            values, document = dict(data), False
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in values.items():
            name = _ALIASES.get(key, key)
            if name not in known:
                unknown.append(key)
            elif name in kwargs and kwargs[name] != value:
                raise UsageError(f"FastSAM3D config: {name} is given twice (as {key!r} too) with different values")
            else:
                kwargs[name] = value
        if unknown and document:
            log.warning("FastSAM3D config: ignoring unknown model field(s) %s", sorted(unknown))
        elif unknown:
            raise UsageError(f"FastSAM3D config: unknown field(s) {sorted(unknown)}; valid fields: {sorted(known)}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able flat dict; ``from_json(to_dict())`` gives an equal config."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["global_attn_indexes"] = list(self.global_attn_indexes)
        return out


def _validate(cfg: FastSAM3DConfig) -> None:
    """Raise UsageError for any size the network cannot be built with; messages name the field."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise UsageError(f"FastSAM3D config: {f.name} must be an integer, got {value!r}")
        if f.type == "int" and value < 1 and f.name not in ("skip_layer", "window_size"):
            raise UsageError(f"FastSAM3D config: {f.name} must be a positive integer, got {value!r}")
    for name in ("encoder_layernorm_eps", "layernorm3d_eps", "decoder_layernorm_eps", "mlp_ratio"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise UsageError(f"FastSAM3D config: {name} must be a positive number, got {value!r}")
    for name in ("qkv_bias", "use_rel_pos", "use_abs_pos"):
        if not isinstance(getattr(cfg, name), bool):
            raise UsageError(f"FastSAM3D config: {name} must be true or false, got {getattr(cfg, name)!r}")
    _check(
        cfg.window_size == 0,
        f"window_size must be 0 (windowed attention is not used by FastSAM3D; got {cfg.window_size!r})",
    )
    _check(
        cfg.img_size % cfg.patch_size == 0,
        f"img_size {cfg.img_size} must be a multiple of patch_size {cfg.patch_size}",
    )
    _check(
        cfg.encoder_embed_dim % cfg.encoder_num_heads == 0,
        f"encoder_embed_dim {cfg.encoder_embed_dim} must be divisible by encoder_num_heads {cfg.encoder_num_heads}",
    )
    _check(
        0 <= cfg.skip_layer <= cfg.encoder_depth,
        f"skip_layer {cfg.skip_layer} must lie in 0..encoder_depth ({cfg.encoder_depth})",
    )
    _check(int(cfg.encoder_embed_dim * cfg.mlp_ratio) >= 1, f"mlp_ratio {cfg.mlp_ratio} gives an empty MLP")
    _check(
        cfg.prompt_embed_dim % 3 == 0 and cfg.prompt_embed_dim % 8 == 0,
        f"prompt_embed_dim {cfg.prompt_embed_dim} must be divisible by 3 (Fourier PE: sin, cos, sin) "
        f"and by 8 (decoder upscaling to C/4 and C/8 channels)",
    )
    _check(cfg.mask_in_chans % 4 == 0, f"mask_in_chans {cfg.mask_in_chans} must be divisible by 4")
    internal = cfg.prompt_embed_dim // cfg.attention_downsample_rate
    _check(
        cfg.prompt_embed_dim % cfg.attention_downsample_rate == 0
        and internal % cfg.decoder_num_heads == 0
        and cfg.prompt_embed_dim % cfg.decoder_num_heads == 0,
        f"prompt_embed_dim {cfg.prompt_embed_dim} / attention_downsample_rate "
        f"{cfg.attention_downsample_rate} and prompt_embed_dim itself must be divisible by "
        f"decoder_num_heads {cfg.decoder_num_heads}",
    )


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(f"FastSAM3D config: {message}")
