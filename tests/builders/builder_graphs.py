"""Helpers for builder tests: which backends can build here, and small synthetic ONNX attention graphs."""

from __future__ import annotations

import importlib.util
from typing import cast

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export_engine.builders import BuilderBackend

RTX_MISSING = "tensorrt_rtx is not installed (pip install 'export-engine[rtx]', i.e. pip install tensorrt-rtx-cu13)"
TRT_MISSING = "full TensorRT (module tensorrt) is not installed; it cannot be installed on this machine"

SEQ, WIDTH, HEADS = 16, 64, 2  # head size 32: within the fused-kernel range (16..256, multiple of 8)


def rtx_installed() -> bool:
    return any(importlib.util.find_spec(m) for m in ("tensorrt_rtx", "tensorrt_rtx_bindings"))


def trt_installed() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


# For tests that only TensorRT-RTX can run: skips at collection, before session fixtures are built.
needs_rtx = pytest.mark.skipif(not rtx_installed(), reason=RTX_MISSING)


def require_backend(backend: str) -> BuilderBackend:
    """Skip (with the reason) unless ``backend`` can build engines on this machine."""
    if backend == "tensorrt-rtx" and not rtx_installed():
        pytest.skip(RTX_MISSING)
    if backend == "tensorrt":
        if not trt_installed():
            pytest.skip(TRT_MISSING)
        from export_engine.runners.backends import cuda_devices

        count, how = cuda_devices()
        if not count:
            pytest.skip(f"full TensorRT needs a CUDA GPU to build ({how})")
    return cast(BuilderBackend, backend)


def attention_model(pre_norm: bool, fp16: bool, project: bool) -> onnx.ModelProto:
    """x[batch, S, D] -> [LayerNorm] -> [Q/K/V MatMul] -> [Cast fp16] -> Attention (opset 23, 3-D, 2 heads)
    -> [Cast fp32] -> y. ``pre_norm=False, fp16=True, project=False`` is the input -> Cast -> Attention -> Cast
    pattern that crashed the TensorRT-RTX 1.7 CPU-only builder (toolchain_facts.md A3)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    src = "x"
    if pre_norm:
        inits += [numpy_helper.from_array(np.ones(WIDTH, np.float32), "ln_scale")]
        inits += [numpy_helper.from_array(np.zeros(WIDTH, np.float32), "ln_bias")]
        nodes.append(helper.make_node("LayerNormalization", ["x", "ln_scale", "ln_bias"], ["x_norm"], axis=-1))
        src = "x_norm"
    qkv = [src, src, src]
    if project:
        qkv = []
        for name in "qkv":
            weight = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
            inits.append(numpy_helper.from_array(weight, f"w_{name}"))
            nodes.append(helper.make_node("MatMul", [src, f"w_{name}"], [name]))
            qkv.append(name)
    if fp16:
        for name in dict.fromkeys(qkv):
            nodes.append(helper.make_node("Cast", [name], [f"{name}_fp16"], to=TensorProto.FLOAT16))
        qkv = [f"{name}_fp16" for name in qkv]
    out = "attn_fp16" if fp16 else "attn"
    nodes.append(helper.make_node("Attention", qkv, [out], q_num_heads=HEADS, kv_num_heads=HEADS))
    if fp16:
        nodes.append(helper.make_node("Cast", [out], ["attn"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("Add", ["attn", "x"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SEQ, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SEQ, WIDTH])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model
