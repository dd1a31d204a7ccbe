"""Interactive FastSAM3D segmentation on an artifact: encode a volume once, then click.

    session = SegmentSession(load("fastsam3d-fp32-128"))
    session.set_volume(volume, around=[(40, 60, 60)])    # crop/pad + z-normalise, encoder runs once
    mask = session.click((40, 60, 60), positive=True)     # (D, H, W) bool in the volume's own geometry
    mask = session.click((42, 70, 61), positive=False)    # the previous low-res logits are fed back

As the released evaluation does it, each click sends only the newest point together with the previous
low-resolution logits (``accumulate=True`` sends every click so far instead, as the Slicer plug-in does).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from export_engine.core.types import LoadedArtifact
from export_engine.errors import ModelInputError, UsageError
from export_engine.families.fastsam3d.preprocess import CropWindow, preprocess_volume

log = logging.getLogger(__name__)


@dataclass
class ClickResult:
    mask: np.ndarray  # (D, H, W) bool, original geometry
    iou_prediction: float
    low_res_logits: np.ndarray  # (1, 1, m, m, m), fed back on the next click


@dataclass
class SegmentSession:
    artifact: LoadedArtifact
    accumulate: bool = False
    window: CropWindow | None = None
    embedding: np.ndarray | None = None
    clicks: list[tuple[tuple[float, float, float], int]] = field(default_factory=list)
    low_res: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.artifact.manifest["model"] != "fastsam3d":
            raise UsageError(f"{self.artifact.path} is a {self.artifact.manifest['model']} artifact, not fastsam3d")
        graphs = self.artifact.graphs
        self.size = int(graphs["encoder"]["inputs"][0]["shape"][-1])
        self.mask_size = int(graphs["prompt_decoder"]["inputs"][3]["shape"][-1])

    def set_volume(self, volume: np.ndarray, around: Sequence[Sequence[float]] | None = None) -> None:
        """Crop/pad (centred on the clicks ``around`` when given, else on the volume), normalise, encode."""
        points = None if around is None else np.asarray(around, dtype=np.float64).reshape(-1, 3)
        if points is not None:
            _check_inside(points, volume.shape)
        prepared = preprocess_volume(volume, self.size, points=points)
        self.window = prepared.window
        self.embedding = self.artifact.runners["encoder"]({"image": prepared.image})["image_embedding"]
        self.clicks, self.low_res = [], None
        log.info("volume %s encoded (crop start %s)", tuple(volume.shape), prepared.window.start)

    def click(self, point: Sequence[float], positive: bool = True) -> ClickResult:
        if self.window is None or self.embedding is None:
            raise UsageError("call set_volume() before click()")
        _check_inside(np.asarray(point, dtype=np.float64).reshape(1, 3), self.window.original_shape)
        crop_point = self.window.points_to_crop(np.asarray(point, dtype=np.float32))
        if np.any(crop_point < 0) or np.any(crop_point > self.size - 1):
            raise ModelInputError(
                f"click {tuple(point)} lies outside the {self.size}^3 crop starting at {self.window.start}; "
                f"start a new session around it (set_volume(..., around=[...]))"
            )
        self.clicks.append((tuple(float(c) for c in crop_point), 1 if positive else 0))  # type: ignore[arg-type]
        used = self.clicks if self.accumulate else self.clicks[-1:]
        previous = self.low_res if self.low_res is not None else np.zeros((1, 1, *(self.mask_size,) * 3), np.float32)
        feed = {
            "image_embedding": self.embedding,
            "point_coords": np.asarray([[c for c, _ in used]], dtype=np.float32),
            "point_labels": np.asarray([[label for _, label in used]], dtype=np.int64),
            "mask_input": previous,
            "has_mask_input": np.ones((1,), np.float32),  # the first click feeds zeros, as upstream's loop does
        }
        out = self.artifact.runners["prompt_decoder"](feed)
        self.low_res = out["low_res_masks"]
        mask = self.window.paste_back(out["masks_upscaled"][0, 0] > 0, fill=False)
        return ClickResult(mask, float(out["iou_predictions"][0, 0]), self.low_res)


def _check_inside(points: np.ndarray, shape: Sequence[int]) -> None:
    upper = np.asarray(shape[-3:], dtype=np.float64) - 1
    if not np.isfinite(points).all() or np.any(points < 0) or np.any(points > upper):
        raise ModelInputError(
            f"click(s) {points.tolist()} outside the volume of shape {tuple(shape[-3:])}; give (d, h, w) voxel indices"
        )
