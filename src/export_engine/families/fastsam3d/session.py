"""Running a FastSAM3D artifact: a volume and clicks -> graph runners -> masks (torch-free, no model code).

The export side (``export_engine.exporters.fastsam3d``) builds the graphs; this is what a deployment needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from export_engine.calibration.synthetic import structured_volume
from export_engine.core.types import Feed, GraphRunner
from export_engine.errors import ModelInputError

RUN_INPUTS = ("image", "point_coords", "point_labels", "mask_input")
RUN_OUTPUTS = ("image_embedding", "low_res_masks", "iou_predictions", "masks_upscaled")
_DECODER_OUTPUTS = ("low_res_masks", "iou_predictions", "masks_upscaled")


def _normalized_volume(size: int, seed: int) -> np.ndarray:
    from export_engine.families.fastsam3d.preprocess import z_normalize

    normalized, _, _ = z_normalize(structured_volume(size, seed))
    return normalized.astype(np.float32)[None, None]


def _prompts(size: int, m: int, batch: int, points: int, seed: int) -> Feed:
    rng = np.random.default_rng(seed)
    coords = rng.uniform(size * 0.2, size * 0.8, size=(batch, points, 3)).astype(np.float32)
    labels = rng.choice(np.array([1, 0, -1]), size=(batch, points)).astype(np.int64)
    labels[:, 0] = 1  # every prompt set has at least one positive click
    mask = (3 * rng.standard_normal((batch, 1, m, m, m))).astype(np.float32)
    has_mask = (np.arange(batch) % 2 == 0).astype(np.float32)
    return {"point_coords": coords, "point_labels": labels, "mask_input": mask, "has_mask_input": has_mask}


def _check_prompt(inputs: Mapping[str, np.ndarray], size: int, m: int) -> Feed:
    for name in ("point_coords", "point_labels"):
        if name not in inputs:
            raise ModelInputError(f"input {name!r} is missing (got {sorted(inputs)}); FastSAM3D takes {RUN_INPUTS}")
    coords = np.asarray(inputs["point_coords"], dtype=np.float32)
    labels = np.asarray(inputs["point_labels"])
    if coords.ndim != 3 or coords.shape[-1] != 3 or coords.shape[1] < 1:
        raise ModelInputError(
            f"point_coords has shape {coords.shape}; expected (B, N>=1, 3) voxel coordinates (d, h, w)"
        )
    if labels.shape != coords.shape[:2]:
        raise ModelInputError(f"point_labels has shape {labels.shape}; expected {coords.shape[:2]} (B, N)")
    if not np.isfinite(coords).all() or coords.min() < 0 or coords.max() > size - 1:
        raise ModelInputError(
            f"point_coords outside the volume: values must lie in [0, {size - 1}] (got {coords.min():.1f} .. "
            f"{coords.max():.1f}); give voxel indices of the {size}^3 crop"
        )
    bad = sorted(set(np.unique(labels).tolist()) - {1, 0, -1})
    if bad:
        raise ModelInputError(f"point_labels must be 1 (positive), 0 (negative) or -1 (ignore); got {bad}")
    batch = coords.shape[0]
    if inputs.get("mask_input") is None:
        mask = np.zeros((batch, 1, m, m, m), np.float32)
        has_mask = np.zeros((batch,), np.float32)
    else:
        mask = np.asarray(inputs["mask_input"], dtype=np.float32)
        if mask.shape != (batch, 1, m, m, m):
            raise ModelInputError(
                f"mask_input has shape {mask.shape}; expected ({batch}, 1, {m}, {m}, {m}) (the previous low_res_masks)"
            )
        has_mask = np.ones((batch,), np.float32)
    return {
        "point_coords": coords,
        "point_labels": labels.astype(np.int64),
        "mask_input": mask,
        "has_mask_input": has_mask,
    }


def run(
    runners: Mapping[str, GraphRunner], inputs: Mapping[str, np.ndarray], graphs_meta: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """image (1, 1, S, S, S) + clicks -> image_embedding, low_res_masks, iou_predictions, masks_upscaled."""
    expected = graphs_meta["encoder"]["inputs"][0]["shape"]  # ["batch", 1, S, S, S]
    size = expected[-1]
    m = graphs_meta["prompt_decoder"]["inputs"][3]["shape"][-1]
    if "image" not in inputs:
        raise ModelInputError(f"input 'image' is missing (got {sorted(inputs)}); FastSAM3D takes {RUN_INPUTS}")
    image = np.asarray(inputs["image"], dtype=np.float32)
    if image.shape != (1, *expected[1:]):
        raise ModelInputError(
            f"image has shape {image.shape}; expected (1, {', '.join(map(str, expected[1:]))}): crop or pad the "
            f"z-normalised volume to {size}^3 first"
        )
    prompt = _check_prompt(inputs, size, m)
    embedding = runners["encoder"]({"image": image})["image_embedding"]
    outputs = runners["prompt_decoder"]({"image_embedding": embedding, **prompt})
    return {"image_embedding": embedding, **{name: outputs[name] for name in _DECODER_OUTPUTS}}


def sample_inputs(graphs_meta: Mapping[str, Any], seed: int) -> dict[str, np.ndarray]:
    size = graphs_meta["encoder"]["inputs"][0]["shape"][-1]
    m = graphs_meta["prompt_decoder"]["inputs"][3]["shape"][-1]
    prompt = _prompts(size, m, 1, 2, seed)
    return {"image": _normalized_volume(size, seed), "point_coords": prompt["point_coords"],
            "point_labels": prompt["point_labels"], "mask_input": prompt["mask_input"]}  # fmt: skip
