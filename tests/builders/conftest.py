"""Builder test fixtures: the backends to build with, synthetic ONNX graphs, a private cache directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from builder_graphs import RTX_MISSING, TRT_MISSING, attention_model, require_backend, rtx_installed, trt_installed

from export_engine.builders import BuilderBackend

# Every builder test that is not specific to one backend runs over both; full TensorRT is marked `tensorrt`.
# Missing modules skip at collection, before session fixtures (tiny_graphs) are built for nothing.
BACKENDS = [
    pytest.param("tensorrt-rtx", id="rtx", marks=pytest.mark.skipif(not rtx_installed(), reason=RTX_MISSING)),
    pytest.param(
        "tensorrt",
        id="trt",
        marks=[pytest.mark.tensorrt, pytest.mark.skipif(not trt_installed(), reason=TRT_MISSING)],
    ),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> BuilderBackend:
    return require_backend(request.param)


@pytest.fixture
def rtx() -> BuilderBackend:
    return require_backend("tensorrt-rtx")


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Builds that use the default timing-cache location must not touch the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture
def attention_onnx(tmp_path: Path) -> Callable[..., Path]:
    """``attention_onnx(name, pre_norm=..., fp16=..., project=...)`` -> path of a saved synthetic graph."""

    def make(name: str, *, pre_norm: bool = True, fp16: bool = True, project: bool = True) -> Path:
        path = tmp_path / "onnx" / f"{name}.onnx"
        path.parent.mkdir(exist_ok=True)
        onnx.save(attention_model(pre_norm, fp16, project), str(path))
        return path

    return make
