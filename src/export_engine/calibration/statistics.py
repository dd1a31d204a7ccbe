"""Activation statistics of an FP32 ONNX graph, measured with ONNX Runtime on the CPU.

By default the measurement is part of the graph: every float tensor gets ``ReduceMax``, ``ReduceMin``,
``ReduceL1`` and ``Shape`` nodes whose small results become extra outputs (max |x| from the max and the min,
mean |x| from the L1 norm and the element count, with no |x| copy of the tensor), so one session and one run
per feed measure everything, and memory stays that of a normal inference (the full MASt3R decoder has thousands of float
tensors, some of 200 MB). Percentiles need the whole tensor: then tensors are exposed as outputs instead, a
chunk at a time so that the memory they hold stays below ``max_bytes_per_run``. Weights stay where they are:
ONNX Runtime reads them from the model's external data file, or, for a graph held in memory, from its arrays.
Tensors that only rearrange their input (Reshape, Transpose, ...) are not measured: they hold exactly their
input's values and inherit its statistics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from export_engine.calibration import lean_session_options
from export_engine.calibration.sessions import InMemoryModel
from export_engine.errors import ModelInputError
from export_engine.graph_passes.graph_facts import VALUE_PRESERVING_OPS

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES_PER_RUN = 1 << 30  # 1 GiB of exposed tensors per ONNX Runtime session
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
_STATS_PASS = "activation_stats"
_INLINE_ELEMENTS = 4096  # external initializers up to this size are read into the serialized graph


@dataclass
class TensorStats:
    """Magnitudes of one tensor over all calibration feeds (FP32 reference run)."""

    absmax: float  # inf when the tensor holds inf/NaN
    mean_abs: float  # over finite values (exposed mode); inf/NaN propagate in the in-graph mode
    shape: tuple[int, ...] | None  # shape seen in the last feed (None: a rearranged tensor of unknown shape)
    dtype: str
    finite: bool = True  # False when the FP32 run itself produced inf/NaN
    samples: int = 1
    percentiles: dict[str, float] = field(default_factory=dict)  # e.g. {"99.9": 3.2} of |x|
    derived_from: str | None = None  # measured on this tensor (a pure rearrangement of it)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def merged(self, other: TensorStats) -> TensorStats:
        n = self.samples + other.samples
        return TensorStats(
            absmax=max(self.absmax, other.absmax),
            mean_abs=(self.mean_abs * self.samples + other.mean_abs * other.samples) / n,
            shape=other.shape,
            dtype=other.dtype,
            finite=self.finite and other.finite,
            samples=n,
            percentiles={k: max(v, other.percentiles.get(k, v)) for k, v in self.percentiles.items()},
            derived_from=self.derived_from,
        )


def measure(array: np.ndarray, percentiles: Sequence[float] = ()) -> TensorStats:
    """Statistics of one array (non-finite values: ``finite`` False, absmax inf, excluded from mean/percentiles)."""
    data = np.asarray(array)
    magnitude = np.abs(data.astype(np.float32, copy=False)).reshape(-1)
    finite_mask = np.isfinite(magnitude)
    finite = bool(finite_mask.all())
    if not finite:
        magnitude = magnitude[finite_mask]
    absmax = float(magnitude.max()) if magnitude.size else 0.0
    if not finite:
        absmax = float("inf")  # an FP32 reference that overflows: nothing about it is FP16-safe
    mean_abs = float(magnitude.mean(dtype=np.float64)) if magnitude.size else 0.0
    pct = {}
    if percentiles and magnitude.size:
        values = np.percentile(magnitude, list(percentiles))
        pct = {f"{p:g}": float(v) for p, v in zip(percentiles, np.atleast_1d(values), strict=True)}
    return TensorStats(absmax, mean_abs, tuple(int(d) for d in data.shape), str(data.dtype), finite, 1, pct)


def collect_activation_stats(
    source: Path | InMemoryModel,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    max_bytes_per_run: int = DEFAULT_MAX_BYTES_PER_RUN,
    tensors: Iterable[str] | None = None,
    percentiles: Sequence[float] = (),
    keep_outputs: list[dict[str, np.ndarray]] | None = None,
) -> dict[str, TensorStats]:
    """Per-tensor statistics of every float tensor of the graph (inputs, intermediates, outputs) over ``feeds``.

    ``source`` is an ONNX file (external data is read in place, nothing is copied) or an in-memory model
    (:mod:`export_engine.calibration.sessions`: ONNX Runtime reads its weight arrays in place). ``tensors``
    restricts the measurement to those names. ``keep_outputs`` (in-graph mode) receives each feed's graph outputs from
    the same run, so a caller that also needs the FP32 outputs on these feeds runs the graph once.
    """
    if not feeds:
        raise ModelInputError("activation statistics need at least one calibration feed; got none")
    if isinstance(source, InMemoryModel):
        model = source.model
    else:
        path = Path(source)
        model = onnx.load(str(path), load_external_data=False)
        _inline_small_initializers(model, path.parent)
    types = _typed_shapes(model, feeds[0])
    wanted = set(tensors) if tensors is not None else None
    measured, derived = _plan_tensors(model, types, wanted)
    stats: dict[str, TensorStats] = {}
    for feed in feeds:  # graph inputs: straight from the feeds
        for name, array in feed.items():
            if np.issubdtype(np.asarray(array).dtype, np.floating) and (wanted is None or name in wanted):
                stats[name] = (
                    stats[name].merged(measure(array, percentiles)) if name in stats else measure(array, percentiles)
                )
    options = source.session_options() if isinstance(source, InMemoryModel) else _session_options(path, model)
    shapes: dict[str, tuple[int, ...]] = {}  # run-time shapes of the rearranged tensors (in-graph mode)
    if percentiles:
        if keep_outputs is not None:
            raise ValueError("keep_outputs needs the in-graph mode (no percentiles)")
        _measure_exposed(model, options, _chunks(measured, types, max_bytes_per_run), feeds, percentiles, stats)
    else:
        graph_outputs = [o.name for o in model.graph.output] if keep_outputs is not None else []
        wanted_run = _Wanted(measured, list(derived), graph_outputs)
        shapes, kept = _measure_in_graph(model, options, wanted_run, feeds, types, stats)
        if keep_outputs is not None:
            keep_outputs.extend(kept)
    for name, origin in derived.items():
        if origin in stats:
            shape = shapes.get(name) or _static(types.get(name, (0, None))[1])
            stats[name] = replace(stats[origin], shape=shape, derived_from=origin)
    return stats


@dataclass(frozen=True)
class _Wanted:
    names: Sequence[str]  # tensors to measure
    shape_only: Sequence[str]  # rearranged tensors: only their run-time shape
    graph_outputs: Sequence[str] = ()  # graph outputs whose values the caller keeps, per feed


def _measure_in_graph(
    model: onnx.ModelProto,
    options: ort.SessionOptions,
    wanted: _Wanted,
    feeds: Sequence[Mapping[str, np.ndarray]],
    types: Mapping[str, tuple[int, Any]],
    stats: dict[str, TensorStats],
) -> tuple[dict[str, tuple[int, ...]], list[dict[str, np.ndarray]]]:
    """One session whose extra outputs are max x, min x, sum |x| and the shape of every tensor in ``names``, and
    the shape of those in ``shape_only``; returns those shapes, and each feed's graph ``outputs`` when asked."""
    start = time.perf_counter()
    make = onnx.helper.make_node
    names, shape_only, graph_outputs = wanted.names, wanted.shape_only, list(wanted.graph_outputs)
    kept: list[dict[str, np.ndarray]] = []
    added, outputs = [], []
    for k, name in enumerate(names):
        base = f"{_STATS_PASS}/{k}"
        added += [
            make("ReduceMax", [name], [f"{base}/max"], name=f"{base}/max", keepdims=0),
            make("ReduceMin", [name], [f"{base}/min"], name=f"{base}/min", keepdims=0),
            make("ReduceL1", [name], [f"{base}/l1"], name=f"{base}/l1", keepdims=0),
            make("Shape", [name], [f"{base}/shape"], name=f"{base}/shape"),
        ]
        outputs += [f"{base}/max", f"{base}/min", f"{base}/l1", f"{base}/shape"]
    for k, name in enumerate(shape_only):
        added.append(make("Shape", [name], [f"{_STATS_PASS}/shape_{k}"], name=f"{_STATS_PASS}/shape_{k}"))
        outputs.append(f"{_STATS_PASS}/shape_{k}")
    shapes: dict[str, tuple[int, ...]] = {}
    original, n_outputs = list(model.graph.node), len(model.graph.output)
    # Each measurement right after the node that produces its tensor: ONNX Runtime runs nodes in this order, so
    # a tensor dies once its own consumers and its statistics have run. Appended at the end, the statistics
    # kept every measured tensor alive until the end of the run (full MASt3R encoder: 13.5 GiB instead of ~5).
    after: dict[str, list[onnx.NodeProto]] = {}
    for node in added:
        after.setdefault(node.input[0], []).append(node)
    del model.graph.node[:]
    for node in original:
        model.graph.node.append(node)
        for name in node.output:
            model.graph.node.extend(after.pop(name, []))
    for rest in after.values():
        model.graph.node.extend(rest)
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in outputs)
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED  # ties in node order: the order built above
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    finally:
        del model.graph.node[:]
        model.graph.node.extend(original)
        del model.graph.output[n_outputs:]
    for index, feed in enumerate(feeds, 1):
        values = session.run([*outputs, *graph_outputs], dict(feed))
        if graph_outputs:
            kept.append(dict(zip(graph_outputs, values[len(outputs) :], strict=True)))
        for k, name in enumerate(names):
            high, low, l1, shape = (np.asarray(v) for v in values[4 * k : 4 * k + 4])
            count = int(np.prod(shape, dtype=np.int64))
            # L1 sums |x| over every element: inf or NaN anywhere makes it non-finite
            finite = bool(np.isfinite(high) and np.isfinite(low) and np.isfinite(l1))
            absmax = max(abs(float(high)), abs(float(low)))
            mean_abs = float(l1) / count if count else 0.0
            dtype = onnx.helper.tensor_dtype_to_np_dtype(types[name][0]) if name in types else np.float32
            one = TensorStats(
                absmax=absmax if finite else float("inf"),
                mean_abs=mean_abs,
                shape=tuple(int(d) for d in shape),
                dtype=str(np.dtype(dtype)),
                finite=finite,
            )
            stats[name] = stats[name].merged(one) if name in stats else one
        shapes = {name: tuple(int(d) for d in values[4 * len(names) + k]) for k, name in enumerate(shape_only)}
        log.info(
            "activation statistics: feed %d/%d, %d tensors, %.1f s",
            index,
            len(feeds),
            len(names),
            time.perf_counter() - start,
        )
    return shapes, kept


