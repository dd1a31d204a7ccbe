"""FP16 storage emulation: what plain ONNX Runtime on the CPU hides (it runs FP16 regions in FP32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from calibration.hybrid_testing import run_emulated, run_ort, save_model

from export_engine.calibration.fp16_emulation import emulate_fp16_storage
from export_engine.graph_passes.base import load_graph, save_graph
from export_engine.graph_passes.convert_fp16 import ConvertFp16Config, convert_fp16
from export_engine.graph_passes.graph_facts import FP16, np_dtype


def test_overflow_between_nodes_is_visible(tmp_path: Path) -> None:
    """x * 1000 * 100 / 1000: 1e5 overflows FP16 in between, although input and result are small."""
    h = onnx.helper
    consts = [
        onnx.numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("a", 1e3), ("b", 1e2), ("c", 1e-3))
    ]
    nodes = [
        h.make_node("Mul", ["x", "a"], ["y"], name="up"),
        h.make_node("Mul", ["y", "b"], ["z"], name="more"),
        h.make_node("Mul", ["z", "c"], ["out"], name="down"),
    ]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
                         [h.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [4])], consts)  # fmt: skip
    source = save_model(h.make_model(graph), tmp_path / "scale.onnx")
    fp16 = load_graph(source)
    convert_fp16(fp16, ConvertFp16Config())
    save_graph(fp16, tmp_path / "fp16.onnx", external_data=False)
    feeds = [{"x": np.ones(4, np.float32)}]
    assert np.isfinite(run_ort(tmp_path / "fp16.onnx", feeds)[0]["out"]).all()  # ORT-CPU computes it in FP32
    assert np.isinf(run_emulated(tmp_path / "fp16.onnx", feeds)[0]["out"]).all()  # an FP16 tensor overflows

    emulated = load_graph(tmp_path / "fp16.onnx")
    count = emulate_fp16_storage(emulated)
    assert count > 0 and not any(np_dtype(t) == FP16 for n in emulated.nodes for t in n.outputs if n.op != "Cast")
