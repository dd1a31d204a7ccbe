"""The artifact manifest (schema in docs/ARTIFACT.md): what was exported, from what, how, and how well."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

import onnx

from export_engine import __version__

_VERSIONED = ("torch", "onnx", "onnxruntime", "polygraphy", "onnx-graphsurgeon", "numpy", "safetensors")


def versions() -> dict[str, str]:
    found = {"export-engine": __version__, "python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def value_info(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    return {"name": value.name, "shape": shape, "dtype": dtype}
