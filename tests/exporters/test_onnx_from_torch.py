from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export_engine.config import Precision
from export_engine.core.types import ModelSpec, TensorSpec, Tolerance
from export_engine.errors import OnnxExportError
from export_engine.exporters import onnx_from_torch as exporter_module
from export_engine.exporters.onnx_from_torch import onnx_from_torch


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 64)
        self.norm = nn.LayerNorm(64, eps=1e-6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.norm(self.fc(x))
        return y, torch.expm1(y.abs().sum(-1))


def _spec() -> ModelSpec:
    return ModelSpec(
        name="toy",
        build_module=lambda m: m,
        inputs=(TensorSpec("x", ("batch", 4, 8)),),
        outputs=(TensorSpec("y", ("batch", 4, 64)), TensorSpec("z", ("batch", 4))),
        tolerances={Precision.FP32: {"y": Tolerance(1e-5, 1e-5), "z": Tolerance(1e-5, 1e-5)}},
    )


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_export_matches_torch_with_dynamic_batch(tmp_path: Path) -> None:
    model = Toy().eval()
    result = onnx_from_torch(model, (torch.randn(2, 4, 8),), tmp_path / "toy.onnx", _spec())
    assert result.path.is_file() and result.data_files == ()
    x = np.random.default_rng(1).standard_normal((5, 4, 8)).astype(np.float32)  # batch 5 != export batch 2
    y, z = _run(result.path, x)
    ref_y, ref_z = (t.detach().numpy() for t in model(torch.from_numpy(x)))
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z, ref_z, rtol=1e-5, atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name != "toy.onnx"], "temporary export files were left"


def test_large_weights_go_to_one_external_data_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exporter_module, "EXTERNAL_DATA_BYTES", 100)  # pretend the toy is large
    model = Toy().eval()
    result = onnx_from_torch(model, (torch.randn(1, 4, 8),), tmp_path / "toy.onnx", _spec())
    assert [p.name for p in result.data_files] == ["toy.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.onnx", "toy.onnx.data"]
    x = np.ones((1, 4, 8), np.float32) * np.arange(8, dtype=np.float32)
    np.testing.assert_allclose(_run(result.path, x)[0], model(torch.from_numpy(x))[0].detach().numpy(), atol=1e-5)


def test_export_failure_is_a_clear_error(tmp_path: Path) -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(x.numpy())  # leaves the graph: not exportable

    with pytest.raises(OnnxExportError, match="toy"):
        onnx_from_torch(Broken(), (torch.randn(1, 4, 8),), tmp_path / "toy.onnx", _spec())
    assert not list(tmp_path.iterdir())


def test_unknown_exporter(tmp_path: Path) -> None:
    with pytest.raises(OnnxExportError, match="torchscript"):
        onnx_from_torch(Toy(), (torch.randn(1, 4, 8),), tmp_path / "t.onnx", _spec(), exporter="magic")
