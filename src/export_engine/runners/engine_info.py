"""What can be learned about a built engine without running it.

Always: size, the plan header, and (TensorRT-RTX) ``IRuntime.get_engine_validity`` with its diagnostics. Where
the engine deserialises (a suitable GPU and driver): the engine inspector's per-layer JSON and the I/O tensors.
On a GPU-less machine deserialisation fails ("CUDA driver version is insufficient"), which is reported as
"cannot be deserialised here: <reason>" instead of an error.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export_engine.errors import BackendError, EngineBuildError, UsageError
from export_engine.runners.backends import BACKEND_MODULES, cuda_devices, import_backend

log = logging.getLogger(__name__)

# Observed plan layout (TensorRT-RTX 1.7.1): bytes 0-3 "vtrt", 16-23 the plan size (little endian), 24-27 the
# builder version as major, minor, patch, build (01 07 01 74 = 1.7.1.116), 32-39 a bit mask of the target compute
# capabilities (builds with one target each gave bit 0 = 7.5, 1 = 8.0, 2 = 8.6, 3 = 8.9, 4 = 12.0, 5 = 12.1; the
# default build sets bits 1-6). Undocumented, so only read for "vtrt" and reported as a hint.
_RTX_MAGIC = b"vtrt"
_RTX_TARGET_BITS = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
_HEADER_BYTES = 64


@dataclass(frozen=True)
class EngineValidity:
    """``status``: valid | suboptimal | invalid | unknown (the module cannot tell)."""

    status: str
    diagnostics: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "diagnostics": list(self.diagnostics), "reason": self.reason}


@dataclass(frozen=True)
class EngineInfo:
    path: Path
    backend: str
    backend_version: str | None  # the installed module used to look at the engine
    engine_bytes: int
    header: Mapping[str, Any]
    validity: EngineValidity
    deserialised: bool
    reason: str  # why it could not be deserialised, or "deserialised"
    num_layers: int | None = None
    layers: tuple[Mapping[str, Any], ...] = ()  # engine inspector JSON, one entry per engine layer
    io_tensors: tuple[Mapping[str, Any], ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "backend": self.backend,
            "backend_version": self.backend_version,
            "engine_bytes": self.engine_bytes,
            "header": dict(self.header),
            "validity": self.validity.to_dict(),
            "deserialised": self.deserialised,
            "reason": self.reason,
            "num_layers": self.num_layers,
            "layers": [dict(layer) for layer in self.layers],
            "io_tensors": [dict(t) for t in self.io_tensors],
        }


class _CapturingLogger:
    """Collects TensorRT's log lines (errors and fatal ones carry the reason a call failed)."""

    def __init__(self, trt: Any):
        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.messages: list[str] = []
                self._lock = threading.Lock()

            def log(self, severity: Any, msg: str) -> None:
                if int(severity) <= 2:  # internal error, error, warning
                    with self._lock:
                        self.messages.append(msg)

        self.logger = Logger()

    def take(self) -> list[str]:
        messages, self.logger.messages = self.logger.messages, []
        return list(messages)


def read_header(engine_path: Path) -> dict[str, Any]:
    with Path(engine_path).open("rb") as f:
        head = f.read(_HEADER_BYTES)
    header: dict[str, Any] = {"magic": head[:4].decode("latin-1"), "bytes_read": len(head)}
    if head[:4] == _RTX_MAGIC and len(head) >= 32:
        header["declared_bytes"] = int.from_bytes(head[16:24], "little")
        header["built_with"] = ".".join(str(b) for b in head[24:28])
    if head[:4] == _RTX_MAGIC and len(head) >= 40:
        mask = int.from_bytes(head[32:40], "little")
        header["targets"] = [
            _RTX_TARGET_BITS[bit] if bit < len(_RTX_TARGET_BITS) else f"bit{bit}"
            for bit in range(64)
            if mask >> bit & 1
        ]
    return header


