"""Graph rewrites for ONNX Runtime, applied in memory when a session opens; the artifact's files never change.

The artifact's ONNX is what TensorRT consumes: standard ops that its builder fuses itself. ONNX Runtime's CUDA
provider runs most ops as one kernel each, so the runner can rewrite a copy of the graph into ONNX Runtime's
fused forms first. Each lowering is one graph pass (``export_engine.graph_passes``); which ones help was
measured on Hopper (bench/RESULTS.md):

==================  =====================================================================================
``patch_conv``      kernel == stride (transposed) convolutions as MatMuls (cuDNN's direct kernels were slow)
``attention_bsh``   attention blocks kept in (B, N, C): Split, RotaryEmbedding and ``MultiHeadAttention``
                    instead of head-major transposes and gathers (q/k projection columns permuted for RoPE)
``rotary``          RoPE (Slice/Neg/Concat/Mul/Add per tensor) as ``com.microsoft.RotaryEmbedding``
``norm_casts``      FP32 LayerNorm islands (Cast, LN, Cast) as one LN on FP16 storage with FP32 statistics
``skip_layernorm``  residual add (+ bias) + LayerNorm as ``com.microsoft.SkipLayerNormalization``
``bias_gelu``       bias add + exact GELU as ``com.microsoft.BiasGelu``
``decompose_attention``  Attention as MatMul/Softmax/MatMul (faster where no flash kernel applies)
``im2col``          stride-1 2-D convolutions as im2col + MatMul (measured slower than cuDNN: opt-in)
==================  =====================================================================================

A rewritten graph is checked before it is used (:mod:`export_engine.runtime.self_check`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from export_engine.errors import ModelInputError

log = logging.getLogger(__name__)

DEFAULT_LOWERINGS = ("patch_conv", "attention_bsh", "rotary", "norm_casts", "skip_layernorm", "bias_gelu")
_MATRIX_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Attention", "Einsum", "FusedMatMul")


def _passes() -> dict[str, Callable[[gs.Graph], object]]:
    from export_engine.graph_passes import (
        decompose_attention,
        fold_norm_casts,
        fuse_bias_gelu,
        fuse_skip_layernorm,
        lower_attention_bsh,
        lower_conv_im2col,
        lower_patch_conv,
        lower_rotary,
    )

    return {
        "patch_conv": lambda g: lower_patch_conv.lower_patch_conv(g, lower_patch_conv.LowerPatchConvConfig()),
        "attention_bsh": lambda g: lower_attention_bsh.lower_attention_bsh(
            g, lower_attention_bsh.LowerAttentionBshConfig()
        ),
        "rotary": lambda g: lower_rotary.lower_rotary(g, lower_rotary.LowerRotaryConfig()),
        "norm_casts": lambda g: fold_norm_casts.fold_norm_casts(g, fold_norm_casts.FoldNormCastsConfig()),
        "skip_layernorm": lambda g: fuse_skip_layernorm.fuse_skip_layernorm(
            g, fuse_skip_layernorm.FuseSkipLayerNormConfig()
        ),
        "bias_gelu": lambda g: fuse_bias_gelu.fuse_bias_gelu(g, fuse_bias_gelu.FuseBiasGeluConfig()),
        "decompose_attention": lambda g: decompose_attention.decompose_attention(
            g, decompose_attention.DecomposeAttentionConfig()
        ),
        "im2col": lambda g: lower_conv_im2col.lower_conv_im2col(g, lower_conv_im2col.LowerConvIm2colConfig()),
    }


LOWERING_NAMES = ("patch_conv", "attention_bsh", "rotary", "norm_casts", "skip_layernorm", "bias_gelu",
                  "decompose_attention", "im2col")  # fmt: skip


def check_lowerings(names: Sequence[str]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in LOWERING_NAMES]
    if unknown:
        raise ModelInputError(f"unknown ONNX Runtime lowering(s) {unknown}; valid: {list(LOWERING_NAMES)}")
    return tuple(n for n in LOWERING_NAMES if n in names)  # one canonical order: norm_casts before skip_layernorm


_LOWERED: dict[tuple, tuple[tempfile.TemporaryDirectory, dict[str, str]]] = {}


def lowered_graph(path: Path, names: Sequence[str]) -> tuple[Path, dict[str, str]]:
    """``path`` rewritten by ``names`` (in canonical order) into a scratch folder removed at exit, and a
    one-line summary per lowering. One rewrite per graph and set per process; no names: the stored graph."""
    names = check_lowerings(names)
    if not names:
        return path, {}
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, names)
    if key not in _LOWERED:
        from export_engine.graph_passes.base import load_graph, save_graph

        # start from the longest set already rewritten that this one extends (a study adds one rewrite a step)
        done = max((k[3] for k in _LOWERED if k[:3] == key[:3] and k[3] == names[: len(k[3])]), key=len, default=())
        start, summaries = (Path(_LOWERED[(*key[:3], done)][0].name) / path.name, dict(_LOWERED[(*key[:3], done)][1])) \
            if done else (path, {})  # fmt: skip
        graph = load_graph(start)
        passes = _passes()
        for name in names[len(done) :]:
            report = passes[name](graph)
            summaries[name] = report.summary()  # type: ignore[attr-defined]
            log.info("%s: %s (for ONNX Runtime only; the artifact is unchanged)", path.name, summaries[name])
        scratch = tempfile.TemporaryDirectory(prefix="export-engine-ort-")
        save_graph(graph, Path(scratch.name) / path.name)
        _LOWERED[key] = (scratch, summaries)
    scratch, summaries = _LOWERED[key]
    return Path(scratch.name) / path.name, summaries


def fp32_matrix_products(path: Path) -> tuple[int, list[str]]:
    """How many matrix-product nodes (MatMul, Gemm, Conv, Attention, ...) the graph has, and the names of those
    that compute in FP32 (or whose type is unknown).

    TF32 changes only what these compute in FP32. A graph with none (a hybrid graph whose FP32 islands are norms
    and element-wise tails) loses nothing with ONNX Runtime's TF32 mode on, which is also what gives its FP16
    convolutions their tensor-core engines in cuDNN."""
    graph = onnx.load(str(path), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    half = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    total, fp32 = 0, []
    for node in graph.node:
        if node.op_type not in _MATRIX_OPS:
            continue
        total += 1
        dtypes = {types.get(name) for name in (*node.input[:2], *node.output[:1]) if name}
        if not dtypes or not dtypes <= half:
            fp32.append(node.name or node.op_type)
    return total, fp32
