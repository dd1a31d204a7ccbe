"""The element-wise comparison every parity check uses, and its table; torch-free, so a deployment that only
loads and checks an artifact needs neither torch's model code nor Polygraphy."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from export_engine.core.types import Tolerance


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
    # The candidate's outputs for every sample (a later gate with the same graph as its reference reuses them).
    candidate_outputs: list[dict[str, np.ndarray]] | None = field(default=None, repr=False, compare=False)

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
