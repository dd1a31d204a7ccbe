"""FP16 storage emulation: what plain ONNX Runtime on the CPU hides (it runs FP16 regions in FP32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from calibration.hybrid_testing import run_emulated, run_ort, save_model

from export_engine.calibration.fp16_emulation import emulate_fp16_storage, emulated_session, emulation_session
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

    # The final parity gate's session (emulated_session) sees the overflow; the stored graph run as it is
    # (optimizations off, no emulation) does not: ONNX Runtime computes the FP16 region in FP32.
    gate = emulated_session(tmp_path / "fp16.onnx")
    name = gate.get_inputs()[0].name
    assert np.isinf(gate.run(None, {name: np.ones(4, np.float32)})[0]).all()
    plain = emulation_session(str(tmp_path / "fp16.onnx"))
    assert np.isfinite(plain.run(None, {name: np.ones(4, np.float32)})[0]).all()


def test_large_fp16_weights_stay_fp16_behind_a_cast_with_the_same_result(tmp_path: Path) -> None:
    """A weight above the in-place limit is not widened in memory (a second FP32 copy of every weight): it stays
    FP16 and a Cast widens it at run time; small constants are widened in place. Both give FP32(FP16(w))."""
    h, rng = onnx.helper, np.random.default_rng(0)
    big = rng.normal(size=(320, 256)).astype(np.float32)  # 81,920 elements: above the limit
    small = rng.normal(size=(256,)).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(big, "w"), onnx.numpy_helper.from_array(small, "b")]
    nodes = [h.make_node("MatMul", ["x", "w"], ["y"], name="mm"), h.make_node("Add", ["y", "b"], ["out"], name="add")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 320])],
                         [h.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [2, 256])], inits)  # fmt: skip
    fp16 = load_graph(save_model(h.make_model(graph), tmp_path / "mm.onnx"))
    convert_fp16(fp16, ConvertFp16Config())
    save_graph(fp16, tmp_path / "fp16.onnx", external_data=False)

    emulated = load_graph(tmp_path / "fp16.onnx")
    emulate_fp16_storage(emulated)
    constants = {t.name: t for t in emulated.tensors().values() if t.__class__.__name__ == "Constant"}
    assert constants["w"].values.dtype == np.float16  # kept FP16 ...
    assert any(n.op == "Cast" and n.inputs[0].name == "w" for n in emulated.nodes)  # ... widened at run time
    assert all(t.values.dtype == np.float32 for name, t in constants.items() if name != "w")

    x = rng.normal(size=(2, 320)).astype(np.float32)
    got = run_emulated(tmp_path / "fp16.onnx", [{"x": x}])[0]["out"]
    x16 = x.astype(np.float16).astype(np.float32)
    y16 = (x16 @ big.astype(np.float16).astype(np.float32)).astype(np.float16).astype(np.float32)
    want = (y16 + small.astype(np.float16).astype(np.float32)).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
