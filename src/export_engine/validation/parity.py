"""Parity gate: Polygraphy's Comparator runs a reference and a candidate, our compare function judges.

The reference is our PyTorch module (through :class:`TorchRunner`, a Polygraphy runner that works on the
CPU) or the FP32 ONNX graph; the candidate is ONNX Runtime on the exported/optimised graph. Every output is
checked element-wise against the spec's tolerance, every failure is collected, and one table is raised.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.comparator import Comparator
from polygraphy.logger import G_LOGGER

from export_engine.errors import ParityError
from export_engine.exporters.spec import Feed, ModelSpec, Tolerance
from export_engine.validation.compare import GraphParityReport as GraphParityReport  # re-exported
from export_engine.validation.compare import OutputParity as OutputParity
from export_engine.validation.compare import _Judge
from export_engine.validation.compare import compare_output as compare_output
from export_engine.validation.compare import format_table as format_table

log = logging.getLogger(__name__)
G_LOGGER.module_severity = G_LOGGER.ERROR  # our own table replaces Polygraphy's verbose report


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


def onnxrt_runner(path: Path, name: str = "onnxruntime") -> OnnxrtRunner:
    return OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"]), name=name)


def check_parity(
    reference: BaseRunner,
    candidate: BaseRunner,
    feeds: Sequence[Feed],
    tolerances: Mapping[str, Tolerance],
    *,
    graph: str,
    precision: str,
) -> GraphParityReport:
    """Run both runners on ``feeds`` through Polygraphy's Comparator and judge every output."""
    judge = _Judge(tolerances)
    start = time.perf_counter()
    results = Comparator.run([reference, candidate], data_loader=list(feeds))
    Comparator.compare_accuracy(results, compare_func=judge)
    first_reference = {name: np.array(value) for name, value in results[0][1][0].items()}
    report = GraphParityReport(
        graph=graph,
        reference=reference.name,
        candidate=candidate.name,
        precision=precision,
        samples=len(feeds),
        seconds=round(time.perf_counter() - start, 2),
        outputs=[judge.worst[name] for name in tolerances],
        reference_sample=first_reference,
    )
    for line in format_table([report]).splitlines():
        log.info("%s", line)
    return report


def raise_on_failure(reports: Sequence[GraphParityReport], what: str) -> None:
    failed = [(r.graph, o) for r in reports for o in r.outputs if not o.passed]
    if not failed:
        return
    names = ", ".join(f"{g}/{o.output}" for g, o in failed[:6])
    raise ParityError(
        f"parity failed for {what}: {len(failed)} output(s) over tolerance ({names}); no artifact written\n"
        + format_table(reports)
    )


def reference_outputs(module: torch.nn.Module, spec: ModelSpec, feeds: Sequence[Feed]) -> list[dict[str, np.ndarray]]:
    """Run the torch module on each feed (used to chain graphs: one graph's outputs feed the next)."""
    runner = TorchRunner(module, spec)
    with runner:
        return [dict(runner.infer(feed)) for feed in feeds]
