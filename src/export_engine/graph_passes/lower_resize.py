"""Bilinear ``Resize`` by whole factors as export-engine's ``ResizeBilinear`` (ONNX Runtime copies only).

DPT's fusion blocks upsample by 2 with ``Resize(mode="linear", coordinate_transformation_mode="align_corners")``.
ONNX Runtime's CUDA kernel for it computes one output value per thread with integer divisions to find the
pixel; ``ResizeBilinear`` (``export_engine.runners.ort_ops``) has one thread write 16 bytes of an output row.
Only 4-D inputs, constant scales of 1 on the first two axes and whole factors >= 1 on the last two, and the
default values of every other attribute are rewritten; others are skipped with the reason. The artifact keeps
the standard ``Resize`` that TensorRT runs itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from export_engine.graph_passes.base import OWN_DOMAIN as DOMAIN
from export_engine.graph_passes.base import PassReport, next_index, node_name, timed

PASS = "lower_resize"
_DEFAULTS = {"antialias": 0, "exclude_outside": 0, "extrapolation_value": 0.0, "cubic_coeff_a": -0.75,
             "nearest_mode": "round_prefer_floor", "keep_aspect_ratio_policy": "stretch"}  # fmt: skip
_IGNORED = {"cubic_coeff_a", "nearest_mode"}  # attributes of other modes: any value leaves linear alone


@dataclass(frozen=True)
class LowerResizeConfig:
    pass


def lower_resize(graph: gs.Graph, config: LowerResizeConfig) -> PassReport:
    report = PassReport(PASS)
    with timed(report):
        index = next_index(graph, PASS)
        for node in [n for n in graph.nodes if n.op == "Resize" and n.domain in (None, "", "ai.onnx")]:
            report.matched += 1
            scale = _scale(node)
            if isinstance(scale, str):
                report.skipped.append(f"{node.name}: {scale}")
                continue
            out = node.outputs[0]
            node.outputs.clear()
            graph.nodes.append(gs.Node("ResizeBilinear", name=node_name(PASS, index), domain=DOMAIN,
                                       inputs=[node.inputs[0]], outputs=[out], attrs={"scale": scale}))  # fmt: skip
            index += 1
            report.rewritten += 1
        graph.cleanup().toposort()
    return report


def _attr(node: gs.Node, name: str, default: object) -> object:
    value = node.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def _scale(node: gs.Node) -> list[int] | str:
    """[sh, sw] for a bilinear align_corners Resize of (N, C, H, W) by whole factors, else why not."""
    if _attr(node, "mode", "nearest") != "linear":
        return f"mode {_attr(node, 'mode', 'nearest')!r} (only 'linear')"
    if _attr(node, "coordinate_transformation_mode", "half_pixel") != "align_corners":
        return f"coordinate transformation {_attr(node, 'coordinate_transformation_mode', 'half_pixel')!r}"
    odd = [k for k, v in _DEFAULTS.items() if k not in _IGNORED and _attr(node, k, v) != v]
    if odd or node.attrs.get("axes") is not None:
        return f"non-default attributes {odd or ['axes']}"
    x = node.inputs[0]
    if x.dtype is not None and np.dtype(x.dtype) not in (np.dtype(np.float16), np.dtype(np.float32)):
        return f"input type {np.dtype(x.dtype)} (ResizeBilinear takes float16 and float)"
    if x.shape is not None and len(x.shape) != 4:
        return f"input of rank {len(x.shape)} (only (N, C, H, W))"
    sizes = node.inputs[3] if len(node.inputs) > 3 else None
    if sizes is not None and sizes.name:
        return "output sizes given instead of scales"
    scales = node.inputs[2] if len(node.inputs) > 2 else None
    if not isinstance(scales, gs.Constant) or scales.values.size != 4:
        return "scales are not a constant of four values"
    values = scales.values.astype(np.float64).reshape(-1)
    whole = np.round(values)
    if values[0] != 1 or values[1] != 1 or np.any(values != whole) or np.any(whole[2:] < 1):
        return f"scales {values.tolist()} are not [1, 1, whole, whole]"
    return [int(whole[2]), int(whole[3])]
