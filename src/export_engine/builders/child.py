"""The build child process: ``python -m export_engine.builders.child REQUEST.json``.

A TensorRT builder can crash (segfault, abort) on graphs it does not handle; running it here keeps the parent
alive to report which graph, which stage and which signal. Protocol with the parent (builders/build.py):
  - the request JSON names the ONNX file, the temporary engine path, the BuildConfig and two output files;
  - events (stage changes, progress, builder log lines) are appended to ``events_path``, one JSON per line;
  - the result JSON is written to ``result_path`` (atomically) on success and on handled failures.
Exit code 0: engine written. 1: handled failure (see the result). Anything else, or a signal: a crash.
"""

from __future__ import annotations

import faulthandler
import json
import os
import resource
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from export_engine.builders.config import BuildConfig, default_timing_cache_path
from export_engine.builders.network import (
    BuildStepError,
    configure,
    create_network,
    make_logger,
    make_progress_monitor,
    mark_attention,
    network_summary,
    parse_onnx,
)
from export_engine.runners.backends import import_backend


class EventWriter:
    """Appends one JSON object per line and flushes, so the parent sees events even if the child dies."""

    def __init__(self, path: Path):
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self.stage = "start"

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "t": round(time.time(), 3), **fields}, default=str)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def enter(self, stage: str) -> None:
        self.stage = stage
        self.emit("stage", stage=stage)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, data: bytes | memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)  # KiB on Linux


def build(request: dict[str, Any], events: EventWriter, report: dict[str, Any]) -> None:
    """All stages of one build; fills ``report`` as it goes so a failure still reports what is known."""
    config = BuildConfig.from_dict(request["config"])
    events.enter("import")
    trt = import_backend(config.backend)
    report["backend_version"] = str(trt.__version__)
    events.emit("backend", module=trt.__name__, version=report["backend_version"])
    logger = make_logger(trt, events.emit)
    report["_logger"] = logger
    builder = trt.Builder(logger)

    events.enter("parse")
    start = time.perf_counter()
    network, report["strongly_typed"] = create_network(trt, builder)
    parser, errors = parse_onnx(trt, network, logger, Path(request["onnx_path"]))  # parser owns the weights
    report["parse_seconds"] = round(time.perf_counter() - start, 3)
    report["parser_errors"] = errors
    if errors:
        raise BuildStepError(f"the ONNX parser rejected the graph ({len(errors)} error(s))")
    if network.num_outputs == 0:  # an empty file, or bytes that happen to decode as an empty protobuf
        raise BuildStepError(f"the parsed network has no outputs: is {request['onnx_path']} an ONNX model?")
    report["attention"] = mark_attention(trt, network, config.attention_decomposable)
    report.update(network_summary(trt, network))

    events.enter("configure")
    monitor = make_progress_monitor(trt, events.emit, config.progress_interval_s)
    builder_config = configure(trt, builder, network, config, monitor)
    builder_config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer details for the inspector
    cache = _attach_timing_cache(builder_config, config, report)

    events.enter("build")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, builder_config)
    report["build_seconds"] = round(time.perf_counter() - start, 3)
    if serialized is None:
        raise BuildStepError("the builder returned no engine")

    events.enter("serialize")
    with Path(request["engine_tmp_path"]).open("wb") as f:  # already a temporary name the parent cleans up
        f.write(memoryview(serialized))
    report["engine_bytes"] = int(serialized.nbytes)
    del serialized, parser
    if cache is not None:
        _save_timing_cache(cache, report["timing_cache"])


def _attach_timing_cache(builder_config: Any, config: BuildConfig, report: dict[str, Any]) -> Any | None:
    """Load the cache file (empty when absent) into the builder config; TRT warns and starts empty on a corrupt
    or foreign file.

    TensorRT-RTX >= 1.2 accepts the calls but ignores them (its DeprecationWarning says "Timing cache operations
    are no-ops"), and on a GPU-less machine deserialising a saved cache logs CUDA errors. So a probe call decides:
    a backend that says the cache is a no-op gets none, and the report says why.
    """
    if not config.use_timing_cache:
        report["timing_cache"] = {"enabled": False, "reason": "use_timing_cache=False"}
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        builder_config.set_timing_cache(builder_config.create_timing_cache(b""), ignore_mismatch=False)
    no_op = [str(w.message) for w in caught if "no-op" in str(w.message)]
    if no_op:
        report["timing_cache"] = {"enabled": False, "reason": f"the backend ignores timing caches: {no_op[0]}"}
        return None
    path = config.timing_cache_path or default_timing_cache_path(config.backend, report["backend_version"])
    data = path.read_bytes() if path.is_file() else b""
    cache = builder_config.create_timing_cache(data)
    accepted = bool(builder_config.set_timing_cache(cache, ignore_mismatch=False))
    report["timing_cache"] = {
        "enabled": True,
        "path": str(path),
        "copy": str(config.timing_cache_copy) if config.timing_cache_copy else None,
        "loaded_bytes": len(data),
        "accepted": accepted,
    }
    return cache


def _save_timing_cache(cache: Any, record: dict[str, Any]) -> None:
    data = bytes(cache.serialize())
    write_bytes_atomic(Path(record["path"]), data)
    if record["copy"]:
        write_bytes_atomic(Path(record["copy"]), data)
    record["saved_bytes"] = len(data)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("usage: python -m export_engine.builders.child REQUEST.json\n")
        return 2
    request = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    faulthandler.enable()  # on a crash the Python stack lands in the child log the parent quotes
    events = EventWriter(Path(request["events_path"]))
    report: dict[str, Any] = {"ok": False}
    code = 0
    try:
        build(request, events, report)
        report["ok"] = True
    except BuildStepError as err:
        report["error"] = str(err)
        code = 1
    except Exception as err:  # a TensorRT call raised: report it as a failure of the current stage
        report["error"] = f"{type(err).__name__}: {err}"
        code = 1
    logger = report.pop("_logger", None)
    report["builder_errors"] = list(logger.errors) if logger is not None else []
    report["stage"] = events.stage
    report["peak_rss_gib"] = peak_rss_gib()
    write_json_atomic(Path(request["result_path"]), report)
    return code


if __name__ == "__main__":
    sys.exit(main())