def _measure_exposed(
    model: onnx.ModelProto,
    options: ort.SessionOptions,
    chunks: Sequence[Sequence[str]],
    feeds: Sequence[Mapping[str, np.ndarray]],
    percentiles: Sequence[float],
    stats: dict[str, TensorStats],
) -> None:
    """The tensors themselves as outputs, a chunk per session (for statistics that need every value)."""
    original_outputs = [o.name for o in model.graph.output]
    start = time.perf_counter()
    for index, chunk in enumerate(chunks, 1):
        extra = [name for name in chunk if name not in original_outputs]
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in extra)
        try:
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        finally:
            del model.graph.output[len(original_outputs) :]
        for feed in feeds:
            arrays = session.run(list(chunk), dict(feed))
            for name, array in zip(chunk, arrays, strict=True):
                one = measure(array, percentiles)
                stats[name] = stats[name].merged(one) if name in stats else one
            del arrays
        del session
        log.info(
            "activation statistics: run %d/%d (%d tensors), %.1f s",
            index,
            len(chunks),
            len(chunk),
            time.perf_counter() - start,
        )


def _inline_small_initializers(model: onnx.ModelProto, folder: Path) -> None:
    """Load small and integer initializers into the graph: ONNX Runtime must read shape tensors while building a
    session from bytes, and cannot follow their external references then."""
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        floating = init.data_type in _FLOAT_TYPES
        if not floating or int(np.prod(init.dims)) <= _INLINE_ELEMENTS:
            onnx.external_data_helper.load_external_data_for_tensor(init, str(folder))
            init.data_location = onnx.TensorProto.DEFAULT
            del init.external_data[:]


