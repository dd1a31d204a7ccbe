"""What every graph pass shares: its report, and loading/saving graphs for passes.

A pass is a plain function ``verb_object(graph, config) -> PassReport`` over an onnx-graphsurgeon graph. It
edits the graph in place, ends with ``graph.cleanup().toposort()``, names the nodes it creates
``<pass>/<i>``, and running it twice changes nothing. Its config is a frozen dataclass in its own file.
The ordered pass tuples per precision live in ``export_engine/pipeline.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from export_engine import config as defaults
from export_engine.errors import GraphPassError

log = logging.getLogger(__name__)

# export-engine's own ONNX Runtime operators (export_engine.runners.ort_ops), which ONNX Runtime-only lowerings write
OWN_DOMAIN = "ai.export_engine"


def quiet_onnxruntime() -> None:
    """Constant folding runs ONNX Runtime on sub-graphs; its optimiser warnings are noise for our users."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)


@dataclass
class PassReport:
    """What a pass matched, rewrote and skipped (with reasons); stored in the artifact."""

    name: str
    matched: int = 0
    rewritten: int = 0
    skipped: list[str] = field(default_factory=list)  # one reason per skipped match
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        text = f"{self.name}: matched {self.matched}, rewrote {self.rewritten}"
        if self.skipped:
            text += f", skipped {len(self.skipped)} ({self.skipped[0]}{', ...' if len(self.skipped) > 1 else ''})"
        return text


@contextmanager
def timed(report: PassReport) -> Iterator[PassReport]:
    start = time.perf_counter()
    yield report
    report.seconds = round(time.perf_counter() - start, 3)


def check_count(report: PassReport, what: str, found: int, expected: int | None, strict: bool) -> None:
    """Compare a structural count against the spec's expectation: a warning, or an error under --strict."""
    if expected is None or found == expected:
        return
    message = f"{report.name}: found {found} {what}, the model spec expects {expected}"
    if strict:
        raise GraphPassError(f"{message} (--strict); the exporter produced a pattern this pass does not know")
    report.warnings.append(message)
    log.warning("%s", message)


def node_name(pass_name: str, index: int) -> str:
    """Name of the index-th node a pass creates, so an engine layer can be traced back to its pass."""
    return f"{pass_name}/{index}"


def next_index(graph: gs.Graph, pass_name: str) -> int:
    """First free ``<pass>/<i>`` index (passes may run more than once on a graph)."""
    prefix = f"{pass_name}/"
    used = [int(n.name[len(prefix) :].split("/")[0]) for n in graph.nodes if n.name.startswith(prefix)
            and n.name[len(prefix) :].split("/")[0].isdigit()]  # fmt: skip
    return max(used, default=-1) + 1


class NodeBuilder:
    """Appends nodes named ``<pass>/<i>`` (and their constants) to a graph, for passes that write small subgraphs."""

    def __init__(self, graph: gs.Graph, pass_name: str, index: int, dtype: Any) -> None:
        self.graph, self.pass_name, self.index, self.dtype = graph, pass_name, index, dtype

    def name(self) -> str:
        return node_name(self.pass_name, self.index)

    def const(self, suffix: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(f"{self.name()}/{suffix}", np.ascontiguousarray(values))

    def add(
        self,
        op: str,
        inputs: list[gs.Tensor],
        attrs: dict | None = None,
        out: gs.Tensor | None = None,
        dtype: Any = None,
        domain: str | None = None,
    ) -> gs.Tensor:
        """One node; its output is `out`, or a new tensor of `dtype` (default: the builder's)."""
        result = out if out is not None else gs.Variable(f"{self.name()}/output", dtype=dtype or self.dtype)
        node = gs.Node(op, name=self.name(), attrs=attrs or {}, inputs=inputs, outputs=[result], domain=domain)
        self.graph.nodes.append(node)
        self.index += 1
        return result

    def reshape(self, x: gs.Tensor, shape: list[int]) -> gs.Tensor:
        return self.add("Reshape", [x, self.const("shape", np.asarray(shape, dtype=np.int64))])


def producer(tensor: gs.Tensor | None, op: str) -> gs.Node | None:
    """The node of type ``op`` that alone produces ``tensor``, or None (a constant, a graph input, another op)."""
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == op:
        return tensor.inputs[0]
    return None


def conv_operand_problem(node: gs.Node) -> str | None:
    """Why a convolution's weight and bias cannot be folded into MatMul constants, or None when they can."""
    x, weight = node.inputs[0], node.inputs[1]
    if not isinstance(weight, gs.Constant):
        return "weight is not a constant"
    if x.dtype is not None and np.dtype(x.dtype) != weight.values.dtype:
        return f"input {x.dtype} and weight {weight.values.dtype} differ"
    if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
        return "bias is not a constant"
    return None


def load_graph(path: Path) -> gs.Graph:
    """Import an ONNX file for passes, weights included.

    Weights are loaded (not left as lazy references to the source's data file) so that the graph can be saved
    anywhere, under any name, without pointing into a file that a later step replaces or deletes.
    """
    quiet_onnxruntime()
    return gs.import_onnx(onnx.load(str(path), load_external_data=True))


def weight_bytes(graph: gs.Graph) -> int:
    """Bytes of the graph's constants, without loading lazily imported ones: ``Constant.values`` would read
    every weight into memory (1.2 GB and several seconds for a full-size MASt3R encoder); the lazy holder and
    numpy arrays both know their ``nbytes``."""
    return sum(t._values.nbytes for t in graph.tensors().values() if isinstance(t, gs.Constant))


def save_graph(graph: gs.Graph, path: Path, *, opset: int | None = None, external_data: bool | None = None) -> None:
    """Export ``graph`` to ``path``, checking the result.

    Weights go to ``<name>.data`` when ``external_data`` is true; when it is None, under the exporter's rule
    (more than ``EXTERNAL_DATA_BYTES`` of weights), so graphs keep one layout from export to artifact.
    """
    if external_data is None:
        external_data = weight_bytes(graph) > defaults.EXTERNAL_DATA_BYTES
    model = gs.export_onnx(graph, do_type_check=True)
    if opset is not None:
        for entry in model.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = max(entry.version, opset)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)  # fmt: skip
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))


PassFn = Callable[[gs.Graph, Any], PassReport]
ExpectedCounts = Mapping[str, int]
