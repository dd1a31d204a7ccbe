"""MASt3R hyperparameters, and how to read them from upstream constructor strings / keyword dicts / JSON.

Upstream builds the model from a Python constructor string (``ckpt['args'].model``) that its loader
``eval()``s. We never evaluate it: :meth:`MASt3RConfig.from_constructor_string` parses it with ``ast`` and
reads every keyword value with ``ast.literal_eval`` (the names ``inf`` / ``-inf`` are the only extension).
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from export_engine.errors import UsageError

log = logging.getLogger(__name__)

INF = math.inf
Mode = tuple[str, float, float]

# `model_string_instantiated` of the official checkpoint: the training string after upstream load_model's
# rewrite (ManyAR_PatchEmbed -> PatchEmbedDust3R, landscape_only=False).
OFFICIAL_CONSTRUCTOR = (
    "AsymmetricMASt3R(pos_embed='RoPE100', patch_embed_cls='PatchEmbedDust3R', img_size=(512, 512), "
    "head_type='catmlp+dpt', output_mode='pts3d+desc24', depth_mode=('exp', -inf, inf), "
    "conf_mode=('exp', 1, inf), enc_embed_dim=1024, enc_depth=24, enc_num_heads=16, dec_embed_dim=768, "
    "dec_depth=12, dec_num_heads=12, two_confs=True, desc_conf_mode=('exp', 0, inf), landscape_only=False)"
)

# Defaults of the upstream constructors (AsymmetricMASt3R -> AsymmetricCroCo3DStereo -> CroCoNet): a keyword
# missing from a constructor string means this value, exactly as when upstream evaluates the string.
_UPSTREAM_DEFAULTS: dict[str, Any] = {
    "img_size": 224,
    "patch_size": 16,
    "enc_embed_dim": 768,
    "enc_depth": 12,
    "enc_num_heads": 12,
    "dec_embed_dim": 512,
    "dec_depth": 8,
    "dec_num_heads": 16,
    "mlp_ratio": 4.0,
    "norm_im2_in_dec": True,
    "pos_embed": "cosine",
    "output_mode": "pts3d",
    "head_type": "linear",
    "depth_mode": ("exp", -INF, INF),
    "conf_mode": ("exp", 1, INF),
    "landscape_only": True,
    "patch_embed_cls": "PatchEmbedDust3R",
    "desc_mode": "norm",
    "two_confs": False,
    "desc_conf_mode": None,
}
_PATCH_EMBED_CLASSES = ("PatchEmbedDust3R", "ManyAR_PatchEmbed")
_DEPTH_MODES = ("exp", "linear", "square")


@dataclass(frozen=True)
class MASt3RConfig:
    """Every hyperparameter of the MASt3R inference model; defaults are the official checkpoint's."""

    enc_embed_dim: int = 1024
    enc_depth: int = 24
    enc_num_heads: int = 16
    dec_embed_dim: int = 768
    dec_depth: int = 12
    dec_num_heads: int = 12
    patch_size: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    rope_base: float = 100.0
    rope_f0: float = 1.0
    local_feat_dim: int = 24
    hidden_dim_factor: float = 4.0
    two_confs: bool = True
    depth_mode: Mode = ("exp", -INF, INF)
    conf_mode: Mode = ("exp", 1.0, INF)
    desc_conf_mode: Mode = ("exp", 0.0, INF)
    desc_mode: str = "norm"
    dpt_feature_dim: int = 256
    dpt_last_dim: int = 128
    dpt_layer_dims: tuple[int, int, int, int] = (96, 192, 384, 768)
    dpt_hooks: tuple[int, int, int, int] | None = None  # None -> [0, L*2//4, L*3//4, L], L = dec_depth
    # Recorded for provenance only: the model always runs the inference path (see from_constructor_kwargs).
    patch_embed_cls: str = "PatchEmbedDust3R"
    landscape_only: bool = False
    img_size: tuple[int, int] = (512, 512)

    def __post_init__(self) -> None:
        for name in (
            "enc_embed_dim",
            "enc_depth",
            "enc_num_heads",
            "dec_embed_dim",
            "dec_depth",
            "dec_num_heads",
            "patch_size",
            "local_feat_dim",
            "dpt_feature_dim",
            "dpt_last_dim",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"MASt3R config: {name} must be a positive integer, got {value!r}")
        for dim, heads, where in (
            (self.enc_embed_dim, self.enc_num_heads, "encoder"),
            (self.dec_embed_dim, self.dec_num_heads, "decoder"),
        ):
            if dim % heads or (dim // heads) % 4:
                raise UsageError(
                    f"MASt3R config: {where} width {dim} / {heads} heads must give a head dim divisible by 4 "
                    f"(2-D RoPE rotates pairs within the y and x halves)"
                )
        if self.dpt_feature_dim % 2:
            raise UsageError(f"MASt3R config: dpt_feature_dim must be even, got {self.dpt_feature_dim}")
        if len(self.dpt_layer_dims) != 4:
            raise UsageError(f"MASt3R config: dpt_layer_dims needs 4 values, got {self.dpt_layer_dims}")
        if self.dpt_hooks is not None:
            hooks = tuple(self.dpt_hooks)
            default = (0, self.dec_depth * 2 // 4, self.dec_depth * 3 // 4, self.dec_depth)
            # Hooks equal to the upstream formula are stored as None so equal models compare equal.
            object.__setattr__(self, "dpt_hooks", None if hooks == default else hooks)
        hooks = self.hooks
        if len(hooks) != 4 or hooks[0] != 0 or not all(1 <= h <= self.dec_depth for h in hooks[1:]):
            raise UsageError(
                f"MASt3R config: dpt_hooks must be [0, h1, h2, h3] with 1 <= h <= dec_depth={self.dec_depth} "
                f"(hook 0 is the encoder output), got {list(hooks)}"
            )
        _check_mode("depth_mode", self.depth_mode, _DEPTH_MODES)
        if self.depth_mode[1:] != (-INF, INF):
            raise UsageError(
                f"MASt3R config: bounded depth_mode {self.depth_mode} is not supported (upstream asserts no bounds)"
            )
        _check_mode("conf_mode", self.conf_mode, ("exp",))
        _check_mode("desc_conf_mode", self.desc_conf_mode, ("exp",))
        if self.desc_mode != "norm":
            raise UsageError(f"MASt3R config: desc_mode {self.desc_mode!r} is not supported; valid: 'norm'")

    @property
    def hooks(self) -> tuple[int, ...]:
        """Indices into the decoder output list [encoder, block 1, ..., block L] that feed the DPT."""
        if self.dpt_hooks is not None:
            return tuple(self.dpt_hooks)
        depth = self.dec_depth
        return (0, depth * 2 // 4, depth * 3 // 4, depth)

    # ------------------------------------------------------------------------------------------------------
    # Constructors

    @classmethod
    def official(cls) -> MASt3RConfig:
        """The official inference model (MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric)."""
        return cls.from_constructor_string(OFFICIAL_CONSTRUCTOR)

    @classmethod
    def from_constructor_kwargs(cls, kwargs: Mapping[str, Any], dpt: Mapping[str, Any] | None = None) -> MASt3RConfig:
        """Build from upstream ``AsymmetricMASt3R(**kwargs)`` keywords plus an optional DPT section.

        Keywords the inference model does not use (``freeze``, ``mask_ratio``, ...) are ignored. As upstream
        ``load_model`` does, ``ManyAR_PatchEmbed`` / ``landscape_only=True`` (the training path) become the
        inference path (``PatchEmbedDust3R``, ``landscape_only=False``): same weights, same outputs.
        """
        kw = {**_UPSTREAM_DEFAULTS, **dict(kwargs)}
        values: dict[str, Any] = {}
        for name in (
            "enc_embed_dim",
            "enc_depth",
            "enc_num_heads",
            "dec_embed_dim",
            "dec_depth",
            "dec_num_heads",
            "patch_size",
        ):
            values[name] = _int(name, kw[name])
        values["mlp_ratio"] = _float("mlp_ratio", kw["mlp_ratio"])
        values["img_size"] = _img_size(kw["img_size"])

        if kw["head_type"] != "catmlp+dpt":
            raise UsageError(f"MASt3R config: head_type {kw['head_type']!r} is not supported; valid: 'catmlp+dpt'")
        found = re.fullmatch(r"pts3d\+desc(\d+)", str(kw["output_mode"]))
        if not found:
            raise UsageError(
                f"MASt3R config: output_mode {kw['output_mode']!r} is not supported; expected 'pts3d+desc<N>'"
            )
        values["local_feat_dim"] = int(found.group(1))
        found = re.fullmatch(r"RoPE(\d+(?:\.\d*)?)", str(kw["pos_embed"]))
        if not found:
            raise UsageError(
                f"MASt3R config: pos_embed {kw['pos_embed']!r} is not supported; expected 'RoPE<base>' (e.g. 'RoPE100')"
            )
        values["rope_base"] = float(found.group(1))
        if kw["norm_im2_in_dec"] is not True:
            raise UsageError("MASt3R config: norm_im2_in_dec=False is not supported (every MASt3R uses True)")
        if kw["patch_embed_cls"] not in _PATCH_EMBED_CLASSES:
            raise UsageError(
                f"MASt3R config: patch_embed_cls {kw['patch_embed_cls']!r} is not supported; valid: "
                f"{list(_PATCH_EMBED_CLASSES)}"
            )
        if kw["patch_embed_cls"] != "PatchEmbedDust3R" or kw["landscape_only"]:
            log.info(
                "MASt3R config: training path (%s, landscape_only=%s) mapped to the inference path "
                "(PatchEmbedDust3R, landscape_only=False) as upstream load_model does",
                kw["patch_embed_cls"],
                kw["landscape_only"],
            )
        values["two_confs"] = _bool("two_confs", kw["two_confs"])
        values["depth_mode"] = _mode("depth_mode", kw["depth_mode"])
        values["conf_mode"] = _mode("conf_mode", kw["conf_mode"])
        if values["two_confs"]:
            values["desc_conf_mode"] = _mode("desc_conf_mode", kw["desc_conf_mode"])
        values["desc_mode"] = str(kw["desc_mode"])
        values.update(_dpt_values(dpt or {}))
        return cls(**values)

    @classmethod
    def from_constructor_string(cls, text: str) -> MASt3RConfig:
        """Parse ``AsymmetricMASt3R(key=literal, ...)`` safely (no eval) and build the config."""
        return cls.from_constructor_kwargs(parse_constructor_string(text))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MASt3RConfig:
        """Build from a reference config.json ({"constructor_kwargs" | "constructor_string", "dpt"}), a flat
        Hugging Face config.json of constructor keywords (optionally with a "dpt" section), or to_dict output.
        """
        if not isinstance(data, Mapping):
            raise UsageError(f"MASt3R config: expected a JSON object, got {type(data).__name__}")
        dpt = data.get("dpt")
        if dpt is not None and not isinstance(dpt, Mapping):
            raise UsageError(f"MASt3R config: 'dpt' must be an object, got {type(dpt).__name__}")
        if "rope_base" in data:
            return cls.from_dict(data)
        if "constructor_kwargs" in data:
            kwargs = data["constructor_kwargs"]
            if not isinstance(kwargs, Mapping):
                raise UsageError("MASt3R config: 'constructor_kwargs' must be an object")
            return cls.from_constructor_kwargs(kwargs, dpt)
        if "constructor_string" in data:
            return cls.from_constructor_kwargs(parse_constructor_string(str(data["constructor_string"])), dpt)
        return cls.from_constructor_kwargs({k: v for k, v in data.items() if k != "dpt"}, dpt)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (infinities as the strings "inf" / "-inf"); inverse of :meth:`from_dict`."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MASt3RConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UsageError(f"MASt3R config: unknown fields {unknown}; valid: {sorted(names)}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("depth_mode", "conf_mode", "desc_conf_mode"):
                values[key] = _mode(key, value)
            elif isinstance(value, list):
                values[key] = tuple(value)
            else:
                values[key] = value
        return cls(**values)


# ----------------------------------------------------------------------------------------------------------
# Safe constructor-string parsing


class _InfNames(ast.NodeTransformer):
    """Replace the bare names ``inf`` (upstream strings write ``-inf``/``inf``) by float constants."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id == "inf":
            return ast.copy_location(ast.Constant(INF), node)
        raise UsageError(f"MASt3R constructor string: name {node.id!r} is not a literal (only 'inf' is)")


def parse_constructor_string(text: str) -> dict[str, Any]:
    """``"AsymmetricMASt3R(a=1, b=('exp', -inf, inf))"`` -> ``{"a": 1, "b": ("exp", -inf, inf)}``."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise UsageError(f"MASt3R constructor string is not valid Python syntax ({err.msg}): {text[:120]!r}") from err
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "AsymmetricMASt3R"):
        raise UsageError(f"MASt3R constructor string must be a single call AsymmetricMASt3R(...), got {text[:120]!r}")
    if call.args:
        raise UsageError("MASt3R constructor string: positional arguments are not supported; use keywords")
    kwargs: dict[str, Any] = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            raise UsageError("MASt3R constructor string: **kwargs expansion is not supported")
        if keyword.arg in kwargs:
            raise UsageError(f"MASt3R constructor string: keyword {keyword.arg!r} given twice")
        try:
            kwargs[keyword.arg] = ast.literal_eval(_InfNames().visit(keyword.value))
        except ValueError as err:
            raise UsageError(
                f"MASt3R constructor string: value of {keyword.arg!r} is not a literal "
                f"({ast.unparse(keyword.value)[:80]!r})"
            ) from err
    return kwargs


# ----------------------------------------------------------------------------------------------------------
# Value helpers


def _dpt_values(dpt: Mapping[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if "feature_dim" in dpt:
        values["dpt_feature_dim"] = _int("dpt.feature_dim", dpt["feature_dim"])
    if "last_dim" in dpt:
        values["dpt_last_dim"] = _int("dpt.last_dim", dpt["last_dim"])
    if "layer_dims" in dpt:
        values["dpt_layer_dims"] = tuple(_int("dpt.layer_dims", v) for v in _seq("dpt.layer_dims", dpt["layer_dims"]))
    if dpt.get("hooks") is not None:
        values["dpt_hooks"] = tuple(_int("dpt.hooks", v) for v in _seq("dpt.hooks", dpt["hooks"]))
    return values


def _check_mode(name: str, mode: Any, valid: tuple[str, ...]) -> None:
    if not (isinstance(mode, tuple) and len(mode) == 3 and mode[0] in valid):
        raise UsageError(
            f"MASt3R config: {name} {mode!r} is not supported; expected (one of {list(valid)}, vmin, vmax)"
        )


def _mode(name: str, value: Any) -> Mode:
    items = _seq(name, value)
    if len(items) != 3 or not isinstance(items[0], str):
        raise UsageError(f"MASt3R config: {name} must be (mode, vmin, vmax), got {value!r}")
    return (items[0], _float(name, items[1]), _float(name, items[2]))


def _seq(name: str, value: Any) -> list[Any]:
    if isinstance(value, list | tuple):
        return list(value)
    raise UsageError(f"MASt3R config: {name} must be a list, got {value!r}")


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"MASt3R config: {name} must be an integer, got {value!r}")
    return value


def _float(name: str, value: Any) -> float:
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity", "-inf", "-infinity"):
        return float(value)  # float() understands inf / -inf / Infinity
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"MASt3R config: {name} must be a number, got {value!r}")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"MASt3R config: {name} must be true or false, got {value!r}")
    return value


def _img_size(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    items = _seq("img_size", value)
    if len(items) != 2:
        raise UsageError(f"MASt3R config: img_size must be an int or (height, width), got {value!r}")
    return (_int("img_size", items[0]), _int("img_size", items[1]))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value
