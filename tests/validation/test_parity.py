from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from export_engine.config import Precision
from export_engine.core.types import ModelSpec, TensorSpec, Tolerance
from export_engine.errors import ParityError
from export_engine.exporters.onnx_from_torch import onnx_from_torch
from export_engine.runners.ort_cpu import onnxrt_runner
from export_engine.runners.torch_cpu import TorchRunner
from export_engine.validation.parity import check_parity, compare_output, raise_on_failure


def test_compare_output_metrics() -> None:
    ref = np.array([1.0, 2.0, -4.0, 0.0], np.float32)
    got = ref + np.array([0.0, 0.01, 0.0, 0.5], np.float32)
    result = compare_output("o", got, ref, Tolerance(atol=0.1, rtol=0.0))
    assert not result.passed
    assert result.share_over == pytest.approx(0.25)
    assert result.max_abs == pytest.approx(0.5)
    assert compare_output("o", got, ref, Tolerance(atol=0.1, rtol=0.0, max_share=0.3)).passed
    nan = compare_output("o", np.array([np.nan, 1], np.float32), np.array([1, 1], np.float32), Tolerance(1, 1))
    assert not nan.passed and not nan.finite
    assert not compare_output("o", np.zeros(3), np.zeros(4), Tolerance(1, 1)).passed


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 32)
        self.b = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.nn.functional.gelu(self.a(x))
        return self.b(h), h.mean(-1)


SPEC = ModelSpec(
    name="toy",
    build_module=lambda m: m,
    inputs=(TensorSpec("x", ("batch", 6)),),
    outputs=(TensorSpec("out", ("batch", 3)), TensorSpec("mean", ("batch",))),
    tolerances={Precision.FP32: {"out": Tolerance(1e-5, 1e-4), "mean": Tolerance(1e-5, 1e-4)}},
)


def _feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"x": rng.standard_normal((4, 6)).astype(np.float32)} for _ in range(2)]


def test_gate_passes_faithful_export_and_fails_a_broken_one(tmp_path: Path) -> None:
    model = Toy().eval()
    path = onnx_from_torch(model, (torch.randn(2, 6),), tmp_path / "toy.onnx", SPEC).path
    tol = SPEC.tolerances[Precision.FP32]
    report = check_parity(TorchRunner(model, SPEC), onnxrt_runner(path), _feeds(), tol, graph="toy", precision="fp32")
    assert report.passed and report.samples == 2
    assert all(o.max_abs < 1e-5 for o in report.outputs)
    raise_on_failure([report], "toy")  # no exception

    # Perturb one weight of the second layer: only "out" may fail, "mean" depends on the first layer only.
    proto = onnx.load(str(path))
    init = next(i for i in proto.graph.initializer if numpy_helper.to_array(i).shape in ((3,), (32, 3), (3, 32)))
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    report = check_parity(TorchRunner(model, SPEC), onnxrt_runner(broken), _feeds(), tol, graph="toy", precision="fp32")
    verdict = {o.output: o.passed for o in report.outputs}
    assert verdict == {"out": False, "mean": True}
    with pytest.raises(ParityError) as info:
        raise_on_failure([report], "toy at fp32")
    message = str(info.value)
    assert "toy/out" in message and "max abs" in message and "FAIL" in message
