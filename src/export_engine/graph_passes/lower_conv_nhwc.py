"""2-D convolutions in channels-last layout, with the layout changes between them removed (ONNX Runtime copies
only).

cuDNN's tensor-core convolutions work in NHWC: on an NCHW graph ONNX Runtime's CUDA ``Conv`` converts every
input (``nchwToNhwc``, 0.5 ms per MASt3R pair on the DPT heads) and the output back. This pass runs each
2-D convolution as ONNX Runtime's ``com.microsoft.NhwcConv`` (weights reordered to (M, kH, kW, C)) between two
Transposes, then moves the Transpose back to NCHW forward through everything that does not care about the layout
(element-wise ops, Casts, export-engine's ``BiasActivation`` and ``ResizeBilinear`` in their channels-last form,
Slices with constant axes) until it meets the next convolution's Transpose to NHWC, where the two cancel. What
is left are Transposes where the graph really changes layout (its inputs and outputs, ops that need NCHW).

    Conv(x) -> Relu -> Conv          becomes   T(x) -> NhwcConv -> Relu -> NhwcConv -> T
    T = Transpose to NHWC (0, 2, 3, 1) at the entry, back to NCHW (0, 3, 1, 2) at the exit

Only ``group=1`` convolutions of a constant 4-D weight are rewritten; others are skipped with the reason. Apply
after ``conv_epilogue`` and ``resize_bilinear`` so that their operators travel in NHWC too. There is no cost
model: where a layout change cannot cancel (a residual path from an NCHW tensor, several consumers of one
Transpose) Transposes stay, which is why the lowering is opt-in until it is measured on a graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from export_engine.graph_passes.base import OWN_DOMAIN, PassReport, next_index, node_name, producer, timed

PASS = "lower_conv_nhwc"
MS_DOMAIN = "com.microsoft"
TO_NHWC = [0, 2, 3, 1]
TO_NCHW = [0, 3, 1, 2]
_UNARY = {"Relu", "Cast", "Sigmoid", "Tanh", "Erf", "Exp", "Neg", "Abs", "Sqrt", "Identity", "LeakyRelu", "Gelu"}
_BINARY = {"Add", "Sub", "Mul", "Div"}
_OWN = {"BiasActivation", "ResizeBilinear"}  # take channels_last=1
_NCHW_TO_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}


@dataclass(frozen=True)
class LowerConvNhwcConfig:
    max_sweeps: int = 1_000  # sweeps that move every movable Transpose one node on (a graph needs its depth)


def lower_conv_nhwc(graph: gs.Graph, config: LowerConvNhwcConfig) -> PassReport:
    report = PassReport(PASS)
    with timed(report):
        index = next_index(graph, PASS)
        for conv in [n for n in graph.nodes if n.op == "Conv" and n.domain in (None, "", "ai.onnx")]:
            report.matched += 1
            why = _problem(conv)
            if why:
                report.skipped.append(f"{conv.name}: {why}")
                continue
            index = _to_nhwc(graph, conv, index)
            report.rewritten += 1
        if report.rewritten:
            graph.cleanup().toposort()
            sweeps = 0
            while sweeps < config.max_sweeps and (moved := _sink_all(graph, index)):
                index, sweeps = moved, sweeps + 1
                graph.cleanup().toposort()
            _cancel_pairs(graph)
        graph.cleanup().toposort()
    return report


def _problem(conv: gs.Node) -> str | None:
    weight = conv.inputs[1]
    if not isinstance(weight, gs.Constant) or weight.values.ndim != 4:
        return "weight is not a constant 4-D tensor"
    if int(conv.attrs.get("group", 1)) != 1:
        return "grouped convolution"
    if len(conv.inputs) > 2 and conv.inputs[2].name and not isinstance(conv.inputs[2], gs.Constant):
        return "bias is not a constant"
    x = conv.inputs[0]
    if x.shape is not None and len(x.shape) != 4:
        return f"input of rank {len(x.shape)}"
    return None


def _permuted(shape: list | None, perm: list[int]) -> list | None:
    return [shape[p] for p in perm] if shape is not None and len(shape) == len(perm) else None


def _transpose(graph: gs.Graph, x: gs.Tensor, perm: list[int], name: str, out: gs.Tensor | None = None) -> gs.Tensor:
    result = out if out is not None else gs.Variable(f"{name}/output", dtype=x.dtype, shape=_permuted(x.shape, perm))
    graph.nodes.append(gs.Node("Transpose", name=name, attrs={"perm": perm}, inputs=[x], outputs=[result]))
    return result


def _to_nhwc(graph: gs.Graph, conv: gs.Node, index: int) -> int:
    x, weight = conv.inputs[0], conv.inputs[1]
    y = conv.outputs[0]
    nhwc_in = _transpose(graph, x, TO_NHWC, node_name(PASS, index))
    ohwi = np.ascontiguousarray(weight.values.transpose(0, 2, 3, 1))  # NhwcConv's weight: (M, kH, kW, C)
    kernel = gs.Constant(f"{node_name(PASS, index + 1)}/weight", ohwi)
    nhwc_out = gs.Variable(f"{node_name(PASS, index + 1)}/output", dtype=y.dtype, shape=_permuted(y.shape, TO_NHWC))
    attrs = dict(conv.attrs)
    graph.nodes.append(gs.Node("NhwcConv", name=node_name(PASS, index + 1), domain=MS_DOMAIN, attrs=attrs,
                               inputs=[nhwc_in, kernel, *conv.inputs[2:]], outputs=[nhwc_out]))  # fmt: skip
    conv.outputs.clear()
    _transpose(graph, nhwc_out, TO_NCHW, node_name(PASS, index + 2), out=y)
    return index + 3


def _from_nchw_transpose(tensor: gs.Tensor) -> gs.Tensor | None:
    """The NHWC tensor that ``tensor`` is the NCHW transpose of, or None."""
    t = producer(tensor, "Transpose")
    return t.inputs[0] if t is not None and list(t.attrs.get("perm", [])) == TO_NCHW else None


def _sinkable(node: gs.Node) -> list[gs.Tensor] | None:
    """The NHWC sources of ``node``'s variable inputs when every one is a Transpose back to NCHW and the node can
    run in NHWC instead; else None."""
    variables = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name]
    if not variables or len(node.outputs) != 1:
        return None
    if node.op in _UNARY and node.domain in (None, "", "ai.onnx"):
        pass
    elif node.op in _BINARY and node.domain in (None, "", "ai.onnx"):
        constants = [t for t in node.inputs if isinstance(t, gs.Constant)]
        if any(c.values.size != 1 or c.values.ndim > 4 for c in constants):
            return None  # a per-channel constant would need reordering, a rank-5 one changes the rank: left alone
    elif node.op in _OWN and node.domain == OWN_DOMAIN:
        if int(node.attrs.get("channels_last", 0)):
            return None
        if node.op == "BiasActivation" and any(isinstance(t, gs.Constant) for t in node.inputs[2:]):
            return None  # a constant residual would stay in NCHW
    elif node.op == "Slice" and node.domain in (None, "", "ai.onnx"):
        if len(node.inputs) < 4 or not all(isinstance(t, gs.Constant) for t in node.inputs[1:]):
            return None
        variables = [node.inputs[0]]
    else:
        return None
    sources = [_from_nchw_transpose(t) for t in variables]
    found = [s for s in sources if s is not None]
    return found if len(found) == len(sources) else None


def _sink_all(graph: gs.Graph, index: int) -> int:
    """Move every Transpose-to-NCHW that can move past the node it feeds, one step each (0 when none moved);
    returns the next node index for names."""
    moved = False
    for node, sources in [(n, _sinkable(n)) for n in list(graph.nodes)]:
        if sources is None:
            continue
        if node.op == "Slice":
            axes = node.inputs[3].values.reshape(-1)
            mapped = np.asarray([_NCHW_TO_NHWC_AXIS[int(a) % 4] for a in axes], dtype=axes.dtype)
            node.inputs[3] = gs.Constant(f"{node_name(PASS, index)}/axes", mapped)
            node.inputs[0] = sources[0]
        else:
            variables = iter(sources)
            node.inputs = [next(variables) if isinstance(t, gs.Variable) and t.name else t for t in node.inputs]
        if node.op in _OWN:
            node.attrs["channels_last"] = 1
        out = node.outputs[0]
        nhwc = gs.Variable(f"{node_name(PASS, index)}/nhwc", dtype=out.dtype, shape=_permuted(out.shape, TO_NHWC))
        node.outputs = [nhwc]
        _transpose(graph, nhwc, TO_NCHW, node_name(PASS, index + 1), out=out)
        index, moved = index + 2, True
    return index if moved else 0


def _cancel_pairs(graph: gs.Graph) -> None:
    """Transpose to NHWC of a Transpose to NCHW: its consumers read the NHWC tensor directly."""
    outputs = {t.name for t in graph.outputs}
    for node in [n for n in graph.nodes if n.op == "Transpose" and list(n.attrs.get("perm", [])) == TO_NHWC]:
        source = _from_nchw_transpose(node.inputs[0])
        result = node.outputs[0]
        if source is None or result.name in outputs:
            continue
        for consumer in list(result.outputs):
            consumer.inputs = [source if t is result else t for t in consumer.inputs]
