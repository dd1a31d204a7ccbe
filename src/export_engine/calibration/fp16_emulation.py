"""FP16 storage emulation for CPU checks of FP16 / hybrid graphs.

ONNX Runtime on the CPU has few FP16 kernels: it runs FP16 regions in FP32, upcasting the FP16 weights and
dropping the FP32->FP16->FP32 round trips between nodes ("InsertedPrecisionFreeCast", at every optimization
level, observed on 1.32). Its outputs therefore show FP16 *weight* rounding but not FP16 *activations*: an MLP
hidden state of 1e5 passes through MatMul->Add->Gelu->MatMul in FP32 and never overflows, where a GPU engine
storing it in FP16 produces inf.

:func:`emulate_fp16_storage` rewrites a mixed graph into an FP32 graph in which every FP16 tensor is rounded
through an explicit ``Cast(FP16) -> Cast(FP32)`` pair (FP16 initializers become their FP32-widened values).
Run with graph optimizations disabled, ONNX Runtime then reproduces FP16 storage exactly (rounding, overflow
to inf, underflow to 0) with FP32 arithmetic in between, which is what tensor-core kernels with FP32
accumulation do. FP16 accumulation inside kernels is still not modelled.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from export_engine.calibration import lean_session_options
from export_engine.graph_passes.base import next_index, node_name
from export_engine.graph_passes.graph_facts import FP16, FP32, ONNX_TYPE, constant_values, is_constant_source, np_dtype

PASS_NAME = "emulate_fp16"
# Models above this many bytes go through a scratch file instead of serialized bytes in memory.
_INLINE_LIMIT = 64_000_000
_WIDEN_IN_PLACE_ELEMENTS = 65_536  # smaller FP16 constants are widened in the graph (shape-like, biases)


def emulate_fp16_storage(graph: gs.Graph) -> int:
    """Rewrite ``graph`` in place as described above; returns the number of FP16 tensors emulated.

    Only for evaluation: the result is an FP32 graph with twice the casts, not something to deploy.
    """
    index = next_index(graph, PASS_NAME)
    count = 0
    for tensor in list(graph.tensors().values()):
        if np_dtype(tensor) != FP16 or not tensor.name:
            continue
        count += 1
        if is_constant_source(tensor):
            index = _widen_constant(graph, tensor, index)
            continue
        if not tensor.inputs:  # an FP16 graph input: widen it for its consumers
            index = _round_trip_after(graph, tensor, tensor, index, widen_only=True)
            continue
        producer = tensor.inputs[0]
        raw = gs.Variable(f"{tensor.name}/{PASS_NAME}_raw", dtype=FP32, shape=tensor.shape)
        producer.outputs[producer.outputs.index(tensor)] = raw
        _widen_node(producer)
        index = _round_trip_after(graph, raw, tensor, index)
    graph.cleanup().toposort()
    return count


def _widen_constant(graph: gs.Graph, tensor: gs.Tensor, index: int) -> int:
    """FP16 constants reach their consumers as FP32 holding the FP16-rounded values. Large ones stay FP16 and
    get a Cast to FP32 (run each inference; graph optimizations are off): widening them in place would hold a
    second, FP32 copy of every FP16 weight, a full-size MASt3R graph's largest allocation during calibration."""
    if isinstance(tensor, gs.Constant) and tensor.values.size > _WIDEN_IN_PLACE_ELEMENTS:
        return _read_through_cast(graph, tensor, index)
    values = constant_values(tensor)
    assert values is not None
    widened = values.astype(np.float32)  # exact: the FP16 rounding stays in the values
    if isinstance(tensor, gs.Constant):
        replacement = gs.Constant(tensor.name, widened)
        for consumer in {id(n): n for n in tensor.outputs}.values():
            for slot, t in enumerate(consumer.inputs):
                if t is tensor:
                    consumer.inputs[slot] = replacement
    else:
        producer = tensor.inputs[0]
        producer.attrs["value"] = gs.Constant(producer.attrs["value"].name, widened)
        tensor.dtype = FP32
    return index


def _read_through_cast(graph: gs.Graph, tensor: gs.Tensor, index: int) -> int:
    """Every consumer of FP16 `tensor` reads an FP32 copy made by one new Cast node; returns the next index."""
    shape = list(tensor.shape) if tensor.shape is not None else None
    wide = gs.Variable(f"{tensor.name}/{PASS_NAME}_fp32", dtype=FP32, shape=shape)
    for consumer in {id(n): n for n in tensor.outputs}.values():
        for slot, t in enumerate(consumer.inputs):
            if t is tensor:
                consumer.inputs[slot] = wide
    graph.nodes.append(gs.Node("Cast", node_name(PASS_NAME, index), {"to": ONNX_TYPE[FP32]}, [tensor], [wide]))
    return index + 1


def _widen_node(node: gs.Node) -> None:
    """A node that produced FP16 because of an attribute now produces FP32 (the round trip rounds it)."""
    if node.op == "Cast" and int(node.attrs.get("to", 0)) == ONNX_TYPE[FP16]:
        node.attrs["to"] = ONNX_TYPE[FP32]
    if node.op == "ConstantOfShape":
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant) and np.asarray(value.values).dtype == FP16:
            node.attrs["value"] = gs.Constant(value.name, np.asarray(value.values).astype(np.float32))


def _round_trip_after(
    graph: gs.Graph, source: gs.Tensor, out: gs.Tensor, index: int, *, widen_only: bool = False
) -> int:
    if widen_only:  # FP16 graph input: consumers read an FP32 copy
        return _read_through_cast(graph, source, index)
    rounded = gs.Variable(f"{out.name}/{PASS_NAME}_fp16", dtype=FP16, shape=out.shape)
    graph.nodes.append(gs.Node("Cast", node_name(PASS_NAME, index), {"to": ONNX_TYPE[FP16]}, [source], [rounded]))
    out.dtype = FP32
    graph.nodes.append(gs.Node("Cast", node_name(PASS_NAME, index + 1), {"to": ONNX_TYPE[FP32]}, [rounded], [out]))
    return index + 2


def emulation_session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with graph optimizations off, so that the round trips of an already emulated
    graph stay (``model`` is emptied when it goes through a scratch file)."""
    if isinstance(model, str):
        model = onnx.load(model)
    return cpu_session(model, optimize=False)


def emulated_session(path: Path) -> ort.InferenceSession:
    """The FP16 / hybrid graph at ``path`` with FP16 storage emulated, in a CPU session: what the final parity
    gate runs, so that an FP16 activation that overflows between two nodes fails the gate as it would fail on
    a GPU (plain ONNX Runtime on the CPU computes that region in FP32 and hides it)."""
    from export_engine.calibration.sessions import in_memory_model
    from export_engine.graph_passes.base import load_graph

    graph = load_graph(path)
    emulate_fp16_storage(graph)
    return in_memory_model(graph).session(optimize=False)  # the weights go to ONNX Runtime in place


def cpu_session(model: onnx.ModelProto, *, optimize: bool = True) -> ort.InferenceSession:
    """A CPU session of ``model``. Large models go through a scratch file (weights as external data) and the
    proto is emptied first, so that only ONNX Runtime's copy of the weights is in memory while the session is
    built (from serialized bytes the graph was held three times over: graph, proto, bytes)."""
    options = lean_session_options()
    options.log_severity_level = 3
    if not optimize:  # keep the emulation's FP16 round trips
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if model.ByteSize() < _INLINE_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="export-engine-eval-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")
        model.Clear()
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
