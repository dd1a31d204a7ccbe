"""Attention blocks in token-major layout with ONNX Runtime's ``MultiHeadAttention`` (ONNX Runtime copies only).

The exported attention block moves every projection into head-major layout and back:

    P = x @ W + b (B, N, 3C) -> Reshape (B, N, 3, h, d) -> Transpose -> Gather q / k / v (B, h, N, d)
    q, k -> RoPE -> Attention(q, k, v) (B, h, N, d) -> Transpose -> Reshape (B, N, C) -> proj

(cross-attention: three projections, each Reshape + Transpose). On ONNX Runtime's CUDA provider those are
separate copy kernels, and RoPE on head-major rows runs one 32-thread block per row. This pass keeps the
tokens in (B, N, C) throughout:

    P -> Split q / k / v (B, N, C) -> RotaryEmbedding(q), RotaryEmbedding(k) -> MultiHeadAttention -> proj

``MultiHeadAttention`` takes and returns (B, N, C) and runs flash attention on FP16. RoPE here rotates pairs
(s*m + j, s*m + m/2 + j) inside each of k sections of a head (m = d/k; MASt3R: k = 2, the y and x halves).
Attention scores are unchanged when q and k have their head dimensions permuted alike, so the pass permutes
the q and k columns of the projection weights (and biases) so that each rotation pair becomes adjacent,
(2i, 2i + 1), and rotates with ``interleaved=1``; v keeps its layout, so the output needs none. With adjacent
pairs a rotary "row" may span several whole heads: ONNX Runtime's CUDA kernel runs one thread block per row
with one thread per value, and rows of 64 values (one head) made 24,576 tiny blocks a call on the MASt3R
encoder (10 us a call, 1.5 ms a pair); a row of the whole token (1,024 values, the block limit) makes 1,536.
The caches repeat each head's per-token angles once per head of the row (position ids 0, 1, ... as the
offset form).

``op="gqa"`` emits ONNX Runtime's ``GroupQueryAttention`` instead (``causal=0``, as many key/value heads as
query heads): it takes the packed q/k/v projection as is (no Split) and applies the rotary embedding itself
(``do_rotary``, interleaved, with the same per-token caches over one head), so a self-attention block becomes
one node after its projection. Its positions are 0, 1, ... over the key sequence, which the caches index per
token; it needs query and key sequences of one static length (true of MASt3R's pairs).

Only blocks that match exactly are rewritten (constant projection weights used by nothing else, static head
sizes, RoPE on both q and k or on neither, no mask or bias); others are skipped with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from export_engine.graph_passes.base import OWN_DOMAIN, NodeBuilder, PassReport, next_index, producer, timed
from export_engine.graph_passes.lower_rotary import LowerRotaryConfig, _Match
from export_engine.graph_passes.lower_rotary import _match as rope_match

PASS = "lower_attention_bsh"
DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class LowerAttentionBshConfig:
    max_sections: int = 4  # RoPE sections per head (as lower_rotary)
    max_row: int = 1024  # values a rotary row may hold: ONNX Runtime's CUDA kernel runs one thread per value
    # MultiHeadAttention after Split + RotaryEmbedding ("mha") or after export-engine's BiasRotarySplit
    # ("fused"), or GroupQueryAttention ("gqa")
    op: Literal["mha", "fused", "gqa"] = "mha"
    gqa_fp32: bool = False  # GroupQueryAttention on FP32 blocks too (ONNX Runtime's CUDA kernel is FP16/BF16 only)


@dataclass
class _Projection:
    """Where a head-major operand comes from: columns [offset, offset + C) of ``packed`` = MatMul + bias."""

    packed: gs.Tensor  # (B, N, width)
    matmul: gs.Node
    bias: gs.Constant
    offset: int
    heads: int
    head_dim: int
    parts: int  # 3 for packed q/k/v, 1 for a single projection


@dataclass
class _Block:
    attention: gs.Node
    output: gs.Tensor  # the (B, N, C) tensor the block's output Reshape wrote
    operands: list[_Projection]  # q, k, v
    ropes: list[_Match | None] = field(default_factory=list)  # q, k


def lower_attention_bsh(graph: gs.Graph, config: LowerAttentionBshConfig) -> PassReport:
    report = PassReport(PASS)
    with timed(report):
        index = next_index(graph, PASS)
        splits: dict[str, list[gs.Tensor]] = {}
        for node in [n for n in graph.nodes if n.op == "Attention" and n.domain in (None, "", "ai.onnx")]:
            report.matched += 1
            block = _match(node, config)
            if isinstance(block, str):
                report.skipped.append(f"{node.name}: {block}")
                continue
            index = _rewrite(graph, block, index, splits, config)
            report.rewritten += 1
        graph.cleanup().toposort()
    return report


def _match(att: gs.Node, config: LowerAttentionBshConfig) -> _Block | str:
    if len(att.inputs) != 3 or len(att.outputs) != 1:
        return "has a mask, bias or extra outputs"
    extra = {k for k, v in att.attrs.items() if k != "scale" and v not in (0, 0.0, None)}
    if extra or att.attrs.get("scale") is None:
        return f"attributes {sorted(extra) or ['no scale']}"
    output = _output(att)
    if isinstance(output, str):
        return output
    ropes: list[_Match | None] = []
    sources = []
    for tensor in att.inputs[:2]:
        add = producer(tensor, "Add")
        rope = rope_match(add, LowerRotaryConfig(config.max_sections)) if add is not None else None
        if isinstance(rope, str):
            return f"RoPE: {rope}"
        ropes.append(rope)
        sources.append(rope.x if rope else tensor)
    if (ropes[0] is None) != (ropes[1] is None):
        return "RoPE on only one of q and k"
    if ropes[0] and ropes[1] and ropes[0].sections != ropes[1].sections:
        return "q and k rotate different sections"
    operands = []
    for tensor in (*sources, att.inputs[2]):
        projection = _projection(tensor)
        if isinstance(projection, str):
            return projection
        operands.append(projection)
    if len({(p.heads, p.head_dim) for p in operands}) != 1:
        return "q, k and v differ in heads or head size"
    if operands[0].head_dim % 2:
        return "odd head size"
    if config.op == "gqa":
        lengths = {_length(att, i, ropes[min(i, 1)]) for i in range(3)}
        if len(lengths) != 1 or not isinstance(next(iter(lengths)), int):
            return "GroupQueryAttention needs query and key sequences of one static length"
        if operands[0].head_dim % 8:
            return "GroupQueryAttention needs a head size that is a multiple of 8"
        if not (_packed_in_order(operands) or all(p.parts == 1 for p in operands)):
            return "q, k and v neither one packed projection in order nor three projections"
        if (
            ropes[0]
            and ropes[1]
            and not all(np.array_equal(getattr(ropes[0], t), getattr(ropes[1], t)) for t in ("cos", "sin"))
        ):
            return "q and k rotate by different angles (GroupQueryAttention applies one table to both)"
        if operands[0].matmul.inputs[1].values.dtype == np.float32 and not config.gqa_fp32:
            return "FP32 block (ONNX Runtime's CUDA GroupQueryAttention takes FP16 or BF16)"
    if config.op == "fused":
        if operands[0].head_dim % 8:
            return "BiasRotarySplit needs a head size that is a multiple of 8 (16-byte vectors of FP16)"
        packed_rope = ropes[0] and ropes[1] and any(p.parts == 3 for p in operands[:2])
        if packed_rope and not all(np.array_equal(getattr(ropes[0], t), getattr(ropes[1], t)) for t in ("cos", "sin")):
            return "q and k of one packed projection rotate by different angles"
    return _Block(att, output, operands, ropes)


def _output(att: gs.Node) -> gs.Tensor | str:
    """The (B, N, C) tensor the attention output becomes: Transpose(0, 2, 1, 3) then Reshape."""
    users = [c for c in att.outputs[0].outputs if c.op != "Shape"]
    if len(users) != 1 or users[0].op != "Transpose" or list(users[0].attrs.get("perm", [])) != [0, 2, 1, 3]:
        return "output is not transposed back to (B, N, heads, d)"
    reshapes = users[0].outputs[0].outputs
    if len(reshapes) != 1 or reshapes[0].op != "Reshape":
        return "output is not reshaped to (B, N, C)"
    result = reshapes[0].outputs[0]
    if result.shape is None or len(result.shape) != 3:
        return "output reshape is not rank 3"
    return result


def _projection(tensor: gs.Tensor) -> _Projection | str:
    gather = producer(tensor, "Gather")
    if gather is not None:  # packed: Gather(Transpose(Reshape(P, (B, N, 3, h, d)), (2, 0, 3, 1, 4)), i)
        index = gather.inputs[1]
        transpose = producer(gather.inputs[0], "Transpose")
        if not isinstance(index, gs.Constant) or index.values.size != 1 or int(gather.attrs.get("axis", 0)) != 0:
            return "q/k/v gathered with a non-constant index"
        if transpose is None or list(transpose.attrs.get("perm", [])) != [2, 0, 3, 1, 4]:
            return "packed q/k/v not in (3, B, heads, N, d) layout"
        source, parts, part = transpose.inputs[0], 3, int(index.values.reshape(-1)[0])
    else:  # single: Transpose(Reshape(P, (B, N, h, d)), (0, 2, 1, 3))
        transpose = producer(tensor, "Transpose")
        if transpose is None or list(transpose.attrs.get("perm", [])) != [0, 2, 1, 3]:
            return "an operand is not a projection in (B, heads, N, d) layout"
        source, parts, part = transpose.inputs[0], 1, 0
    reshape = producer(source, "Reshape")
    if reshape is None or source.shape is None or len(source.shape) != 2 + parts + (1 if parts == 1 else 0):
        return "projection reshape of unexpected rank"
    heads, head_dim = source.shape[-2], source.shape[-1]
    if not (isinstance(heads, int) and isinstance(head_dim, int)) or (parts == 3 and source.shape[2] != 3):
        return "head count or size not static"
    packed = reshape.inputs[0]
    add = producer(packed, "Add")
    if add is None or [c for c in packed.outputs if c.op != "Shape"] != [reshape]:
        return "projection without a bias add, or used elsewhere"
    bias = next((t for t in add.inputs if isinstance(t, gs.Constant)), None)
    product = next((t for t in add.inputs if not isinstance(t, gs.Constant)), None)
    matmul = producer(product, "MatMul")
    if bias is None or matmul is None or not isinstance(matmul.inputs[1], gs.Constant):
        return "projection is not MatMul(constant) + constant bias"
    weight = matmul.inputs[1]
    width = heads * head_dim * parts
    if weight.values.ndim != 2 or weight.values.shape[1] != width or bias.values.shape != (width,):
        return "projection weight or bias shape does not match the heads"
    if len(weight.outputs) != 1 or len(bias.outputs) != 1:
        return "projection weights are shared with other nodes"
    return _Projection(packed, matmul, bias, part * heads * head_dim, heads, head_dim, parts)


def _pair_permutation(head_dim: int, sections: int) -> np.ndarray:
    """new -> old head-dimension index so that each RoPE pair (s*m + j, s*m + m/2 + j) lands at (2i, 2i + 1)."""
    m = head_dim // sections
    perm = np.empty(head_dim, dtype=np.int64)
    i = 0
    for s in range(sections):
        for j in range(m // 2):
            perm[2 * i], perm[2 * i + 1] = s * m + j, s * m + m // 2 + j
            i += 1
    return perm


def _heads_per_row(heads: int, head_dim: int, max_row: int) -> int:
    """The most whole heads a rotary row can hold: a divisor of ``heads`` with at most ``max_row`` values."""
    return max((g for g in range(1, heads + 1) if heads % g == 0 and g * head_dim <= max_row), default=1)


def _permute_columns(projection: _Projection, perm: np.ndarray) -> None:
    d, h = projection.head_dim, projection.heads
    columns = np.arange(projection.matmul.inputs[1].values.shape[1])
    block = projection.offset + (np.arange(h)[:, None] * d + perm[None, :]).reshape(-1)
    columns[projection.offset : projection.offset + h * d] = block
    weight = projection.matmul.inputs[1]
    weight.values = np.ascontiguousarray(weight.values[:, columns])
    projection.bias.values = np.ascontiguousarray(projection.bias.values[columns])


def _caches(rope: _Match, perm: np.ndarray, heads_per_row: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, heads_per_row * d/2) caches: pair i of a head reads the angle of its first member, once per head."""
    first = perm[0::2]
    return np.tile(rope.cos[:, first], (1, heads_per_row)), np.tile(rope.sin[:, first], (1, heads_per_row))


