"""Check a runner against the artifact's stored FP32 reference: what every rewrite and every backend the export
gates did not run must pass before it is used.

An artifact stores, per graph, a reference input, the FP32 outputs that PyTorch's model gave for it, and the
tolerances the export gates used (``reference_check`` in the manifest). Running that input through any runner
(ONNX Runtime on a rewritten graph, an engine) and comparing at those tolerances costs one inference and says
whether this runner computes what the artifact promises.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from export_engine.core.types import Tolerance
from export_engine.errors import ArtifactError, BackendError, ModelInputError, ParityError
from export_engine.runners.ort_lowering import graph_key
from export_engine.validation.compare import GraphParityReport, compare_output, format_table

log = logging.getLogger(__name__)

NumpyRunner = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]
R = TypeVar("R", bound=Callable[..., Any])


def has_reference(artifact: Path, graph_meta: Mapping[str, Any]) -> bool:
    check = graph_meta.get("reference_check")
    if not check:
        return False
    return (artifact / check["inputs"]).is_file() and (artifact / check["expected"]).is_file()


def check_runner(run: Callable[..., Any], artifact: Path, graph_meta: Mapping[str, Any], backend: str,
                 precision: str = "") -> GraphParityReport:  # fmt: skip
    """Run the graph's stored reference input through ``run`` and compare with the stored FP32 outputs."""
    check = graph_meta.get("reference_check")
    if not check:
        raise ArtifactError(f"{artifact}: graph {graph_meta['name']} stores no reference data; export it again")
    with np.load(artifact / check["inputs"]) as data:
        feed = {k: data[k] for k in data.files}
    with np.load(artifact / check["expected"]) as data:
        expected = {k: data[k] for k in data.files}
    outputs = run(feed)
    # a runner of a pruned graph (see ort_lowering.lowered_graph) computes, and is checked on, its entry's outputs
    produced = {o["name"] for o in graph_meta.get("outputs", ())} or set(expected)
    results = [
        compare_output(name, np.asarray(outputs[name]), expected[name], Tolerance(**check["tolerances"][name]))
        for name in expected
        if name in produced
    ]
    if not results:
        raise ArtifactError(f"{artifact}: the reference of graph {graph_meta['name']} holds none of its outputs "
                            f"{sorted(produced)}; export it again")  # fmt: skip
    return GraphParityReport(graph_meta["name"], "stored-fp32-reference", backend, precision, 1, 0.0, results)


def worst(report: GraphParityReport) -> str:
    """The failing output with the largest excess over its tolerance, in one phrase."""
    failing = [r for r in report.outputs if not r.passed] or list(report.outputs)
    r = max(failing, key=lambda o: o.max_abs / max(o.tolerance.get("atol", 0.0), 1e-12))
    tol = r.tolerance
    return (f"{r.output} max abs error {r.max_abs:.3g}, {r.share_over:.1%} over atol {tol.get('atol')} / "
            f"rtol {tol.get('rtol')}" + ("" if r.finite else ", non-finite values"))  # fmt: skip


@dataclass
class RewriteOutcome:
    """What a session runs: the rewrites in use, and the check that decided (None: nothing to check)."""

    lowerings: tuple[str, ...]
    tf32: bool
    check: GraphParityReport | None = None
    fallback: str | None = None  # why the session runs the graph as stored


def open_checked(open_fn: Callable[[tuple[str, ...], bool], R], path: Path, graph_meta: Mapping[str, Any],
                 lowerings: tuple[str, ...], tf32: bool, check: bool = True, strict: bool = False,
                 context: tuple = ()) -> tuple[R, RewriteOutcome]:  # fmt: skip
    """Open ``path`` with the rewrites (``open_fn(lowerings, tf32)``), check the result against the artifact's
    reference, and fall back to the graph as stored (or, ``strict``, refuse) when it fails.

    A verdict is remembered for the process, per graph file, rewrites and ``context`` (what else the result
    depends on: the runner passes the GPU and its session options), so another GPU or other options are checked
    again.

    On failure each rewrite is tried alone, so that the message names the one that broke and by how much; that
    costs one session and inference per rewrite, on the failure path only."""
    if not (lowerings or tf32) or not check:
        return open_fn(lowerings, tf32), RewriteOutcome(lowerings, tf32)
    key = (*graph_key(path), lowerings, tf32, getattr(open_fn, "__qualname__", ""), context)
    with _CHECKED_LOCK:
        known = _CHECKED.get(key)
    if known is not None:  # later sessions of the same graph, rewrites and context reuse the verdict
        return open_fn(known.lowerings, known.tf32), known
    runner, outcome = _open_and_check(open_fn, path, graph_meta, lowerings, tf32, strict)
    with _CHECKED_LOCK:
        _CHECKED[key] = outcome
    return runner, outcome


