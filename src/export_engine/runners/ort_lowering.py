"""Graph rewrites for ONNX Runtime, applied in memory when a session opens; the artifact's files never change.

The artifact's ONNX is what TensorRT consumes: standard ops that its builder fuses itself. ONNX Runtime's CUDA
provider runs most ops as one kernel each, so the runner can rewrite a copy of the graph into ONNX Runtime's
fused forms first. Each lowering is one graph pass (``export_engine.graph_passes``); which ones help was
measured on Hopper (bench/RESULTS.md):

==================  =====================================================================================
``patch_conv``      kernel == stride (transposed) convolutions as MatMuls (cuDNN's direct kernels were slow)
``attention_fused`` as ``attention_bsh``, but each projection's bias add, q/k rotation and q/k/v split run as one
                    kernel of export-engine's own (``BiasRotarySplit``, :mod:`export_engine.runners.ort_ops`,
                    prebuilt or built on first use; where no library fits, the runner uses ``attention_bsh``)
``attention_gqa``   attention blocks as ``GroupQueryAttention`` (non-causal) on the packed q/k/v projection,
                    RoPE inside the op (q/k projection columns permuted as for ``attention_bsh``)
``attention_bsh``   attention blocks kept in (B, N, C): Split, RotaryEmbedding and ``MultiHeadAttention``
                    instead of head-major transposes and gathers (q/k projection columns permuted for RoPE)
``rotary``          RoPE (Slice/Neg/Concat/Mul/Add per tensor) as ``com.microsoft.RotaryEmbedding``
``norm_casts``      FP32 LayerNorm islands (Cast, LN, Cast) as one LN on FP16 storage with FP32 statistics
``skip_layernorm``  residual add (+ bias) + LayerNorm as ``com.microsoft.SkipLayerNormalization``
``bias_gelu``       bias add + exact GELU as ``com.microsoft.BiasGelu``
``matmul_gelu``     an MLP's first MatMul with its ``BiasGelu`` as export-engine's ``MatMulBiasGelu``: one
                    cuBLASLt matmul with a bias+GELU epilogue (tanh GELU)
``conv_epilogue``   a convolution's bias with the ReLU or residual Add after it as export-engine's
                    ``BiasActivation`` (one pass instead of cuDNN's bias kernel and one more; dropped where the
                    operator library cannot be built)
``channel_norm``    LayerNorm over the channel axis of channels-first tensors (LayerNorm3d/2d, exported element by
                    element: up to eleven kernels) as export-engine's ``ChannelLayerNorm``, with a GELU after it
``resize_bilinear`` bilinear align_corners ``Resize`` by whole factors as export-engine's ``ResizeBilinear``
                    (16 bytes of output a thread)
``nhwc_conv``       2-D convolutions as ``com.microsoft.NhwcConv`` with the layout Transposes between them moved
                    until they cancel (cuDNN's NCHW<->NHWC conversions gone; dropped with the operator
                    library, whose channels-last forms it relies on)
``decompose_attention``  Attention as MatMul/Softmax/MatMul (faster where no flash kernel applies)
``im2col``          stride-1 2-D convolutions as im2col + MatMul (measured slower than cuDNN: opt-in)
==================  =====================================================================================

A rewritten graph is checked before it is used (:mod:`export_engine.runners.self_check`).
"""

from __future__ import annotations

import functools
import importlib
import logging
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from export_engine.errors import BackendError, ModelInputError
from export_engine.graph_passes.base import OWN_DOMAIN, PassReport

log = logging.getLogger(__name__)

DEFAULT_LOWERINGS = (
    "patch_conv",
    "attention_fused",
    "rotary",
    "norm_casts",
    "skip_layernorm",
    "bias_gelu",
    "matmul_gelu",
    "conv_epilogue",
    "channel_norm",
    "resize_bilinear",
    "nhwc_conv",
)
ATTENTION_LOWERINGS = ("attention_fused", "attention_gqa", "attention_bsh")  # alternatives (the first in this
# order that is named rewrites the attention blocks; the others then find none)
# lowerings that need export-engine's operator library, and what replaces each where it cannot be built (None: none)
OWN_OP_LOWERINGS: dict[str, str | None] = {
    "attention_fused": "attention_bsh",
    "conv_epilogue": None,
    "resize_bilinear": None,
    "matmul_gelu": None,
    "channel_norm": None,
    "nhwc_conv": None,  # measured only with the channels-last forms of the two operators above
}
_MATRIX_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Attention", "Einsum", "FusedMatMul")


