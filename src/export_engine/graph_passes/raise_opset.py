"""Raise a graph's default-domain opset, refusing when an op it uses changed meaning in between.

The TorchScript exporter stops at opset 20; the standard ``Attention`` op needs 23. Between the two, most
ops were re-versioned only to accept new types (Cast, Constant, Reshape, Shape, Transpose, Conv, …), which
changes nothing for a graph that already type-checks. Others changed behaviour: GroupNormalization-21 takes
per-channel instead of per-group scale and bias, QuantizeLinear/DequantizeLinear-21 gained block
quantization. The check compares the two schemas from ``onnx.defs``: identical inputs, outputs and
attributes (names, types, defaults) and no dropped types, otherwise it refuses and names the op.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from export_engine.errors import GraphPassError
from export_engine.graph_passes.base import PassReport, timed


@dataclass(frozen=True)
class RaiseOpsetConfig:
    target: int = 23  # the first opset with the standard Attention op


def raise_opset(graph: gs.Graph, config: RaiseOpsetConfig) -> PassReport:
    """Raise the default-domain opset to ``config.target`` (never lowers it). The report lists the ops whose
    schema was re-versioned in between (all only by added types, or the pass raises GraphPassError)."""
    report = PassReport("raise_opset")
    with timed(report):
        source = int(graph.opset)
        reversioned = upgrade_opset(graph, config.target)
        report.matched = len(_default_domain_ops(graph))
        report.rewritten = int(graph.opset != source)
        report.details = {"from": source, "to": int(graph.opset), "reversioned_ops": reversioned,
                          "ir_version": graph.ir_version}  # fmt: skip
        graph.cleanup().toposort()
    return report


def upgrade_opset(graph: gs.Graph, target: int) -> list[str]:
    """Set the default-domain opset of ``graph`` to ``target`` (and its IR version to at least the one that
    came with it) after checking every op; returns the ops re-versioned in between. Does nothing when the
    graph is already at ``target`` or above. Raises GraphPassError, leaving the graph unchanged, when an op
    changed more than its types."""
    source = int(graph.opset)
    if source >= target:
        return []
    reversioned = []
    for op in sorted(_default_domain_ops(graph)):
        try:
            old = onnx.defs.get_schema(op, source, "")
            new = onnx.defs.get_schema(op, target, "")
        except onnx.defs.SchemaError as err:
            raise GraphPassError(
                f"cannot raise the graph's opset {source} -> {target}: no schema for {op} ({err})"
            ) from err
        if old.since_version == new.since_version:
            continue
        change = _schema_change(old, new)
        if change:
            raise GraphPassError(
                f"cannot raise the graph's opset {source} -> {target}: {op} changed between opset "
                f"{old.since_version} and {new.since_version} ({change}); export at opset {target} instead"
            )
        reversioned.append(op)
    graph.opset = target
    for entry in graph.import_domains or []:
        if entry.domain in ("", "ai.onnx"):
            entry.version = target
    # The IR version released with the opset (opset 23 came with IR 11); the TorchScript exporter writes IR 9.
    needed = min(ir for _, ir, opset, *_ in onnx.helper.VERSION_TABLE if opset >= target)
    if graph.ir_version is not None and graph.ir_version < needed:
        graph.ir_version = needed
    return reversioned


def _default_domain_ops(graph: gs.Graph) -> set[str]:
    ops: set[str] = set()
    for node in graph.nodes:
        if node.domain in (None, "", "ai.onnx"):
            ops.add(node.op)
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                ops |= _default_domain_ops(value)
    return ops


def _schema_change(old: onnx.defs.OpSchema, new: onnx.defs.OpSchema) -> str:
    """'' when ``new`` only adds types to ``old``; otherwise what changed."""

    def formals(schema: onnx.defs.OpSchema) -> tuple[list[tuple], list[tuple]]:
        return ([(f.name, f.type_str, f.option) for f in schema.inputs],
                [(f.name, f.type_str, f.option) for f in schema.outputs])  # fmt: skip

    if formals(old) != formals(new):
        return "its inputs or outputs differ"
    attrs_old = {k: (a.type, a.required, a.default_value.SerializeToString()) for k, a in old.attributes.items()}
    attrs_new = {k: (a.type, a.required, a.default_value.SerializeToString()) for k, a in new.attributes.items()}
    if attrs_old != attrs_new:
        changed = sorted({*attrs_old, *attrs_new} - {k for k in attrs_old if attrs_new.get(k) == attrs_old[k]})
        return f"attribute(s) {', '.join(changed)} differ"
    types_new = {c.type_param_str: set(c.allowed_type_strs) for c in new.type_constraints}
    for constraint in old.type_constraints:
        dropped = set(constraint.allowed_type_strs) - types_new.get(constraint.type_param_str, set())
        if dropped:
            return f"type constraint {constraint.type_param_str} dropped {sorted(dropped)}"
    return ""