def _session_options(path: Path, model: onnx.ModelProto) -> ort.SessionOptions:
    options = lean_session_options()
    options.log_severity_level = 3
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    if external:  # the serialized graph has no folder of its own: tell ORT where the data file is
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(path.resolve().parent)
        )
    return options


def _typed_shapes(
    model: onnx.ModelProto, feed: Mapping[str, np.ndarray]
) -> dict[str, tuple[int, tuple[int | str | None, ...] | None]]:
    """(ONNX elem type, shape) of every value, with the graph inputs fixed to the first feed's shapes."""
    probe = onnx.ModelProto(ir_version=model.ir_version)  # no weights: initializers become typed inputs
    probe.opset_import.extend(model.opset_import)
    probe.functions.extend(model.functions)
    for part in ("node", "input", "output", "value_info"):
        getattr(probe.graph, part).extend(getattr(model.graph, part))
    for init in model.graph.initializer:
        probe.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        if init.data_location != onnx.TensorProto.EXTERNAL and int(np.prod(init.dims)) <= 64:
            probe.graph.initializer.append(init)  # small constants feed shape computations
    for value in probe.graph.input:
        if value.name in feed:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, np.asarray(feed[value.name]).shape, strict=False):
                dim.Clear()
                dim.dim_value = int(size)
    try:
        probe = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except onnx.shape_inference.InferenceError as err:
        log.warning("shape inference for statistics stopped early: %s", " ".join(str(err).split())[:200])
    types: dict[str, tuple[int, tuple[int | str | None, ...] | None]] = {}
    for info in [*probe.graph.input, *probe.graph.value_info, *probe.graph.output]:
        ttype = info.type.tensor_type
        shape = None
        if ttype.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in ttype.shape.dim)
        types[info.name] = (ttype.elem_type, shape)
    return types


