"""Rotary position embeddings as ONNX Runtime's one-kernel ``com.microsoft.RotaryEmbedding`` (ORT copies only).

The exporter writes RoPE as ``x * COS + rotate_half(x) * SIN`` with constant per-token tables: for a head of
dimension D split into k sections of M = D / k (MASt3R: k = 2, the y and the x half), ``rotate_half`` is a
Concat along the last axis of ``[-x[hi_0], x[lo_0], ..., -x[hi_{k-1}], x[lo_{k-1}]]`` where lo_j / hi_j are the
first and second halves of section j, and each table repeats its first M/2 values inside each section. That is
eleven element-wise kernels per rotated tensor on ONNX Runtime's CUDA provider (Slice, Neg, Concat, Mul, Add).

ONNX Runtime's ``RotaryEmbedding`` rotates one section per row with a ``(positions, M/2)`` cos/sin cache. A
free reshape of x from ``(B, heads, N, D)`` to ``(B, heads, N*k, M)`` makes every section of every token its
own row; row ``n*k + j`` then reads cache row ``n*k + j``, which holds section j of token n's table, so the
position ids are simply 0, 1, 2, ... (the op's offset form, position_ids = [0]) for any batch size:

    x (B, h, N, D) -> Reshape (B, h, N*k, M) -> RotaryEmbedding(cache rows = table sections) -> Reshape (B, h, N, D)

The caches hold exactly the table values, so the result equals the original up to the kernel's arithmetic
(ONNX Runtime computes x*cos - x'*sin in the input's type). Matches whose tables or slices do not have this
structure are skipped with the reason. Applied in memory by the ONNX Runtime runner only: the artifact keeps
the standard ops that TensorRT fuses itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from export_engine.graph_passes.base import NodeBuilder, PassReport, next_index, producer, timed

PASS = "lower_rotary"
DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class LowerRotaryConfig:
    max_sections: int = 4  # rotary sections per head (1 = 1-D RoPE, 2 = MASt3R's 2-D RoPE)


@dataclass
class _Match:
    add: gs.Node
    x: gs.Tensor
    cos: np.ndarray  # (N, D)
    sin: np.ndarray
    sections: int


def lower_rotary(graph: gs.Graph, config: LowerRotaryConfig) -> PassReport:
    report = PassReport(PASS)
    with timed(report):
        index = next_index(graph, PASS)
        for node in [n for n in graph.nodes if n.op == "Add"]:
            match = _match(node, config)
            if match is None:
                continue
            report.matched += 1
            if isinstance(match, str):
                report.skipped.append(f"{node.name}: {match}")
                continue
            index = _rewrite(graph, match, index)
            report.rewritten += 1
        graph.cleanup().toposort()
    return report


def _split_mul(node: gs.Node | None) -> tuple[gs.Tensor, gs.Constant] | None:
    """(variable operand, constant operand) of a two-input Mul."""
    if node is None or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if isinstance(b, gs.Constant) and not isinstance(a, gs.Constant):
        return a, b
    if isinstance(a, gs.Constant) and not isinstance(b, gs.Constant):
        return b, a
    return None


def _match(add: gs.Node, config: LowerRotaryConfig) -> _Match | str | None:
    """None when ``add`` is not a RoPE sum at all; a reason string when it is one this pass cannot lower."""
    if len(add.inputs) != 2:
        return None
    muls = [_split_mul(producer(t, "Mul")) for t in add.inputs]
    if any(m is None for m in muls):
        return None
    for plain, rotated in ((muls[0], muls[1]), (muls[1], muls[0])):
        assert plain is not None and rotated is not None
        concat = producer(rotated[0], "Concat")
        if concat is None:
            continue
        x, cos, sin = plain[0], plain[1].values, rotated[1].values
        parts = _rotate_half_parts(concat, x)
        if parts is None:
            continue  # not rotate_half of the same tensor
        return _check(add, x, cos, sin, parts, config)
    return None


def _slice_range(node: gs.Node | None, x: gs.Tensor) -> tuple[int, int] | None:
    """[start, end) of a last-axis, step-1 Slice of ``x`` with constant bounds."""
    if node is None or node.op != "Slice" or node.inputs[0] is not x or len(node.inputs) < 4:
        return None
    if not all(isinstance(t, gs.Constant) for t in node.inputs[1:]):
        return None
    starts, ends, axes = (np.asarray(t.values).reshape(-1) for t in node.inputs[1:4])
    steps = np.asarray(node.inputs[4].values).reshape(-1) if len(node.inputs) > 4 else np.ones(1)
    rank = len(x.shape) if x.shape is not None else None
    if len(starts) != 1 or int(steps[0]) != 1 or int(axes[0]) not in (-1, (rank or 0) - 1):
        return None
    return int(starts[0]), int(ends[0])


def _rotate_half_parts(concat: gs.Node, x: gs.Tensor) -> list[tuple[int, int, bool]] | None:
    """The concat's parts as (start, end, negated) slices of x along the last axis, or None."""
    if int(concat.attrs.get("axis", 0)) not in (-1, (len(x.shape) - 1) if x.shape is not None else -1):
        return None
    parts = []
    for tensor in concat.inputs:
        neg = producer(tensor, "Neg")
        source = neg.inputs[0] if neg is not None else tensor
        sliced = _slice_range(producer(source, "Slice"), x)
        if sliced is None:
            return None
        parts.append((*sliced, neg is not None))
    return parts


