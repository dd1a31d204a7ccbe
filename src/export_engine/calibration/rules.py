"""The rules behind :func:`export_engine.calibration.plan.plan_precision` (HybridCast).

Structural FP32 islands come first (they are never undone), then the data-driven ones (the search may undo
them), then FP16 for everything else. A node keeps the first rule that claims it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from export_engine.calibration.plan import HybridCastConfig
from export_engine.calibration.statistics import TensorStats
from export_engine.graph_passes.graph_facts import (
    MATRIX_OPS,
    GraphFacts,
    constant_values,
    fill_missing_dtypes,
    is_float,
    node_flops,
    reduced_elements,
    reduction_depth,
    static_shape,
)
from export_engine.graph_passes.precision_plan import DATA_RULES, NodePlan, PrecisionPlan, describe_structure

_REDUCTIONS = frozenset({"ReduceMean", "ReduceSum", "ReduceProd", "ReduceLogSumExp", "ReduceSumSquare", "ReduceL1"})
_NORMS = frozenset({"ReduceL2", "ReduceSumSquare", "LpNormalization"})
_NORM_CHAIN = frozenset({"Add", "Sqrt", "Clip", "Max", "Reciprocal", "Pow", "Unsqueeze", "Reshape", "Expand"})
_NORMALIZATION_OPS = frozenset({"LayerNormalization", "GroupNormalization", "InstanceNormalization"})
_INTEGER_CASTS = frozenset({2, 3, 4, 5, 6, 7, 9, 12, 13})  # uint8 int8 uint16 int16 int32 int64 bool uint32 uint64


class _Planner:
    def __init__(self, graph: gs.Graph, stats: Mapping[str, TensorStats], config: HybridCastConfig):
        fill_missing_dtypes(graph)
        self.graph = graph
        self.facts = GraphFacts.of(graph)
        self.stats = stats
        self.config = config
        self.eligible = {id(n): n for n in self.facts.eligible}
        self.decided: dict[int, tuple[str, str, str]] = {}  # id -> (precision, rule, reason)
        self.warnings: list[str] = []

    def shape_of(self, tensor: gs.Tensor) -> tuple[int, ...] | None:
        measured = self.stats.get(tensor.name)
        if measured is not None and measured.shape is not None:
            return tuple(measured.shape)
        if isinstance(tensor, gs.Constant):
            return tuple(int(d) for d in tensor.shape)
        return static_shape(tensor)

    def absmax(self, tensor: gs.Tensor) -> float | None:
        measured = self.stats.get(tensor.name)
        if measured is None:
            return None
        return measured.absmax if np.isfinite(measured.absmax) and measured.finite else float("inf")

    def mark(self, node: gs.Node | None, precision: str, rule: str, reason: str) -> bool:
        if node is None or id(node) not in self.eligible or id(node) in self.decided:
            return False
        self.decided[id(node)] = (precision, rule, reason)
        return True

    # -- structural rules -----------------------------------------------------------------------------------
    def structural(self) -> None:
        cfg = self.config
        for node in self.facts.eligible:
            if node.op == "Attention" and cfg.fp16_attention:
                self.mark(
                    node,
                    "fp16",
                    "attention",
                    "fused attention stays FP16: FP16 Q/K/V for fused kernels, no casts around its softmax",
                )
        for node in self.facts.eligible:
            key = self.facts.key(node)
            if key in cfg.fp32_nodes or node.name in cfg.fp32_nodes:
                self.mark(node, "fp32", "user", "listed in fp32_nodes")
            elif node.op in cfg.fp32_ops:
                self.mark(node, "fp32", "user", f"{node.op} is listed in fp32_ops")
            elif node.op in _NORMALIZATION_OPS:
                self.mark(
                    node,
                    "fp32",
                    "layernorm",
                    f"{node.op}: TensorRT 11 normalizes in its input dtype and FP16 overflows "
                    "(TensorRT#2564); input, scale and bias are cast to FP32",
                )
        self._norm_islands()
        self._long_reductions()
        self._exp_heads()
        self._integer_casts()
        if cfg.fp32_tail:
            self._tail()

    def _norm_islands(self) -> None:
        reason = "norm/variance: squares overflow FP16 above |x| = 256"
        for node in self.facts.eligible:
            square = None
            if node.op in _NORMS:
                seed = node
            elif node.op in ("ReduceMean", "ReduceSum") and _is_square(_producer(node.inputs[0])):
                seed, square = node, _producer(node.inputs[0])
            else:
                continue
            self.mark(seed, "fp32", "normalization", reason)
            if square is not None:
                self.mark(square, "fp32", "normalization", reason)
                centre = _producer(square.inputs[0])
                if centre is not None and centre.op == "Sub" and len(centre.inputs) > 1:
                    mean = _producer(centre.inputs[1])
                    if mean is not None and mean.op in _REDUCTIONS:
                        self.mark(centre, "fp32", "normalization", reason + " (centering)")
                        self.mark(mean, "fp32", "normalization", reason + " (mean)")
            self._norm_chain(seed, reason)

    def _norm_chain(self, seed: gs.Node, reason: str) -> None:
        """From a norm, through eps/sqrt/clip to the division (or multiplication) that normalizes."""
        frontier, seen = [seed], {id(seed)}
        for _ in range(6):
            nxt = []
            for node in frontier:
                for out in node.outputs:
                    for consumer in self.facts.consumers(out):
                        if id(consumer) in seen:
                            continue
                        seen.add(id(consumer))
                        if consumer.op in ("Div", "Mul"):
                            self.mark(consumer, "fp32", "normalization", reason + " (normalizing division)")
                        elif consumer.op in _NORM_CHAIN:
                            self.mark(consumer, "fp32", "normalization", reason)
                            nxt.append(consumer)
            frontier = nxt

    def _long_reductions(self) -> None:
        limit = self.config.max_reduction_elements
        for node in self.facts.eligible:
            if node.op in _REDUCTIONS:
                count = reduced_elements(node, self.shape_of)
                if count is not None and count > limit:
                    self.mark(node, "fp32", "reduction", f"reduces {count} elements (> {limit})")

    def _exp_heads(self) -> None:
        for node in self.facts.eligible:
            if node.op != "Exp":
                continue
            self.mark(node, "fp32", "exp_head", "exp overflows FP16 above x = 11.1 (conf/desc_conf/expm1 heads)")
            stack = [node]
            while stack:
                current = stack.pop()
                for out in current.outputs:
                    for consumer in self.facts.consumers(out):
                        if consumer.op in MATRIX_OPS or id(consumer) not in self.eligible:
                            continue
                        if self.mark(consumer, "fp32", "exp_head", f"post-processing after {node.name or 'Exp'}"):
                            stack.append(consumer)

    def _integer_casts(self) -> None:
        for node in self.graph.nodes:
            if node.op == "Cast" and int(node.attrs.get("to", 0)) in _INTEGER_CASTS and is_float(node.inputs[0]):
                self.mark(
                    _producer(node.inputs[0]),
                    "fp32",
                    "integer_cast",
                    f"its output becomes integers in {node.name or 'a Cast'}: FP16 rounding would change them",
                )

    def _tail(self) -> None:
        reaches_matrix: set[int] = set()
        for node in reversed(self.graph.nodes):
            if node.op in MATRIX_OPS or any(
                id(c) in reaches_matrix for out in node.outputs for c in self.facts.consumers(out)
            ):
                reaches_matrix.add(id(node))
        for node in self.facts.eligible:
            if id(node) not in reaches_matrix:
                self.mark(node, "fp32", "tail", "after the last matrix op: cheap post-processing, outputs not rounded")

    # -- data-driven rules ----------------------------------------------------------------------------------
    def data_driven(self) -> None:
        cfg = self.config
        for tensor in self.graph.tensors().values():
            if not is_float(tensor) or isinstance(tensor, gs.Constant):
                continue
            value = self.absmax(tensor)
            if value is None or value <= cfg.data_max:
                continue
            text = f"{tensor.name} reaches |x| = {value:.3g} (> data_max {cfg.data_max:g})"
            self._data_mark(_producer(tensor), "magnitude", f"output {text}")
            for consumer in self.facts.consumers(tensor):
                self._data_mark(consumer, "magnitude", f"input {text}")
        for node in self.facts.eligible:
            for tensor in node.inputs:
                values = constant_values(tensor) if is_float(tensor) else None
                if values is not None and values.size and float(np.abs(values).max()) > cfg.init_max:
                    big = float(np.abs(values).max())
                    self._data_mark(
                        node, "initializer_range", f"{tensor.name} holds |x| = {big:.3g} > {cfg.init_max:g}"
                    )
            depth = reduction_depth(node, self.shape_of)
            if cfg.max_reduction_depth is not None and depth is not None and depth > cfg.max_reduction_depth:
                self._data_mark(node, "reduction_depth", f"sums {depth} terms (> {cfg.max_reduction_depth})")

    def _data_mark(self, node: gs.Node | None, rule: str, reason: str) -> None:
        if node is None or id(node) not in self.eligible:
            return
        decided = self.decided.get(id(node))
        if decided is not None and decided[1] == "attention":
            self.warnings.append(f"{node.name}: {reason}, but fused attention stays FP16")
            return
        self.mark(node, "fp32", rule, reason)

    # -- result ---------------------------------------------------------------------------------------------
    def plan(self) -> PrecisionPlan:
        nodes: dict[str, NodePlan] = {}
        for node in self.facts.eligible:
            precision, rule, reason = self.decided.get(id(node), ("fp16", "default", "no rule keeps it in FP32"))
            magnitudes = [self.absmax(t) for t in (*node.inputs, *node.outputs) if is_float(t)]
            known = [m for m in magnitudes if m is not None]
            nodes[self.facts.key(node)] = NodePlan(
                precision=precision,
                op=node.op,
                ordinal=self.facts.ordinal[id(node)],
                rule=rule,
                reason=reason,
                mandatory=rule not in DATA_RULES and rule != "default",
                flops=node_flops(node, self.shape_of),
                absmax=max(known) if known else None,
                depth=reduction_depth(node, self.shape_of),
            )
        ops = Counter(n.op for n in self.facts.eligible)
        metadata = {
            "created_by": "plan_precision",
            "config": self.config.to_dict(),
            "graph": {"nodes": len(self.graph.nodes), "eligible": len(self.facts.eligible), "ops": dict(ops)},
            "statistics": {
                "tensors": len(self.stats),
                "feeds": max((s.samples for s in self.stats.values()), default=0),
            },
            "warnings": self.warnings,
        }
        plan = PrecisionPlan(nodes, metadata)
        plan.metadata["structure"] = describe_structure(self.facts, plan)
        return plan


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def _is_square(node: gs.Node | None) -> bool:
    if node is None:
        return False
    if node.op == "Mul":
        return len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]
    if node.op == "Pow" and len(node.inputs) == 2:
        exponent = constant_values(node.inputs[1])
        return exponent is not None and exponent.size == 1 and float(exponent.reshape(-1)[0]) == 2.0
    return False


def plan_from_rules(graph: gs.Graph, stats: Mapping[str, TensorStats], config: HybridCastConfig) -> PrecisionPlan:
    planner = _Planner(graph, stats, config)
    planner.structural()
    planner.data_driven()
    return planner.plan()