# lowering name -> the graph pass (module of export_engine.graph_passes, function of the same name) and its
# config class; in the one order they apply in (norm_casts before skip_layernorm, attention_bsh before rotary).
_PASSES: dict[str, tuple[str, str] | tuple[str, str, dict[str, Any]]] = {
    "patch_conv": ("lower_patch_conv", "LowerPatchConvConfig"),
    "attention_fused": ("lower_attention_bsh", "LowerAttentionBshConfig", {"op": "fused"}),
    "attention_gqa": ("lower_attention_bsh", "LowerAttentionBshConfig", {"op": "gqa"}),
    "attention_bsh": ("lower_attention_bsh", "LowerAttentionBshConfig"),
    "rotary": ("lower_rotary", "LowerRotaryConfig"),
    "norm_casts": ("fold_norm_casts", "FoldNormCastsConfig"),
    "skip_layernorm": ("fuse_skip_layernorm", "FuseSkipLayerNormConfig"),
    "bias_gelu": ("fuse_bias_gelu", "FuseBiasGeluConfig"),
    "matmul_gelu": ("fuse_matmul_gelu", "FuseMatMulGeluConfig"),
    "conv_epilogue": ("fuse_conv_epilogue", "FuseConvEpilogueConfig"),
    "channel_norm": ("fuse_channel_layernorm", "FuseChannelLayerNormConfig"),
    "resize_bilinear": ("lower_resize", "LowerResizeConfig"),
    "nhwc_conv": ("lower_conv_nhwc", "LowerConvNhwcConfig"),
    "decompose_attention": ("decompose_attention", "DecomposeAttentionConfig"),
    "im2col": ("lower_conv_im2col", "LowerConvIm2colConfig"),
}
LOWERING_NAMES = tuple(_PASSES)


def _passes() -> dict[str, Callable[[gs.Graph], PassReport]]:
    """Each lowering as ``graph -> PassReport`` with its default config (passes are imported here, on use)."""
    table: dict[str, Callable[[gs.Graph], PassReport]] = {}
    for name, (module_name, config_name, *options) in _PASSES.items():
        module = importlib.import_module(f"export_engine.graph_passes.{module_name}")
        config = getattr(module, config_name)(**(options[0] if options else {}))
        table[name] = functools.partial(getattr(module, module_name), config=config)
    return table


def check_lowerings(names: Sequence[str]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in LOWERING_NAMES]
    if unknown:
        raise ModelInputError(f"unknown ONNX Runtime lowering(s) {unknown}; valid: {list(LOWERING_NAMES)}")
    return tuple(n for n in LOWERING_NAMES if n in names)


def with_own_ops(names: Sequence[str], cuda: bool, strict: bool) -> tuple[str, ...]:
    """``names`` where export-engine's operator library can be had (bundled, prebuilt, cached, or built now);
    elsewhere (no library fits, the cache is not writable, nothing can build one) each lowering that needs it is
    replaced by its stock-operator form, with one log line saying why, or refused under ``strict`` (BackendError)."""
    names = check_lowerings(names)
    wanted = [n for n in names if n in OWN_OP_LOWERINGS]
    if not wanted:
        return names
    from export_engine.runners import ort_ops

    ok, why = ort_ops.available(cuda)
    if ok:
        return names
    if strict:
        raise BackendError(f"lowerings {wanted} need export-engine's ONNX Runtime operators: {why}")
    instead = [OWN_OP_LOWERINGS[n] for n in wanted]
    log.warning("%s: using %s instead (%s)", ", ".join(wanted), [n for n in instead if n] or "none", why)
    return check_lowerings([n for n in (OWN_OP_LOWERINGS.get(n, n) for n in names) if n])


def register_own_ops(options: Any, source: Path, cuda: bool) -> None:
    """Register export-engine's operator library with ONNX Runtime ``SessionOptions`` when ``source`` uses it
    (only graphs that :func:`lowered_graph` wrote can: the artifact's files hold standard operators)."""
    if source in _OWN_OP_GRAPHS:
        from export_engine.runners import ort_ops

        ort_ops.register(options, cuda)


