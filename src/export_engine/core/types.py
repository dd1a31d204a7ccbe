"""Types shared by export, validation and the runtime; importing them pulls in neither torch nor model code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Feed = dict[str, np.ndarray]
# A runner for one graph: feed -> outputs by name (ONNX Runtime session, engine, or torch module).
GraphRunner = Callable[[Feed], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Tolerance:
    """Element-wise check ``|actual - ref| <= atol + rtol * |ref|``; ``max_share`` of elements may exceed it."""

    atol: float
    rtol: float
    max_share: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {"atol": self.atol, "rtol": self.rtol, "max_share": self.max_share}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``shape`` entries are ints (static) or names (dynamic axes)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
