"""Engine builders: ONNX -> TensorRT / TensorRT-RTX engines through one code path, in a child process.

Nothing here imports TensorRT at import time; the modules load at call time (and only in the build child for
builds), so this package imports on any machine.
"""

from export_engine.builders.build import AttentionLayer, BuildResult, engine_from_onnx
from export_engine.builders.config import (
    BuildConfig,
    BuilderBackend,
    InputShapes,
    Profile,
    default_timing_cache_path,
    profiles_from_spec,
)
from export_engine.runners.backends import available_backends, choose_backend
from export_engine.runners.engine_info import EngineInfo, EngineValidity, engine_validity, inspect_engine

__all__ = [
    "AttentionLayer",
    "BuildConfig",
    "BuildResult",
    "BuilderBackend",
    "EngineInfo",
    "EngineValidity",
    "InputShapes",
    "Profile",
    "available_backends",
    "choose_backend",
    "default_timing_cache_path",
    "engine_from_onnx",
    "engine_validity",
    "inspect_engine",
    "profiles_from_spec",
]
