"""Sensitivity search: keep as much FP16 as the output tolerances allow, in a bounded number of evaluations.

Each evaluation builds the hybrid graph of a candidate plan, runs it with ONNX Runtime on the calibration
feeds and compares every output with the FP32 graph's (the same element-wise test as the parity gate).

1. Evaluate the rule-based plan.
2. If it fails: move FP32 islands outward. First by sensitivity (measured magnitude): nodes whose |x| exceeds
   data_max / 4, / 16, / 64 go to FP32; then by distance: FP16 nodes within 2, 4, 8, 16 hops upstream of the
   failing outputs.
3. If it passes: return data-driven FP32 nodes to FP16, least risky (smallest |x|) first, as one group and then
   by halves of the groups that fail.

Candidates are evaluated with FP16 storage emulated (``fp16_emulation``): plain ONNX Runtime on the CPU runs
FP16 regions in FP32 and would not see an FP16 activation overflow that a GPU engine produces. Structural FP32
islands and fused attention are never changed, and nodes whose measured values come within
``never_relax_above`` of FP16's range never return to FP16 (a margin for inputs the calibration set missed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from export_engine.calibration import lean_session_options
from export_engine.calibration.fp16_emulation import emulate_fp16_storage
from export_engine.calibration.sessions import in_memory_model
from export_engine.core.types import Feed, Tolerance
from export_engine.graph_passes.base import load_graph
from export_engine.graph_passes.graph_facts import GraphFacts, fill_missing_dtypes
from export_engine.graph_passes.precision_plan import DATA_RULES, PrecisionPlan, describe_structure
from export_engine.validation.compare import compare_output

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchConfig:
    max_evaluations: int = 12
    tighten_factors: tuple[float, ...] = (4.0, 16.0, 64.0)  # data_max divided by these while failing
    grow_hops: tuple[int, ...] = (2, 4, 8, 16)  # then FP32 this many hops upstream of failing outputs
    relax: bool = True
    # |x| above which a node never returns to FP16: 8x below FP16's largest value (65504), a margin for inputs
    # larger than the calibration set's.
    never_relax_above: float = 8192.0
    # Evaluate with every FP16 tensor rounded through FP16 (see fp16_emulation); off = plain ONNX Runtime.
    emulate_fp16_storage: bool = True


@dataclass
class Evaluation:
    passed: bool
    outputs: dict[str, dict[str, Any]]  # per output: max_abs, share_over, ratio (error / allowed), passed
    seconds: float

    def worst(self) -> tuple[str, float]:
        if not self.outputs:
            return "", 0.0
        name = max(self.outputs, key=lambda n: self.outputs[n]["ratio"])
        return name, float(self.outputs[name]["ratio"])


@dataclass
class SearchStep:
    step: str
    fp16_flop_share: float
    fp16_nodes: int
    passed: bool
    worst_output: str
    worst_ratio: float  # largest |error| / (atol + rtol |ref|); <= 1 everywhere means no element over
    seconds: float


@dataclass
class SearchReport:
    steps: list[SearchStep] = field(default_factory=list)
    passed: bool = False
    initial_fp16_flop_share: float = 0.0
    final_fp16_flop_share: float = 0.0
    moved_to_fp32: list[str] = field(default_factory=list)
    returned_to_fp16: list[str] = field(default_factory=list)
    final_outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Evaluator = Callable[[PrecisionPlan], Evaluation]


@dataclass(frozen=True)
class Known:
    """What the caller already has, so the evaluator need not redo it: the FP32 graph in memory (not modified;
    candidates are copies sharing its weights) and the FP32 outputs on each calibration feed."""

    graph: gs.Graph | None = None
    reference: Sequence[Mapping[str, np.ndarray]] | None = None


class OrtPlanEvaluator:
    """Builds a plan's hybrid graph from the FP32 graph and checks its outputs on ONNX Runtime (CPU).

    A candidate's session reads the candidate graph's weight arrays in place (external initializers, see
    :mod:`export_engine.calibration.sessions`): serialized bytes held the graph three times over (graph, proto,
    bytes) next to the session's own weights, and a scratch file cost seconds per candidate at full size."""

    def __init__(
        self,
        fp32_onnx: Path | None,
        feeds: Sequence[Feed],
        tolerances: Mapping[str, Tolerance],
        *,
        emulate: bool = True,
        known: Known | None = None,
    ):
        from export_engine.graph_passes.apply_precision_plan import ApplyPrecisionPlanConfig, apply_precision_plan

        known = known or Known()
        self._apply = apply_precision_plan
        self._config = ApplyPrecisionPlanConfig
        if known.graph is not None:
            self.graph = known.graph
        elif fp32_onnx is not None:
            self.graph = load_graph(Path(fp32_onnx))
        else:
            raise ValueError("the evaluator needs the FP32 graph: a path or known.graph")
        fill_missing_dtypes(self.graph)
        for tensor in self.graph.tensors().values():
            if isinstance(tensor, gs.Constant):
                _ = tensor.values  # load once: every candidate's graph copy shares these arrays
        self.feeds = list(feeds)
        self.tolerances = dict(tolerances)
        self.emulate = emulate
        if known.reference is not None:
            self.reference = [{n: np.asarray(r[n]) for n in self.tolerances} for r in known.reference]
        else:
            session = (
                ort.InferenceSession(str(fp32_onnx), lean_session_options(), providers=["CPUExecutionProvider"])
                if fp32_onnx is not None
                else in_memory_model(self.graph).session()
            )
            self.reference = [dict(zip(self.tolerances, session.run(list(self.tolerances), f), strict=True))
                              for f in feeds]  # fmt: skip
            del session
        if len(self.reference) != len(self.feeds):
            raise ValueError(f"{len(self.reference)} reference outputs for {len(self.feeds)} calibration feeds")

    def __call__(self, plan: PrecisionPlan) -> Evaluation:
        start = time.perf_counter()
        graph = self.graph.copy()
        self._apply(graph, self._config(plan))
        if self.emulate:
            emulate_fp16_storage(graph)
        session = in_memory_model(graph).session(optimize=not self.emulate)  # weights in place, no scratch file
        del graph
        outputs: dict[str, dict[str, Any]] = {}
        for feed, ref in zip(self.feeds, self.reference, strict=True):
            got = dict(zip(self.tolerances, session.run(list(self.tolerances), feed), strict=True))
            for name, tol in self.tolerances.items():
                outputs[name] = _worse(outputs.get(name), _judge(name, got[name], ref[name], tol))
        passed = all(o["passed"] for o in outputs.values())
        return Evaluation(passed, outputs, round(time.perf_counter() - start, 3))