def _rewrite(
    graph: gs.Graph, block: _Block, index: int, splits: dict[str, list[gs.Tensor]], config: LowerAttentionBshConfig
) -> int:
    b = NodeBuilder(graph, PASS, index, block.output.dtype)
    q, k, v = block.operands
    width = q.heads * q.head_dim
    perm = _pair_permutation(q.head_dim, block.ropes[0].sections) if block.ropes[0] else None
    if perm is not None:
        for projection in (q, k):
            _permute_columns(projection, perm)
    if config.op == "gqa":
        return _emit_gqa(graph, b, block, perm, splits)
    if config.op == "fused":
        return _emit_fused(graph, b, block, perm, splits)
    tokens = []
    for projection in (q, k, v):
        if projection.parts == 1:
            tokens.append(projection.packed)
            continue
        if projection.packed.name not in splits:  # one Split per packed projection
            outs = [gs.Variable(f"{b.name()}/split{i}", dtype=b.dtype) for i in range(3)]
            node = gs.Node("Split", name=b.name(), attrs={"axis": -1}, outputs=outs,
                           inputs=[projection.packed, b.const("sizes", np.full(3, width, dtype=np.int64))])  # fmt: skip
            graph.nodes.append(node)
            b.index += 1
            splits[projection.packed.name] = outs
        tokens.append(splits[projection.packed.name][projection.offset // width])
    if perm is not None:
        offset = b.const("position_offset", np.zeros(1, dtype=np.int64))
        per_row = _heads_per_row(q.heads, q.head_dim, config.max_row)
        rope_attrs = {"interleaved": 1, "num_heads": q.heads // per_row}
        for i, rope in enumerate(block.ropes):
            assert rope is not None
            cos, sin = _caches(rope, perm, per_row)
            inputs = [tokens[i], offset, b.const("cos_cache", cos), b.const("sin_cache", sin)]
            tokens[i] = b.add("RotaryEmbedding", inputs, rope_attrs, domain=DOMAIN)
    return _attend(b, block, tokens)


def _attend(b: NodeBuilder, block: _Block, tokens: list[gs.Tensor]) -> int:
    """``MultiHeadAttention`` on (B, N, C) q, k and v, writing the block's output in place of its old producer."""
    block.output.inputs[0].outputs.clear()
    attrs = {"num_heads": block.operands[0].heads, "scale": float(block.attention.attrs["scale"])}
    b.add("MultiHeadAttention", tokens, attrs, out=block.output, domain=DOMAIN)
    return b.index


def _float_tables(b: NodeBuilder, rope: _Match | None, perm: np.ndarray, suffix: str) -> list[gs.Tensor]:
    """BiasRotarySplit's (N, D/2) float cos and sin tables of one rotated operand."""
    assert rope is not None
    cos, sin = _caches(rope, perm, 1)
    return [b.const(f"cos{suffix}", cos.astype(np.float32)), b.const(f"sin{suffix}", sin.astype(np.float32))]


def _emit_fused(graph: gs.Graph, b: NodeBuilder, block: _Block, perm: np.ndarray | None,
                splits: dict[str, list[gs.Tensor]]) -> int:  # fmt: skip
    """q, k and v from export-engine's ``BiasRotarySplit`` (bias add, q/k rotation and split in one kernel), then
    ``MultiHeadAttention``: one node per projection (a packed q/k/v projection gives all three)."""
    q = block.operands[0]
    width = q.heads * q.head_dim
    tables = _float_tables(b, block.ropes[0], perm, "") if perm is not None else []
    tokens = []
    for i, projection in enumerate(block.operands):
        key = f"{projection.packed.name}:{i if projection.parts == 1 else 'qkv'}"
        if key not in splits:
            if projection.parts == 3:  # rotate the parts q and k take, wherever the packing put them
                rotate = [0, 0, 0]
                for rotated in block.operands[:2] if perm is not None else ():
                    if rotated.packed is projection.packed:
                        rotate[rotated.offset // width] = 1
            else:
                rotate = [int(perm is not None and i < 2)]
            own = tables
            if perm is not None and i == 1 and projection.parts == 1:  # k rotates by its own tokens' angles
                own = _float_tables(b, block.ropes[1], perm, "_k")
            outs = [gs.Variable(f"{b.name()}/part{j}", dtype=b.dtype) for j in range(len(rotate))]
            inputs = [projection.matmul.outputs[0], projection.bias, *(own if any(rotate) else [])]
            attrs = {"rotate": rotate, "head_dim": q.head_dim}
            graph.nodes.append(gs.Node("BiasRotarySplit", name=b.name(), attrs=attrs, inputs=inputs, outputs=outs,
                                       domain=OWN_DOMAIN))  # fmt: skip
            b.index += 1
            splits[key] = outs
        outs = splits[key]
        tokens.append(outs[projection.offset // width] if projection.parts == 3 else outs[0])
    return _attend(b, block, tokens)


def _emit_gqa(graph: gs.Graph, b: NodeBuilder, block: _Block, perm: np.ndarray | None,
              seqlens: dict[str, list[gs.Tensor]]) -> int:  # fmt: skip
    """One ``GroupQueryAttention`` for the block: the packed projection as its query when q, k and v all come
    from it, else q, k and v as three inputs; RoPE inside the op."""
    q, k, v = block.operands
    length = _length(block.attention, 0, block.ropes[0])
    assert length is not None  # checked by _match
    if _packed_in_order(block.operands):
        inputs: list[gs.Tensor] = [q.packed, gs.Variable.empty(), gs.Variable.empty()]
    else:  # three projections (checked by _match)
        inputs = [p.packed for p in (q, k, v)]
    inputs += [gs.Variable.empty(), gs.Variable.empty(), _seqlens(graph, b, q.packed, length, seqlens),
               b.const("total_sequence_length", np.asarray(length, dtype=np.int32))]  # fmt: skip
    attrs = {"num_heads": q.heads, "kv_num_heads": q.heads, "scale": float(block.attention.attrs["scale"]),
             "causal": 0}  # fmt: skip
    if perm is not None:
        rope = block.ropes[0]
        assert rope is not None
        cos, sin = _caches(rope, perm, 1)
        inputs += [b.const("cos_cache", cos), b.const("sin_cache", sin)]
        attrs.update(do_rotary=1, rotary_interleaved=1)
    producer_node = block.output.inputs[0]
    producer_node.outputs.clear()
    outputs = [block.output] + [gs.Variable(f"{b.name()}/present_{n}", dtype=b.dtype) for n in ("key", "value")]
    node = gs.Node("GroupQueryAttention", name=b.name(), attrs=attrs, inputs=inputs, outputs=outputs, domain=DOMAIN)
    graph.nodes.append(node)
    b.index += 1
    return b.index


def _seqlens(graph: gs.Graph, b: NodeBuilder, query: gs.Tensor, length: int,
             cache: dict[str, list[gs.Tensor]]) -> gs.Tensor:  # fmt: skip
    """GroupQueryAttention's per-batch key lengths minus one, (B,) int32: a constant for a static batch, else
    made once per graph from the query's batch dimension."""
    batch = query.shape[0] if query.shape else None
    key = f"seqlens:{batch}:{length}"
    if key not in cache:
        fill = np.full(1, length - 1, dtype=np.int32)
        if isinstance(batch, int):
            cache[key] = [b.const("seqlens_k", np.repeat(fill, batch))]
        else:
            shape = b.add("Shape", [query], {"start": 0, "end": 1}, dtype=np.int64)
            value = gs.Constant(f"{b.name()}/fill", fill)
            cache[key] = [b.add("ConstantOfShape", [shape], {"value": value}, dtype=np.int32)]
    return cache[key][0]


def _packed_in_order(operands: list[_Projection]) -> bool:
    """q, k and v are columns [0, C), [C, 2C), [2C, 3C) of one packed projection."""
    q = operands[0]
    width = q.heads * q.head_dim
    return all(p.parts == 3 and p.packed is q.packed and p.offset == i * width for i, p in enumerate(operands))


def _length(att: gs.Node, i: int, rope: _Match | None) -> int | None:
    """The static sequence length of the attention's i-th operand (B, heads, N, d), or None. A rotated operand
    has as many tokens as its constant per-token angle table (v: as many as k, whose table is passed)."""
    shape = att.inputs[i].shape
    if shape is not None and len(shape) == 4 and isinstance(shape[2], int):
        return shape[2]
    return int(rope.cos.shape[0]) if rope is not None else None
