"""BuildConfig validation, profiles from a ModelSpec, and backend selection: no TensorRT needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from export_engine.builders import BuildConfig, InputShapes, choose_backend, profiles_from_spec
from export_engine.builders.config import default_timing_cache_path
from export_engine.core.types import ModelSpec, TensorSpec
from export_engine.errors import BackendError, UsageError
from export_engine.runners import backends as backends_module


def _spec() -> ModelSpec:
    return ModelSpec(
        name="decoder",
        build_module=lambda model: model,
        inputs=(
            TensorSpec("image_embedding", (1, 8, 4, 4, 4)),
            TensorSpec("point_coords", ("prompts", "points", 3)),
            TensorSpec("has_mask", ("prompts",)),
        ),
        outputs=(TensorSpec("masks", ("prompts", 1, 8, 8, 8)),),
        tolerances={},
    )


def test_profiles_from_spec_fills_named_dims_and_skips_static_inputs() -> None:
    profile = profiles_from_spec(_spec(), {"prompts": (1, 2, 8), "points": (1, 4, 16)})
    assert profile == (
        InputShapes("point_coords", (1, 1, 3), (2, 4, 3), (8, 16, 3)),
        InputShapes("has_mask", (1,), (2,), (8,)),
    )


@pytest.mark.parametrize(
    ("dims", "needle"),
    [
        ({"prompts": (1, 2, 8)}, "missing ['points']"),
        ({"prompts": (1, 2, 8), "points": (1, 1, 1), "batch": (1, 1, 1)}, "unknown ['batch']"),
        ({"prompts": (2, 1, 8), "points": (1, 1, 1)}, "min <= opt <= max"),
    ],
)
def test_profiles_from_spec_rejects_bad_dims(dims: dict[str, tuple[int, int, int]], needle: str) -> None:
    with pytest.raises(UsageError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        profiles_from_spec(_spec(), dims)


def test_hopper_is_refused_for_tensorrt_rtx() -> None:
    with pytest.raises(UsageError, match="cannot be targeted by TensorRT-RTX") as err:
        BuildConfig(backend="tensorrt-rtx", compute_capabilities=("8.9", "9.0"))
    assert "Hopper" in str(err.value) and "full TensorRT" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"backend": "tensorrt-rtx", "compute_capabilities": ("8.7",)}, "unknown TensorRT-RTX compute capability"),
        ({"backend": "tensorrt-rtx", "hardware_compatibility": "ampere_plus"}, "full TensorRT only"),
        ({"backend": "tensorrt-rtx", "version_compatible": True}, "full TensorRT only"),
        ({"backend": "tensorrt", "compute_capabilities": ("8.9",)}, "TensorRT-RTX only"),
        ({"backend": "tensorrt", "hardware_compatibility": "any"}, "choose one of: none, ampere_plus, same_cc"),
        ({"backend": "tensorrt", "opt_level": 6}, "0..5"),
        ({"backend": "onnx"}, "choose one of: tensorrt, tensorrt-rtx"),
        ({"attention_decomposable": "some"}, "choose one of: fp32, all, none"),
        ({"timeout_s": 0}, "positive"),
    ],
)
def test_build_config_rejects_invalid_combinations(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        BuildConfig(**kwargs)


def test_build_config_round_trips_through_json_dict(tmp_path: Path) -> None:
    config = BuildConfig(
        backend="tensorrt",
        opt_level=5,
        profiles=((InputShapes("x", (1, 4), (2, 4), (8, 4)),),),
        timing_cache_path=tmp_path / "t.cache",
        timing_cache_copy=tmp_path / "artifact" / "t.cache",
        hardware_compatibility="ampere_plus",
        version_compatible=True,
        timeout_s=None,
    )
    assert BuildConfig.from_dict(config.to_dict()) == config


def test_default_timing_cache_path_is_per_user_and_per_version(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = default_timing_cache_path("tensorrt", "10.13.0")
    assert path == tmp_path / "export-engine" / "timing" / "tensorrt-10.13.0.cache"


def _fake_machine(monkeypatch: pytest.MonkeyPatch, trt: str | None, rtx: str | None, gpus: int) -> None:
    versions = {"tensorrt": trt, "tensorrt-rtx": rtx, "onnx": "1.32.0"}
    monkeypatch.setattr(backends_module, "backend_version", lambda name: versions[name])
    monkeypatch.setattr(backends_module, "cuda_devices", lambda: (gpus, f"{gpus} CUDA device(s) (fake)"))


@pytest.mark.parametrize(
    ("trt", "rtx", "gpus", "expected", "why"),
    [
        ("10.13.0", "1.7.1", 1, "tensorrt", "imports and 1 CUDA device"),
        ("10.13.0", "1.7.1", 0, "tensorrt-rtx", "no GPU for full TensorRT"),
        (None, "1.7.1", 1, "tensorrt-rtx", "full TensorRT is not installed"),
        (None, None, 0, "onnx", "no TensorRT builder installed"),
    ],
)
def test_choose_backend_auto(
    monkeypatch: pytest.MonkeyPatch, trt: str | None, rtx: str | None, gpus: int, expected: str, why: str
) -> None:
    _fake_machine(monkeypatch, trt, rtx, gpus)
    name, reason = choose_backend("auto")
    assert name == expected
    assert why in reason and "\n" not in reason


def test_choose_backend_explicit_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends_module, "_import", lambda backend: (None, "No module named 'x'"))
    with pytest.raises(BackendError, match=r"pip install tensorrt-rtx-cu13"):
        choose_backend("tensorrt-rtx")
    with pytest.raises(BackendError, match="cannot be installed on CPU-only machines"):
        choose_backend("tensorrt")


def test_choose_backend_rejects_unknown_names() -> None:
    with pytest.raises(UsageError, match="choose one of: auto, tensorrt, tensorrt-rtx, onnx"):
        choose_backend("openvino")


def test_available_backends_reports_every_backend_and_the_gpu() -> None:
    found = backends_module.available_backends()
    assert set(found) == {"tensorrt", "tensorrt-rtx", "onnx", "gpu"}
    assert found["onnx"] is not None  # onnxruntime is a dependency
