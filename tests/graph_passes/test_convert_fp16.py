"""convert_fp16: the naive FP16 graph loads in ONNX Runtime, stays close on benign graphs, keeps FP32 I/O,
keeps what FP16 cannot express (Resize scales, shape arithmetic) and is idempotent."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from calibration.hybrid_testing import (
    LOOSE,
    attention_block,
    block_feeds,
    check_strongly_typed,
    compare_all,
    io_dtypes,
    node_by_name,
    run_ort,
    save_model,
)

from export_engine.graph_passes.base import load_graph, save_graph
from export_engine.graph_passes.convert_fp16 import ConvertFp16Config, convert_fp16
from export_engine.graph_passes.graph_facts import (
    FP16,
    FP32,
    GraphFacts,
    fill_missing_dtypes,
    is_boundary_cast,
    np_dtype,
)

log = logging.getLogger(__name__)
TINY = ("mast3r.encoder", "mast3r.decoder", "fastsam3d.encoder", "fastsam3d.prompt_decoder")
MATRIX = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Attention")


def _convert(source: Path, target: Path) -> tuple[Path, object]:
    graph = load_graph(source)
    report = convert_fp16(graph, ConvertFp16Config())
    save_graph(graph, target, external_data=False)
    return target, report


@pytest.mark.parametrize("key", TINY)
def test_tiny_graph_fp16_loads_and_is_close(tiny_graphs: dict, tmp_path: Path, key: str) -> None:
    tiny = tiny_graphs[key]
    path, report = _convert(tiny.path, tmp_path / "fp16.onnx")
    check_strongly_typed(path)
    assert io_dtypes(path) == io_dtypes(tiny.path)  # graph I/O keeps its dtypes (FP32)
    graph = load_graph(path)
    for node in graph.nodes:
        if node.op in MATRIX:
            assert np_dtype(node.outputs[0]) == FP16, node.name
        if node.op == "Resize" and len(node.inputs) > 2 and node.inputs[2].name:
            assert np_dtype(node.inputs[2]) == FP32, f"{node.name}: Resize scales must stay FP32"
    worst = compare_all(run_ort(tiny.path, tiny.feeds), run_ort(path, tiny.feeds), LOOSE)
    log.info("%s fp16 max abs errors: %s", key, {n: f"{o.max_abs:.3g}" for n, o in worst.items()})
    assert all(o.passed for o in worst.values()), {n: (o.max_abs, o.share_over) for n, o in worst.items()}
    assert report.rewritten > 0 and report.details["casts_added"] > 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("key", ["mast3r.decoder", "fastsam3d.prompt_decoder"])
def test_second_run_changes_nothing(tiny_graphs: dict, tmp_path: Path, key: str) -> None:
    path, _ = _convert(tiny_graphs[key].path, tmp_path / "fp16.onnx")
    graph = load_graph(path)
    before = [(n.op, n.name, [t.name for t in n.inputs], [str(np_dtype(t)) for t in n.outputs]) for n in graph.nodes]
    report = convert_fp16(graph, ConvertFp16Config())
    after = [(n.op, n.name, [t.name for t in n.inputs], [str(np_dtype(t)) for t in n.outputs]) for n in graph.nodes]
    assert report.rewritten == 0 and report.details["casts_added"] == 0
    assert before == after


def test_shape_arithmetic_and_integer_tensors_untouched(tiny_graphs: dict, tmp_path: Path) -> None:
    """Static float tensors (RoPE tables, shape arithmetic) stay FP32 and int64 stays int64."""
    tiny = tiny_graphs["mast3r.encoder"]
    before = load_graph(tiny.path)
    fill_missing_dtypes(before)
    facts = GraphFacts.of(before)
    static_float = {
        t.name for n in before.nodes for t in n.outputs if np_dtype(t) == FP32 and t.name not in facts.dynamic
    }
    ints = {t.name for t in before.tensors().values() if np_dtype(t) == np.dtype(np.int64)}
    assert static_float  # the RoPE cos/sin tables are computed from shapes
    path, _ = _convert(tiny.path, tmp_path / "fp16.onnx")
    after = load_graph(path).tensors()
    assert all(np_dtype(after[name]) == FP32 for name in static_float if name in after)
    assert all(np_dtype(after[name]) == np.dtype(np.int64) for name in ints if name in after)


def test_attention_graph_and_consumed_graph_output(tmp_path: Path) -> None:
    source = save_model(attention_block(), tmp_path / "block.onnx")
    path, _ = _convert(source, tmp_path / "fp16.onnx")
    check_strongly_typed(path)
    graph = load_graph(path)
    attention = node_by_name(graph, "attention")
    assert [np_dtype(t) for t in attention.inputs] == [FP16] * 3
    # "tokens" is both a graph output (FP32, through a boundary cast) and the head's input (FP16).
    tokens = next(t for t in graph.outputs if t.name == "tokens")
    assert np_dtype(tokens) == FP32 and is_boundary_cast(tokens.inputs[0])
    assert np_dtype(node_by_name(graph, "head").inputs[0]) == FP16
    feeds = block_feeds()
    worst = compare_all(run_ort(source, feeds), run_ort(path, feeds), LOOSE)
    assert all(o.passed for o in worst.values())


def test_existing_float_casts_follow_and_overflow_is_reported(tmp_path: Path) -> None:
    """A Cast(to=FLOAT) on data becomes Cast(to=FLOAT16); weights beyond FP16's range become inf, counted."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    big = onnx.numpy_helper.from_array(np.array([1.0, 1e5, 2.0], np.float32), "big")
    nodes = [
        onnx.helper.make_node("Relu", ["x"], ["r"], name="relu"),
        onnx.helper.make_node("Cast", ["r"], ["c"], name="cast", to=onnx.TensorProto.FLOAT),
        onnx.helper.make_node("Mul", ["c", "big"], ["y"], name="mul"),
    ]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x], [y], [big]))
    source = save_model(model, tmp_path / "cast.onnx")
    path, report = _convert(source, tmp_path / "fp16.onnx")
    check_strongly_typed(path)
    graph = load_graph(path)
    assert node_by_name(graph, "cast").attrs["to"] == onnx.TensorProto.FLOAT16
    assert report.details["initializer_overflow"] == 1 and report.warnings  # type: ignore[attr-defined]
    out = run_ort(path, [{"x": np.ones((2, 3), np.float32)}])[0]["y"]
    assert np.isinf(out[:, 1]).all()  # the naive conversion really overflows
