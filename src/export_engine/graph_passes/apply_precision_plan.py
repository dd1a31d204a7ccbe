"""apply_precision_plan: turn a PrecisionPlan into a strongly typed mixed FP16/FP32 graph.

Precision is expressed only through tensor dtypes, so that ONNX Runtime, TensorRT 10 (strongly typed) and
TensorRT 11 (always strongly typed, no per-layer precision) all read the same thing: initializers of FP16 nodes
become FP16, and an explicit ``Cast`` sits at every FP16/FP32 boundary, one per tensor and target dtype, shared
by all consumers. Graph inputs and outputs keep their dtypes (FP32 I/O engines need the casts inside the graph).
Nodes the plan does not mention keep what they had; our own boundary casts are never planned, so a second run
finds every dtype already right and changes nothing.

The retyping engine (:func:`retype_graph`) is shared with ``convert_fp16``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from export_engine.errors import GraphPassError
from export_engine.graph_passes.base import PassReport, next_index, node_name, timed
from export_engine.graph_passes.graph_facts import (
    FLOATS,
    FP16,
    FP16_MAX,
    FP16_TINY,
    ONNX_TYPE,
    GraphFacts,
    constant_values,
    fill_missing_dtypes,
    implicit_uses,
    is_boundary_cast,
    is_constant_source,
    is_float,
    np_dtype,
    wanted_dtype,
)
from export_engine.graph_passes.precision_plan import PrecisionPlan

log = logging.getLogger(__name__)

PASS_NAME = "apply_precision_plan"
_TAGS = {np.dtype(np.float16): "fp16", np.dtype(np.float32): "fp32"}


@dataclass(frozen=True)
class ApplyPrecisionPlanConfig:
    plan: PrecisionPlan
    # Plan entries that do not fit the graph (missing node, node that cannot be retyped) raise instead of warn.
    strict: bool = False


def apply_precision_plan(graph: gs.Graph, config: ApplyPrecisionPlanConfig) -> PassReport:
    """Retype every planned node to its precision, with FP16 initializers and Casts at the boundaries."""
    report = PassReport(PASS_NAME)
    with timed(report):
        fill_missing_dtypes(graph)
        facts = GraphFacts.of(graph)
        targets, problems = config.plan.resolve(facts)
        if problems and config.strict:
            raise GraphPassError(
                f"{PASS_NAME}: the precision plan does not fit this graph ({len(problems)} problem(s): "
                f"{'; '.join(problems[:3])}); make the plan from this graph (same model, config and passes)"
            )
        for problem in problems:
            report.skipped.append(problem)
        if problems:
            log.warning("%s: %d plan entries did not fit (%s)", PASS_NAME, len(problems), problems[0])
        report.matched = len(targets)
        retype_graph(graph, facts, targets, PASS_NAME, report)
        graph.cleanup().toposort()
    return report


def retype_graph(
    graph: gs.Graph, facts: GraphFacts, targets: Mapping[int, np.dtype], pass_name: str, report: PassReport
) -> None:
    """Make each node in ``targets`` (by ``id``) compute in its dtype; cast wherever dtypes disagree."""
    _Retyper(graph, facts, targets, pass_name, report).run()


class _Retyper:
    def __init__(
        self, graph: gs.Graph, facts: GraphFacts, targets: Mapping[int, np.dtype], pass_name: str, report: PassReport
    ):
        self.graph = graph
        self.facts = facts
        self.targets = targets
        self.pass_name = pass_name
        self.report = report
        self.index = next_index(graph, pass_name)
        self.names = set(graph.tensors())
        self.outputs = {id(t) for t in graph.outputs}
        # What every consumer slot had before any change: nodes left alone keep wanting exactly that.
        self.before: dict[tuple[int, int], np.dtype | None] = {}
        for node in graph.nodes:
            for slot, tensor in enumerate(node.inputs):
                self.before[(id(node), slot)] = np_dtype(tensor)
            for inner, slot in implicit_uses(node):
                self.before[(id(inner), slot)] = np_dtype(inner.inputs[slot])
        # (tensor name, dtype) -> converted tensor; our casts from earlier runs are reused.
        self.cache: dict[tuple[str, str], gs.Tensor] = {}
        for node in graph.nodes:
            if is_boundary_cast(node) and node.inputs and node.outputs:
                to = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
                self.cache[(node.inputs[0].name, to.str)] = node.outputs[0]
        self.counts = {
            "casts_added": 0,
            "initializers_converted": 0,
            "initializer_copies": 0,
            "initializer_overflow": 0,
            "initializer_underflow": 0,
            "nodes_retyped": 0,
            "casts_removed": 0,
        }

    def run(self) -> None:
        self._convert_constants_in_place()
        for node in list(self.graph.nodes):
            target = self.targets.get(id(node))
            for slot in range(len(node.inputs)):
                before = self.before.get((id(node), slot))
                self._ensure(node, slot, wanted_dtype(node, slot, before, target))
            for inner, slot in implicit_uses(node):
                self._ensure(inner, slot, self.before.get((id(inner), slot)))
            if target is not None and self._retype_outputs(node, target):
                self.counts["nodes_retyped"] += 1
        self._drop_noop_casts()
        fp16 = sum(1 for d in self.targets.values() if d == FP16)
        self.report.rewritten = self.counts["nodes_retyped"]
        self.report.details.update(self.counts, planned_fp16=fp16, planned_fp32=len(self.targets) - fp16)
        if self.counts["initializer_overflow"]:
            self.report.warnings.append(
                f"{self.counts['initializer_overflow']} initializer values exceed FP16's range and became inf"
            )

    # -- constants ------------------------------------------------------------------------------------------
    def _convert_constants_in_place(self) -> None:
        """A constant that every consumer wants in one other dtype is converted where it is (no copy)."""
        for tensor in list(self.graph.tensors().values()):
            if not is_float(tensor) or not is_constant_source(tensor) or id(tensor) in self.outputs:
                continue
            wanted = set()
            for consumer in self.facts.consumers(tensor):
                target = self.targets.get(id(consumer))
                for slot, t in enumerate(consumer.inputs):
                    if t is tensor:
                        wanted.add(wanted_dtype(consumer, slot, self.before.get((id(consumer), slot)), target))
            wanted.discard(None)
            if len(wanted) != 1:
                continue
            dtype = wanted.pop()
            if dtype is None or dtype == np_dtype(tensor) or dtype not in FLOATS:
                continue
            values = self._values_as(constant_values(tensor), dtype)
            if isinstance(tensor, gs.Constant):
                # A new Constant rather than new values: a copied Constant pins its original export dtype.
                converted = gs.Constant(tensor.name, values)
                for consumer in self.facts.consumers(tensor):
                    for slot, t in enumerate(consumer.inputs):
                        if t is tensor:
                            consumer.inputs[slot] = converted
            else:  # output of a Constant node
                producer = tensor.inputs[0]
                producer.attrs["value"] = gs.Constant(producer.attrs["value"].name, values)
                tensor.dtype = dtype
            self.counts["initializers_converted"] += 1

    def _values_as(self, values: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
        assert values is not None
        if dtype == FP16 and values.dtype != FP16:
            magnitude = np.abs(values[np.isfinite(values)])
            self.counts["initializer_overflow"] += int((magnitude > FP16_MAX).sum())
            self.counts["initializer_underflow"] += int(((magnitude > 0) & (magnitude < FP16_TINY)).sum())
        with np.errstate(over="ignore"):
            return values.astype(dtype)

    # -- boundaries -----------------------------------------------------------------------------------------
    def _ensure(self, node: gs.Node, slot: int, wanted: np.dtype | None) -> None:
        tensor = node.inputs[slot]
        have = np_dtype(tensor)
        if not tensor.name or wanted is None or have is None or have == wanted:
            return
        if have not in FLOATS or wanted not in FLOATS:
            self.report.warnings.append(f"{node.name}: input {tensor.name} is {have}, wanted {wanted}; left as is")
            return
        node.inputs[slot] = self._converted(tensor, wanted)

    def _converted(self, tensor: gs.Tensor, dtype: np.dtype) -> gs.Tensor:
        key = (tensor.name, dtype.str)
        if key in self.cache:
            return self.cache[key]
        tag = _TAGS[dtype]
        values = constant_values(tensor) if is_constant_source(tensor) else None
        converted: gs.Tensor
        if values is not None:
            converted = gs.Constant(self._unique(f"{tensor.name}/{tag}"), self._values_as(values, dtype))
            self.counts["initializer_copies"] += 1
        else:
            converted = gs.Variable(self._unique(f"{tensor.name}/cast_{tag}"), dtype=dtype, shape=tensor.shape)
            self._add_cast(tensor, converted, dtype)
        self.cache[key] = converted
        return converted

    def _add_cast(self, source: gs.Tensor, out: gs.Variable, dtype: np.dtype) -> None:
        cast = gs.Node(
            "Cast",
            name=node_name(self.pass_name, self.index),
            attrs={"to": ONNX_TYPE[dtype]},
            inputs=[source],
            outputs=[out],
        )
        self.index += 1
        self.graph.nodes.append(cast)
        self.counts["casts_added"] += 1

    def _unique(self, name: str) -> str:
        candidate, k = name, 1
        while candidate in self.names:
            candidate, k = f"{name}_{k}", k + 1
        self.names.add(candidate)
        return candidate

    # -- the node itself ------------------------------------------------------------------------------------
    def _retype_outputs(self, node: gs.Node, target: np.dtype) -> bool:
        changed = False
        if node.op == "Cast" and int(node.attrs.get("to", 0)) in ONNX_TYPE.values():
            changed = int(node.attrs["to"]) != ONNX_TYPE[target]
            node.attrs["to"] = ONNX_TYPE[target]
        if node.op == "ConstantOfShape":
            value = node.attrs.get("value")
            values = np.asarray(value.values) if isinstance(value, gs.Constant) else np.zeros(1, np.float32)
            if values.dtype in FLOATS and values.dtype != target:
                node.attrs["value"] = gs.Constant(getattr(value, "name", "") or "value", values.astype(target))
                changed = True
        for index, out in enumerate(node.outputs):
            if not is_float(out) or np_dtype(out) == target:
                continue
            changed = True
            if id(out) in self.outputs:
                self._keep_graph_output(node, index, out, target)
            else:
                out.dtype = target
        return changed

    def _keep_graph_output(self, node: gs.Node, index: int, out: gs.Variable, target: np.dtype) -> None:
        """The node computes ``out`` in ``target`` into a new tensor; a Cast gives the graph output its dtype."""
        declared = np_dtype(out)
        assert declared is not None
        inner = gs.Variable(self._unique(f"{out.name}/{_TAGS[target]}"), dtype=target, shape=out.shape)
        for consumer in self.facts.consumers(out):
            for slot, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[slot] = inner
        node.outputs[index] = inner
        self._add_cast(inner, out, declared)
        self.cache[(inner.name, declared.str)] = out

    def _drop_noop_casts(self) -> None:
        """Our own casts that no longer convert anything (a node went back to the cast's dtype) are bypassed."""
        for node in list(self.graph.nodes):
            if not is_boundary_cast(node) or not node.outputs or id(node.outputs[0]) in self.outputs:
                continue
            source, out = node.inputs[0], node.outputs[0]
            if np_dtype(source) != np_dtype(out):
                continue
            for consumer in self.facts.consumers(out):
                for slot, t in enumerate(consumer.inputs):
                    if t is out:
                        consumer.inputs[slot] = source
            node.outputs.clear()
            self.counts["casts_removed"] += 1
