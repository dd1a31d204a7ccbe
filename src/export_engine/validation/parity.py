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
from dataclasses import asdict, dataclass, field
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


@dataclass
class OutputParity:
    output: str
    max_abs: float
    max_rel: float
    share_over: float
    tolerance: dict[str, float]
    passed: bool
    shape: list[int] = field(default_factory=list)
    finite: bool = True


@dataclass
class GraphParityReport:
    graph: str
    reference: str
    candidate: str
    precision: str
    samples: int
    seconds: float
    outputs: list[OutputParity]
    # The reference runner's outputs for the first sample (kept so an artifact can store a re-checkable pair).
    reference_sample: dict[str, np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "graph": self.graph,
            "reference": self.reference,
            "candidate": self.candidate,
            "precision": self.precision,
            "samples": self.samples,
            "seconds": self.seconds,
            "passed": self.passed,
            "outputs": [asdict(o) for o in self.outputs],
        }


def compare_output(name: str, actual: np.ndarray, ref: np.ndarray, tol: Tolerance) -> OutputParity:
    """Element-wise comparison of one output against its reference."""
    if actual.shape != ref.shape:
        return OutputParity(name, float("inf"), float("inf"), 1.0, tol.to_dict(), False, list(actual.shape))
    a = actual.astype(np.float64)
    r = ref.astype(np.float64)
    finite = bool(np.isfinite(a).all())
    diff = np.abs(a - r)
    diff = np.where(np.isnan(diff), np.inf, diff)
    rel = diff / np.maximum(np.abs(r), 1e-12)
    over = diff > tol.atol + tol.rtol * np.abs(r)
    share = float(over.mean()) if over.size else 0.0
    passed = finite and share <= tol.max_share
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float(rel.max()) if rel.size else 0.0
    return OutputParity(name, max_abs, max_rel, share, tol.to_dict(), passed, list(actual.shape), finite)


class _Judge:
    """Polygraphy compare_func: accumulates our per-output metrics (worst over all samples)."""

    def __init__(self, tolerances: Mapping[str, Tolerance]):
        self.tolerances = tolerances
        self.worst: dict[str, OutputParity] = {}

    def __call__(self, ref_result: Mapping[str, np.ndarray], cand_result: Mapping[str, np.ndarray]) -> Any:
        verdict: OrderedDict[str, bool] = OrderedDict()
        for name, tol in self.tolerances.items():
            if name not in cand_result:
                result = OutputParity(name, float("inf"), float("inf"), 1.0, tol.to_dict(), False)
            else:
                result = compare_output(name, np.asarray(cand_result[name]), np.asarray(ref_result[name]), tol)
            verdict[name] = result.passed
            self.worst[name] = _worse(self.worst.get(name), result)
        return verdict


def _worse(old: OutputParity | None, new: OutputParity) -> OutputParity:
    if old is None:
        return new
    return OutputParity(
        new.output,
        max(old.max_abs, new.max_abs),
        max(old.max_rel, new.max_rel),
        max(old.share_over, new.share_over),
        new.tolerance,
        old.passed and new.passed,
        new.shape,
        old.finite and new.finite,
    )


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


def format_table(reports: Sequence[GraphParityReport]) -> str:
    rows = [("graph", "output", "max abs", "max rel", "over tol", "tolerance (atol/rtol)", "")]
    for report in reports:
        for o in report.outputs:
            rows.append(
                (
                    report.graph,
                    o.output,
                    f"{o.max_abs:.3g}",
                    f"{o.max_rel:.3g}",
                    f"{100 * o.share_over:.3g}%",
                    f"{o.tolerance['atol']:.0e}/{o.tolerance['rtol']:.0e}",
                    "ok" if o.passed else ("FAIL (non-finite)" if not o.finite else "FAIL"),
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


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