def engine_validity(engine_path: Path, backend: str) -> EngineValidity:
    """``IRuntime.get_engine_validity`` on the plan header (TensorRT-RTX), with the diagnostics spelled out and
    the builder's own log lines as the reason; ``unknown`` where the module has no such call."""
    trt = import_backend(backend)
    capture = _CapturingLogger(trt)
    runtime = trt.Runtime(capture.logger)
    if not hasattr(runtime, "get_engine_validity"):
        return EngineValidity(
            "unknown", (), f"{trt.__name__} {trt.__version__} has no IRuntime.get_engine_validity (TensorRT-RTX only)"
        )
    size = max(int(getattr(runtime, "engine_header_size", _HEADER_BYTES)), _HEADER_BYTES)
    with Path(engine_path).open("rb") as f:
        head = f.read(size)
    validity, diagnostics = runtime.get_engine_validity(head)
    status = str(validity).rsplit(".", 1)[-1].lower()
    flags = tuple(
        name for name, member in trt.EngineInvalidityDiagnostics.__members__.items() if int(diagnostics) & int(member)
    )
    messages = capture.take()
    if status == "valid":
        reason = "likely valid on this system"
    else:
        parts = [f"diagnostics: {', '.join(flags)}"] if flags else []
        parts += messages[-3:]
        reason = "; ".join(parts) or "no diagnostics given"
    return EngineValidity(status, flags, reason)


def inspect_engine(engine_path: Path, backend: str) -> EngineInfo:
    """Everything knowable without running the engine; never fails because this machine cannot run it."""
    engine_path = Path(engine_path)
    if backend not in BACKEND_MODULES:
        raise UsageError(f"unknown builder backend {backend!r}; choose one of: {', '.join(BACKEND_MODULES)}")
    if not engine_path.is_file():
        raise EngineBuildError(f"engine file {engine_path} does not exist")
    size = engine_path.stat().st_size
    header = read_header(engine_path)
    try:
        trt = import_backend(backend)
    except BackendError as err:
        unknown = EngineValidity("unknown", (), str(err))
        why = f"cannot be deserialised here: {err}"
        return EngineInfo(engine_path, backend, None, size, header, unknown, deserialised=False, reason=why)
    version = str(trt.__version__)
    validity = engine_validity(engine_path, backend)
    if "MALFORMED_ENGINE" in validity.diagnostics:
        why = f"cannot be deserialised here: the plan is malformed ({validity.reason})"
        return EngineInfo(engine_path, backend, version, size, header, validity, deserialised=False, reason=why)
    capture = _CapturingLogger(trt)
    runtime = trt.Runtime(capture.logger)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        messages = capture.take()
        count, gpu_how = cuda_devices()
        why = messages[-1] if messages else "deserialize_cuda_engine returned None"
        why = f"cannot be deserialised here: {why}" + ("" if count else f" ({gpu_how})")
        log.info("engine %s: %s", engine_path.name, why)
        return EngineInfo(engine_path, backend, version, size, header, validity, deserialised=False, reason=why)
    return EngineInfo(
        engine_path,
        backend,
        version,
        size,
        header,
        validity,
        deserialised=True,
        reason="deserialised",
        num_layers=int(engine.num_layers),
        layers=tuple(_layer_info(trt, engine)),
        io_tensors=tuple(_io_tensors(engine)),
    )


def _layer_info(trt: Any, engine: Any) -> list[Mapping[str, Any]]:
    inspector = engine.create_engine_inspector()
    text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    layers = json.loads(text).get("Layers", [])
    # LAYER_NAMES_ONLY engines give plain names; DETAILED engines (builders/child.py sets it) give dicts.
    return [layer if isinstance(layer, dict) else {"Name": layer} for layer in layers]


def _io_tensors(engine: Any) -> list[Mapping[str, Any]]:
    tensors: list[Mapping[str, Any]] = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        tensors.append(
            {
                "name": name,
                "mode": str(engine.get_tensor_mode(name)).rsplit(".", 1)[-1],
                "shape": list(engine.get_tensor_shape(name)),
                "dtype": str(engine.get_tensor_dtype(name)).rsplit(".", 1)[-1],
            }
        )
    return tensors
