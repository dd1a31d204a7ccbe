"""Precision plans as data: which node computes in FP16, which in FP32, and why (``--precision hybrid``).

One entry per node that could compute in FP16, keyed by node name (our exporter and passes name nodes
deterministically for a given model and configuration; unnamed or duplicated names fall back to a structural
key ``<op>#<k>``, the k-th node of that op in graph order, which every entry also records). A plan is written
as readable JSON and can be given back with ``--precision-plan FILE``. Calibration makes plans
(:mod:`export_engine.calibration`); :mod:`export_engine.graph_passes.apply_precision_plan` applies them.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from export_engine.errors import UsageError
from export_engine.graph_passes.graph_facts import (
    PRECISION_DTYPES,
    GraphFacts,
    count_conversions,
    is_float,
    np_dtype,
)

log = logging.getLogger(__name__)

PLAN_FORMAT = "export-engine-precision-plan"
PLAN_VERSION = 1
# Rules whose FP32 the search may undo (measured, not structural).
DATA_RULES = frozenset({"magnitude", "initializer_range", "reduction_depth", "search"})


@dataclass
class NodePlan:
    """The precision of one node and why."""

    precision: str  # "fp16" | "fp32"
    op: str
    ordinal: int  # index among the graph's nodes of this op (structural fallback key)
    rule: str
    reason: str
    mandatory: bool  # structural: the search never changes it
    flops: int = 0
    absmax: float | None = None  # largest measured |x| over the node's float inputs and outputs
    depth: int | None = None  # accumulation depth (matrix ops)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: v for k, v in data.items() if v is not None}


@dataclass
class PrecisionPlan:
    """Per-node precision with reasons, plus metadata (thresholds, graph fingerprint, structure)."""

    nodes: dict[str, NodePlan]
    metadata: dict[str, Any] = field(default_factory=dict)

    # -- reading and writing -------------------------------------------------------------------------------
    def to_json(self, path: Path | None = None) -> str:
        data = {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "summary": self.summary(),
            "metadata": self.metadata,
            "nodes": {key: entry.to_dict() for key, entry in self.nodes.items()},
        }
        text = json.dumps(data, indent=1, default=_json_default) + "\n"
        if path is not None:
            path = Path(path)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> PrecisionPlan:
        """Read a plan from JSON text or a file path; a clear UsageError when it is not a plan."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            try:
                text = Path(source).read_text()
            except OSError as err:
                raise UsageError(f"precision plan {source}: cannot read it ({err})") from err
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"precision plan is not valid JSON: {err}") from err
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise UsageError(f'not a precision plan (expected "format": "{PLAN_FORMAT}")')
        if data.get("version") != PLAN_VERSION:
            raise UsageError(f"precision plan version {data.get('version')} is not supported (need {PLAN_VERSION})")
        nodes = {}
        known = set(NodePlan.__dataclass_fields__)
        for key, entry in data.get("nodes", {}).items():
            if not isinstance(entry, dict) or not {"precision", "op", "ordinal", "rule", "reason"} <= entry.keys():
                raise UsageError(f"precision plan: node {key!r} lacks precision/op/ordinal/rule/reason")
            entry = {k: v for k, v in entry.items() if k in known}
            entry.setdefault("mandatory", entry["rule"] not in DATA_RULES and entry["rule"] != "default")
            if entry.get("precision") not in PRECISION_DTYPES:
                raise UsageError(
                    f"precision plan: node {key!r} has precision {entry.get('precision')!r}; "
                    f"use one of {sorted(PRECISION_DTYPES)}"
                )
            nodes[key] = NodePlan(**entry)
        return cls(nodes, dict(data.get("metadata", {})))

    # -- queries --------------------------------------------------------------------------------------------
    def keys_with(self, precision: str) -> list[str]:
        return [key for key, entry in self.nodes.items() if entry.precision == precision]

    def fp16_flop_share(self) -> float:
        total = sum(e.flops for e in self.nodes.values())
        return sum(e.flops for e in self.nodes.values() if e.precision == "fp16") / total if total else 0.0

    def summary(self) -> dict[str, Any]:
        """FP16 FLOP share, node counts, FP32 nodes and FLOPs by rule, casts and islands (when known)."""
        fp32 = [e for e in self.nodes.values() if e.precision == "fp32"]
        structure = self.metadata.get("structure", {})
        return {
            "nodes": len(self.nodes),
            "fp16_nodes": len(self.nodes) - len(fp32),
            "fp32_nodes": len(fp32),
            "gflops": round(sum(e.flops for e in self.nodes.values()) / 1e9, 6),
            "fp16_flop_share": round(self.fp16_flop_share(), 6),
            "fp32_by_rule": dict(Counter(e.rule for e in fp32).most_common()),
            "fp32_gflops_by_rule": {
                rule: round(sum(e.flops for e in fp32 if e.rule == rule) / 1e9, 6)
                for rule in sorted({e.rule for e in fp32})
            },
            "casts": structure.get("casts"),
            "initializer_copies": structure.get("initializer_copies"),
            "fp32_islands": structure.get("islands"),
            "largest_fp32_islands": structure.get("largest_islands", []),
        }

    def summary_line(self) -> str:
        s = self.summary()
        rules = ", ".join(f"{k} {v}" for k, v in s["fp32_by_rule"].items()) or "none"
        return (
            f"{s['fp16_nodes']}/{s['nodes']} nodes FP16, {100 * s['fp16_flop_share']:.1f}% of FLOPs in FP16, "
            f"{s['casts']} casts, {s['fp32_islands']} FP32 islands (FP32 by rule: {rules})"
        )

    # -- edits (return new plans) ---------------------------------------------------------------------------
    def with_precision(self, keys: Iterable[str], precision: str, rule: str, reason: str) -> PrecisionPlan:
        nodes = dict(self.nodes)
        for key in keys:
            entry = nodes[key]
            if entry.mandatory or entry.precision == precision:
                continue
            nodes[key] = replace(entry, precision=precision, rule=rule, reason=reason)
        return PrecisionPlan(nodes, {**self.metadata, "structure": {}})

    # -- binding to a graph ---------------------------------------------------------------------------------
    def resolve(self, facts: GraphFacts) -> tuple[dict[int, np.dtype], list[str]]:
        """Map entries onto ``facts.graph``: {id(node): dtype}, plus one problem line per entry that does not fit."""
        targets: dict[int, np.dtype] = {}
        problems: list[str] = []
        eligible = {id(n) for n in facts.eligible}
        by_ordinal = {(n.op, facts.ordinal[id(n)]): n for n in facts.graph.nodes}
        for key, entry in self.nodes.items():
            node = facts.by_key.get(key)
            if node is None or node.op != entry.op:
                node = by_ordinal.get((entry.op, entry.ordinal))
                if node is None:
                    problems.append(f"{key} ({entry.op}): not in this graph")
                    continue
            if id(node) not in eligible:
                reason = facts.ineligible_reason.get(id(node), "not eligible")
                problems.append(f"{key} ({entry.op}): cannot be planned ({reason})")
                continue
            targets[id(node)] = PRECISION_DTYPES[entry.precision]
        missing = len(eligible) - len(targets)
        if missing > 0:
            problems.append(f"{missing} node(s) that could compute in FP16 are not in the plan (left as they are)")
        return targets, problems


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def describe_structure(facts: GraphFacts, plan: PrecisionPlan) -> dict[str, Any]:
    """Casts the plan needs and its FP32 islands (connected FP32 nodes), largest first, with their reasons."""
    targets, _ = plan.resolve(facts)
    casts, copies = count_conversions(facts, targets)
    fp32 = {i for i, dtype in targets.items() if dtype == PRECISION_DTYPES["fp32"]}
    parent = {i: i for i in fp32}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for node in facts.eligible:
        if id(node) not in fp32:
            continue
        for out in node.outputs:
            for consumer in facts.consumers(out):
                if id(consumer) in fp32:
                    parent[find(id(consumer))] = find(id(node))
    members: dict[int, list[gs.Node]] = {}
    for node in facts.eligible:
        if id(node) in fp32:
            members.setdefault(find(id(node)), []).append(node)
    islands = sorted(members.values(), key=len, reverse=True)
    largest = []
    for nodes in islands[:10]:
        rules = Counter(plan.nodes[facts.key(n)].rule for n in nodes if facts.key(n) in plan.nodes)
        largest.append({"first": facts.key(nodes[0]), "nodes": len(nodes), "rules": dict(rules)})
    return {"casts": casts, "initializer_copies": copies, "islands": len(islands), "largest_islands": largest}


def np_precision(dtype: np.dtype | None) -> str | None:
    for name, value in PRECISION_DTYPES.items():
        if dtype == value:
            return name
    return None


def current_precisions(graph: gs.Graph) -> dict[str, str]:
    """The precision each eligible node of ``graph`` computes in now (by plan key): FP16 where its float
    outputs are FP16. For reports and tests."""
    facts = GraphFacts.of(graph)
    result = {}
    for node in facts.eligible:
        dtypes = {np_dtype(t) for t in node.outputs if is_float(t)} or {np_dtype(t) for t in node.inputs if is_float(t)}
        name = np_precision(dtypes.pop()) if len(dtypes) == 1 else None
        if name is not None:
            result[facts.key(node)] = name
    return result