def graph_key(path: Path) -> tuple[str, int, int]:
    """Identifies one version of a graph file within a process (path, modification time, size)."""
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


_LOWERED: dict[tuple, tempfile.TemporaryDirectory] = {}
_OWN_OP_GRAPHS: set[Path] = set()  # rewritten graphs with nodes of export-engine's operator domain
_LOWERING_LOCK = threading.Lock()


def lowered_graph(path: Path, names: Sequence[str], outputs: Sequence[str] = ()) -> Path:
    """``path`` rewritten by ``names`` (in canonical order) into a scratch folder removed at exit; no names: the
    stored graph. One rewrite per graph and set per process, started from the longest set already rewritten
    that this one extends (a study adds one rewrite a step).

    ``outputs``: compute only these outputs (empty: all; :func:`pruned_entry` resolves them from the manifest's
    graph entry); the graph is first pruned of the others and of every node that only they need
    (:func:`~export_engine.graph_passes.prune_outputs.prune_outputs`), so a pruned graph is a graph of its own
    even without rewrites. An output the graph does not have raises ModelInputError."""
    names = check_lowerings(names)
    kept = tuple(outputs)
    if not names and not kept:
        return path
    graph_id = (*graph_key(path), kept)
    with _LOWERING_LOCK:  # artifacts may be loaded from several threads
        return _lowered_locked(path, graph_id, names)


def pruned_entry(graph_meta: Mapping[str, Any], outputs: Sequence[str], where: str
                 ) -> tuple[tuple[str, ...], Mapping[str, Any]]:  # fmt: skip
    """The outputs of a graph to keep, from its manifest entry and in its order (() when ``outputs`` is empty or
    names them all), and the entry as the pruned graph has it (its outputs only). An unknown name raises
    ModelInputError naming ``where`` and the graph's outputs."""
    if not outputs:
        return (), graph_meta
    declared = [o["name"] for o in graph_meta["outputs"]]
    unknown = [n for n in outputs if n not in declared]
    if unknown:
        raise ModelInputError(f"{where} has no output(s) {unknown}; its outputs: {declared}")
    kept = tuple(n for n in declared if n in outputs)
    if len(kept) == len(declared):
        return (), graph_meta
    return kept, {**graph_meta, "outputs": [o for o in graph_meta["outputs"] if o["name"] in kept]}


def _lowered_locked(path: Path, graph_id: tuple, names: tuple[str, ...]) -> Path:
    if (*graph_id, names) not in _LOWERED:
        from export_engine.graph_passes.base import load_graph, save_graph
        from export_engine.graph_passes.prune_outputs import PruneOutputsConfig, prune_outputs

        done = max((k[-1] for k in _LOWERED if k[:-1] == graph_id and k[-1] == names[: len(k[-1])]), key=len,
                   default=None)  # fmt: skip
        if done is None:  # nothing of this graph and outputs yet: start from the stored graph, pruned
            done = ()
            graph = load_graph(path)
            declared = [t.name for t in graph.outputs]
            unknown = [n for n in graph_id[-1] if n not in declared]
            if unknown:  # a user's name, said as such (the pass itself refuses it as a pass error)
                raise ModelInputError(f"{path.name} has no output(s) {unknown}; its outputs: {declared}")
            report = prune_outputs(graph, PruneOutputsConfig(graph_id[-1]))
            if report.matched:
                log.info("%s: computing only %s: %d nodes of the other outputs dropped (for this run only; the "
                         "artifact is unchanged)", path.name, list(graph_id[-1]), report.rewritten)  # fmt: skip
        else:
            graph = load_graph(Path(_LOWERED[(*graph_id, done)].name) / path.name)
        passes = _passes()
        for name in names[len(done) :]:
            report = passes[name](graph)
            log.info("%s: %s (for ONNX Runtime only; the artifact is unchanged)", path.name, report.summary())
        scratch = tempfile.TemporaryDirectory(prefix="export-engine-ort-")
        save_graph(graph, Path(scratch.name) / path.name)
        _LOWERED[(*graph_id, names)] = scratch
        if any(node.domain == OWN_DOMAIN for node in graph.nodes):
            _OWN_OP_GRAPHS.add(Path(scratch.name) / path.name)
    return Path(_LOWERED[(*graph_id, names)].name) / path.name


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
