"""lower_patch_conv: kernel == stride Conv / ConvTranspose become MatMuls with the same ONNX Runtime outputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from graph_passes.graph_testing import op_counts, run_graph

from export_engine.graph_passes.base import load_graph
from export_engine.graph_passes.cleanup import FoldConstantsConfig, fold_constants
from export_engine.graph_passes.lower_patch_conv import LowerPatchConvConfig, lower_patch_conv

# (Conv, ConvTranspose) patch convolutions of the tiny models: MASt3R's patch embedding and its DPT reassembly
# upsamplers (4x and 2x, two heads); FastSAM3D's 3-D patch embedding, the prompt encoder's two mask downscaling
# convolutions and the mask decoder's two upscaling transposed convolutions.
EXPECTED = {"mast3r.encoder": (1, 0), "mast3r.decoder": (0, 4), "fastsam3d.encoder": (1, 0),
            "fastsam3d.prompt_decoder": (2, 2)}  # fmt: skip


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_rewrites_patch_convolutions_of_the_tiny_models(tiny_graphs: dict[str, Any], key: str) -> None:
    tiny = tiny_graphs[key]
    graph = load_graph(tiny.path)
    fold_constants(graph, FoldConstantsConfig())  # infers the static shapes the rewrite needs, as in artifacts
    before_ops = op_counts(graph)
    before = run_graph(graph, tiny.feeds[0])

    report = lower_patch_conv(graph, LowerPatchConvConfig())

    convs, transposed = EXPECTED[key]
    assert (report.matched, report.rewritten, report.skipped) == (convs + transposed,) * 2 + ([],)
    after_ops = op_counts(graph)
    assert before_ops["Conv"] - after_ops["Conv"] == convs
    assert before_ops["ConvTranspose"] - after_ops["ConvTranspose"] == transposed
    onnx.checker.check_model(gs.export_onnx(graph))
    for got, want in zip(run_graph(graph, tiny.feeds[0]), before, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(float(np.abs(want).max()), 1.0))
    again = lower_patch_conv(graph, LowerPatchConvConfig())
    assert again.rewritten == 0


def _conv_graph(op: str, dtype: type, spatial: tuple[int, ...], kernel: tuple[int, ...], bias: bool,
                **attrs: Any) -> gs.Graph:  # fmt: skip
    rng = np.random.default_rng(len(spatial))
    c, o = 3, 5
    x = gs.Variable("x", dtype=dtype, shape=("batch", c, *spatial))
    w_shape = (o, c, *kernel) if op == "Conv" else (c, o, *kernel)
    inputs = [x, gs.Constant("w", rng.standard_normal(w_shape).astype(dtype))]
    if bias:
        inputs.append(gs.Constant("b", rng.standard_normal(o).astype(dtype)))
    y = gs.Variable("y", dtype=dtype)
    node = gs.Node(op, attrs={"strides": list(kernel), "kernel_shape": list(kernel), **attrs}, inputs=inputs,
                   outputs=[y])  # fmt: skip
    return gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=17)


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
@pytest.mark.parametrize(("spatial", "kernel"), [((8, 12), (4, 2)), ((4, 8, 6), (2, 4, 3))])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_conv_in_2d_and_3d(op: str, spatial: tuple[int, ...], kernel: tuple[int, ...], bias: bool) -> None:
    graph = _conv_graph(op, np.float32, spatial, kernel, bias)
    feed = {"x": np.random.default_rng(1).standard_normal((2, 3, *spatial)).astype(np.float32)}
    expected = run_graph(graph, feed)[0]
    report = lower_patch_conv(graph, LowerPatchConvConfig())
    assert report.rewritten == 1 and not [n for n in graph.nodes if n.op.startswith("Conv")]
    np.testing.assert_allclose(run_graph(graph, feed)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [({"pads": [1, 1, 1, 1]}, "padded"), ({"group": 3}, "grouped or dilated")],
)
def test_skips_what_is_not_a_plain_patch_conv(attrs: dict, reason: str) -> None:
    graph = _conv_graph("Conv", np.float32, (8, 8), (2, 2), True, **attrs)
    if "group" in attrs:
        graph.nodes[0].inputs[1] = gs.Constant("wg", np.ones((6, 1, 2, 2), np.float32))
    report = lower_patch_conv(graph, LowerPatchConvConfig())
    assert report.rewritten == 0 and reason in report.skipped[0]


def test_leaves_ordinary_convolutions_alone() -> None:
    graph = _conv_graph("Conv", np.float32, (8, 8), (3, 3), True)
    graph.nodes[0].attrs["strides"] = [1, 1]
    report = lower_patch_conv(graph, LowerPatchConvConfig())
    assert (report.matched, report.rewritten) == (0, 0)