def _plan_tensors(
    model: onnx.ModelProto, types: Mapping[str, tuple[int, Any]], wanted: set[str] | None
) -> tuple[list[str], dict[str, str]]:
    """Float node outputs to measure (graph order), and {rearranged tensor: its measured source}."""
    measured: list[str] = []
    derived: dict[str, str] = {}
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        for name in node.output:
            if not name or types.get(name, (0, None))[0] not in _FLOAT_TYPES:
                continue
            if wanted is not None and name not in wanted:
                continue
            source = node.input[0] if node.op_type in VALUE_PRESERVING_OPS and node.input else None
            if source is not None and name not in outputs:
                derived[name] = derived.get(source, source)
            else:
                measured.append(name)
    not_node_outputs = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    not_node_outputs |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    for source in set(derived.values()):
        if source not in measured and source not in not_node_outputs:
            if types.get(source, (0, None))[0] in _FLOAT_TYPES:
                measured.append(source)  # a rearranged tensor's source that ``wanted`` left out
    return measured, derived


def _chunks(names: Sequence[str], types: Mapping[str, tuple[int, Any]], max_bytes: int) -> list[list[str]]:
    sizes = {name: _nbytes(types.get(name)) for name in names}
    known = [s for s in sizes.values() if s is not None]
    fallback = max(known) if known else 1 << 20  # unknown shapes: assume the largest known tensor
    chunks: list[list[str]] = [[]]
    used = 0
    for name in names:
        size = sizes[name] if sizes[name] is not None else fallback
        if chunks[-1] and used + size > max_bytes:  # type: ignore[operator]
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size  # type: ignore[operator]
    return [c for c in chunks if c]


def _static(shape: tuple[int | str | None, ...] | None) -> tuple[int, ...] | None:
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(int(d) for d in shape)  # type: ignore[arg-type]


def _nbytes(entry: tuple[int, Any] | None) -> int | None:
    if entry is None or entry[1] is None or not all(isinstance(d, int) for d in entry[1]):
        return None
    itemsize = 2 if entry[0] == onnx.TensorProto.FLOAT16 else 8 if entry[0] == onnx.TensorProto.DOUBLE else 4
    return int(np.prod(entry[1], dtype=np.int64)) * itemsize
