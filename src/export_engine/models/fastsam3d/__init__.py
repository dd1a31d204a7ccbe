"""FastSAM3D (MICCAI 2024) in PyTorch: a readable port that loads the released checkpoint strictly."""

from export_engine.models.fastsam3d.checkpoint import (
    build_fastsam3d,
    expected_state_dict_shapes,
    init_random_weights,
)
from export_engine.models.fastsam3d.config import FastSAM3DConfig
from export_engine.models.fastsam3d.model import FastSAM3D, PromptDecodeResult

__all__ = [
    "FastSAM3D",
    "FastSAM3DConfig",
    "PromptDecodeResult",
    "build_fastsam3d",
    "expected_state_dict_shapes",
    "init_random_weights",
]
