"""ONNX Runtime CPU sessions of an in-memory graph whose weights are handed over in place, never serialized.

Calibration, the precision search and the final parity gate each run a graph that exists only in memory (the
FP32 graph after the passes, a candidate plan, the emulated final graph). Serializing it means copying every
weight into a protobuf, writing it to a scratch file and parsing it back: for a full-size MASt3R graph
(1.2 to 1.5 GB of weights) several seconds each time. Here the model is exported with its large floating
initializers as references without data, and the arrays themselves go to ONNX Runtime as external
initializers, which it reads where they are. Integer and small initializers stay in the model: ONNX Runtime
and shape inference read shape tensors while the session is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx_graphsurgeon.ir.tensor import LazyValues

from export_engine.calibration import lean_session_options

_IN_PLACE_MIN_BYTES = 4096  # smaller initializers stay in the model
_FLOATS = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))


@dataclass
class InMemoryModel:
    """A model whose large floating initializers are data-less references, and those initializers' arrays."""

    model: onnx.ModelProto
    initializers: dict[str, np.ndarray]

    def session_options(self, options: ort.SessionOptions | None = None) -> ort.SessionOptions:
        """`options` (default: the lean calibration options) with the arrays registered as external
        initializers; the arrays must outlive every session built with them."""
        options = options or lean_session_options()
        names = list(self.initializers)
        if names:
            values = [ort.OrtValue.ortvalue_from_numpy(self.initializers[n]) for n in names]
            options.add_external_initializers(names, values)
        return options

    def session(self, *, optimize: bool = True) -> ort.InferenceSession:
        """A CPU session; ``optimize=False`` keeps the graph exactly as it is (FP16 storage emulation)."""
        options = self.session_options()
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(self.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session._export_engine_weights = self.initializers  # keeps the arrays ONNX Runtime reads in place alive
        return session


def in_memory_model(graph: gs.Graph) -> InMemoryModel:
    """Export ``graph`` (unchanged afterwards) with its large floating constants held out of the model."""
    held: list[tuple[gs.Constant, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    try:
        for tensor in graph.tensors().values():
            if not isinstance(tensor, gs.Constant) or tensor._values.nbytes < _IN_PLACE_MIN_BYTES:
                continue
            if np.dtype(tensor.dtype) not in _FLOATS:
                continue
            values = np.ascontiguousarray(tensor.values)
            held.append((tensor, tensor._values))
            arrays[tensor.name] = values
            tensor._values = LazyValues(_reference(tensor.name, values))
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for tensor, values in held:
            tensor._values = values
    return InMemoryModel(model, arrays)


def _reference(name: str, values: np.ndarray) -> onnx.TensorProto:
    """A data-less initializer: name, type, shape and an external location that is never read."""
    proto = onnx.TensorProto()
    proto.name = name
    proto.data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    proto.dims.extend(values.shape)
    proto.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "in-memory"), ("offset", "0"), ("length", str(values.nbytes))):
        entry = proto.external_data.add()
        entry.key, entry.value = key, value
    return proto
