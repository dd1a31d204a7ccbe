"""Running a TensorRT or TensorRT-RTX engine: a Polygraphy runner over the TensorRT runtime API.

One code path for both modules (they share the runtime API). I/O lives in torch CUDA tensors, so the only
extra requirement on a deployment machine is the backend module, torch with CUDA, and a GPU the engine targets.
Everything heavy is imported at call time.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from polygraphy.backend.base import BaseRunner

from export_engine.errors import BackendError

log = logging.getLogger(__name__)


def can_run_engine(engine_path: Path, backend: str) -> tuple[bool, str]:
    """Whether this machine can deserialise and run the engine, with the reason when it cannot."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU on this machine"
    from export_engine.builders.inspect import inspect_engine

    info = inspect_engine(engine_path, backend)
    if not info.deserialised:
        return False, info.reason
    return True, f"{backend} {info.backend_version} deserialises it"


class EngineRunner(BaseRunner):
    """Polygraphy runner for a serialized engine (dynamic shapes resolved per call)."""

    def __init__(self, engine_path: Path, backend: str, name: str | None = None):
        super().__init__(name=name or f"{backend}-engine", prefix="engine-runner")
        self.engine_path = Path(engine_path)
        self.backend = backend
        self._state: dict[str, Any] = {}

    def activate_impl(self) -> None:
        import torch

        from export_engine.builders.backends import import_backend

        trt = import_backend(self.backend)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise BackendError(f"{self.backend} could not deserialise {self.engine_path.name} on this machine")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._state = {
            "trt": trt,
            "runtime": runtime,
            "engine": engine,
            "context": engine.create_execution_context(),
            "inputs": [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT],
            "outputs": [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT],
            "stream": torch.cuda.Stream(),
        }

    def get_input_metadata_impl(self) -> Any:
        from polygraphy.common import TensorMetadata
        from polygraphy.datatype import DataType

        engine, meta = self._state["engine"], TensorMetadata()
        for name in self._state["inputs"]:
            dtype = _numpy_dtype(self._state["trt"], engine.get_tensor_dtype(name))
            meta.add(name, DataType.from_dtype(dtype), tuple(engine.get_tensor_shape(name)))
        return meta

    def infer_impl(self, feed_dict: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        import torch

        start = time.perf_counter()
        outputs = self.run({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed_dict.items()})
        torch.cuda.current_stream().synchronize()
        self.inference_time = time.perf_counter() - start
        return OrderedDict((name, value.cpu().numpy()) for name, value in outputs.items())

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Torch tensors in (moved to the GPU if needed), torch CUDA tensors out, ordered with torch's current
        stream: the engine's stream waits for the work that produced the inputs, and the current stream waits
        for the engine before anything reads the outputs (no host synchronisation)."""
        import torch

        trt, engine, context = self._state["trt"], self._state["engine"], self._state["context"]
        stream, current = self._state["stream"], torch.cuda.current_stream()
        tensors = []
        for name in self._state["inputs"]:
            tensor = feeds[name].to("cuda", non_blocking=True).contiguous()  # copied on the current stream
            tensors.append(tensor)
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self._state["outputs"]:
            shape = tuple(context.get_tensor_shape(name))
            dtype = _numpy_dtype(trt, engine.get_tensor_dtype(name))
            outputs[name] = torch.empty(shape, dtype=getattr(torch, dtype.name), device="cuda")
            context.set_tensor_address(name, outputs[name].data_ptr())
        stream.wait_stream(current)  # inputs (and output buffers) are ready before the engine starts
        for tensor in (*tensors, *outputs.values()):
            tensor.record_stream(stream)  # the caching allocator must not reuse them before the engine is done
        if not context.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"{self.engine_path.name}: execution failed")
        current.wait_stream(stream)  # readers on the current stream see finished outputs
        return outputs

    def deactivate_impl(self) -> None:
        self._state = {}


def _numpy_dtype(trt: Any, dtype: Any) -> np.dtype:
    table = {trt.float32: np.float32, trt.float16: np.float16, trt.int32: np.int32, trt.int64: np.int64,
             trt.bool: np.bool_, trt.int8: np.int8}  # fmt: skip
    if dtype not in table:
        raise BackendError(f"engine tensor dtype {dtype} is not supported by this runner")
    return np.dtype(table[dtype])
