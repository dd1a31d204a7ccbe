"""Real engine builds (TensorRT-RTX here, full TensorRT where it is installed) of tiny and synthetic graphs.

Tiny builds take about a second each on 2 cores; every build runs in a child process.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
from builder_graphs import SEQ, WIDTH, needs_rtx, require_backend
from onnx import TensorProto, helper

from export_engine.builders import (
    BuildConfig,
    BuilderBackend,
    BuildResult,
    InputShapes,
    engine_from_onnx,
    profiles_from_spec,
)
from export_engine.errors import BackendError, EngineBuildError, UsageError

TINY = ["mast3r.encoder", "mast3r.decoder", "fastsam3d.encoder", "fastsam3d.prompt_decoder"]
BATCH_1_TO_4 = (InputShapes("x", (1, SEQ, WIDTH), (2, SEQ, WIDTH), (4, SEQ, WIDTH)),)


def _fixed_dims(spec: Any, value: int = 1) -> dict[str, tuple[int, int, int]]:
    return {d: (value, value, value) for t in spec.inputs for d in t.shape if isinstance(d, str)}


def _assert_clean(directory: Path, expected: set[str]) -> None:
    """Only the named files are left: no temporary engine, no partial write."""
    assert {p.name for p in directory.iterdir()} == expected


@pytest.mark.parametrize("graph", TINY)
def test_tiny_graphs_build_as_is(
    backend: BuilderBackend, graph: str, tiny_graphs: dict[str, Any], tmp_path: Path
) -> None:
    tiny = tiny_graphs[graph]
    config = BuildConfig(backend=backend, profiles=(profiles_from_spec(tiny.spec, _fixed_dims(tiny.spec)),))
    result = engine_from_onnx(tiny.path, tmp_path / f"{graph}.engine", config)
    assert result.engine_path.stat().st_size == result.engine_bytes > 0
    assert result.network_layers > 0 and result.build_seconds > 0 and result.peak_rss_gib > 0
    assert result.strongly_typed and not result.parser_errors
    assert {t["name"] for t in result.inputs} == set(tiny.spec.input_names)
    assert {t["name"] for t in result.outputs} == set(tiny.spec.output_names)
    assert result.attention == ()  # MatMul/Softmax attention: no IAttention to mark
    _assert_clean(tmp_path, {f"{graph}.engine"})


@pytest.mark.parametrize("graph", ["mast3r.encoder", "fastsam3d.encoder", "fastsam3d.prompt_decoder"])
def test_dynamic_profiles(backend: BuilderBackend, graph: str, tiny_graphs: dict[str, Any], tmp_path: Path) -> None:
    tiny = tiny_graphs[graph]
    dims = {d: (1, 2, 4) for d in _fixed_dims(tiny.spec)}
    config = BuildConfig(backend=backend, profiles=(profiles_from_spec(tiny.spec, dims),))
    result = engine_from_onnx(tiny.path, tmp_path / "dynamic.engine", config)
    dynamic = [t for t in result.inputs if -1 in t["shape"]]
    assert dynamic and result.engine_bytes > 0


@needs_rtx
def test_mast3r_decoder_dynamic_batch(rtx: BuilderBackend, tiny_graphs: dict[str, Any], tmp_path: Path) -> None:
    # TensorRT-RTX 1.7.1 failed here (Myelin CHECK_EQ(dim_count(), stride_order().size()) 4 vs 3) while the MASt3R
    # head sliced channels after its NCHW -> NHWC permute; the head now slices first (models/mast3r/heads.py).
    tiny = tiny_graphs["mast3r.decoder"]
    config = BuildConfig(backend=rtx, profiles=(profiles_from_spec(tiny.spec, {"batch": (1, 1, 2)}),))
    result = engine_from_onnx(tiny.path, tmp_path / "decoder.engine", config)
    assert result.engine_bytes > 0 and any(-1 in t["shape"] for t in result.inputs)


def test_fp16_attention_keeps_its_fused_kernel(
    backend: BuilderBackend, attention_onnx: Callable[..., Path], tmp_path: Path
) -> None:
    onnx_path = attention_onnx("ln_cast_attention_cast", pre_norm=True, fp16=True, project=False)
    config = BuildConfig(backend=backend, profiles=(BATCH_1_TO_4,))
    result = engine_from_onnx(onnx_path, tmp_path / "fp16.engine", config)
    assert [(a.q_dtype, a.decomposable, a.set_by_builder) for a in result.attention] == [("HALF", False, False)]
    assert result.layer_types.get("ATTENTION_INPUT") == 1


def test_fp32_attention_is_made_decomposable(
    backend: BuilderBackend, attention_onnx: Callable[..., Path], tmp_path: Path
) -> None:
    onnx_path = attention_onnx("fp32_attention", fp16=False)
    config = BuildConfig(backend=backend, profiles=(BATCH_1_TO_4,))
    result = engine_from_onnx(onnx_path, tmp_path / "fp32.engine", config)
    assert [(a.q_dtype, a.decomposable, a.set_by_builder) for a in result.attention] == [("FLOAT", True, True)]


@needs_rtx
def test_fp32_attention_without_decomposable_fails_with_advice(
    rtx: BuilderBackend, attention_onnx: Callable[..., Path], tmp_path: Path
) -> None:
    onnx_path = attention_onnx("fp32_attention", fp16=False)
    config = BuildConfig(backend=rtx, profiles=(BATCH_1_TO_4,), attention_decomposable="none")
    with pytest.raises(EngineBuildError, match="stage 'build'") as err:
        engine_from_onnx(onnx_path, tmp_path / "out" / "fp32.engine", config)
    assert "is_decomposable" in str(err.value) and "attention_decomposable='all'" in str(err.value)
    _assert_clean(tmp_path / "out", set())


@needs_rtx
def test_builder_crash_becomes_engine_build_error(
    rtx: BuilderBackend, attention_onnx: Callable[..., Path], tmp_path: Path
) -> None:
    """input -> Cast(fp16) -> Attention -> Cast segfaults the TensorRT-RTX 1.7.1 CPU-only builder (the same
    pattern with a LayerNorm first builds). If a later release builds it, turn this into a clean-build test."""
    onnx_path = attention_onnx("input_cast_attention_cast", pre_norm=False, fp16=True, project=False)
    config = BuildConfig(backend=rtx, profiles=(BATCH_1_TO_4,))
    with pytest.raises(EngineBuildError) as err:
        engine_from_onnx(onnx_path, tmp_path / "out" / "crash.engine", config)
    message = str(err.value)
    assert "input_cast_attention_cast.onnx" in message and "crashed in stage 'build'" in message
    assert "SIGSEGV" in message and "no engine was written" in message
    assert "builder phase: Building engine" in message
    _assert_clean(tmp_path / "out", set())


@needs_rtx
def test_timeout_kills_the_child_and_leaves_nothing(
    rtx: BuilderBackend, tiny_graphs: dict[str, Any], tmp_path: Path
) -> None:
    tiny = tiny_graphs["mast3r.decoder"]
    config = BuildConfig(backend=rtx, profiles=(profiles_from_spec(tiny.spec, _fixed_dims(tiny.spec)),), timeout_s=0.2)
    with pytest.raises(EngineBuildError, match=r"timed out after 0.2 s in stage '\w+' and was killed"):
        engine_from_onnx(tiny.path, tmp_path / "out" / "slow.engine", config)
    _assert_clean(tmp_path / "out", set())


@needs_rtx
def test_rtx_compute_capabilities(rtx: BuilderBackend, attention_onnx: Callable[..., Path], tmp_path: Path) -> None:
    onnx_path = attention_onnx("fp16_attention")
    for ccs in [("8.9",), ("8.6", "12.0")]:
        result = engine_from_onnx(
            onnx_path, tmp_path / "cc.engine", BuildConfig(profiles=(BATCH_1_TO_4,), compute_capabilities=ccs)
        )
        assert result.config.compute_capabilities == ccs and result.engine_bytes > 0
    # Turing has no FP32 GEMM in TensorRT-RTX: a clear build error, not a crash.
    with pytest.raises(EngineBuildError, match="Turing"):
        engine_from_onnx(
            onnx_path, tmp_path / "cc.engine", BuildConfig(profiles=(BATCH_1_TO_4,), compute_capabilities=("7.5",))
        )


@needs_rtx
def test_rtx_refuses_current_without_gpu(
    rtx: BuilderBackend, attention_onnx: Callable[..., Path], tmp_path: Path
) -> None:
    from export_engine.runners.backends import cuda_devices

    if cuda_devices()[0]:
        pytest.skip("this machine has a GPU")
    with pytest.raises(UsageError, match="there is none"):
        engine_from_onnx(attention_onnx("a"), tmp_path / "a.engine", BuildConfig(compute_capabilities=("current",)))


@pytest.mark.tensorrt
def test_timing_cache_saved_then_reused(attention_onnx: Callable[..., Path], tmp_path: Path) -> None:
    """Full TensorRT only: TensorRT-RTX ignores timing caches (next test)."""
    backend = require_backend("tensorrt")
    onnx_path = attention_onnx("fp16_attention")
    cache, copy = tmp_path / "cache" / "timing.cache", tmp_path / "artifact" / "timing.cache"
    config = BuildConfig(backend=backend, profiles=(BATCH_1_TO_4,), timing_cache_path=cache, timing_cache_copy=copy)
    first = engine_from_onnx(onnx_path, tmp_path / "1.engine", config)
    assert first.timing_cache["loaded_bytes"] == 0 and first.timing_cache["saved_bytes"] > 0
    assert cache.read_bytes() == copy.read_bytes()
    second = engine_from_onnx(onnx_path, tmp_path / "2.engine", config)
    assert second.timing_cache["loaded_bytes"] == first.timing_cache["saved_bytes"]
    assert second.timing_cache["accepted"]


@needs_rtx
def test_rtx_reports_that_it_ignores_the_timing_cache(
    rtx: BuilderBackend, attention_onnx: Callable[..., Path], tmp_path: Path
) -> None:
    cache = tmp_path / "cache" / "timing.cache"
    config = BuildConfig(profiles=(BATCH_1_TO_4,), timing_cache_path=cache, timing_cache_copy=tmp_path / "copy.cache")
    for name in ("1.engine", "2.engine"):
        result = engine_from_onnx(attention_onnx("fp16_attention"), tmp_path / name, config)
        assert result.timing_cache["enabled"] is False
        assert "no-op" in result.timing_cache["reason"]
        assert not result.builder_errors  # loading a cache on a GPU-less machine would log CUDA errors
    assert not cache.exists() and not (tmp_path / "copy.cache").exists()


@needs_rtx
def test_missing_onnx_file(rtx: BuilderBackend, tmp_path: Path) -> None:
    with pytest.raises(EngineBuildError, match="does not exist"):
        engine_from_onnx(tmp_path / "nope.onnx", tmp_path / "nope.engine", BuildConfig())


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (random.Random(0).randbytes(300), "parser: .*Failed to parse the ONNX model"),
        (b"this is not a protobuf" * 10, "has no outputs"),  # decodes as an empty ModelProto
        (b"", "has no outputs"),
    ],
    ids=["random-bytes", "text", "empty"],
)
def test_garbage_onnx_fails_in_the_parse_stage(
    backend: BuilderBackend, content: bytes, needle: str, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(content)
    with pytest.raises(EngineBuildError, match=r"garbage\.onnx failed in stage 'parse'") as err:
        engine_from_onnx(garbage, tmp_path / "out" / "garbage.engine", BuildConfig(backend=backend))
    assert re.search(needle, str(err.value))
    _assert_clean(tmp_path / "out", set())


def test_unsupported_op_names_the_node(backend: BuilderBackend, tmp_path: Path) -> None:
    node = helper.make_node("FancyOp", ["x"], ["y"], name="my_fancy_node", domain="com.example")
    graph = helper.make_graph(
        [node],
        "fancy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(tmp_path / "fancy.onnx"))
    with pytest.raises(EngineBuildError, match="stage 'parse'") as err:
        engine_from_onnx(tmp_path / "fancy.onnx", tmp_path / "fancy.engine", BuildConfig(backend=backend))
    assert "parser at node 'my_fancy_node' (FancyOp)" in str(err.value)


def test_external_data_is_found_next_to_the_model(
    backend: BuilderBackend, attention_onnx: Callable[..., Path], tmp_path: Path
) -> None:
    model = onnx.load(str(attention_onnx("fp32_attention", fp16=False)))
    path = tmp_path / "external" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    assert (path.parent / "model.onnx.data").stat().st_size >= 3 * WIDTH * WIDTH * 4
    config = BuildConfig(backend=backend, profiles=(BATCH_1_TO_4,))
    result = engine_from_onnx(path, tmp_path / "external.engine", config)
    assert result.engine_bytes > 0 and not result.parser_errors


@pytest.mark.tensorrt
@pytest.mark.parametrize("compat", ["ampere_plus", "same_cc"])
def test_full_tensorrt_compatibility_options(attention_onnx: Callable[..., Path], tmp_path: Path, compat: str) -> None:
    backend = require_backend("tensorrt")
    config = BuildConfig(
        backend=backend,
        profiles=(BATCH_1_TO_4,),
        hardware_compatibility=compat,  # type: ignore[arg-type]
        version_compatible=compat == "ampere_plus",
    )
    result = engine_from_onnx(attention_onnx("fp16_attention"), tmp_path / "compat.engine", config)
    assert result.engine_bytes > 0 and result.strongly_typed


@needs_rtx
def test_dynamic_graph_without_profile(
    rtx: BuilderBackend, attention_onnx: Callable[..., Path], tmp_path: Path
) -> None:
    with pytest.raises(EngineBuildError, match=r"dynamic inputs \(x\[-1, 16, 64\]\) but no optimisation profile"):
        engine_from_onnx(attention_onnx("fp16_attention"), tmp_path / "a.engine", BuildConfig())


def test_missing_backend_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "tensorrt" in name else real(name, *a))
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"x")
    with pytest.raises(BackendError, match="pip install"):
        engine_from_onnx(onnx_path, tmp_path / "m.engine", BuildConfig())


@needs_rtx
def test_result_serialises_for_the_manifest(
    rtx: BuilderBackend, attention_onnx: Callable[..., Path], tmp_path: Path
) -> None:
    import json

    result: BuildResult = engine_from_onnx(
        attention_onnx("fp16_attention"), tmp_path / "a.engine", BuildConfig(profiles=(BATCH_1_TO_4,))
    )
    record = json.loads(json.dumps(result.to_dict()))
    assert record["backend"] == "tensorrt-rtx" and record["backend_version"]
    (attention,) = record["attention"]
    assert attention["q_dtype"] == "HALF" and attention["decomposable"] is False
    assert BuildConfig.from_dict(record["config"]) == result.config


@needs_rtx
def test_progress_is_logged(
    rtx: BuilderBackend, attention_onnx: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="export_engine")
    engine_from_onnx(attention_onnx("fp16_attention"), tmp_path / "a.engine", BuildConfig(profiles=(BATCH_1_TO_4,)))
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("engine build fp16_attention.onnx: Building engine start") for m in messages)
    assert any(m.startswith("engine fp16_attention.onnx: tensorrt-rtx") for m in messages)
