"""engine_from_onnx: build a TensorRT or TensorRT-RTX engine in a child process, atomically.

The child (builders/child.py) does every TensorRT call. A crash there (segfault, abort, out of memory) becomes
an EngineBuildError naming the graph, the stage and the signal; the engine is written to a temporary file next
to the target and renamed only after a successful build, so a failure leaves nothing that looks like an engine.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import export_engine
from export_engine.builders.config import BuildConfig
from export_engine.errors import BackendError, EngineBuildError, UsageError
from export_engine.progress import heartbeat
from export_engine.runners.backends import BACKEND_MODULES, INSTALL_HINTS, cuda_devices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionLayer:
    """One IAttention of the network: its Q dtype and whether it may be decomposed into primitive layers."""

    name: str
    q_dtype: str
    decomposable: bool
    set_by_builder: bool  # True when engine_from_onnx set decomposable (False: the parsed graph already had it)
    head_size: int = -1


@dataclass(frozen=True)
class BuildResult:
    """What a build produced; ``to_dict()`` is what an artifact manifest records."""

    onnx_path: Path
    engine_path: Path
    backend: str
    backend_version: str
    engine_bytes: int
    parse_seconds: float
    build_seconds: float
    total_seconds: float  # wall time including the child's start-up
    network_layers: int  # layers of the parsed network (the engine fuses them; inspect_engine on a GPU tells more)
    layer_types: Mapping[str, int]
    attention: tuple[AttentionLayer, ...]
    strongly_typed: bool
    timing_cache: Mapping[str, Any]
    peak_rss_gib: float  # of the build child
    config: BuildConfig
    inputs: tuple[Mapping[str, Any], ...] = ()
    outputs: tuple[Mapping[str, Any], ...] = ()
    parser_errors: tuple[Mapping[str, Any], ...] = ()
    builder_errors: tuple[str, ...] = field(default=())  # error lines the builder logged in a build that succeeded

    def to_dict(self) -> dict[str, Any]:
        return {
            "onnx": str(self.onnx_path),
            "engine": str(self.engine_path),
            "backend": self.backend,
            "backend_version": self.backend_version,
            "engine_bytes": self.engine_bytes,
            "parse_seconds": self.parse_seconds,
            "build_seconds": self.build_seconds,
            "total_seconds": self.total_seconds,
            "network_layers": self.network_layers,
            "layer_types": dict(self.layer_types),
            "attention": [vars(a) for a in self.attention],
            "strongly_typed": self.strongly_typed,
            "timing_cache": dict(self.timing_cache),
            "peak_rss_gib": self.peak_rss_gib,
            "config": self.config.to_dict(),
            "inputs": [dict(t) for t in self.inputs],
            "outputs": [dict(t) for t in self.outputs],
            "parser_errors": [dict(e) for e in self.parser_errors],
            "builder_errors": list(self.builder_errors),
        }


@dataclass
class _ChildOutcome:
    returncode: int | None = None
    stage: str = "start"
    backend_version: str = "?"
    timed_out: bool = False
    peak_rss_gib: float | None = None
    builder_messages: list[str] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)  # builder phases open when the child stopped
    report: dict[str, Any] | None = None
    log_tail: str = ""


def engine_from_onnx(onnx_path: Path, engine_path: Path, config: BuildConfig) -> BuildResult:
    """Build ``engine_path`` from ``onnx_path`` (external data next to it is found) with ``config.backend``."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    graph = onnx_path.name
    if not onnx_path.is_file():
        raise EngineBuildError(f"cannot build an engine for {graph}: ONNX file {onnx_path} does not exist")
    if not any(importlib.util.find_spec(m) for m in BACKEND_MODULES[config.backend]):
        raise BackendError(f"backend {config.backend!r} is not installed; {INSTALL_HINTS[config.backend]}")
    if "current" in config.compute_capabilities and not cuda_devices()[0]:
        raise UsageError(
            f"compute capability 'current' means the GPU of this machine, and there is none ({cuda_devices()[1]}); "
            "name the targets instead, e.g. compute_capabilities=('8.9',)"
        )
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_engine = engine_path.with_name(f".{engine_path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="export-engine-build-") as work:
            outcome = _run_child(onnx_path, tmp_engine, config, Path(work))
        report = _check_outcome(outcome, graph, onnx_path, config)
        if not tmp_engine.is_file() or tmp_engine.stat().st_size != report["engine_bytes"]:
            raise EngineBuildError(f"engine build for {graph}: the child reported success but {tmp_engine} is missing")
        os.replace(tmp_engine, engine_path)
    finally:
        tmp_engine.unlink(missing_ok=True)
    result = _result(report, onnx_path, engine_path, config, round(time.perf_counter() - start, 3))
    n_dec = sum(a.decomposable for a in result.attention)
    log.info(
        "engine %s: %s %s, %d network layers, %d attention (%d decomposable), build %.1f s, %.1f MB, "
        "peak RSS %.2f GiB -> %s",
        graph, result.backend, result.backend_version, result.network_layers, len(result.attention), n_dec,
        result.build_seconds, result.engine_bytes / 1e6, result.peak_rss_gib, engine_path,
    )  # fmt: skip
    return result


def _run_child(onnx_path: Path, tmp_engine: Path, config: BuildConfig, work: Path) -> _ChildOutcome:
    request = {
        "onnx_path": str(onnx_path.resolve()),
        "engine_tmp_path": str(tmp_engine.resolve()),
        "config": config.to_dict(),
        "events_path": str(work / "events.jsonl"),
        "result_path": str(work / "result.json"),
    }
    (work / "request.json").write_text(json.dumps(request), encoding="utf-8")
    (work / "events.jsonl").touch()
    env = dict(os.environ)
    package_root = str(Path(export_engine.__file__).resolve().parents[1])  # works without an installed package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    outcome = _ChildOutcome()
    command = [sys.executable, "-m", "export_engine.builders.child", str(work / "request.json")]
    with (work / "child.log").open("wb") as child_log, (work / "events.jsonl").open(encoding="utf-8") as events:
        proc = subprocess.Popen(command, stdout=child_log, stderr=subprocess.STDOUT, env=env)
        try:
            with heartbeat(f"building {config.backend} engine for {onnx_path.name}"):
                _wait(proc, events, outcome, config, onnx_path.name)
        except BaseException:
            proc.kill()  # Ctrl-C or a bug here: never leave a builder running
            proc.wait()
            raise
    result_path = work / "result.json"
    if result_path.is_file():
        outcome.report = json.loads(result_path.read_text(encoding="utf-8"))
    outcome.log_tail = (work / "child.log").read_text(encoding="utf-8", errors="replace")[-3000:]
    return outcome


def _wait(
    proc: subprocess.Popen[bytes], events: TextIO, outcome: _ChildOutcome, config: BuildConfig, graph: str
) -> None:
    deadline = None if config.timeout_s is None else time.monotonic() + config.timeout_s
    pending = ""
    while True:
        status = _reap(proc, blocking=False)
        pending += events.read()  # read after reaping: nothing the child wrote is missed
        *lines, pending = pending.split("\n")
        for line in lines:
            _on_event(line, outcome, graph)
        if status is not None:
            outcome.returncode, outcome.peak_rss_gib = status
            return
        if deadline is not None and time.monotonic() > deadline:
            outcome.timed_out = True
            proc.kill()
            outcome.returncode, outcome.peak_rss_gib = _reap(proc, blocking=True) or (proc.wait(), None)
            return
        time.sleep(0.1)


def _reap(proc: subprocess.Popen[bytes], blocking: bool) -> tuple[int, float | None] | None:
    """(Popen-style return code, peak RSS in GiB) once the child has exited; wait4 gives its own rusage."""
    if not hasattr(os, "wait4"):
        code = proc.wait() if blocking else proc.poll()
        return None if code is None else (code, None)
    pid, status, usage = os.wait4(proc.pid, 0 if blocking else os.WNOHANG)
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so tell Popen
    return proc.returncode, round(usage.ru_maxrss / 1024**2, 3)


def _on_event(line: str, outcome: _ChildOutcome, graph: str) -> None:
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return  # a line cut short by a crash
    kind = event.get("event")
    if kind == "stage":
        outcome.stage = event["stage"]
        log.debug("engine build %s: stage %s", graph, outcome.stage)
    elif kind == "backend":
        outcome.backend_version = event["version"]
    elif kind == "phase":
        if event["state"] == "start":
            outcome.phases[event["depth"] :] = [event["phase"]]
        elif event["state"] == "finish":
            outcome.phases = outcome.phases[: event["depth"]]
        if event.get("show"):
            detail = {"start": f"({event.get('steps')} steps)", "step": f"step {event.get('step')}"}
            log.info("engine build %s: %s %s %s", graph, event["phase"], event["state"], detail.get(event["state"], ""))
    elif kind == "trt_log":
        severity, message = event["severity"], event["message"]
        if severity in ("internal_error", "error"):
            outcome.builder_messages = [*outcome.builder_messages[-19:], message]
        level = {"internal_error": logging.ERROR, "error": logging.ERROR, "warning": logging.WARNING}
        log.log(level.get(severity, logging.DEBUG), "builder [%s] %s", severity, message)


def _check_outcome(outcome: _ChildOutcome, graph: str, onnx_path: Path, config: BuildConfig) -> dict[str, Any]:
    where = f"{config.backend} {outcome.backend_version} engine build for {graph}"
    messages = (outcome.report or {}).get("builder_errors") or outcome.builder_messages
    last = "; last builder messages: " + " | ".join(m[:400] for m in messages[-3:]) if messages else ""
    if outcome.timed_out:
        raise EngineBuildError(
            f"{where} timed out after {config.timeout_s} s in stage '{outcome.stage}' and was killed{last}; "
            "raise BuildConfig.timeout_s or lower opt_level"
        )
    report = outcome.report
    code = outcome.returncode
    if report is not None and report.get("ok") and code == 0:
        return report
    if report is not None and code in (0, 1):
        raise EngineBuildError(_failure_message(where, report, last))
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        died = f"the builder process died with {name} (signal {-code})"
        if -code == signal.SIGKILL:
            died += ", perhaps from the out-of-memory killer"
    else:
        died = f"the builder process exited with code {code} without a result"
    if outcome.peak_rss_gib is not None:
        died += f" at a peak RSS of {outcome.peak_rss_gib:.2f} GiB"
    phase = f" (builder phase: {' > '.join(outcome.phases)})" if outcome.phases else ""
    raise EngineBuildError(
        f"{where} crashed in stage '{outcome.stage}'{phase}: {died}{last}; no engine was written. "
        f"Child output: {_crash_lines(outcome.log_tail)}. "
        f"Next: shrink the graph to a repro with `polygraphy debug reduce {onnx_path}` and report it to NVIDIA; "
        "known TensorRT-RTX 1.7 CPU-only crash: a network input (or one tensor used as Q, K and V) feeding "
        "Cast -> Attention"
    )


def _crash_lines(log_tail: str) -> str:
    """The faulthandler headline and the innermost Python frame, else the last lines of the child's output."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    fatal = [i for i, line in enumerate(lines) if line.startswith("Fatal Python error")]
    if fatal:
        frames = [line for line in lines[fatal[-1] :] if line.startswith("File ")]
        return " / ".join([lines[fatal[-1]], *frames[:1]])
    return " / ".join(lines[-5:]) or "(empty)"


def _failure_message(where: str, report: Mapping[str, Any], last: str) -> str:
    stage = report.get("stage", "?")
    text = f"{where} failed in stage '{stage}': {report.get('error', 'unknown error')}"
    parser_errors = report.get("parser_errors", [])
    for err in parser_errors[:10]:
        node = f" at node {err['node_name']!r} ({err.get('op', '?')})" if err.get("node_name") else ""
        text += f"\n  parser{node}: {err['desc']}"
    if not parser_errors:  # the parser's own records say it better than its log lines
        text += last
    if "is_decomposable" in last:
        text += "; an attention has no fused kernel here: use attention_decomposable='all' (or cast it to FP16)"
    elif stage == "parse":
        text += "; check the graph with onnx.checker and the TensorRT ONNX operator support list"
    return text


def _result(
    report: dict[str, Any], onnx_path: Path, engine_path: Path, config: BuildConfig, total: float
) -> BuildResult:
    return BuildResult(
        onnx_path=onnx_path,
        engine_path=engine_path,
        backend=config.backend,
        backend_version=report["backend_version"],
        engine_bytes=report["engine_bytes"],
        parse_seconds=report["parse_seconds"],
        build_seconds=report["build_seconds"],
        total_seconds=total,
        network_layers=report["network_layers"],
        layer_types=report["layer_types"],
        attention=tuple(AttentionLayer(**a) for a in report["attention"]),
        strongly_typed=report["strongly_typed"],
        timing_cache=report["timing_cache"],
        peak_rss_gib=report["peak_rss_gib"],
        config=config,
        inputs=tuple(report["inputs"]),
        outputs=tuple(report["outputs"]),
        parser_errors=tuple(report["parser_errors"]),
        builder_errors=tuple(report["builder_errors"]),
    )
