"""LayerNorm over the channel axis, as exported element by element, as export-engine's ``ChannelLayerNorm``
(ONNX Runtime copies only).

Convolutional necks and upsamplers normalise channels-first tensors over their channel axis (LayerNorm3d,
LayerNorm2d). Exported, each is ``ReduceMean`` (axis 1), ``Sub``, ``Pow`` 2, ``ReduceMean``, ``Add`` epsilon,
``Sqrt``, ``Div``, then ``Mul`` by the weight and ``Add`` of the bias; hybrid graphs wrap the statistics in a Cast
to float and back. On ONNX Runtime's CUDA provider that is up to eleven kernels over the tensor; the operator
does it in one, with the same two-pass float statistics, on float16 storage where the graph casts around the
norm, and takes an exact GELU that follows it too (``gelu=1``).

Matched by structure from the ``Div``; a norm whose intermediate values have other consumers, whose reductions
are not over axis 1 with kept dims, or whose weight or bias is not a constant per-channel vector is skipped
with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from export_engine.graph_passes.base import OWN_DOMAIN as DOMAIN
from export_engine.graph_passes.base import PassReport, next_index, node_name, producer, timed

PASS = "fuse_channel_layernorm"
_FLOAT, _FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16  # Cast's "to"
_TYPES = (np.float16, np.float32)  # what the operator takes


@dataclass(frozen=True)
class FuseChannelLayerNormConfig:
    pass


@dataclass
class _Norm:
    x: gs.Tensor  # the norm's input as the new node takes it
    dtype: np.dtype
    eps: float
    channels: int | None
    last: gs.Node  # the chain's last node, whose output the new node takes over
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    gelu: bool = False


def fuse_channel_layernorm(graph: gs.Graph, config: FuseChannelLayerNormConfig) -> PassReport:
    report = PassReport(PASS)
    with timed(report):
        index = next_index(graph, PASS)
        outputs = {t.name for t in graph.outputs}
        for div in [n for n in graph.nodes if n.op == "Div" and n.domain in (None, "", "ai.onnx")]:
            core = _statistics(div, outputs)
            if core is None:
                continue  # not a normalisation's division
            report.matched += 1
            norm = _extend(div, core, outputs) if not isinstance(core, str) else core
            if isinstance(norm, str):
                report.skipped.append(f"{div.name}: {norm}")
                continue
            out = norm.last.outputs[0]
            norm.last.outputs.clear()
            channels = int(norm.channels or 0)
            weight = norm.weight if norm.weight is not None else np.ones(channels)
            bias = norm.bias if norm.bias is not None else np.zeros(channels)
            name = node_name(PASS, index)
            constants = [gs.Constant(f"{name}/{what}", np.ascontiguousarray(v, dtype=norm.dtype))
                         for what, v in (("weight", weight), ("bias", bias))]  # fmt: skip
            attrs = {"epsilon": float(norm.eps), "gelu": int(norm.gelu)}
            graph.nodes.append(gs.Node("ChannelLayerNorm", name=name, domain=DOMAIN, inputs=[norm.x, *constants],
                                       outputs=[out], attrs=attrs))  # fmt: skip
            index += 1
            report.rewritten += 1
        graph.cleanup().toposort()
    return report


def _reduces_channels(node: gs.Node, rank: int) -> bool:
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        axes = node.inputs[1].values.tolist()
    if axes is None or node.attrs.get("keepdims", 1) != 1:
        return False
    return [int(a) % rank for a in np.atleast_1d(axes)] == [1]


def _constant(node: gs.Node, other: gs.Tensor) -> np.ndarray | None:
    """The constant operand of a binary node whose other operand is ``other``."""
    if len(node.inputs) != 2 or other not in node.inputs:
        return None
    const = node.inputs[1] if node.inputs[0] is other else node.inputs[0]
    return const.values if isinstance(const, gs.Constant) else None


def _statistics(div: gs.Node, outputs: set[str]) -> _Norm | str | None:
    """The normalisation core (x - mean) / sqrt(var + eps) ending in ``div``; None where ``div`` is no such thing."""
    sub, sqrt = producer(div.inputs[0], "Sub"), producer(div.inputs[1], "Sqrt")
    if sub is None or sqrt is None:
        return None
    x = sub.inputs[0]
    mean = producer(sub.inputs[1], "ReduceMean")
    add = producer(sqrt.inputs[0], "Add")
    if mean is None or mean.inputs[0] is not x or add is None:
        return None
    var = next((producer(t, "ReduceMean") for t in add.inputs if not isinstance(t, gs.Constant)), None)
    power = producer(var.inputs[0], "Pow") if var is not None else None
    if var is None or power is None or power.inputs[0] is not sub.outputs[0]:
        return None
    if x.dtype is None or x.shape is None or len(x.shape) < 2:
        return "the input's type or rank is unknown"
    rank = len(x.shape)
    if not any(x.dtype == t for t in _TYPES):
        return f"input type {x.dtype}: the operator takes float16 or float"
    exponent, eps = _constant(power, sub.outputs[0]), _constant(add, var.outputs[0])
    if exponent is None or exponent.size != 1 or exponent.ndim > rank or float(exponent.reshape(-1)[0]) != 2.0:
        return "the variance is not a mean of squares by a constant exponent"
    if eps is None or eps.size != 1 or eps.ndim > rank or not float(eps.reshape(-1)[0]) >= 0:
        return "epsilon is not a constant scalar >= 0"
    if not (_reduces_channels(mean, rank) and _reduces_channels(var, rank)):
        return "the reductions are not over axis 1 with kept dims"
    inner = (mean.outputs[0], sub.outputs[0], power.outputs[0], var.outputs[0], add.outputs[0], sqrt.outputs[0])
    if any(len(t.outputs) != (2 if t is sub.outputs[0] else 1) for t in inner):
        return "an intermediate value has other consumers"
    if any(t.name in outputs for t in inner):
        return "an intermediate value is a graph output"
    channels = x.shape[1] if isinstance(x.shape[1], int) else None
    return _Norm(x=x, dtype=np.dtype(x.dtype), eps=float(eps.reshape(-1)[0]), channels=channels, last=div)


def _per_channel(values: np.ndarray, rank: int) -> np.ndarray | None:
    """``values`` as a (C,) vector when it broadcasts along axis 1 of a rank-``rank`` tensor only."""
    shape = list(values.shape)
    if len(shape) == rank:
        shape = shape[1:] if shape[0] == 1 else []
    if len(shape) == rank - 1 and all(d == 1 for d in shape[1:]):
        return values.reshape(-1)
    return None


def _sole_consumer(tensor: gs.Tensor, op: str, outputs: set[str]) -> gs.Node | None:
    if tensor.name in outputs or len(tensor.outputs) != 1 or tensor.outputs[0].op != op:
        return None
    return tensor.outputs[0]


def _extend(div: gs.Node, norm: _Norm, outputs: set[str]) -> _Norm | str:
    """The norm with what follows the division folded in: the float16 Casts around it, the weight, the bias and
    an exact GELU."""
    rank = len(norm.x.shape or [])
    cursor = div.outputs[0]
    if cursor.name in outputs:
        return "the normalised value is a graph output"
    cast_in = producer(norm.x, "Cast")
    cast_out = _sole_consumer(cursor, "Cast", outputs)
    if cast_in is not None and cast_out is not None and cast_in.attrs.get("to") == _FLOAT:
        source = cast_in.inputs[0]
        if cast_out.attrs.get("to") == _FLOAT16 and source.dtype is not None and np.dtype(source.dtype) == np.float16:
            norm.x, norm.dtype, norm.last = source, np.dtype(np.float16), cast_out
            cursor = cast_out.outputs[0]
    mul = _sole_consumer(cursor, "Mul", outputs)
    weight = _channel_vector(mul, cursor, rank, norm.channels)
    if mul is not None and weight is not None:  # (a Mul that is not per-channel ends the chain before it)
        norm.weight, norm.last, cursor = weight, mul, mul.outputs[0]
        norm.channels = weight.size
        add = _sole_consumer(cursor, "Add", outputs)
        bias = _channel_vector(add, cursor, rank, norm.channels)
        if add is not None and bias is not None:
            norm.bias, norm.last, cursor = bias, add, add.outputs[0]
    gelu = _sole_consumer(cursor, "Gelu", outputs)
    if gelu is not None and gelu.attrs.get("approximate", "none") in ("none", b"none"):
        norm.gelu, norm.last = True, gelu
    if norm.channels is None:
        return "the channel count is unknown"
    return norm


def _channel_vector(node: gs.Node | None, operand: gs.Tensor, rank: int, channels: int | None) -> np.ndarray | None:
    """The (C,) constant ``node`` multiplies or adds along axis 1 of ``operand``, or None."""
    values = _constant(node, operand) if node is not None else None
    vector = _per_channel(values, rank) if values is not None else None
    if vector is None or (channels is not None and vector.size != channels):
        return None
    return vector
