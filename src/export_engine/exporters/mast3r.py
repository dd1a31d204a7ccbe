"""MASt3R as exported graphs: an encoder (images -> tokens) and a decoder+heads graph (two token sets -> outputs).

Split so that a deployment encodes each image once and matches it against many. Both graphs are exported at
one resolution (``--resolution WxH``, landscape or portrait): the network is not transpose-equivariant and the
DPT head's grid sizes follow from H and W, so a portrait image needs a portrait artifact. The batch axis is
dynamic in both graphs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export_engine.calibration.synthetic import structured_images
from export_engine.config import Precision, Resolution
from export_engine.core.types import Feed, ModelSpec, TensorSpec, Tolerance
from export_engine.errors import UsageError
from export_engine.exporters.spec import FamilySpec, GraphModule, LoadedModel
from export_engine.families import MAST3R
from export_engine.families.mast3r.session import OUTPUT_NAMES

# FP32 ONNX Runtime vs PyTorch on the CPU: the full-size model measured <= 2.3e-5 absolute on every output;
# these bounds leave ~10x margin and still catch any layout bug.
_FP32_TOKENS = Tolerance(atol=2e-4, rtol=1e-3)
_FP32_OUTPUT = Tolerance(atol=2e-4, rtol=1e-3)
# FP16 / hybrid vs the FP32 ONNX with FP16 storage emulated. Measured: naive FP16 of the full model (random
# weights) reached 1.5e-2 on pts3d and 2e-2 on desc_conf (export_feasibility.md); hybrid on the tiny graphs
# <= 1.5e-2. Half-precision rounding makes a few elements near zero exceed any relative bound, so 0.1 % of the
# elements may; an overflow (inf/NaN) or a systematic error fails regardless.
_HALF_TOKENS = Tolerance(atol=3e-2, rtol=3e-2, max_share=1e-3)
_HALF_OUTPUT = {
    "pts3d": Tolerance(atol=3e-2, rtol=3e-2, max_share=1e-3),
    "pts3d_in_other_view": Tolerance(atol=3e-2, rtol=3e-2, max_share=1e-3),
    "conf": Tolerance(atol=3e-2, rtol=3e-2, max_share=1e-3),
    "desc": Tolerance(atol=3e-2, rtol=3e-2, max_share=1e-3),
    "desc_conf": Tolerance(atol=5e-2, rtol=5e-2, max_share=1e-3),
}

# The reference small model (shared/reference/mast3r/config.json) doubles as the tiny test configuration.
TINY_CONFIG: dict[str, Any] = {
    "constructor_kwargs": {
        "pos_embed": "RoPE100",
        "patch_embed_cls": "PatchEmbedDust3R",
        "img_size": [512, 512],
        "head_type": "catmlp+dpt",
        "output_mode": "pts3d+desc8",
        "depth_mode": ["exp", float("-inf"), float("inf")],
        "conf_mode": ["exp", 1, float("inf")],
        "enc_embed_dim": 96,
        "enc_depth": 3,
        "enc_num_heads": 3,
        "dec_embed_dim": 64,
        "dec_depth": 4,
        "dec_num_heads": 2,
        "two_confs": True,
        "desc_conf_mode": ["exp", 0, float("inf")],
        "landscape_only": False,
    },
    "dpt": {"feature_dim": 32, "last_dim": 16, "layer_dims": [16, 24, 32, 48], "hooks": [0, 2, 3, 4]},
}


class EncoderGraph(GraphModule):
    """images (B, 3, H, W) -> encoder tokens (B, H/16 * W/16, enc_dim), after enc_norm."""

    uses = ("patch_embed", "enc_blocks", "enc_norm")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images)


class DecoderGraph(GraphModule):
    """(tokens of view 1, tokens of view 2) -> the 8 outputs, both views at the graph's resolution."""

    uses = ("decoder_embed", "dec_blocks", "dec_blocks2", "dec_norm", "downstream_head1", "downstream_head2")

    def __init__(self, model: nn.Module, height: int, width: int):
        super().__init__(model)
        self.shape = (height, width)

    def forward(self, feat1: torch.Tensor, feat2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.decode(feat1, feat2, self.shape, self.shape)
        return tuple(out[name] for name in OUTPUT_NAMES)


def load(config_json: Mapping[str, Any] | None, checkpoint: str | None, seed: int | None,
         attention: str = "dense") -> LoadedModel:  # fmt: skip
    from export_engine.models.mast3r.checkpoint import build_mast3r
    from export_engine.models.mast3r.config import MASt3RConfig

    config = MASt3RConfig.from_json(config_json) if config_json is not None else None
    model, ckpt, resolved = build_mast3r(config, checkpoint, seed)
    return LoadedModel(
        module=model,
        config=resolved,
        checkpoint_source=ckpt.source if ckpt else None,
        checkpoint_sha256=ckpt.sha256 if ckpt else None,
        seed=seed,
    )


def graphs(config: Any, shape_text: str | None) -> tuple[ModelSpec, ...]:
    res = Resolution.parse(shape_text or "512x384", multiple_of=config.patch_size)
    h, w = res.height, res.width
    n = (h // config.patch_size) * (w // config.patch_size)
    desc = config.local_feat_dim
    tokens = lambda name: TensorSpec(name, ("batch", n, config.enc_embed_dim))  # noqa: E731
    encoder = ModelSpec(
        name="encoder",
        build_module=EncoderGraph,
        inputs=(TensorSpec("images", ("batch", 3, h, w)),),
        outputs=(tokens("tokens"),),
        tolerances={
            Precision.FP32: {"tokens": _FP32_TOKENS},
            Precision.FP16: {"tokens": _HALF_TOKENS},
            Precision.HYBRID: {"tokens": _HALF_TOKENS},
        },
        expected_counts={"attention": config.enc_depth},
        shape_notes={"resolution": str(res), "batch": "dynamic", "tokens_per_image": n},
        profile_dims={"batch": (1, 2, 8)},  # a pair is encoded as one batch of 2
    )
    view_shapes = {"pts3d": (3,), "conf": (), "desc": (desc,), "desc_conf": ()}
    outputs = []
    for name in OUTPUT_NAMES:
        kind = name.split("_", 1)[1].replace("pts3d_in_other_view", "pts3d")
        outputs.append(TensorSpec(name, ("batch", h, w, *view_shapes[kind])))
    decoder = ModelSpec(
        name="decoder",
        build_module=lambda model: DecoderGraph(model, h, w),
        inputs=(tokens("feat1"), tokens("feat2")),
        outputs=tuple(outputs),
        tolerances={
            Precision.FP32: {name: _FP32_OUTPUT for name in OUTPUT_NAMES},
            Precision.FP16: {name: _HALF_OUTPUT[name.split("_", 1)[1]] for name in OUTPUT_NAMES},
            Precision.HYBRID: {name: _HALF_OUTPUT[name.split("_", 1)[1]] for name in OUTPUT_NAMES},
        },
        expected_counts={"attention": 4 * config.dec_depth},
        shape_notes={"resolution": str(res), "batch": "dynamic", "views": "both views at the resolution"},
        profile_dims={"batch": (1, 1, 4)},
    )
    return (encoder, decoder)


def parity_feeds(loaded: LoadedModel, specs: tuple[ModelSpec, ...], samples: int, seed: int) -> dict[str, list[Feed]]:
    """Structured image pairs for the encoder; the torch encoder's tokens of each pair for the decoder."""
    _, _, h, w = specs[0].inputs[0].shape
    assert isinstance(h, int) and isinstance(w, int)
    return _pair_feeds(loaded, specs, [structured_images(2, h, w, seed + i) for i in range(samples)])


def user_feeds(loaded: LoadedModel, specs: tuple[ModelSpec, ...], folder: Path, seed: int) -> dict[str, list[Feed]]:
    """The user's photos (png/jpg, loaded the MASt3R way at the graph's resolution), paired in name order."""
    from export_engine.families.mast3r.images import load_image

    _, _, h, w = specs[0].inputs[0].shape
    assert isinstance(h, int) and isinstance(w, int)
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(files) < 2:
        raise UsageError(f"calibration folder {folder} needs at least 2 images (.png/.jpg) for MASt3R pairs")
    images = [load_image(f, w, h).tensor[0] for f in files]
    pairs = [np.stack((images[i], images[(i + 1) % len(images)])) for i in range(0, len(images), 2)]
    return _pair_feeds(loaded, specs, pairs)


def _pair_feeds(loaded: LoadedModel, specs: tuple[ModelSpec, ...], pairs: list[np.ndarray]) -> dict[str, list[Feed]]:
    from export_engine.runners.torch_cpu import reference_outputs

    encoder, _ = specs
    encoder_feeds = [{"images": pair.astype(np.float32)} for pair in pairs]
    tokens = reference_outputs(encoder.build_module(loaded.module), encoder, encoder_feeds)
    decoder_feeds = [{"feat1": t["tokens"][0:1], "feat2": t["tokens"][1:2]} for t in tokens]
    return {"encoder": encoder_feeds, "decoder": decoder_feeds}


FAMILY = FamilySpec(
    name="mast3r",
    summary="MASt3R ViT-L/ViT-B image matcher (encoder graph + decoder/heads graph)",
    runtime=MAST3R,
    load=load,
    graphs=graphs,
    parity_feeds=parity_feeds,
    user_feeds=user_feeds,
    shape_option="--resolution WxH (multiples of 16; landscape or portrait)",
    default_shape="512x384",
    validate_shape=lambda text: Resolution.parse(text or "512x384"),
    tiny_config=lambda: TINY_CONFIG,
    tiny_shape="80x48",
)
