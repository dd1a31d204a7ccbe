"""What the export pipeline knows about a model family: one FamilySpec per model, its loaded torch model.

The graphs are :class:`~export_engine.core.types.ModelSpec` objects (torch-free, so validation, builders and
calibration can use them). Everything model-specific (how to build the torch module, how graphs chain at run
time) lives in callables provided by ``exporters/<model>.py``. Generic code never branches on a model name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import nn

from export_engine.core.types import Feed, GraphRunner, ModelSpec
from export_engine.families import RuntimeFamily


@dataclass(frozen=True)
class LoadedModel:
    """A torch model ready for export, and where its weights came from."""

    module: nn.Module
    config: Any  # the family's frozen config dataclass (has to_dict())
    checkpoint_source: str | None
    checkpoint_sha256: str | None
    seed: int | None

    def describe_weights(self) -> dict[str, Any]:
        if self.checkpoint_source is None:
            return {"random_weights": True, "seed": self.seed}
        return {"source": self.checkpoint_source, "sha256": self.checkpoint_sha256, "random_weights": False}


@dataclass(frozen=True)
class FamilySpec:
    """A model family (``--model NAME``): loading, its graphs and representative inputs; how its artifacts run
    (``runtime``: input checks, graph chaining, ONNX Runtime attention choice) is the torch-free
    :class:`~export_engine.families.RuntimeFamily` a deployment uses."""

    name: str
    summary: str
    runtime: RuntimeFamily
    # (config JSON or None, checkpoint or None, seed or None, attention variant) -> LoadedModel
    load: Callable[[Mapping[str, Any] | None, str | None, int | None, str], LoadedModel]
    # (config, shape option text or None) -> graph specs, in export order
    graphs: Callable[[Any, str | None], tuple[ModelSpec, ...]]
    # (loaded model, graph specs, n samples, seed) -> representative feeds per graph name (structured data)
    parity_feeds: Callable[[LoadedModel, tuple[ModelSpec, ...], int, int], dict[str, list[Feed]]]
    # (loaded model, graph specs, folder of the user's images or volumes, seed) -> calibration feeds per graph
    user_feeds: Callable[[LoadedModel, tuple[ModelSpec, ...], Path, int], dict[str, list[Feed]]]
    shape_option: str  # CLI text describing the shape option (e.g. "resolution WxH")
    default_shape: str
    # Raises UsageError for a bad shape option before any long work starts.
    validate_shape: Callable[[str | None], object]
    # A small configuration (config JSON) for tests and the tiny end-to-end run.
    tiny_config: Callable[[], Mapping[str, Any]]
    tiny_shape: str
    # Attention variants ``--attention`` may pick; the first is the default.
    attention_choices: tuple[str, ...] = ("dense",)

    # The run-time side, from ``runtime`` (one definition, used by export and deployment alike).
    @property
    def run(self) -> Callable[[Mapping[str, GraphRunner], Mapping[str, np.ndarray], Mapping[str, Any]], dict]:
        return self.runtime.run

    @property
    def sample_inputs(self) -> Callable[[Mapping[str, Any], int], dict[str, np.ndarray]]:
        return self.runtime.sample_inputs

    @property
    def run_input_names(self) -> tuple[str, ...]:
        return self.runtime.run_input_names

    @property
    def run_output_names(self) -> tuple[str, ...]:
        return self.runtime.run_output_names

    @property
    def ort_attention(self) -> Literal["fused", "decomposed"]:
        return self.runtime.ort_attention


class GraphModule(nn.Module):
    """Base for export wrappers: exposes one path through a model while registering only the submodules that
    graph uses, so the exporter sees (and sizes) exactly the weights the graph needs.

    The full model is kept as a plain attribute (not a registered child): its methods run unchanged.
    """

    uses: tuple[str, ...] = ()
    model: Any  # the family's model class; typed loosely so generic code needs no model imports

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "model", model)
        for name in self.uses:
            self.add_module(name.replace(".", "__"), model.get_submodule(name))
