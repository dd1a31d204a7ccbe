"""FastSAM3D: image encoder + 3D prompt encoder + 3D mask decoder, with the official checkpoint's key layout.

Deployment split (SAM convention): `encode` once per 128^3 crop, then `prompt_decode`
once per click with the cached embedding. Upstream's `Sam3D.forward` / `postprocess_masks` are not used
by any inference script and are not reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from export_engine.errors import ModelInputError, UsageError
from export_engine.models.fastsam3d.config import FastSAM3DConfig
from export_engine.models.fastsam3d.image_encoder import ImageEncoder3D
from export_engine.models.fastsam3d.layers import ATTN_IMPLS
from export_engine.models.fastsam3d.mask_decoder import MaskDecoder3D, upscale_masks
from export_engine.models.fastsam3d.prompt_encoder import PromptEncoder3D


@dataclass
class PromptDecodeResult:
    """Everything one prompt pass produces (all M = num_multimask_outputs + 1 mask channels)."""

    sparse_embeddings: Tensor  # (B, N+1, C): clicks plus the padding point
    dense_embeddings: Tensor  # (B, C, g, g, g)
    low_res_masks_all: Tensor  # (B, M, 4g, 4g, 4g) logits
    iou_predictions_all: Tensor  # (B, M)
    decoder_tokens_out: Tensor  # (B, 1 + M + N + 1, C)
    decoder_image_tokens_out: Tensor  # (B, g^3, C)
    decoder_upscaled_embedding: Tensor  # (B, C/8, 4g, 4g, 4g)

    def select(self, multimask_output: bool) -> tuple[Tensor, Tensor]:
        """Upstream's selection: channel 0 (single mask) or channels 1.. (multimask); no best-IoU pick."""
        if multimask_output:
            return self.low_res_masks_all[:, 1:], self.iou_predictions_all[:, 1:]
        return self.low_res_masks_all[:, :1], self.iou_predictions_all[:, :1]


class FastSAM3D(nn.Module):
    def __init__(self, config: FastSAM3DConfig | None = None, attn_impl: str = "explicit") -> None:
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise UsageError(f"unknown attn_impl {attn_impl!r}; choose one of: {', '.join(ATTN_IMPLS)}")
        self.config = config or FastSAM3DConfig.released()
        self.attn_impl = attn_impl
        self.image_encoder = ImageEncoder3D(self.config, attn_impl)
        self.prompt_encoder = PromptEncoder3D(self.config)
        self.mask_decoder = MaskDecoder3D(self.config, attn_impl)

    # ------------------------------------------------------------------------------ image side
    def encode(self, image: Tensor) -> Tensor:
        """(B, in_chans, S, S, S) z-normalised volume -> image embedding (B, C, g, g, g)."""
        cfg = self.config
        expected = (cfg.in_chans, cfg.img_size, cfg.img_size, cfg.img_size)
        if image.dim() != 5 or tuple(image.shape[1:]) != expected:
            raise ModelInputError(
                f"FastSAM3D image must be (B, {', '.join(map(str, expected))}), got {tuple(image.shape)}; "
                f"crop or pad the volume to {cfg.img_size}^3 first (runtime.fastsam3d_preprocess)"
            )
        return self.image_encoder(image)

    def dense_pe(self) -> Tensor:
        """(1, C, g, g, g) positional encoding of the image tokens (constant per model)."""
        return self.prompt_encoder.dense_pe()

    # ------------------------------------------------------------------------------ prompt side
    def prompt_decode_all(
        self,
        image_embedding: Tensor,
        point_coords: Tensor,
        point_labels: Tensor,
        mask_input: Tensor | None = None,
        has_mask_input: Tensor | None = None,
    ) -> PromptDecodeResult:
        """Prompt encoder + mask decoder, keeping every intermediate output.

        image_embedding (1 or B, C, g, g, g); point_coords (B, N, 3) voxel coordinates of the S^3 crop in
        tensor order (d, h, w); point_labels (B, N) (1 positive, 0 negative, -1 ignore; int or float);
        mask_input (B, 1, 4g, 4g, 4g) previous low-res logits, or None for `no_mask_embed`.
        """
        self._check_prompt_shapes(image_embedding, point_coords, point_labels, mask_input)
        sparse, dense = self.prompt_encoder(point_coords, point_labels, mask_input, has_mask_input)
        out = self.mask_decoder(image_embedding, self.dense_pe(), sparse, dense)
        return PromptDecodeResult(
            sparse_embeddings=sparse,
            dense_embeddings=dense,
            low_res_masks_all=out.low_res_masks,
            iou_predictions_all=out.iou_predictions,
            decoder_tokens_out=out.tokens_out,
            decoder_image_tokens_out=out.image_tokens_out,
            decoder_upscaled_embedding=out.upscaled_embedding,
        )

    def prompt_decode(
        self,
        image_embedding: Tensor,
        point_coords: Tensor,
        point_labels: Tensor,
        mask_input: Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """-> (low_res_masks (B, 1 or M-1, 4g, 4g, 4g) logits, iou_predictions (B, 1 or M-1)).

        multimask_output=False (channel 0) is what every upstream inference script uses; feed the
        returned logits back unchanged as the next click's `mask_input`.
        """
        result = self.prompt_decode_all(image_embedding, point_coords, point_labels, mask_input)
        return result.select(multimask_output)

    @staticmethod
    def upscale_masks(low_res_masks: Tensor, size: int | tuple[int, int, int]) -> Tensor:
        """Trilinear resize (align_corners=False) of low-res logits to the crop size; threshold at 0."""
        return upscale_masks(low_res_masks, size)

    def _check_prompt_shapes(
        self, embedding: Tensor, coords: Tensor, labels: Tensor, mask_input: Tensor | None
    ) -> None:
        cfg, g = self.config, self.config.grid
        problems = []
        if tuple(embedding.shape[1:]) != (cfg.prompt_embed_dim, g, g, g) or embedding.dim() != 5:
            problems.append(
                f"image_embedding {tuple(embedding.shape)} != (1 or B, {cfg.prompt_embed_dim}, {g}, {g}, {g})"
            )
        if coords.dim() != 3 or coords.shape[-1] != 3 or coords.shape[1] < 1:
            problems.append(f"point_coords {tuple(coords.shape)} is not (B, N>=1, 3)")
        elif tuple(labels.shape) != tuple(coords.shape[:2]):
            problems.append(f"point_labels {tuple(labels.shape)} != {tuple(coords.shape[:2])} (B, N)")
        elif embedding.shape[0] != 1 and embedding.shape[0] != coords.shape[0]:
            problems.append(
                f"image_embedding batch {embedding.shape[0]} is neither 1 nor the prompt batch {coords.shape[0]}"
            )
        s = cfg.mask_input_size
        if mask_input is not None and (
            mask_input.dim() != 5
            or tuple(mask_input.shape[1:]) != (1, s, s, s)
            or mask_input.shape[0] != coords.shape[0]
        ):
            problems.append(f"mask_input {tuple(mask_input.shape)} != (B={coords.shape[0]}, 1, {s}, {s}, {s})")
        if problems:
            raise ModelInputError("FastSAM3D prompt inputs: " + "; ".join(problems))
