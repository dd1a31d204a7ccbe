"""Helpers shared by the HybridCast tests (tests/calibration and tests/graph_passes).

Import as ``from calibration.hybrid_testing import ...`` (``tests/`` is on sys.path through its conftest).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper

from export_engine.calibration.statistics import TensorStats, collect_activation_stats
from export_engine.core.types import Tolerance
from export_engine.graph_passes.graph_facts import FP16, FP32, np_dtype
from export_engine.validation.parity import OutputParity, compare_output

# FP16 storage rounds to 2^-11 relative; the tiny random graphs measured <= 1.3e-2 absolute (fp16) and
# <= 7.3e-3 (hybrid) on outputs of magnitude ~1-10. 3e-2 keeps a margin and still fails on inf/NaN or layout bugs.
LOOSE = Tolerance(atol=3e-2, rtol=3e-2)


def run_ort(model: Path | onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, dict(feed)), strict=True)) for feed in feeds]


def run_emulated(path: Path, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Run a FP16/hybrid graph with FP16 storage emulated (every FP16 tensor rounded through FP16)."""
    from export_engine.calibration.fp16_emulation import emulate_fp16_storage, emulation_session
    from export_engine.graph_passes.base import load_graph

    graph = load_graph(path)
    emulate_fp16_storage(graph)
    session = emulation_session(gs.export_onnx(graph))
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, dict(feed)), strict=True)) for feed in feeds]


def compare_all(
    reference: Sequence[Mapping[str, np.ndarray]], candidate: Sequence[Mapping[str, np.ndarray]], tol: Tolerance
) -> dict[str, OutputParity]:
    """Worst result per output over all feeds (largest errors; passed only if every feed passed)."""
    worst: dict[str, OutputParity] = {}
    for ref, got in zip(reference, candidate, strict=True):
        for name, value in ref.items():
            new = compare_output(name, got[name], value, tol)
            old = worst.get(name)
            worst[name] = (
                new
                if old is None
                else replace(
                    new,
                    max_abs=max(old.max_abs, new.max_abs),
                    max_rel=max(old.max_rel, new.max_rel),
                    share_over=max(old.share_over, new.share_over),
                    passed=old.passed and new.passed,
                    finite=old.finite and new.finite,
                )
            )
    return worst


def check_strongly_typed(path: Path) -> None:
    """onnx.checker, strict shape inference (every node's input dtypes consistent) and an ORT load."""
    onnx.checker.check_model(str(path))
    onnx.shape_inference.infer_shapes_path(str(path), str(path.with_suffix(".inferred.onnx")), strict_mode=True)
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


_STATS: dict[str, dict[str, TensorStats]] = {}


def cached_stats(path: Path, feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, TensorStats]:
    """Activation statistics, measured once per graph file for the whole test session."""
    if str(path) not in _STATS:
        _STATS[str(path)] = collect_activation_stats(path, feeds)
    return _STATS[str(path)]


def dtype_of(tensor: gs.Tensor) -> np.dtype | None:
    return np_dtype(tensor)


