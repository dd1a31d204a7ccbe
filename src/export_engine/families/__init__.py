"""Model families as a deployment sees them: how an artifact of each model runs (torch-free, no model code).

Loading an artifact needs only this: the family's input checks and graph chaining, and how ONNX Runtime should
run its attention. The export side (``export_engine.exporters``: model loading, graph specs, feeds) builds on
the same entries and is never imported when an artifact is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from export_engine.core.types import GraphRunner
from export_engine.errors import UsageError
from export_engine.families.fastsam3d import session as fastsam3d
from export_engine.families.mast3r import session as mast3r


@dataclass(frozen=True)
class RuntimeFamily:
    name: str
    # (runners by graph name, user inputs, manifest graph records) -> user-facing outputs
    run: Callable[[Mapping[str, GraphRunner], Mapping[str, np.ndarray], Mapping[str, Any]], dict[str, np.ndarray]]
    # (graph records by name, seed) -> plausible user inputs for ``run`` (tests, benchmarks, smoke checks)
    sample_inputs: Callable[[Mapping[str, Any], int], dict[str, np.ndarray]]
    run_input_names: tuple[str, ...]
    run_output_names: tuple[str, ...]
    # How ONNX Runtime CUDA runs this family's Attention nodes, measured per family (TensorRT always receives
    # the fused op).
    ort_attention: Literal["fused", "decomposed"] = "fused"


MAST3R = RuntimeFamily("mast3r", mast3r.run, mast3r.sample_inputs, mast3r.RUN_INPUTS, mast3r.OUTPUT_NAMES)
# FastSAM3D's attention carries a relative-position bias (no flash attention) over short sequences: on ONNX
# Runtime CUDA MatMul/Softmax beat its Attention kernels (H100, hybrid: encoder 1.43 vs 1.57 ms, click 0.85
# vs 1.11 ms).
FASTSAM3D = RuntimeFamily("fastsam3d", fastsam3d.run, fastsam3d.sample_inputs, fastsam3d.RUN_INPUTS,
                          fastsam3d.RUN_OUTPUTS, ort_attention="decomposed")  # fmt: skip
RUNTIME_FAMILIES = (MAST3R, FASTSAM3D)


def runtime_family(name: str) -> RuntimeFamily:
    for family in RUNTIME_FAMILIES:
        if family.name == str(name).lower():
            return family
    valid = ", ".join(f.name for f in RUNTIME_FAMILIES)
    raise UsageError(f"artifact of unknown model {name!r}; this export-engine runs: {valid}")