_CHECKED: dict[tuple, RewriteOutcome] = {}
_CHECKED_LOCK = threading.Lock()  # sessions may be opened from several threads


def _open_and_check(open_fn: Callable[[tuple[str, ...], bool], R], path: Path, graph_meta: Mapping[str, Any],
                    lowerings: tuple[str, ...], tf32: bool, strict: bool) -> tuple[R, RewriteOutcome]:  # fmt: skip
    def stored_instead(err: Exception, what: str) -> tuple[R, RewriteOutcome]:
        message = f"{path.name}: ONNX Runtime cannot {what} the graph rewritten by {_describe(lowerings, tf32)}: {err}"
        stored = open_fn((), False)  # a graph that does not open as stored either raises its own error here
        if strict:
            raise BackendError(
                f"{message}; refusing to run (strict). Without strict the graph runs without rewrites."
            ) from err
        log.warning("%s; running the graph without rewrites", message)
        return stored, RewriteOutcome((), False, None, message)

    try:
        runner = open_fn(lowerings, tf32)
    except BackendError as err:  # e.g. an ONNX Runtime without a contrib op or attribute the rewrite uses
        if not lowerings:
            raise
        return stored_instead(err, "open")
    outcome = RewriteOutcome(lowerings, tf32)
    artifact = path.parent
    if not has_reference(artifact, graph_meta):
        log.warning("%s: the artifact stores no reference data; ONNX Runtime rewrites %s run unchecked",
                    path.name, _describe(lowerings, tf32))  # fmt: skip
        return runner, outcome
    try:
        report = check_runner(runner, artifact, graph_meta, f"onnxruntime + {_describe(lowerings, tf32)}")
    except (BackendError, ModelInputError) as err:  # a kernel of the rewritten graph refused its inputs or failed
        if not lowerings:
            raise
        del runner  # its session goes before the stored graph's opens
        return stored_instead(err, "run")
    outcome.check = report
    if report.passed:
        log.info("%s: ONNX Runtime rewrites %s pass the artifact's check (%s)", path.name,
                 _describe(lowerings, tf32), worst(report))  # fmt: skip
        return runner, outcome
    culprits = []
    singles: list[tuple[tuple[str, ...], bool]] = [((name,), False) for name in lowerings]
    singles += [((), True)] if tf32 else []
    for names, alone_tf32 in singles:
        try:
            alone = check_runner(open_fn(names, alone_tf32), artifact, graph_meta, _describe(names, alone_tf32))
        except BackendError as err:
            culprits.append(f"{_describe(names, alone_tf32)} (cannot open: {err})")
            continue
        if not alone.passed:
            culprits.append(f"{_describe(names, alone_tf32)} ({worst(alone)})")
    message = (f"{path.name}: ONNX Runtime rewrite {'; '.join(culprits) or _describe(lowerings, tf32)} fails the "
               f"artifact's check (together: {worst(report)})")  # fmt: skip
    if strict:
        raise ParityError(f"{message}; refusing to run (strict). Without strict the graph runs without rewrites.\n"
                          + format_table([report]))  # fmt: skip
    log.warning("%s; running the graph without rewrites", message)
    return open_fn((), False), RewriteOutcome((), False, report, message)


def _describe(lowerings: tuple[str, ...], tf32: bool) -> str:
    return "+".join([*lowerings, *(["tf32"] if tf32 else [])]) or "none"
