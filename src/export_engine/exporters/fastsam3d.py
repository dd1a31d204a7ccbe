"""FastSAM3D as exported graphs (SAM convention): an encoder run once per volume and a prompt+decoder graph
run once per click.

* ``encoder``: ``image`` (B, 1, S, S, S) z-normalised crop -> ``image_embedding`` (B, C, g, g, g).
* ``prompt_decoder``: ``image_embedding`` (1, C, g, g, g), ``point_coords`` (B, N, 3) voxel coordinates (d, h, w),
  ``point_labels`` (B, N) int64 in {1, 0, -1}, ``mask_input`` (B, 1, m, m, m) previous low-res logits and
  ``has_mask_input`` (B,) 0/1 -> ``low_res_masks`` (B, 1, m, m, m), ``iou_predictions`` (B, 1) and
  ``masks_upscaled`` (B, 1, S, S, S). ``multimask_output=False`` semantics (channel 0, what every upstream
  inference script uses). The image positional encoding is folded in as a constant; the padding point is
  appended inside the graph, so B and N are dynamic. With ``has_mask_input = 0`` the mask branch is replaced
  by ``no_mask_embed`` (upstream's ``masks=None``), so one graph serves both cases.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export_engine.config import Precision
from export_engine.core.types import Feed, ModelSpec, TensorSpec, Tolerance
from export_engine.errors import UsageError
from export_engine.exporters.spec import FamilySpec, GraphModule, LoadedModel
from export_engine.families import FASTSAM3D
from export_engine.families.fastsam3d.session import (
    _DECODER_OUTPUTS,
    _normalized_volume,
    _prompts,
)

# FP32 ONNX Runtime vs PyTorch: the reference README measured thread-count noise of ~8e-6 on every dense
# array; 1e-4 absolute plus 1e-3 relative keeps a wide margin over it and still fails on any layout bug.
_FP32 = Tolerance(atol=1e-4, rtol=1e-3)
# FP16 / hybrid vs the FP32 ONNX with FP16 storage emulated: the reference README suggests ~2e-2 on embeddings
# and mask logits for fp16 engines; tiny-model hybrid measured <= 1.3e-2. 0.1 % of the elements may exceed it
# (half-precision rounding near zero); inf/NaN or a systematic error fails regardless.
_HALF = {
    "image_embedding": Tolerance(atol=3e-2, rtol=3e-2, max_share=1e-3),
    "low_res_masks": Tolerance(atol=5e-2, rtol=5e-2, max_share=1e-3),
    "iou_predictions": Tolerance(atol=3e-2, rtol=3e-2),
    "masks_upscaled": Tolerance(atol=5e-2, rtol=5e-2, max_share=1e-3),
}

TINY_CONFIG: dict[str, Any] = {
    "model": {
        "img_size": 64,
        "patch_size": 8,
        "in_chans": 1,
        "encoder_embed_dim": 96,
        "encoder_depth": 4,
        "encoder_num_heads": 3,
        "mlp_ratio": 4.0,
        "skip_layer": 2,
        "window_size": 0,
        "global_attn_indexes": [2, 5, 8, 11],
        "layeroutput": 2,
        "prompt_embed_dim": 96,
        "mask_in_chans": 16,
        "num_multimask_outputs": 3,
        "iou_head_depth": 3,
        "iou_head_hidden_dim": 64,
        "decoder_transformer_depth": 2,
        "decoder_mlp_dim": 2048,
        "decoder_num_heads": 8,
        "attention_downsample_rate": 2,
    }
}


class EncoderGraph(GraphModule):
    uses = ("image_encoder",)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode(image)


class PromptDecoderGraph(GraphModule):
    """Prompt encoder + mask decoder for one click (``multimask_output=False``: mask channel 0).

    The image positional encoding depends only on the weights, so it is computed once here and enters the
    graph as a constant (upstream recomputes its sin/cos grid on every call).
    """

    uses = ("prompt_encoder", "mask_decoder")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.size = self.model.config.img_size
        with torch.no_grad():
            self.register_buffer("image_pe", self.model.dense_pe().detach().clone())

    def forward(
        self,
        image_embedding: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sparse, dense = self.model.prompt_encoder(point_coords, point_labels, mask_input, has_mask_input)
        out = self.model.mask_decoder(image_embedding, self.image_pe, sparse, dense)
        low_res, iou = out.low_res_masks[:, :1], out.iou_predictions[:, :1]
        return low_res, iou, self.model.upscale_masks(low_res, self.size)


def load(config_json: Mapping[str, Any] | None, checkpoint: str | None, seed: int | None,
         attention: str = "dense") -> LoadedModel:  # fmt: skip
    """``attention="sparse"``: the encoder's "3D sparse flash attention" variant; the same weights load."""
    import dataclasses

    from export_engine.models.fastsam3d.checkpoint import build_fastsam3d
    from export_engine.models.fastsam3d.config import FastSAM3DConfig

    config = FastSAM3DConfig.from_json(config_json) if config_json is not None else None
    if attention != "dense":
        config = dataclasses.replace(config or FastSAM3DConfig.released(), encoder_attention=attention)
    model, ckpt, resolved = build_fastsam3d(config, checkpoint, seed)
    return LoadedModel(model, resolved, ckpt.source if ckpt else None, ckpt.sha256 if ckpt else None, seed)


def validate_shape(text: str | None) -> None:
    if text is not None:
        raise UsageError(
            "fastsam3d takes its volume size from the configuration (img_size, 128 for the released model); "
            "--resolution does not apply"
        )