def _check(add: gs.Node, x: gs.Tensor, cos: np.ndarray, sin: np.ndarray, parts: list[tuple[int, int, bool]],
           config: LowerRotaryConfig) -> _Match | str:  # fmt: skip
    if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[-1], int):
        return "x is not 4-D (B, heads, N, D) with a static head dimension"
    dim = int(x.shape[-1])
    if len(parts) % 2 or len(parts) // 2 > config.max_sections:
        return f"rotate_half with {len(parts)} parts"
    sections = len(parts) // 2
    if dim % (2 * sections):
        return f"head dimension {dim} does not split into {sections} rotary sections"
    m = dim // sections
    for j in range(sections):  # [-x[hi_j], x[lo_j]]
        lo, hi = (j * m, j * m + m // 2), (j * m + m // 2, (j + 1) * m)
        neg_part, pos_part = parts[2 * j], parts[2 * j + 1]
        if not (neg_part[2] and not pos_part[2] and _same(neg_part, hi, dim) and _same(pos_part, lo, dim)):
            return f"section {j} is not rotate_half ([-x{list(hi)}, x{list(lo)}])"
    tables = []
    for table in (cos, sin):
        t = np.asarray(table)
        while t.ndim > 2 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 2 or t.shape[1] != dim:
            return f"cos/sin table of shape {list(table.shape)} is not per-token (N, {dim})"
        if x.dtype is not None and t.dtype != np.dtype(x.dtype):
            return f"table dtype {t.dtype} differs from x ({np.dtype(x.dtype)})"
        halves = t.reshape(t.shape[0], sections, 2, m // 2)
        if not np.array_equal(halves[:, :, 0], halves[:, :, 1]):
            return "cos/sin tables do not repeat each section's first half"
        tables.append(t)
    if isinstance(x.shape[2], int) and x.shape[2] != tables[0].shape[0]:
        return f"table rows {tables[0].shape[0]} differ from the sequence length {x.shape[2]}"
    return _Match(add, x, tables[0], tables[1], sections)


def _same(part: tuple[int, int, bool], want: tuple[int, int], dim: int) -> bool:
    start, end, _ = part
    clamp = lambda v: min(max(v + dim if v < 0 else v, 0), dim)  # noqa: E731
    return (clamp(start), clamp(end)) == want


def _rewrite(graph: gs.Graph, match: _Match, index: int) -> int:
    b = NodeBuilder(graph, PASS, index, match.x.dtype)
    n, dim = match.cos.shape
    m = dim // match.sections
    # cache row n*k + j = section j of token n's table (its first half: the second repeats it)
    cos_cache = match.cos.reshape(n, match.sections, m)[:, :, : m // 2].reshape(n * match.sections, m // 2)
    sin_cache = match.sin.reshape(n, match.sections, m)[:, :, : m // 2].reshape(n * match.sections, m // 2)
    rows = b.reshape(match.x, [0, 0, -1, m]) if match.sections > 1 else match.x
    inputs = [rows, b.const("position_offset", np.zeros(1, dtype=np.int64)), b.const("cos_cache", cos_cache),
              b.const("sin_cache", sin_cache)]  # fmt: skip
    result = match.add.outputs[0]
    match.add.outputs.clear()
    if match.sections == 1:
        b.add("RotaryEmbedding", inputs, {"interleaved": 0}, out=result, domain=DOMAIN)
        return b.index
    rotated = b.add("RotaryEmbedding", inputs, {"interleaved": 0}, domain=DOMAIN)
    b.add("Reshape", [rotated, b.const("shape", np.asarray([0, 0, -1, dim], dtype=np.int64))], out=result)
    return b.index
