"""MASt3R (naver/mast3r ViT-L/ViT-B "catmlpdpt" metric model) reimplemented for export."""

from export_engine.families.mast3r.session import OUTPUT_NAMES
from export_engine.models.mast3r.checkpoint import (
    ALIASES,
    build_mast3r,
    config_from_checkpoint,
    init_random_weights,
)
from export_engine.models.mast3r.config import OFFICIAL_CONSTRUCTOR, MASt3RConfig, parse_constructor_string
from export_engine.models.mast3r.model import (
    MASt3R,
    count_parameters,
    expected_state_dict_shapes,
)

__all__ = [
    "ALIASES",
    "OFFICIAL_CONSTRUCTOR",
    "OUTPUT_NAMES",
    "MASt3R",
    "MASt3RConfig",
    "build_mast3r",
    "config_from_checkpoint",
    "count_parameters",
    "expected_state_dict_shapes",
    "init_random_weights",
    "parse_constructor_string",
]
