"""Running a TensorRT or TensorRT-RTX engine: a Polygraphy runner over the TensorRT runtime API.

One code path for both modules (they share the runtime API). I/O lives in torch CUDA tensors, so the only
extra requirement on a deployment machine is the backend module, torch with CUDA, and a GPU the engine targets.
Everything heavy is imported at call time.

* ``run`` takes and returns torch CUDA tensors, ordered with torch's current stream (the engine's stream
  waits for the work that produced the inputs; the current stream waits for the engine before anything
  reads the outputs; no host synchronisation). ``__call__`` is the numpy edge (the generic runner interface),
  ``infer`` the Polygraphy one.
* ``cuda_graph=True`` captures the engine's launch in a CUDA graph per input-shape signature (after one plain
  run, as TensorRT asks after a shape change) and replays it afterwards: inputs are copied into the graph's
  fixed buffers first. An engine whose launch cannot be captured runs without, with one warning.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
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
    from export_engine.runners.engine_info import inspect_engine

    info = inspect_engine(engine_path, backend)
    if not info.deserialised:
        return False, info.reason
    return True, f"{backend} {info.backend_version} deserialises it"


class EngineRunner(BaseRunner):
    """Polygraphy runner for a serialized engine (dynamic shapes resolved per call)."""

    def __init__(self, engine_path: Path, backend: str, name: str | None = None, cuda_graph: bool = False):
        super().__init__(name=name or f"{backend}-engine", prefix="engine-runner")
        self.engine_path = Path(engine_path)
        self.backend = backend
        self.cuda_graph = cuda_graph
        self._state: dict[str, Any] = {}
        self._graphs: dict[tuple, _Captured | None] = {}  # per input signature; None: runs without a graph
        self.lock = threading.RLock()  # calls from several threads are serialised (see run)

    def activate_impl(self) -> None:
        import torch

        from export_engine.runners.backends import import_backend

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

    def __call__(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """numpy in and out: the generic runner interface (:data:`export_engine.core.types.GraphRunner`)."""
        import torch

        from export_engine.runners import gpu_gate

        with self.lock:
            outputs = self.run({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}, copy=False)
            with gpu_gate.shared():
                return {name: value.cpu().numpy() for name, value in outputs.items()}

    def run(self, feeds: Mapping[str, Any], copy: bool = True) -> dict[str, Any]:
        """Torch tensors in (moved to the GPU if needed), torch CUDA tensors out, ordered with torch's current
        stream. With a CUDA graph and ``copy=False`` the outputs are the graph's buffers, overwritten by the
        next run with the same input shapes.

        Threads: calls are serialised by ``lock``; a capture runs alone on the device (``gpu_gate``)."""
        from export_engine.runners import gpu_gate

        with gpu_gate.holding(self.lock):
            key = tuple((n, tuple(feeds[n].shape), feeds[n].dtype) for n in self._state.get("inputs", ()) if n in feeds)
            capturing = self.cuda_graph and key not in self._graphs
            with gpu_gate.exclusive() if capturing else gpu_gate.shared():
                return self._run_locked(feeds, copy)

    def _run_locked(self, feeds: Mapping[str, Any], copy: bool) -> dict[str, Any]:
        import torch

        if not self._state:
            raise BackendError(f"{self.engine_path.name}: the runner is not active (use it in a with block)")
        tensors = {name: feeds[name].to("cuda", non_blocking=True).contiguous() for name in self._state["inputs"]}
        if not self.cuda_graph:
            return self._launch(tensors)
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in tensors.items())
        if key not in self._graphs:
            self._graphs[key] = self._capture(tensors)
            return self._launch(tensors)
        captured = self._graphs[key]
        if captured is None:
            return self._launch(tensors)
        stream, current = self._state["stream"], torch.cuda.current_stream()
        stream.wait_stream(current)  # the inputs are ready, and earlier readers of the outputs are done
        with torch.cuda.stream(stream):
            for name, tensor in tensors.items():
                captured.inputs[name].copy_(tensor)
                tensor.record_stream(stream)
            captured.graph.replay()
        current.wait_stream(stream)
        return {n: (t.clone() if copy else t) for n, t in captured.outputs.items()}

    def _bind(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """Set input shapes and addresses, allocate the outputs; returns the outputs."""
        import torch

        trt, engine, context = self._state["trt"], self._state["engine"], self._state["context"]
        for name, tensor in tensors.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self._state["outputs"]:
            shape = tuple(context.get_tensor_shape(name))
            dtype = _numpy_dtype(trt, engine.get_tensor_dtype(name))
            outputs[name] = torch.empty(shape, dtype=getattr(torch, dtype.name), device="cuda")
            context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def _launch(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """One plain launch on the engine's stream, ordered with torch's current stream."""
        import torch

        stream, current = self._state["stream"], torch.cuda.current_stream()
        outputs = self._bind(tensors)
        stream.wait_stream(current)  # inputs (and output buffers) are ready before the engine starts
        for tensor in (*tensors.values(), *outputs.values()):
            tensor.record_stream(stream)  # the caching allocator must not reuse them before the engine is done
        if not self._state["context"].execute_async_v3(stream.cuda_stream):
            raise BackendError(f"{self.engine_path.name}: execution failed")
        current.wait_stream(stream)  # readers on the current stream see finished outputs
        return outputs

    def _capture(self, tensors: Mapping[str, Any]) -> _Captured | None:
        """A CUDA graph of one launch with fixed input and output buffers, or None where capture fails."""
        import torch

        stream, context = self._state["stream"], self._state["context"]
        torch.cuda.current_stream().synchronize()
        inputs = {name: tensor.clone() for name, tensor in tensors.items()}
        outputs = self._bind(inputs)
        with torch.cuda.stream(stream):  # TensorRT wants one launch after a shape change before a capture
            ok = context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        if not ok:
            raise BackendError(f"{self.engine_path.name}: execution failed")
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream):
                ok = context.execute_async_v3(stream.cuda_stream)
        except RuntimeError as err:
            log.warning("%s: the engine's launch cannot be captured in a CUDA graph (%s); it runs without one",
                        self.engine_path.name, " ".join(str(err).split())[:200])  # fmt: skip
            return None
        if not ok:
            raise BackendError(f"{self.engine_path.name}: execution failed during CUDA graph capture")
        return _Captured(graph, inputs, outputs)

    def deactivate_impl(self) -> None:
        self._state = {}
        self._graphs = {}


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, Any]  # the fixed buffers the graph reads and writes
    outputs: dict[str, Any]


def _numpy_dtype(trt: Any, dtype: Any) -> np.dtype:
    table = {trt.float32: np.float32, trt.float16: np.float16, trt.int32: np.int32, trt.int64: np.int64,
             trt.bool: np.bool_, trt.int8: np.int8}  # fmt: skip
    if dtype not in table:
        raise BackendError(f"engine tensor dtype {dtype} is not supported by this runner")
    return np.dtype(table[dtype])
