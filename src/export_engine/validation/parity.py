"""Parity gate: Polygraphy's Comparator runs a reference and a candidate, our compare function judges.

The caller passes both runners (:mod:`export_engine.runners`): the reference is our PyTorch module or the FP32
ONNX graph, the candidate ONNX Runtime on the exported/optimised graph or an engine. Every output is checked
element-wise against the spec's tolerance, every failure is collected, and one table is raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.comparator import Comparator
from polygraphy.logger import G_LOGGER

from export_engine.core.types import Feed, Tolerance
from export_engine.errors import ParityError
from export_engine.validation.compare import GraphParityReport as GraphParityReport  # re-exported
from export_engine.validation.compare import OutputParity as OutputParity
from export_engine.validation.compare import _Judge
from export_engine.validation.compare import compare_output as compare_output
from export_engine.validation.compare import format_table as format_table

log = logging.getLogger(__name__)
G_LOGGER.module_severity = G_LOGGER.ERROR  # our own table replaces Polygraphy's verbose report


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
        candidate_outputs=[{name: np.array(value) for name, value in it.items()} for it in results[1][1]],
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
