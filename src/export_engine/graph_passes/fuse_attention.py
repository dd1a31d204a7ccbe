"""Rewrite every attention into one standard ONNX ``Attention`` op (opset 23, default domain).

ONNX Runtime (CPU, >= 1.23) runs it and TensorRT (>= 10.14) parses it into ``IAttention`` with fused
kernels; the importer splits the ``scale`` attribute as sqrt(scale) into Q and K, which is where its fused
kernels want it (TensorRT's ONNX parser applies sqrt(scale) to both Q and K). Two sources of attention are handled:

* written out (TorchScript exporter, ``attn_impl="explicit"``): an anchor ``Softmax`` over the last axis whose
  output feeds only ``MatMul(P, V)``, and whose input is ``MatMul(Q, Kᵀ)`` followed by any chain of scalar
  ``Mul``/``Div`` (the scale, before or after the product), ``Add``/``Sub`` of bias terms (they become the
  additive ``attn_mask``) and at most one ``Reshape`` round trip (FastSAM3D adds its relative-position
  terms in a 7-D view of the logits). Kᵀ is usually ``Transpose(K)``; its permutation is undone.
* ``Attention`` nodes already in the graph (dynamo exporter at opset 23, or an earlier run): counted, and
  given an explicit ``scale`` when they rely on the default 1/sqrt(head_dim).

Softmax is exact under the rewrite: ``softmax(a·(Q Kᵀ) + Σ cᵢ·biasᵢ)·V`` is Attention(Q, K, V,
mask=Σ cᵢ·biasᵢ, scale=a) for any split of the logits into one product plus the rest, so the match needs no
names and no knowledge of which operand is "the" bias.

Precondition: the scale must be a constant. The TorchScript exporter computes ``head_dim ** -0.5`` from
``Shape(q)`` at run time; run ``fold_constants`` first (it also infers the shapes that mask checks need).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from export_engine.errors import GraphPassError
from export_engine.graph_passes.base import PassReport, check_count, next_index, node_name, timed
from export_engine.graph_passes.cleanup import infer_shapes
from export_engine.graph_passes.raise_opset import upgrade_opset

PASS = "fuse_attention"
ATTENTION_OPSET = 23  # first opset with the standard Attention op


@dataclass(frozen=True)
class FuseAttentionConfig:
    expected: int | None = None  # attention blocks in the graph (ModelSpec.expected_counts["attention"])
    strict: bool = False  # a count mismatch raises instead of warning


class _MissError(Exception):
    """A Softmax that does not anchor a fusable attention; the message is the reason."""


@dataclass
class _Term:
    tensor: gs.Tensor
    factor: float  # multiplier the logits chain applies to this term after it is added
    in_view: bool  # added inside the reshaped view of the logits


@dataclass
class _Chain:
    """The logits of one softmax: ``scale · MatMul(q_side, kt_side) + terms`` (terms possibly in a view)."""

    matmul: gs.Node
    scale: float
    terms: list[_Term] = field(default_factory=list)
    view_shape: gs.Tensor | None = None  # shape input of the Reshape that maps the view back to 4-D
    view_allowzero: int = 0
    view_tensor: gs.Tensor | None = None  # the logits inside the view (output of the first Reshape)


@dataclass
class _Site:
    output: gs.Node  # MatMul(P, V), replaced by Attention
    q: gs.Tensor
    k: gs.Tensor  # source of Kᵀ; transposed by k_perm into [B, H, Sk, D]
    k_perm: list[int] | None
    v: gs.Tensor
    chain: _Chain
    scale: float


def fuse_attention(graph: gs.Graph, config: FuseAttentionConfig) -> PassReport:
    """Replace each ``Softmax``-anchored attention by ``Attention(Q, K, V[, attn_mask], scale=…)`` with 4-D
    [B, H, S, D] inputs, normalise existing ``Attention`` nodes, and raise the opset to 23 when needed."""
    report = PassReport(PASS)
    with timed(report):
        infer_shapes(graph)
        existing = [n for n in graph.nodes if n.op == "Attention" and n.domain in (None, "", "ai.onnx")]
        normalised = sum(_normalise(node, report) for node in existing)
        sites: list[_Site] = []
        for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
            try:
                sites.append(_match(softmax, graph))
            except _MissError as miss:
                report.skipped.append(f"Softmax {softmax.name!r}: {miss}")
        if sites and graph.opset < ATTENTION_OPSET:
            try:  # refuses before anything is rewritten
                upgrade_opset(graph, ATTENTION_OPSET)
            except GraphPassError as err:
                raise GraphPassError(f"{PASS}: Attention needs opset {ATTENTION_OPSET}; {err}") from err
            report.details["opset_raised_to"] = ATTENTION_OPSET
        index = next_index(graph, PASS)
        for site in sites:
            index = _rewrite(graph, site, index)
        graph.cleanup().toposort()
        total = sum(1 for n in graph.nodes if n.op == "Attention")
        left = [n.name for n in graph.nodes if n.op == "Softmax"]
        report.matched = len(existing) + len(sites)
        report.rewritten = len(sites) + normalised
        report.details.update(
            existing=len(existing),
            fused=len(sites),
            normalised=normalised,
            attention=total,
            softmax_left=left,
            scales=sorted({round(s.scale, 8) for s in sites}),
        )
        if left:
            report.warnings.append(f"{len(left)} Softmax node(s) left unfused (see skipped for the reasons)")
        check_count(report, "Attention ops", total, config.expected, config.strict)
    return report


# ---------------------------------------------------------------------------------------------------------
# matching


def _match(softmax: gs.Node, graph: gs.Graph) -> _Site:
    if graph.opset < 13:
        raise _MissError(f"opset {graph.opset} Softmax flattens to 2-D (axis semantics before opset 13)")
    probs = softmax.outputs[0]
    users = probs.outputs
    if len(users) != 1 or users[0].op != "MatMul" or users[0].inputs[0] is not probs:
        raise _MissError(f"its output feeds {[u.op for u in users]}, not only the first input of one MatMul (P·V)")
    graph_outputs = frozenset(t.name for t in graph.outputs)
    if probs.name in graph_outputs:
        raise _MissError(f"the attention probabilities {probs.name!r} are a graph output")
    output = users[0]
    chain = _descend(softmax.inputs[0], 1.0, None, graph_outputs)
    q, q_scale = _strip_scale(chain.matmul.inputs[0])
    kt, k_scale = _strip_scale(chain.matmul.inputs[1])
    k, k_perm = kt, [0, 1, 3, 2]
    transpose = _producer(kt)
    if transpose is not None and transpose.op == "Transpose" and len(transpose.attrs.get("perm", [])) == 4:
        perm = [int(p) for p in transpose.attrs["perm"]]
        k, k_scale_inner = _strip_scale(transpose.inputs[0])
        k_scale *= k_scale_inner
        k_perm = [perm[0], perm[1], perm[3], perm[2]]
    rank = _rank(q)
    if rank is None and transpose is not None and transpose.op == "Transpose":
        rank = len(transpose.attrs.get("perm", []))
    if rank != 4:
        shown = rank if rank is not None else "unknown"
        raise _MissError(f"Q {q.name!r} has rank {shown}; the pass emits 4-D Attention only")
    axis = int(softmax.attrs.get("axis", -1))
    if axis not in (-1, 3):
        raise _MissError(f"softmax over axis {axis}, not the key axis (-1)")
    for name, tensor in (("K", k), ("V", output.inputs[1])):
        if _rank(tensor) not in (None, 4):
            raise _MissError(f"{name} {tensor.name!r} has rank {_rank(tensor)}, Q has rank 4")
    scale = chain.scale * q_scale * k_scale
    if not math.isfinite(scale) or scale == 0.0:
        raise _MissError(f"the combined scale {scale} is not a usable attention scale")
    if chain.view_tensor is not None:
        _check_view_terms(chain)
    return _Site(output, q, k, None if k_perm == [0, 1, 2, 3] else k_perm, output.inputs[1], chain, scale)


def _descend(
    x: gs.Tensor, factor: float, view: tuple[gs.Tensor, int] | None, outputs: frozenset[str], closed: bool = False
) -> _Chain:
    """Walk the logits from the softmax input down to MatMul(Q, Kᵀ), collecting scales and bias terms.

    ``view`` is (shape, allowzero) of the Reshape that maps a reshaped view back to the 4-D logits while the
    walk is inside that view; ``closed`` once the walk has left it again. ``outputs``: the graph's output
    names (an intermediate that is a graph output must stay).
    """
    node = _producer(x)
    if node is None:
        raise _MissError(f"the logits {x.name!r} are not computed from a Q·Kᵀ MatMul")
    if len(x.outputs) != 1 or x.name in outputs:
        raise _MissError(f"the logits tensor {x.name!r} is also used elsewhere ({[c.op for c in x.outputs]})")
    if node.op == "MatMul":
        if view is not None:
            raise _MissError("the logits are reshaped between Q·Kᵀ and the softmax without being reshaped back")
        return _Chain(node, factor)
    if node.op == "Identity":
        return _descend(node.inputs[0], factor, view, outputs, closed)
    if node.op in ("Mul", "Div"):
        const, rest = _scalar_operand(node)
        if const is None:
            raise _MissError(f"{node.op} {node.name!r} in the logits is not by a scalar constant; run fold_constants")
        return _descend(rest, factor * const if node.op == "Mul" else factor / const, view, outputs, closed)
    if node.op == "Reshape":
        if view is None and not closed:
            return _descend(node.inputs[0], factor, (node.inputs[1], int(node.attrs.get("allowzero", 0))), outputs)
        if view is not None:
            chain = _descend(node.inputs[0], factor, None, outputs, closed=True)
            chain.view_shape, chain.view_allowzero = view
            chain.view_tensor = x
            return chain
        raise _MissError("the logits go through more than one reshaped view")
    if node.op in ("Add", "Sub"):
        first_error: _MissError | None = None
        for spine in (0, 1) if node.op == "Add" else (0,):
            try:
                chain = _descend(node.inputs[spine], factor, view, outputs, closed)
            except _MissError as miss:
                first_error = first_error or miss
                continue
            sign = -1.0 if node.op == "Sub" else 1.0
            chain.terms.append(_Term(node.inputs[1 - spine], sign * factor, view is not None))
            return chain
        assert first_error is not None
        raise first_error
    raise _MissError(f"{node.op} {node.name!r} between Q·Kᵀ and the softmax is not a scale, bias or reshape")


def _check_view_terms(chain: _Chain) -> None:
    """Terms added in the reshaped view become the mask through the inverse Reshape, which is only valid
    when together they span the whole view (no axis left to broadcasting)."""
    view = chain.view_tensor
    assert view is not None
    terms = [t.tensor for t in chain.terms if t.in_view]
    if not terms:
        return
    shapes = [view.shape, *(t.shape for t in terms)]
    if any(s is None for s in shapes):
        raise _MissError(f"bias terms are added in a reshaped view ({view.name!r}) of unknown shape")
    rank = len(view.shape)
    for axis in range(1, rank + 1):
        dims = [t.shape[-axis] for t in terms if len(t.shape) >= axis]
        spanned = any(d not in (1, None) for d in dims)
        if view.shape[-axis] != 1 and not spanned:
            raise _MissError(
                f"the bias terms in the reshaped view {view.name!r} do not span axis {rank - axis} "
                f"(sizes {dims}, the view has {view.shape[-axis]})"
            )
        if view.shape[-axis] == 1 and spanned:
            raise _MissError(f"the bias terms in the reshaped view {view.name!r} enlarge axis {rank - axis}")
    if chain.view_shape is not None and _depends_on(chain.view_shape, chain.matmul.outputs[0]):
        raise _MissError("the reshape back to 4-D takes its shape from the logits themselves")


def _depends_on(tensor: gs.Tensor, target: gs.Tensor, budget: int = 256) -> bool:
    """Whether ``tensor`` is computed from ``target`` (a bounded walk: shape computations are small)."""
    stack, seen = [tensor], set()
    while stack and budget > 0:
        current = stack.pop()
        if current is target:
            return True
        if id(current) in seen or not current.inputs:
            continue
        seen.add(id(current))
        budget -= 1
        stack.extend(current.inputs[0].inputs)
    return bool(stack)  # budget exhausted: assume the worst


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def _rank(tensor: gs.Tensor) -> int | None:
    return len(tensor.shape) if tensor.shape is not None else None


def _scalar(tensor: gs.Tensor) -> float | None:
    if isinstance(tensor, gs.Constant) and int(np.prod(tensor.shape)) == 1:
        return float(np.asarray(tensor.values).reshape(-1)[0])
    return None


def _scalar_operand(node: gs.Node) -> tuple[float | None, gs.Tensor]:
    """(scalar constant, other input) of a binary Mul/Div; Div only by a constant divisor."""
    a, b = node.inputs[0], node.inputs[1]
    if _scalar(b) is not None:
        return _scalar(b), a
    if node.op == "Mul" and _scalar(a) is not None:
        return _scalar(a), b
    return None, a


def _strip_scale(tensor: gs.Tensor) -> tuple[gs.Tensor, float]:
    """Follow scalar-constant Mul/Div (and Identity) producers up from ``tensor``: (source, product of scales)."""
    factor = 1.0
    while (node := _producer(tensor)) is not None:
        if node.op == "Identity":
            tensor = node.inputs[0]
            continue
        if node.op not in ("Mul", "Div"):
            break
        const, rest = _scalar_operand(node)
        if const is None or const == 0.0:
            break
        factor = factor * const if node.op == "Mul" else factor / const
        tensor = rest
    return tensor, factor


# ---------------------------------------------------------------------------------------------------------
# rewriting


def _rewrite(graph: gs.Graph, site: _Site, index: int) -> int:
    def add(op: str, inputs: list[gs.Tensor], attrs: dict | None = None, dtype: object = None) -> gs.Tensor:
        nonlocal index
        name = node_name(PASS, index)
        index += 1
        out = gs.Variable(f"{name}/output", dtype=dtype)
        graph.nodes.append(gs.Node(op, name=name, attrs=attrs or {}, inputs=inputs, outputs=[out]))
        return out

    def scaled(term: _Term) -> gs.Tensor:
        if term.factor == 1.0:
            return term.tensor
        dtype = term.tensor.dtype if term.tensor.dtype is not None else np.float32
        factor = gs.Constant(f"{node_name(PASS, index)}/factor", np.asarray(term.factor, dtype=dtype))
        return add("Mul", [term.tensor, factor], dtype=term.tensor.dtype)

    def total(parts: list[gs.Tensor]) -> gs.Tensor:
        result = parts[0]
        for part in parts[1:]:
            result = add("Add", [result, part], dtype=result.dtype)
        return result

    chain = site.chain
    parts: list[gs.Tensor] = []
    in_view = [scaled(t) for t in chain.terms if t.in_view]
    if in_view:
        assert chain.view_shape is not None
        attrs = {"allowzero": chain.view_allowzero} if chain.view_allowzero else {}
        parts.append(add("Reshape", [total(in_view), chain.view_shape], attrs, dtype=in_view[0].dtype))
    parts.extend(scaled(t) for t in chain.terms if not t.in_view)
    k = site.k if site.k_perm is None else add("Transpose", [site.k], {"perm": site.k_perm}, dtype=site.k.dtype)
    inputs = [site.q, k, site.v] + ([total(parts)] if parts else [])
    result = site.output.outputs[0]
    site.output.outputs.clear()
    name = node_name(PASS, index)
    graph.nodes.append(gs.Node("Attention", name=name, attrs={"scale": float(site.scale)}, inputs=inputs,
                               outputs=[result]))  # fmt: skip
    return index + 1


def _normalise(node: gs.Node, report: PassReport) -> int:
    """Make an existing Attention node what TensorRT's importer accepts: Q/K/V (+ mask) only, one used output,
    an explicit scale. Returns 1 when it was changed."""
    name = node.name
    extra_inputs = [t for t in node.inputs[4:] if t.name]
    used_outputs = [i for i, t in enumerate(node.outputs) if i > 0 and t.outputs]
    if extra_inputs or used_outputs:
        report.skipped.append(f"Attention {name!r}: uses past_key/value or extra outputs, which TensorRT rejects")
        return 0
    changed = 0
    if len(node.outputs) > 1:
        while len(node.outputs) > 1:
            node.outputs.pop()  # slice deletion is not synchronised by onnx-graphsurgeon
        changed = 1
    if node.attrs.get("scale") is None:
        q = node.inputs[0]
        heads = node.attrs.get("q_num_heads")
        hidden = q.shape[-1] if q.shape else None
        if not isinstance(hidden, int) or (_rank(q) == 3 and not heads):
            report.skipped.append(f"Attention {name!r}: no scale attribute and the head size of {q.name!r} is unknown")
            return changed
        head_dim = hidden // int(heads) if _rank(q) == 3 else hidden
        node.attrs["scale"] = float(1.0 / math.sqrt(head_dim))  # the op's default, made explicit
        changed = 1
    return changed
