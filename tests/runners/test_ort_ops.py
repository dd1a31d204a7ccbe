"""export-engine's ONNX Runtime operators: built on first use (cached, atomic), the same numbers as numpy on the
CPU provider and (marker gpu) on the CUDA provider, clear errors, and the fallback where nothing can build them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from export_engine.errors import BackendError
from export_engine.runners import ort_lowering, ort_ops
from export_engine.runners.ort_cuda import cuda_available

CPU_OK = ort_ops.cxx() is not None or any(ort_ops.prebuilt_folders())
needs_cxx = pytest.mark.skipif(not CPU_OK, reason="needs the CPU operators: no C++ compiler and no prebuilt library")
CUDA, CUDA_WHY = cuda_available()
CUDA_OPS, CUDA_OPS_WHY = ort_ops.available(cuda=True) if CUDA else (False, "no GPU")


@pytest.fixture
def no_prebuilt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests of first-use builds: no prebuilt library (CI installs one) is looked at."""
    monkeypatch.setattr(ort_ops, "prebuilt_folders", lambda: [])
    ort_ops.forget()


def _model(dtype: int, batch: int, tokens: int, width: int, rotate: list[int], head_dim: int,
           symbolic_tables: bool = False) -> bytes:  # fmt: skip
    part = width // len(rotate)
    inputs = [helper.make_tensor_value_info("P", dtype, [batch, tokens, width]),
              helper.make_tensor_value_info("bias", dtype, [width])]  # fmt: skip
    names = ["P", "bias"]
    if any(rotate):
        for name in ("cos", "sin"):
            dims = ["rows", "pairs"] if symbolic_tables else [tokens, head_dim // 2]
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
            names.append(name)
    outputs = [helper.make_tensor_value_info(f"y{j}", dtype, [batch, tokens, part]) for j in range(len(rotate))]
    node = helper.make_node("BiasRotarySplit", names, [o.name for o in outputs], domain=ort_ops.DOMAIN,
                            rotate=rotate, head_dim=head_dim)  # fmt: skip
    graph = helper.make_graph([node], "bias_rotary_split", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(ort_ops.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def _bias_activation_model(dtype: int, shape: list[int], residual: bool, relu: int, last: int = 0) -> bytes:
    names = ["X", "bias", *(["R"] if residual else [])]
    inputs = [
        helper.make_tensor_value_info("X", dtype, shape),
        helper.make_tensor_value_info("bias", dtype, [shape[-1] if last else shape[1]]),
    ]
    if residual:
        inputs.append(helper.make_tensor_value_info("R", dtype, shape))
    node = helper.make_node(
        "BiasActivation", names, ["Y"], domain=ort_ops.DOMAIN, relu=relu, **({"channels_last": last} if last else {})
    )  # absent: the default, 0
    graph = helper.make_graph([node], "bias_activation", inputs, [helper.make_tensor_value_info("Y", dtype, shape)])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(ort_ops.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def _bias_activation_case(dtype: type, shape: list[int], residual: bool, relu: int, cuda: bool,
                          last: int = 0) -> None:  # fmt: skip
    rng = np.random.default_rng(2)
    channels = shape[-1] if last else shape[1]
    feed = {"X": rng.standard_normal(shape).astype(dtype), "bias": rng.standard_normal(channels).astype(dtype)}
    want = feed["X"].astype(np.float32)
    if residual:
        feed["R"] = rng.standard_normal(shape).astype(dtype)
        want = want + feed["R"].astype(np.float32)
    bias = feed["bias"].astype(np.float32)
    want = want + (bias if last else bias.reshape(1, -1, *([1] * (len(shape) - 2))))
    want = (np.maximum(want, 0) if relu else want).astype(dtype)
    onnx_type = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    session = _session(_bias_activation_model(onnx_type, shape, residual, relu, last), cuda)
    (got,) = session.run(None, feed)
    assert got.dtype == dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)  # float arithmetic in numpy's order, one rounding


BIAS_ACTIVATION_CASES = [([2, 16, 12, 8], False, 1), ([2, 16, 12, 8], True, 0), ([1, 3, 5, 7], True, 1),
                         ([1, 4, 9], False, 0)]  # fmt: skip


def _reference(feed: dict[str, np.ndarray], rotate: list[int], head_dim: int) -> list[np.ndarray]:
    """P + bias split into len(rotate) parts; rotated parts turn each adjacent pair of a head by its angle."""
    p = feed["P"]
    x = p.astype(np.float32) + feed["bias"].astype(np.float32)
    batch, tokens, _ = p.shape
    out = []
    for j, part in enumerate(np.split(x, len(rotate), axis=-1)):
        if rotate[j]:
            pairs = part.reshape(batch, tokens, -1, head_dim // 2, 2)
            cos, sin = feed["cos"][None, :, None], feed["sin"][None, :, None]
            a, b = pairs[..., 0], pairs[..., 1]
            part = np.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(batch, tokens, -1)
        out.append(part.astype(p.dtype))
    return out


def _feed(dtype: type, batch: int, tokens: int, width: int, head_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    angles = rng.uniform(-np.pi, np.pi, (tokens, head_dim // 2))
    return {"P": rng.standard_normal((batch, tokens, width)).astype(dtype),
            "bias": rng.standard_normal(width).astype(dtype),
            "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32)}  # fmt: skip


def _session(model: bytes, cuda: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    ort_ops.register(options, cuda)
    providers = ["CUDAExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    return ort.InferenceSession(model, options, providers=providers)


CASES = [([1, 1, 0], 64), ([1], 64), ([0], 64), ([1, 1, 0], 8)]


@needs_cxx
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize(("rotate", "head_dim"), CASES)
def test_cpu_kernel_matches_numpy(dtype: type, rotate: list[int], head_dim: int) -> None:
    batch, tokens, heads = 2, 12, 3
    width = heads * head_dim * len(rotate)
    feed = _feed(dtype, batch, tokens, width, head_dim)
    onnx_type = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    session = _session(_model(onnx_type, batch, tokens, width, rotate, head_dim), cuda=False)
    got = session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})
    for g, want in zip(got, _reference(feed, rotate, head_dim), strict=True):
        assert g.dtype == dtype and g.shape == want.shape
        np.testing.assert_array_equal(g, want)  # float arithmetic, one rounding: the same bits as numpy


@needs_cxx
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize(("shape", "residual", "relu"), BIAS_ACTIVATION_CASES)
def test_cpu_bias_activation_matches_numpy(dtype: type, shape: list[int], residual: bool, relu: int) -> None:
    _bias_activation_case(dtype, shape, residual, relu, cuda=False)
    _bias_activation_case(dtype, shape, residual, relu, cuda=False, last=1)  # bias along the last axis


@needs_cxx
def test_bad_inputs_are_named() -> None:
    feed = _feed(np.float32, 1, 4, 48, 8)
    model = _model(TensorProto.FLOAT, 1, 4, 48, [1, 1, 0], 8, symbolic_tables=True)
    session = _session(model, cuda=False)
    with pytest.raises(Exception, match=r"BiasRotarySplit: cos and sin must be float \(4, 4\), got \(5, 4\)"):
        session.run(None, {**feed, "cos": np.zeros((5, 4), np.float32)})
    odd_parts = _model(TensorProto.FLOAT, 1, 4, 9, [0, 0, 0], 2)
    with pytest.raises(Exception, match="each part must hold an even number of values"):
        _session(odd_parts, cuda=False).run(None, {"P": feed["P"][..., :9], "bias": feed["bias"][:9]})
    odd = _model(TensorProto.FLOAT, 1, 4, 48, [1, 1, 0], 6, symbolic_tables=True)
    with pytest.raises(Exception, match="a part's width is not a whole number of heads"):
        _session(odd, cuda=False).run(None, {**feed, "cos": feed["cos"][:, :3], "sin": feed["sin"][:, :3]})


@needs_cxx
@pytest.mark.usefixtures("no_prebuilt")
def test_library_is_built_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPORT_ENGINE_CACHE", str(tmp_path))
    ort_ops.forget()
    try:
        path = ort_ops.library(cuda=False)
        assert path.is_relative_to(tmp_path) and ort_ops.providers(path) == ("cpu",)
        stamp = path.stat().st_mtime_ns
        ort_ops.forget()
        assert ort_ops.library(cuda=False) == path and path.stat().st_mtime_ns == stamp  # no rebuild
        assert sorted(p.name for p in path.parent.iterdir()) == ["build.json", ort_ops.LIBRARY_NAME]  # no scratch
        assert not [p for p in path.parent.parent.iterdir() if p.name.startswith(".")]
    finally:
        ort_ops.forget()


@pytest.mark.usefixtures("no_prebuilt")
def test_a_failed_build_says_why_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPORT_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    monkeypatch.setattr(ort_ops.build, "cxx", lambda: "/bin/false")
    ort_ops.forget()
    try:
        with pytest.raises(BackendError, match="building export-engine's ONNX Runtime operators failed"):
            ort_ops.library(cuda=False)
        # nothing but the (empty) lock file that serialises builds of this library across processes
        assert [p.suffix for p in tmp_path.rglob("*") if p.is_file() or p.parent != tmp_path] == [".lock"]
        ok, why = ort_ops.available(cuda=False)
        assert not ok and "failed" in why
    finally:
        ort_ops.forget()


@pytest.mark.usefixtures("no_prebuilt")
def test_without_a_compiler_the_stock_operators_are_used(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    monkeypatch.setattr(ort_ops.build, "nvcc", lambda: None)
    ort_ops.forget()
    try:
        names = ("patch_conv", "attention_fused", "rotary")
        with caplog.at_level(logging.WARNING):
            assert ort_lowering.with_own_ops(names, cuda=True, strict=False) == ("patch_conv", "attention_bsh",
                                                                                  "rotary")  # fmt: skip
        assert "attention_fused: using ['attention_bsh'] instead" in caplog.text and "nvcc" in caplog.text
        with pytest.raises(BackendError, match=r"lowerings \['attention_fused'\] need export-engine's"):
            ort_lowering.with_own_ops(names, cuda=True, strict=True)
        assert ort_lowering.with_own_ops(("rotary",), cuda=True, strict=True) == ("rotary",)  # nothing to build
    finally:
        ort_ops.forget()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=f"needs ONNX Runtime CUDA and a GPU: {CUDA_WHY}")
@pytest.mark.skipif(not CUDA_OPS, reason=f"needs export-engine's CUDA operators: {CUDA_OPS_WHY}")
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize(("rotate", "head_dim"), CASES)
def test_cuda_kernel_matches_numpy(dtype: type, rotate: list[int], head_dim: int) -> None:
    assert ort_ops.providers(ort_ops.library(cuda=True)) == ("cpu", "cuda")
    batch, tokens, heads = 2, 37, 16  # 37 tokens: the last thread block is partial
    width = heads * head_dim * len(rotate)
    feed = _feed(dtype, batch, tokens, width, head_dim, seed=1)
    onnx_type = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    session = _session(_model(onnx_type, batch, tokens, width, rotate, head_dim), cuda=True)
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    got = session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})
    for g, want in zip(got, _reference(feed, rotate, head_dim), strict=True):
        assert g.dtype == dtype and g.shape == want.shape
        # the GPU may contract a*c - b*s into one FMA: within an ulp of the output type
        np.testing.assert_allclose(g.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=f"needs ONNX Runtime CUDA and a GPU: {CUDA_WHY}")
@pytest.mark.skipif(not CUDA_OPS, reason=f"needs export-engine's CUDA operators: {CUDA_OPS_WHY}")
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize(("shape", "residual", "relu"), BIAS_ACTIVATION_CASES)
def test_cuda_bias_activation_matches_numpy(dtype: type, shape: list[int], residual: bool, relu: int) -> None:
    """16-byte steps where the plane (channels last: the channel count) allows them, single values elsewhere."""
    _bias_activation_case(dtype, shape, residual, relu, cuda=True)
    _bias_activation_case(dtype, shape, residual, relu, cuda=True, last=1)


@pytest.mark.usefixtures("no_prebuilt")
def test_status_says_what_applies_without_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPORT_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setattr(ort_ops.build, "nvcc", lambda: None)
    assert ort_ops.status(cuda=True).startswith("none:") and "nvcc" in ort_ops.status(cuda=True)
    monkeypatch.setattr(ort_ops.build, "nvcc", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(ort_ops, "nvcc", lambda: "/opt/cuda/bin/nvcc")
    assert ort_ops.status(cuda=True).startswith("built on first use by /opt/cuda/bin/nvcc")
    assert not any(tmp_path.iterdir())  # nothing was built or created


def _resize_last_model(dtype: int, shape: list[int], scale: list[int]) -> bytes:
    """ResizeBilinear with channels last on an (N, H, W, C) input."""
    n, c, h, w = shape
    x = helper.make_tensor_value_info("X", dtype, [n, h, w, c])
    y = helper.make_tensor_value_info("Y", dtype, [n, h * scale[0], w * scale[1], c])
    node = helper.make_node("ResizeBilinear", ["X"], ["Y"], domain=ort_ops.DOMAIN, scale=scale, channels_last=1)
    opsets = [helper.make_opsetid("", 19), helper.make_opsetid(ort_ops.DOMAIN, 1)]
    graph = helper.make_graph([node], "ours_last", [x], [y])
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def _resize_models(dtype: int, shape: list[int], scale: list[int]) -> tuple[bytes, bytes]:
    """(ResizeBilinear, ONNX Resize linear align_corners) on the same input, for comparison."""
    out_shape = [shape[0], shape[1], shape[2] * scale[0], shape[3] * scale[1]]
    x = helper.make_tensor_value_info("X", dtype, shape)
    y = helper.make_tensor_value_info("Y", dtype, out_shape)
    opsets = [helper.make_opsetid("", 19), helper.make_opsetid(ort_ops.DOMAIN, 1)]
    ours = helper.make_node("ResizeBilinear", ["X"], ["Y"], domain=ort_ops.DOMAIN, scale=scale)
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, *map(float, scale)])
    onnx_node = helper.make_node("Resize", ["X", "", "scales"], ["Y"], mode="linear",
                                 coordinate_transformation_mode="align_corners")  # fmt: skip
    graphs = (helper.make_graph([ours], "ours", [x], [y]), helper.make_graph([onnx_node], "onnx", [x], [y], [scales]))
    return tuple(helper.make_model(g, opset_imports=opsets, ir_version=10).SerializeToString() for g in graphs)


RESIZE_CASES = [([1, 3, 6, 10], [2, 2]), ([2, 2, 1, 4], [2, 2]), ([1, 1, 5, 3], [3, 1]), ([1, 2, 12, 16], [2, 2]),
                ([1, 16, 3, 5], [2, 2])]  # fmt: skip


@needs_cxx
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize(("shape", "scale"), RESIZE_CASES)
def test_cpu_resize_bilinear_matches_onnx_resize(dtype: type, shape: list[int], scale: list[int]) -> None:
    _resize_case(dtype, shape, scale, cuda=False)


def _resize_case(dtype: type, shape: list[int], scale: list[int], cuda: bool) -> None:
    onnx_type = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    ours, reference = _resize_models(onnx_type, shape, scale)
    x = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    (got,) = _session(ours, cuda).run(None, {"X": x})
    # ONNX Runtime's own Resize on the CPU, in FP32 (its FP16 CPU kernel rounds differently)
    onnx_resize = ort.InferenceSession(_resize_models(TensorProto.FLOAT, shape, scale)[1],
                                       providers=["CPUExecutionProvider"])  # fmt: skip
    want = onnx_resize.run(None, {"X": x.astype(np.float32)})[0]
    assert reference and got.dtype == dtype and got.shape == want.shape
    (last,) = _session(_resize_last_model(onnx_type, shape, scale), cuda).run(None, {"X": x.transpose(0, 2, 3, 1)})
    # the same arithmetic in either layout (up to how the compiler contracts it into FMAs)
    np.testing.assert_allclose(last.transpose(0, 3, 1, 2).astype(np.float32), got.astype(np.float32), rtol=1e-3,
                               atol=1e-3 if dtype == np.float16 else 1e-6)  # fmt: skip
    # one rounding of the output type; float arithmetic in another order than ONNX Runtime's (values ~ N(0, 1))
    ulp = 2e-3 if dtype == np.float16 else 1e-5
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=ulp, atol=ulp)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=f"needs ONNX Runtime CUDA and a GPU: {CUDA_WHY}")
@pytest.mark.skipif(not CUDA_OPS, reason=f"needs export-engine's CUDA operators: {CUDA_OPS_WHY}")
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize(("shape", "scale"), RESIZE_CASES)
def test_cuda_resize_bilinear_matches_onnx_resize(dtype: type, shape: list[int], scale: list[int]) -> None:
    """16-byte rows (16 x 2 = 32 values) and single values (3, 10 x 2 = 20 halves) alike."""
    _resize_case(dtype, shape, scale, cuda=True)


@pytest.mark.usefixtures("no_prebuilt")
def test_a_failed_build_is_not_retried_in_the_same_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def failing_run(command: list[str], **kwargs: object) -> object:
        calls.append(command)
        raise OSError("exec format error")

    monkeypatch.setenv("EXPORT_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setattr(ort_ops.build, "cxx", lambda: "/usr/bin/g++")
    monkeypatch.setattr(ort_ops.build.subprocess, "run", failing_run)
    ort_ops.forget()
    try:
        for _ in range(3):
            with pytest.raises(BackendError, match="exec format error"):
                ort_ops.library(cuda=False)
        assert len(calls) == 1
    finally:
        ort_ops.forget()


def test_the_cuda_build_targets_the_same_architectures_with_or_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A library built ahead of time where no GPU is visible is the one a GPU machine's runner looks for."""
    monkeypatch.setattr(ort_ops.build, "supported", lambda compiler: frozenset({"75", "80", "86", "89", "90", "100"}))
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    without = ort_ops.build.archs_for("nvcc")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert ort_ops.build.archs_for("nvcc") == without == ("80", "86", "89", "90", "100")  # 120: not in this nvcc
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert ort_ops.build.archs_for("nvcc") == ("75", *without)  # a GPU outside the list gets its own code too


def _matmul_gelu_model(x_shape: list, k: int, n: int) -> bytes:
    f16 = TensorProto.FLOAT16
    inputs = [helper.make_tensor_value_info("X", f16, x_shape), helper.make_tensor_value_info("W", f16, [k, n]),
              helper.make_tensor_value_info("bias", f16, [n])]  # fmt: skip
    node = helper.make_node("MatMulBiasGelu", ["X", "W", "bias"], ["Y"], domain=ort_ops.DOMAIN)
    out = helper.make_tensor_value_info("Y", f16, [*x_shape[:-1], n])
    graph = helper.make_graph([node], "matmul_bias_gelu", inputs, [out])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(ort_ops.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def _matmul_gelu_case(lead: tuple[int, ...], k: int, n: int, cuda: bool) -> tuple[np.ndarray, np.ndarray]:
    """(got, want): want is the float64 product of the float16 operands, bias added, tanh GELU."""
    rng = np.random.default_rng(5)
    feed = {"X": rng.standard_normal((*lead, k)).astype(np.float16),
            "W": (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float16),
            "bias": rng.standard_normal(n).astype(np.float16)}  # fmt: skip
    z = feed["X"].astype(np.float64) @ feed["W"].astype(np.float64) + feed["bias"].astype(np.float64)
    want = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    (got,) = _session(_matmul_gelu_model([*lead, k], k, n), cuda).run(None, feed)
    assert got.dtype == np.float16 and got.shape == want.shape
    return got.astype(np.float64), want


MATMUL_GELU_CASES = [((2, 5), 24, 40), ((7,), 16, 8), ((1, 3, 4), 64, 96)]


@needs_cxx
@pytest.mark.parametrize(("lead", "k", "n"), MATMUL_GELU_CASES)
def test_cpu_matmul_bias_gelu_matches_numpy(lead: tuple[int, ...], k: int, n: int) -> None:
    got, want = _matmul_gelu_case(lead, k, n, cuda=False)
    # float accumulation and one float16 rounding: within half an ulp of float16 plus the sum's float error
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@needs_cxx
def test_matmul_bias_gelu_names_bad_shapes() -> None:
    session = _session(_matmul_gelu_model(["rows", "k"], 8, 4), cuda=False)
    x = np.zeros((3, 6), np.float16)
    with pytest.raises(Exception, match=r"MatMulBiasGelu: W must be \(6, N\), got \(8, 4\)"):
        session.run(None, {"X": x, "W": np.zeros((8, 4), np.float16), "bias": np.zeros(4, np.float16)})


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=f"needs ONNX Runtime CUDA and a GPU: {CUDA_WHY}")
@pytest.mark.skipif(not CUDA_OPS, reason=f"needs export-engine's CUDA operators: {CUDA_OPS_WHY}")
@pytest.mark.parametrize(("lead", "k", "n"), [*MATMUL_GELU_CASES, ((2, 768), 1024, 4096)])
def test_cuda_matmul_bias_gelu_matches_numpy(lead: tuple[int, ...], k: int, n: int) -> None:
    """One cuBLASLt matmul with its GELU+bias epilogue (MASt3R's encoder MLP shape last)."""
    got, want = _matmul_gelu_case(lead, k, n, cuda=True)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def _channel_norm_model(dtype: int, shape: list, eps: float, gelu: int) -> bytes:
    inputs = [helper.make_tensor_value_info("X", dtype, shape), helper.make_tensor_value_info("w", dtype, [shape[1]]),
              helper.make_tensor_value_info("b", dtype, [shape[1]])]  # fmt: skip
    node = helper.make_node("ChannelLayerNorm", ["X", "w", "b"], ["Y"], domain=ort_ops.DOMAIN, epsilon=eps, gelu=gelu)
    graph = helper.make_graph([node], "channel_layer_norm", inputs, [helper.make_tensor_value_info("Y", dtype, shape)])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(ort_ops.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def _channel_norm_case(dtype: type, shape: list[int], gelu: int, cuda: bool) -> None:
    from scipy.special import erf

    rng = np.random.default_rng(3)
    feed = {"X": (rng.standard_normal(shape) * 3 + 1).astype(dtype), "w": rng.standard_normal(shape[1]).astype(dtype),
            "b": rng.standard_normal(shape[1]).astype(dtype)}  # fmt: skip
    x = feed["X"].astype(np.float64)
    mean = x.mean(axis=1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=1, keepdims=True)
    along = (1, -1, *([1] * (len(shape) - 2)))
    want = (x - mean) / np.sqrt(var + 1e-6) * feed["w"].astype(np.float64).reshape(along)
    want = want + feed["b"].astype(np.float64).reshape(along)
    if gelu:
        want = 0.5 * want * (1 + erf(want / np.sqrt(2)))
    onnx_type = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    (got,) = _session(_channel_norm_model(onnx_type, shape, 1e-6, gelu), cuda).run(None, feed)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 4e-3 if dtype == np.float16 else 1e-5  # float statistics, one rounding to the output type
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol, atol=tol)


CHANNEL_NORM_CASES = [([2, 16, 4, 5, 3], 1), ([1, 96, 8, 8, 8], 0), ([3, 5, 7], 1), ([1, 384, 33], 0)]


@needs_cxx
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize(("shape", "gelu"), CHANNEL_NORM_CASES)
def test_cpu_channel_layer_norm_matches_numpy(dtype: type, shape: list[int], gelu: int) -> None:
    _channel_norm_case(dtype, shape, gelu, cuda=False)


@needs_cxx
def test_channel_layer_norm_names_bad_shapes() -> None:
    session = _session(_channel_norm_model(TensorProto.FLOAT, ["n", "c", "s"], 1e-6, 0), cuda=False)
    with pytest.raises(Exception, match=r"ChannelLayerNorm: weight and bias must be \(4,\) of X's type, got \(3\)"):
        session.run(None, {"X": np.zeros((1, 4, 2), np.float32), "w": np.ones(3, np.float32),
                           "b": np.zeros(4, np.float32)})  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=f"needs ONNX Runtime CUDA and a GPU: {CUDA_WHY}")
@pytest.mark.skipif(not CUDA_OPS, reason=f"needs export-engine's CUDA operators: {CUDA_OPS_WHY}")
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize(("shape", "gelu"), CHANNEL_NORM_CASES)
def test_cuda_channel_layer_norm_matches_numpy(dtype: type, shape: list[int], gelu: int) -> None:
    """Blocks of 32 positions x 8 channel rows: fewer channels than rows, and positions past the last block."""
    _channel_norm_case(dtype, shape, gelu, cuda=True)


PREBUILT_CUDA = [p for f in ort_ops.prebuilt_folders() for p in f.glob(f"cuda*/{ort_ops.LIBRARY_NAME}")]


@pytest.mark.skipif(not ort_ops.prebuilt_folders(), reason="no prebuilt library here (CI builds one)")
def test_sessions_here_use_the_prebuilt_library() -> None:
    """Where a prebuilt library is installed (CI: built before the tests), the CPU kernels checked against numpy
    in this file are its: nothing was compiled for them."""
    ort_ops.forget()
    choice = ort_ops.choose(cuda=False)
    assert choice.source == "prebuilt" and not choice.refused and ort_ops.providers(choice.path)[0] == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=f"needs ONNX Runtime CUDA and a GPU: {CUDA_WHY}")
@pytest.mark.skipif(not PREBUILT_CUDA, reason="needs the prebuilt CUDA library (scripts/build_ort_ops.py)")
def test_cuda_kernels_of_the_prebuilt_library_with_no_nvcc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every operator's CUDA kernels, from the prebuilt library, on a machine where nothing can compile them."""
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and not (Path(p) / "nvcc").exists()]
    monkeypatch.setenv("PATH", os.pathsep.join(path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(ort_ops.build, "nvcc", lambda: None)  # /usr/local/cuda/bin/nvcc too
    monkeypatch.setenv("EXPORT_ENGINE_CACHE", str(tmp_path))
    ort_ops.forget()
    try:
        choice = ort_ops.choose(cuda=True)
        assert choice.source == "prebuilt" and ort_ops.providers(choice.path) == ("cpu", "cuda"), choice
        for rotate, head_dim in CASES:
            test_cuda_kernel_matches_numpy(np.float16, rotate, head_dim)
        for shape, residual, relu in BIAS_ACTIVATION_CASES:
            test_cuda_bias_activation_matches_numpy(np.float16, shape, residual, relu)
        for shape, scale in RESIZE_CASES:
            _resize_case(np.float16, shape, scale, cuda=True)
        for lead, k, n in MATMUL_GELU_CASES:
            test_cuda_matmul_bias_gelu_matches_numpy(lead, k, n)
        for shape, gelu in CHANNEL_NORM_CASES:
            _channel_norm_case(np.float16, shape, gelu, cuda=True)
        assert ort_ops.library(cuda=True) == choice.path and not any(tmp_path.iterdir())  # nothing was built
    finally:
        ort_ops.forget()
