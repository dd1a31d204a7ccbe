"""PyTorch on the CPU as a Polygraphy runner: the reference side of the export gates."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner

from export_engine.core.types import Feed, ModelSpec


class TorchRunner(BaseRunner):
    """Polygraphy runner for a torch module on the CPU (Polygraphy's PytRunner moves inputs to CUDA)."""

    def __init__(self, module: torch.nn.Module, spec: ModelSpec, name: str = "pytorch"):
        super().__init__(name=name, prefix="pytorch-runner")
        self._module = module
        self._spec = spec

    def activate_impl(self) -> None:
        self._module.eval()

    def get_input_metadata_impl(self) -> Any:
        from polygraphy.common import TensorMetadata
        from polygraphy.datatype import DataType

        meta = TensorMetadata()
        for tensor in self._spec.inputs:
            meta.add(tensor.name, DataType.from_dtype(np.dtype(tensor.dtype)), tensor.shape)
        return meta

    def infer_impl(self, feed_dict: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        inputs = [torch.from_numpy(np.ascontiguousarray(feed_dict[n])) for n in self._spec.input_names]
        start = time.perf_counter()
        with torch.no_grad():
            outputs = self._module(*inputs)
        self.inference_time = time.perf_counter() - start
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        result = OrderedDict(
            (name, out.detach().cpu().numpy()) for name, out in zip(self._spec.output_names, outputs, strict=True)
        )
        return result

    def deactivate_impl(self) -> None:
        pass


def reference_outputs(module: torch.nn.Module, spec: ModelSpec, feeds: Sequence[Feed]) -> list[dict[str, np.ndarray]]:
    """Run the torch module on each feed (used to chain graphs: one graph's outputs feed the next)."""
    runner = TorchRunner(module, spec)
    with runner:
        return [dict(runner.infer(feed)) for feed in feeds]
