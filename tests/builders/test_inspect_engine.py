"""inspect_engine / engine_validity: what a built engine tells without running it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from builder_graphs import SEQ, WIDTH, needs_rtx

from export_engine.builders import (
    BuildConfig,
    BuilderBackend,
    InputShapes,
    engine_from_onnx,
    engine_validity,
    inspect_engine,
)
from export_engine.errors import EngineBuildError, UsageError
from export_engine.runners.backends import cuda_devices

PROFILE = (InputShapes("x", (1, SEQ, WIDTH), (1, SEQ, WIDTH), (2, SEQ, WIDTH)),)


def _build(backend: BuilderBackend, attention_onnx: Callable[..., Path], tmp_path: Path) -> tuple[Path, str]:
    config = BuildConfig(backend=backend, profiles=(PROFILE,))
    result = engine_from_onnx(attention_onnx("fp16_attention"), tmp_path / "a.engine", config)
    return result.engine_path, result.backend_version


@pytest.fixture
def built(backend: BuilderBackend, attention_onnx: Callable[..., Path], tmp_path: Path) -> tuple[Path, str]:
    return _build(backend, attention_onnx, tmp_path)


@pytest.fixture
def rtx_built(rtx: BuilderBackend, attention_onnx: Callable[..., Path], tmp_path: Path) -> tuple[Path, str]:
    return _build(rtx, attention_onnx, tmp_path)


def test_inspect_engine(built: tuple[Path, str], backend: BuilderBackend) -> None:
    path, version = built
    info = inspect_engine(path, backend)
    assert info.engine_bytes == path.stat().st_size and info.backend_version == version
    if info.deserialised:  # a machine that can run the engine: layer details from the engine inspector
        assert info.num_layers and info.layers and {t["name"] for t in info.io_tensors} == {"x", "y"}
    else:
        assert info.reason.startswith("cannot be deserialised here: ")
        assert not cuda_devices()[0], "only a GPU-less machine is expected to fail deserialising"
        assert "CUDA" in info.reason and info.layers == ()
    assert info.to_dict()["validity"]["status"] == info.validity.status


@needs_rtx
def test_rtx_header_names_version_and_targets(
    rtx: BuilderBackend, attention_onnx: Callable[..., Path], tmp_path: Path
) -> None:
    config = BuildConfig(profiles=(PROFILE,), compute_capabilities=("8.6", "12.0"))
    result = engine_from_onnx(attention_onnx("fp16_attention"), tmp_path / "a.engine", config)
    header = inspect_engine(result.engine_path, rtx).header
    assert header["magic"] == "vtrt" and header["declared_bytes"] == result.engine_bytes
    assert header["built_with"] == result.backend_version
    assert header["targets"] == ["8.6", "12.0"]


@needs_rtx
def test_rtx_validity_without_gpu_gives_the_reason(rtx_built: tuple[Path, str], rtx: BuilderBackend) -> None:
    if cuda_devices()[0]:
        pytest.skip("this machine has a GPU")
    validity = engine_validity(rtx_built[0], rtx)
    assert validity.status == "invalid"
    assert "CUDA" in validity.reason  # "cudaError 35: CUDA driver version is insufficient ..."


@needs_rtx
def test_rtx_validity_of_a_malformed_plan(rtx: BuilderBackend, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.engine"
    bogus.write_bytes(b"\0" * 4096)
    validity = engine_validity(bogus, rtx)
    assert validity.status == "invalid" and validity.diagnostics == ("MALFORMED_ENGINE",)
    info = inspect_engine(bogus, rtx)
    assert not info.deserialised and "malformed" in info.reason and info.header["magic"] == "\0" * 4


def test_inspect_engine_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(EngineBuildError, match="does not exist"):
        inspect_engine(tmp_path / "none.engine", "tensorrt-rtx")
    with pytest.raises(UsageError, match="choose one of"):
        inspect_engine(tmp_path / "none.engine", "onnx")