def io_dtypes(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    return {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}


# ---------------------------------------------------------------------------------------------------------
# A small transformer block built directly in ONNX, with an opset-23 Attention node (as fuse_attention emits).


def attention_block(
    seed: int = 0, *, tokens: int = 8, dim: int = 16, heads: int = 2, hidden_scale: float = 1.0
) -> onnx.ModelProto:
    """x (1, S, D) -> LN -> Q/K/V -> Attention(4-D) -> proj + x -> LN -> MLP(ReLU) + residual = tokens;
    tokens -> Linear -> Exp = conf. ``tokens`` is a graph output that is also consumed inside the graph.

    ``hidden_scale`` multiplies fc1 (weight and bias) and divides fc2: with ReLU the function is unchanged, but
    the MLP hidden state is ``hidden_scale`` times larger.
    """
    rng = np.random.default_rng(seed)
    hd = dim // heads

    def w(name: str, *shape: int, scale: float = 1.0) -> onnx.TensorProto:
        values = (rng.standard_normal(shape) * scale / np.sqrt(shape[0])).astype(np.float32)
        return onnx.numpy_helper.from_array(values, name)

    inits = [
        w("wq", dim, dim), w("wk", dim, dim), w("wv", dim, dim), w("wo", dim, dim),
        w("w1", dim, 4 * dim, scale=hidden_scale), w("w2", 4 * dim, dim, scale=1.0 / hidden_scale),
        w("wh", dim, 1),
        onnx.numpy_helper.from_array((0.1 * rng.standard_normal(4 * dim) * hidden_scale).astype(np.float32), "b1"),
        onnx.numpy_helper.from_array(np.ones(dim, np.float32), "g"),
        onnx.numpy_helper.from_array(np.zeros(dim, np.float32), "b"),
        onnx.numpy_helper.from_array(np.array([1, tokens, heads, hd], np.int64), "split_shape"),
        onnx.numpy_helper.from_array(np.array([1, tokens, dim], np.int64), "merge_shape"),
    ]  # fmt: skip
    n = helper.make_node
    nodes = [
        n("LayerNormalization", ["x", "g", "b"], ["ln1"], name="ln1", axis=-1),
        *[n("MatMul", ["ln1", f"w{c}"], [c], name=f"proj_{c}") for c in "qkv"],
        *[n("Reshape", [c, "split_shape"], [f"{c}3"], name=f"split_{c}") for c in "qkv"],
        *[n("Transpose", [f"{c}3"], [f"{c}4"], name=f"heads_{c}", perm=[0, 2, 1, 3]) for c in "qkv"],
        n("Attention", ["q4", "k4", "v4"], ["att"], name="attention"),
        n("Transpose", ["att"], ["att_t"], name="merge_t", perm=[0, 2, 1, 3]),
        n("Reshape", ["att_t", "merge_shape"], ["att_m"], name="merge"),
        n("MatMul", ["att_m", "wo"], ["o"], name="proj_o"),
        n("Add", ["o", "x"], ["r1"], name="residual1"),
        n("LayerNormalization", ["r1", "g", "b"], ["ln2"], name="ln2", axis=-1),
        n("MatMul", ["ln2", "w1"], ["h"], name="fc1"),
        n("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        n("Relu", ["hb"], ["a"], name="act"),
        n("MatMul", ["a", "w2"], ["m"], name="fc2"),
        n("Add", ["m", "r1"], ["tokens"], name="residual2"),
        n("MatMul", ["tokens", "wh"], ["raw"], name="head"),
        n("Exp", ["raw"], ["conf"], name="conf_exp"),
    ]
    graph = helper.make_graph(
        nodes,
        "attention_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, dim])],
        [
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, [1, tokens, dim]),
            helper.make_tensor_value_info("conf", TensorProto.FLOAT, [1, tokens, 1]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    onnx.checker.check_model(model)
    return model


def block_feeds(count: int = 2, *, tokens: int = 8, dim: int = 16, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, tokens, dim)).astype(np.float32)} for _ in range(count)]


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def node_by_name(graph: gs.Graph, name: str) -> gs.Node:
    return next(n for n in graph.nodes if n.name == name)


def compute_dtype(node: gs.Node) -> np.dtype | None:
    """The dtype a node's first float output (or input) has."""
    for tensor in (*node.outputs, *node.inputs):
        dtype = np_dtype(tensor)
        if dtype in (FP16, FP32):
            return dtype
    return None


# ---------------------------------------------------------------------------------------------------------
# "Massive activations": the tiny MASt3R encoder with one block's MLP rescaled.


_MASSIVE: dict[str, tuple[Path, list[dict[str, np.ndarray]]]] = {}


def massive_mast3r_encoder(tmp: Path, mode: str, alpha: float = 1e5) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """Cached per mode for the test session (an export takes seconds); see :func:`export_massive_encoder`."""
    if mode not in _MASSIVE:
        _MASSIVE[mode] = export_massive_encoder(tmp, mode, alpha)
    return _MASSIVE[mode]


def export_massive_encoder(tmp: Path, mode: str, alpha: float = 1e5) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """Export the tiny MASt3R encoder with enc_blocks[1]'s MLP rescaled; return (path, 3 feeds).

    ``hidden``: fc1 x alpha, fc2 / alpha: (nearly) the same function (GELU(a h)/a ~ ReLU(h) for large a), but the
    MLP hidden state reaches ~1e5, beyond FP16's 65504, as in real ViT-L "massive activations".
    ``residual``: fc2 x alpha: the residual stream itself reaches ~1e5 (a different function; the reference
    is that model's own FP32 run).
    """
    import torch

    from export_engine.exporters.onnx_from_torch import onnx_from_torch
    from export_engine.exporters.registry import get_family

    family = get_family("mast3r")
    loaded = family.load(family.tiny_config(), None, 0)
    specs = family.graphs(loaded.config, family.tiny_shape)
    mlp = loaded.module.enc_blocks[1].mlp
    with torch.no_grad():
        if mode == "hidden":
            mlp.fc1.weight.mul_(alpha)
            mlp.fc1.bias.mul_(alpha)
            mlp.fc2.weight.div_(alpha)
        else:
            mlp.fc2.weight.mul_(alpha)
            mlp.fc2.bias.mul_(alpha)
    feeds = family.parity_feeds(loaded, specs, 3, 0)["encoder"]
    path = tmp / f"massive_{mode}.onnx"
    encoder = specs[0]
    onnx_from_torch(encoder.build_module(loaded.module), (torch.from_numpy(feeds[0]["images"]),), path, encoder)
    return path, feeds