def _judge(name: str, actual: np.ndarray, ref: np.ndarray, tol: Tolerance) -> dict[str, Any]:
    parity = compare_output(name, np.asarray(actual), np.asarray(ref), tol)
    if parity.shape != list(np.asarray(ref).shape) or not parity.finite:
        ratio = float("inf")
    else:
        a, r = np.asarray(actual, np.float64), np.asarray(ref, np.float64)
        ratio = float((np.abs(a - r) / (tol.atol + tol.rtol * np.abs(r))).max()) if r.size else 0.0
    return {"max_abs": parity.max_abs, "share_over": parity.share_over, "ratio": ratio, "passed": parity.passed}


def _worse(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    if old is None:
        return new
    return {k: (old[k] and new[k]) if k == "passed" else max(old[k], new[k]) for k in new}


def search_precision(
    fp32_onnx: Path | None,
    feeds_calib: Sequence[Feed],
    tolerances: Mapping[str, Tolerance],
    initial_plan: PrecisionPlan,
    *,
    config: SearchConfig | None = None,
    evaluate: Evaluator | None = None,
    known: Known | None = None,
) -> tuple[PrecisionPlan, SearchReport]:
    """The plan with the most FP16 found within ``config.max_evaluations`` that meets ``tolerances``.

    ``evaluate`` replaces the ONNX Runtime evaluator (tests, or another runtime); ``known`` hands the default
    evaluator the FP32 graph and outputs the caller already has. When nothing passes, the last (most FP32) plan
    is returned with ``report.passed = False``; the caller decides (the parity gate fails).
    """
    structure = known.graph if known is not None and known.graph is not None else fp32_onnx
    if structure is None:
        raise ValueError("search_precision needs the FP32 graph: a path or known.graph")
    cfg = config or SearchConfig()
    evaluator = evaluate or OrtPlanEvaluator(
        fp32_onnx, feeds_calib, tolerances, emulate=cfg.emulate_fp16_storage, known=known
    )
    search = _Search(structure, initial_plan, cfg, evaluator)
    return search.run()


class _Search:
    def __init__(self, source: Path | gs.Graph, plan: PrecisionPlan, config: SearchConfig, evaluate: Evaluator):
        self.source = source  # the FP32 graph, or its file: read for the graph's structure only
        self.plan = plan
        self.config = config
        self.evaluate = evaluate
        self.report = SearchReport(initial_fp16_flop_share=round(plan.fp16_flop_share(), 6))
        self._facts: GraphFacts | None = None

    def run(self) -> tuple[PrecisionPlan, SearchReport]:
        result = self._try(self.plan, "rule-based plan")
        assert result is not None
        if not result.passed:
            result = self._tighten(result)
        if result.passed and self.config.relax:
            result = self._relax(result)
        self.report.passed = result.passed
        self.report.final_fp16_flop_share = round(self.plan.fp16_flop_share(), 6)
        self.report.final_outputs = result.outputs
        plan = PrecisionPlan(
            self.plan.nodes,
            {
                **self.plan.metadata,
                "created_by": "search_precision",
                "search": {"evaluations": len(self.report.steps), "passed": result.passed},
            },
        )
        plan.metadata["structure"] = describe_structure(self._structure(), plan)
        log.info(
            "precision search: %d evaluations, %s; %s",
            len(self.report.steps),
            "passed" if result.passed else "FAILED",
            plan.summary_line(),
        )
        return plan, self.report

    def _try(self, plan: PrecisionPlan, step: str) -> Evaluation | None:
        if len(self.report.steps) >= self.config.max_evaluations:
            return None
        result = self.evaluate(plan)
        worst, ratio = result.worst()
        self.report.steps.append(
            SearchStep(
                step,
                round(plan.fp16_flop_share(), 6),
                len(plan.keys_with("fp16")),
                result.passed,
                worst,
                ratio,
                result.seconds,
            )
        )
        log.info(
            "precision search %d/%d: %s: FP16 FLOPs %.1f%%, %s (worst %s at %.3g x tolerance)",
            len(self.report.steps),
            self.config.max_evaluations,
            step,
            100 * plan.fp16_flop_share(),
            "pass" if result.passed else "fail",
            worst,
            ratio,
        )
        return result

    def _tighten(self, result: Evaluation) -> Evaluation:
        data_max = float(self.plan.metadata.get("config", {}).get("data_max", 512.0))
        for factor in self.config.tighten_factors:
            threshold = data_max / factor
            keys = [
                k
                for k, e in self.plan.nodes.items()
                if e.precision == "fp16" and not e.mandatory and e.absmax is not None and e.absmax > threshold
            ]
            if keys:
                reason = f"search: |x| > {threshold:g} while outputs were over tolerance"
                outcome = self._move(keys, "fp32", reason, f"FP32 where |x| > {threshold:g}")
                if outcome is None:
                    return result
                result = outcome
                if result.passed:
                    return result
        for hops in self.config.grow_hops:
            failing = [name for name, o in result.outputs.items() if not o["passed"]]
            keys = self._upstream_fp16(failing, hops)
            if keys:
                outcome = self._move(
                    keys,
                    "fp32",
                    f"search: within {hops} hops of a failing output",
                    f"FP32 within {hops} hops of {', '.join(failing[:3])}",
                )
                if outcome is None:
                    return result
                result = outcome
                if result.passed:
                    return result
        return result

    def _move(self, keys: list[str], precision: str, reason: str, step: str) -> Evaluation | None:
        candidate = self.plan.with_precision(keys, precision, "search", reason)
        outcome = self._try(candidate, step)
        if outcome is not None:
            self.plan = candidate  # moving outward is kept even when still failing: the next step builds on it
            self.report.moved_to_fp32.extend(keys)
        return outcome

    def _relax(self, result: Evaluation) -> Evaluation:
        limit = self.config.never_relax_above
        candidates = [
            k
            for k, e in self.plan.nodes.items()
            if e.precision == "fp32"
            and e.rule in DATA_RULES
            and e.rule != "initializer_range"
            and (e.absmax is None or e.absmax <= limit)
        ]
        candidates.sort(key=lambda k: self.plan.nodes[k].absmax or 0.0)
        queue = [candidates] if candidates else []
        while queue:
            group = queue.pop(0)
            candidate = self.plan.with_precision(group, "fp16", "search", "search: back to FP16, outputs in tolerance")
            outcome = self._try(candidate, f"{len(group)} node(s) back to FP16")
            if outcome is None:
                break
            if outcome.passed:
                self.plan, result = candidate, outcome
                self.report.returned_to_fp16.extend(group)
            elif len(group) > 1:
                half = len(group) // 2
                queue[:0] = [group[:half], group[half:]]
        return result

    def _structure(self) -> GraphFacts:
        if self._facts is None:
            if isinstance(self.source, gs.Graph):
                graph = self.source
            else:
                graph = gs.import_onnx(onnx.load(str(self.source), load_external_data=False))
            fill_missing_dtypes(graph)
            self._facts = GraphFacts.of(graph)
        return self._facts

    def _upstream_fp16(self, outputs: list[str], hops: int) -> list[str]:
        facts = self._structure()
        frontier = [t for t in facts.graph.outputs if t.name in outputs]
        seen: set[int] = set()
        keys: list[str] = []
        for _ in range(hops):
            producers = [t.inputs[0] for t in frontier if len(t.inputs) == 1]
            frontier = []
            for node in producers:
                if id(node) in seen:
                    continue
                seen.add(id(node))
                key = facts.keys[id(node)]
                entry = self.plan.nodes.get(key)
                if entry is not None and entry.precision == "fp16" and not entry.mandatory:
                    keys.append(key)
                frontier.extend(t for t in node.inputs if t.name)
        return keys