def _attentions_per_layer(config: Any) -> int:
    """Dense: one. Sparse: one per block of equal-size token groups (two when the groups are ragged)."""
    if config.encoder_attention != "sparse":
        return 1
    length, extra = divmod(config.num_tokens, config.sparse_segment_size)
    return int(bool(length)) + int(bool(extra))


def graphs(config: Any, shape_text: str | None) -> tuple[ModelSpec, ...]:
    validate_shape(shape_text)
    s, g, c, m = config.img_size, config.grid, config.prompt_embed_dim, config.mask_input_size
    encoder = ModelSpec(
        name="encoder",
        build_module=EncoderGraph,
        inputs=(TensorSpec("image", ("batch", config.in_chans, s, s, s)),),
        outputs=(TensorSpec("image_embedding", ("batch", c, g, g, g)),),
        tolerances={
            Precision.FP32: {"image_embedding": _FP32},
            Precision.FP16: {"image_embedding": _HALF["image_embedding"]},
            Precision.HYBRID: {"image_embedding": _HALF["image_embedding"]},
        },
        expected_counts={"attention": (config.encoder_depth - config.skip_layer) * _attentions_per_layer(config)},
        shape_notes={"resolution": f"{s}x{s}x{s}", "batch": "dynamic"},
        profile_dims={"batch": (1, 1, 2)},
    )
    decoder = ModelSpec(
        name="prompt_decoder",
        build_module=PromptDecoderGraph,
        inputs=(
            TensorSpec("image_embedding", (1, c, g, g, g)),
            TensorSpec("point_coords", ("prompts", "points", 3)),
            TensorSpec("point_labels", ("prompts", "points"), "int64"),
            TensorSpec("mask_input", ("prompts", 1, m, m, m)),
            TensorSpec("has_mask_input", ("prompts",)),
        ),
        outputs=(
            TensorSpec("low_res_masks", ("prompts", 1, m, m, m)),
            TensorSpec("iou_predictions", ("prompts", 1)),
            TensorSpec("masks_upscaled", ("prompts", 1, s, s, s)),
        ),
        tolerances={
            Precision.FP32: {name: _FP32 for name in _DECODER_OUTPUTS},
            Precision.FP16: {name: _HALF[name] for name in _DECODER_OUTPUTS},
            Precision.HYBRID: {name: _HALF[name] for name in _DECODER_OUTPUTS},
        },
        expected_counts={"attention": 3 * config.decoder_transformer_depth + 1},
        shape_notes={"prompts": "dynamic (>= 1)", "points": "dynamic (>= 1)", "multimask_output": False},
        # The released click loop sends the newest click only (1 point + the padding point).
        profile_dims={"prompts": (1, 1, 8), "points": (1, 1, 32)},
    )
    return (encoder, decoder)


def parity_feeds(loaded: LoadedModel, specs: tuple[ModelSpec, ...], samples: int, seed: int) -> dict[str, list[Feed]]:
    """A CT-like volume per sample; then a first click (B=1, zero mask) and a batch of 2 multi-point prompts."""

    cfg = loaded.config
    return _volume_feeds(loaded, specs, [_normalized_volume(cfg.img_size, seed + i) for i in range(samples)], seed)


def user_feeds(loaded: LoadedModel, specs: tuple[ModelSpec, ...], folder: Path, seed: int) -> dict[str, list[Feed]]:
    """The user's volumes (.npy/.nii/.nii.gz), centre-cropped/padded and z-normalised as the released inference."""
    from export_engine.families.fastsam3d.preprocess import preprocess_volume
    from export_engine.families.fastsam3d.volumes import load_volume

    files = sorted(p for p in Path(folder).iterdir() if p.name.lower().endswith((".npy", ".nii", ".nii.gz")))
    if not files:
        raise UsageError(f"calibration folder {folder} holds no volumes (.npy, .nii, .nii.gz)")
    size = loaded.config.img_size
    images = [preprocess_volume(load_volume(f).data, size).image for f in files]
    return _volume_feeds(loaded, specs, images, seed)


def _volume_feeds(
    loaded: LoadedModel, specs: tuple[ModelSpec, ...], images: list[np.ndarray], seed: int
) -> dict[str, list[Feed]]:
    from export_engine.runners.torch_cpu import reference_outputs

    encoder, _ = specs
    cfg = loaded.config
    encoder_feeds = [{"image": image.astype(np.float32)} for image in images]
    embeddings = reference_outputs(encoder.build_module(loaded.module), encoder, encoder_feeds)
    decoder_feeds = []
    for i, emb in enumerate(embeddings):
        first = _prompts(cfg.img_size, cfg.mask_input_size, 1, 1, seed + 100 + i)
        first["point_labels"][:] = 1
        first["mask_input"][:] = 0
        decoder_feeds.append({"image_embedding": emb["image_embedding"], **first})
        batch = _prompts(cfg.img_size, cfg.mask_input_size, 2, 3, seed + 200 + i)
        decoder_feeds.append({"image_embedding": emb["image_embedding"], **batch})
    return {"encoder": encoder_feeds, "prompt_decoder": decoder_feeds}


FAMILY = FamilySpec(
    name="fastsam3d",
    summary="FastSAM3D interactive 3D segmentation (encoder graph + prompt/decoder graph)",
    runtime=FASTSAM3D,
    load=load,
    graphs=graphs,
    parity_feeds=parity_feeds,
    user_feeds=user_feeds,
    shape_option="volume size from the configuration (img_size)",
    default_shape="128",
    validate_shape=validate_shape,
    tiny_config=lambda: TINY_CONFIG,
    tiny_shape="",
    attention_choices=("dense", "sparse"),
)
