"""Types shared by export, validation and the runtime; importing them pulls in neither torch nor model code."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from export_engine.config import Precision

Feed = dict[str, np.ndarray]
# A runner for one graph: feed -> outputs by name (ONNX Runtime session, engine, or torch module).
GraphRunner = Callable[[Feed], dict[str, np.ndarray]]


class LoadedArtifact(Protocol):
    """What a model's run-time session (matching, clicks) reads of a loaded artifact
    (:class:`export_engine.runtime.session.ArtifactSession` is one)."""

    path: Path
    manifest: dict[str, Any]
    graphs: dict[str, Any]  # graph name -> the manifest's graph entry
    runners: dict[str, GraphRunner]  # graph name -> its runner (some also take device tensors through .run)


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


@dataclass(frozen=True)
class ModelSpec:
    """One exported graph: how to build its torch module and what the graph must look like."""

    name: str  # short graph name, e.g. "encoder"; the artifact file is <name>.onnx
    # loaded torch model -> torch wrapper with forward(*inputs) -> tuple (torch stays out of this module's imports)
    build_module: Callable[[Any], Any]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerances: Mapping[Precision, Mapping[str, Tolerance]]
    opset: int = 20  # the TorchScript exporter's newest; passes that add opset-23 ops (Attention) raise it
    # Structural expectations checked by graph passes (e.g. {"attention": 24}); a miss warns, or fails --strict.
    expected_counts: Mapping[str, int] = field(default_factory=dict)
    # Facts a deployment needs about shape choices (recorded in the manifest).
    shape_notes: Mapping[str, Any] = field(default_factory=dict)
    # TensorRT optimisation profile per dynamic dim: (min, opt, max); kernels are tuned for opt.
    profile_dims: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {}
        for tensor in (*self.inputs, *self.outputs):
            named = {i: d for i, d in enumerate(tensor.shape) if isinstance(d, str)}
            if named:
                axes[tensor.name] = named
        return axes

    def tolerance(self, precision: Precision, output: str) -> Tolerance:
        return self.tolerances[precision][output]
