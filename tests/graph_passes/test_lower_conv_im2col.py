"""lower_conv_im2col: stride-1 2-D convolutions become Slice/Concat + MatMul with the same outputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from graph_passes.graph_testing import op_counts, run_graph

from export_engine.graph_passes.base import load_graph
from export_engine.graph_passes.cleanup import FoldConstantsConfig, fold_constants
from export_engine.graph_passes.lower_conv_im2col import LowerConvIm2colConfig, lower_conv_im2col


def test_rewrites_the_dpt_convolutions_of_tiny_mast3r(tiny_graphs: dict[str, Any]) -> None:
    tiny = tiny_graphs["mast3r.decoder"]
    graph = load_graph(tiny.path)
    fold_constants(graph, FoldConstantsConfig())
    before = run_graph(graph, tiny.feeds[0])
    convs = op_counts(graph)["Conv"]

    report = lower_conv_im2col(graph, LowerConvIm2colConfig())

    assert report.rewritten > 0 and report.skipped == []
    assert op_counts(graph)["Conv"] == convs - report.rewritten
    for conv in (n for n in graph.nodes if n.op == "Conv"):  # what stays: 1x1 and strided convolutions
        assert conv.inputs[1].shape[2:] == [1, 1] or conv.attrs.get("strides") != [1, 1]
    onnx.checker.check_model(gs.export_onnx(graph))
    for got, want in zip(run_graph(graph, tiny.feeds[0]), before, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(float(np.abs(want).max()), 1.0))
    assert lower_conv_im2col(graph, LowerConvIm2colConfig()).rewritten == 0


def _graph(dtype: type, kernel: tuple[int, int], pads: list[int], bias: bool) -> gs.Graph:
    rng = np.random.default_rng(0)
    x = gs.Variable("x", dtype=dtype, shape=("batch", 3, 7, 9))
    inputs = [x, gs.Constant("w", rng.standard_normal((5, 3, *kernel)).astype(dtype))]
    if bias:
        inputs.append(gs.Constant("b", rng.standard_normal(5).astype(dtype)))
    y = gs.Variable("y", dtype=dtype)
    node = gs.Node("Conv", attrs={"pads": pads, "kernel_shape": list(kernel)}, inputs=inputs, outputs=[y])
    return gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=17)


@pytest.mark.parametrize(("kernel", "pads"), [((3, 3), [1, 1, 1, 1]), ((3, 5), [0, 2, 1, 0]), ((1, 1), [0, 0, 0, 0])])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("dtype", "tol"), [(np.float32, 1e-5), (np.float16, 2e-2)])
def test_matches_conv(kernel: tuple[int, int], pads: list[int], bias: bool, dtype: type, tol: float) -> None:
    graph = _graph(dtype, kernel, pads, bias)
    feed = {"x": np.random.default_rng(1).standard_normal((2, 3, 7, 9)).astype(dtype)}
    expected = run_graph(graph, feed)[0]
    report = lower_conv_im2col(graph, LowerConvIm2colConfig(include_1x1=True))
    assert report.rewritten == 1 and not [n for n in graph.nodes if n.op == "Conv"]
    np.testing.assert_allclose(
        run_graph(graph, feed)[0].astype(np.float32), expected.astype(np.float32), rtol=tol, atol=tol
    )


def test_scope_small_outputs_1x1_and_strides_are_left_alone() -> None:
    graph = _graph(np.float32, (3, 3), [1, 1, 1, 1], True)
    assert lower_conv_im2col(graph, LowerConvIm2colConfig(min_output_pixels=64)).matched == 0  # 7 x 9 = 63
    assert lower_conv_im2col(_graph(np.float32, (1, 1), [0, 0, 0, 0], True), LowerConvIm2colConfig()).matched == 0
    strided = _graph(np.float32, (3, 3), [1, 1, 1, 1], True)
    strided.nodes[0].attrs["strides"] = [2, 2]
    assert lower_conv_im2col(strided, LowerConvIm2colConfig()).matched == 0
