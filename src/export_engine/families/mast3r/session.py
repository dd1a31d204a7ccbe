"""Running a MASt3R artifact: user inputs -> graph runners -> user outputs (torch-free, no model code).

The export side (``export_engine.exporters.mast3r``) builds the graphs; this is what a deployment needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from export_engine.calibration.synthetic import structured_images
from export_engine.core.types import GraphRunner
from export_engine.errors import ModelInputError

RUN_INPUTS = ("view1_img", "view2_img")
OUTPUT_NAMES = (
    "view1_pts3d",
    "view1_conf",
    "view1_desc",
    "view1_desc_conf",
    "view2_pts3d_in_other_view",
    "view2_conf",
    "view2_desc",
    "view2_desc_conf",
)


def run(
    runners: Mapping[str, GraphRunner], inputs: Mapping[str, np.ndarray], graphs_meta: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """view1_img, view2_img (B, 3, H, W) in [-1, 1] -> the 8 outputs (encoder batched over both views)."""
    expected = graphs_meta["encoder"]["inputs"][0]["shape"]  # ["batch", 3, H, W]
    images = [_check_image(inputs, name, expected) for name in RUN_INPUTS]
    if images[0].shape[0] != images[1].shape[0]:
        raise ModelInputError(
            f"view1_img and view2_img have different batch sizes ({images[0].shape[0]} vs {images[1].shape[0]})"
        )
    batch = images[0].shape[0]
    tokens = runners["encoder"]({"images": np.concatenate(images)})["tokens"]
    outputs = runners["decoder"]({"feat1": tokens[:batch], "feat2": tokens[batch:]})
    return {name: outputs[name] for name in OUTPUT_NAMES}


def sample_inputs(graphs_meta: Mapping[str, Any], seed: int) -> dict[str, np.ndarray]:
    _, _, h, w = graphs_meta["encoder"]["inputs"][0]["shape"]
    images = structured_images(2, h, w, seed)
    return {"view1_img": images[0:1], "view2_img": images[1:2]}


def _check_image(inputs: Mapping[str, np.ndarray], name: str, expected: list[Any]) -> np.ndarray:
    if name not in inputs:
        raise ModelInputError(
            f"input {name!r} is missing (got {sorted(inputs)}); MASt3R artifacts take {', '.join(RUN_INPUTS)}"
        )
    image = np.asarray(inputs[name])
    _, c, h, w = expected
    if image.ndim != 4 or tuple(image.shape[1:]) != (c, h, w):
        raise ModelInputError(
            f"input {name!r} has shape {tuple(image.shape)}, this artifact was exported for {w}x{h}: expected "
            f"(B, {c}, {h}, {w}); resize the image or export another --resolution"
        )
    if not np.issubdtype(image.dtype, np.floating):
        raise ModelInputError(f"input {name!r} has dtype {image.dtype}; expected float32 in [-1, 1]")
    return image.astype(np.float32)
