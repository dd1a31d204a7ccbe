"""Clean-up passes engines like: constant folding (which also removes ``If`` nodes whose condition folds),
Einsum -> MatMul, and a check that LayerNormalization / Gelu stayed single ops.

``infer_shapes`` is the shared helper that puts ONNX shape inference results on a graph's tensors; constant
folding needs it (onnx-graphsurgeon folds ``Shape`` only for tensors whose shape is known) and
``fuse_attention`` uses it to check mask shapes.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from export_engine.errors import GraphPassError
from export_engine.graph_passes.base import PassReport, check_count, next_index, node_name, timed

# Weights above this many elements are replaced by typed graph inputs in the copy handed to shape inference,
# so inference never serialises the weights (and works for graphs over protobuf's 2 GB limit).
_INFERENCE_CONSTANT_LIMIT = 1024


def infer_shapes(graph: gs.Graph) -> int:
    """Run ONNX shape inference (with data propagation) and store the dtypes and shapes on ``graph``'s
    intermediate tensors, in place. Graph inputs and outputs keep the shapes the spec stamped on them.

    Returns how many tensors received a shape.
    """
    skeleton = graph.copy()  # copies nodes and tensors, shares the weight arrays
    stand_ins: dict[str, gs.Variable] = {}
    for node in skeleton.nodes:
        for i, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and int(np.prod(tensor.shape)) > _INFERENCE_CONSTANT_LIMIT:
                if tensor.name not in stand_ins:
                    stand_ins[tensor.name] = gs.Variable(tensor.name, dtype=tensor.dtype, shape=list(tensor.shape))
                node.inputs[i] = stand_ins[tensor.name]
    skeleton.inputs = [*skeleton.inputs, *stand_ins.values()]
    model = gs.export_onnx(skeleton, do_type_check=False)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except onnx.shape_inference.InferenceError as err:
        raise GraphPassError(f"ONNX shape inference failed on graph {graph.name!r}: {err}") from err
    known = gs.import_onnx(inferred).tensors()
    boundary = {t.name for t in (*graph.inputs, *graph.outputs)}
    updated = 0
    for name, tensor in graph.tensors().items():
        found = known.get(name)
        if not isinstance(tensor, gs.Variable) or name in boundary or found is None or found.shape is None:
            continue
        tensor.shape = list(found.shape)
        if found.dtype is not None:
            tensor.dtype = found.dtype
        updated += 1
    return updated


# ---------------------------------------------------------------------------------------------------------
# fold_constants


@dataclass(frozen=True)
class FoldConstantsConfig:
    # Graph input shapes to declare before folding (the spec's: ints are static, names stay dynamic). Empty:
    # keep the shapes the exporter stamped (onnx_from_torch already stamps the spec's).
    input_shapes: Mapping[str, tuple[int | str, ...]] = field(default_factory=dict)
    max_rounds: int = 4  # inference -> fold rounds; each round can expose shapes the previous one fixed
    size_threshold: int | None = None  # bytes; larger folded tensors stay computed at run time


def fold_constants(graph: gs.Graph, config: FoldConstantsConfig) -> PassReport:
    """Fold constants and static shapes (onnx-graphsurgeon, evaluated by ONNX Runtime), flatten ``If`` nodes
    whose condition folds, then clean up.

    The TorchScript exporter writes ``tensor.squeeze(dim)`` as ``If(Shape(x)[dim] == 1)`` when it cannot
    see the size: the FastSAM3D encoder's relative-position terms (``models/fastsam3d/image_encoder.py``,
    ``RelPosAttention3D._rel_pos_terms``, the three ``.squeeze(-2)``) give three ``If`` per attention block.
    With shapes inferred, the condition folds and the ``If`` is replaced by its taken branch.
    """
    report = PassReport("fold_constants")
    with timed(report):
        _declare_input_shapes(graph, config.input_shapes)
        before = Counter(n.op for n in graph.nodes)
        rounds = 0
        while rounds < config.max_rounds:
            rounds += 1
            count = len(graph.nodes)
            infer_shapes(graph)
            _fold_once(graph, config.size_threshold, report)
            graph.cleanup().toposort()
            if len(graph.nodes) == count:
                break
        infer_shapes(graph)  # leave the graph with shapes consistent with what was folded
        after = Counter(n.op for n in graph.nodes)
        report.matched = sum(before.values())
        report.rewritten = sum(before.values()) - sum(after.values())
        for node in graph.nodes:
            if node.op == "If":
                report.skipped.append(
                    f"If node {node.name!r}: its condition {node.inputs[0].name!r} depends on run-time values, "
                    "so the branch cannot be chosen at build time"
                )
        report.details = {
            "nodes_before": sum(before.values()),
            "nodes_after": sum(after.values()),
            "rounds": rounds,
            "if_before": before.get("If", 0),
            "if_after": after.get("If", 0),
            "shape_ops_after": after.get("Shape", 0),
        }
    return report


def _fold_once(graph: gs.Graph, size_threshold: int | None, report: PassReport) -> None:
    """One folding round over the whole graph at once (fast); if ONNX Runtime fails on the foldable part,
    again in partitions so that one bad node only blocks its own partition (~30x slower)."""
    options = {"fold_shapes": True, "recurse_subgraphs": True, "flatten_subgraphs": True,
               "size_threshold": size_threshold}  # fmt: skip
    try:
        graph.fold_constants(partitioning=None, error_ok=False, **options)
    except Exception as err:  # onnx-graphsurgeon re-raises whatever ONNX Runtime or the exporter raised
        message = f"folding the whole graph failed ({type(err).__name__}: {' '.join(str(err).split())[:200]}); " \
                  "folded partition by partition"  # fmt: skip
        report.warnings.append(message)  # logged by the pipeline with the report
        graph.fold_constants(partitioning="basic", error_ok=True, **options)


def _declare_input_shapes(graph: gs.Graph, shapes: Mapping[str, tuple[int | str, ...]]) -> None:
    inputs = {t.name: t for t in graph.inputs}
    for name, shape in shapes.items():
        tensor = inputs.get(name)
        if tensor is None:
            raise GraphPassError(f"fold_constants: the spec declares input {name!r}; the graph has {sorted(inputs)}")
        if tensor.shape is not None and len(tensor.shape) != len(shape):
            raise GraphPassError(
                f"fold_constants: input {name!r} has rank {len(tensor.shape)} ({tensor.shape}), the spec declares "
                f"{tuple(shape)}; re-export the graph"
            )
        tensor.shape = list(shape)


# ---------------------------------------------------------------------------------------------------------
# replace_einsum


@dataclass(frozen=True)
class ReplaceEinsumConfig:
    strict: bool = False  # an Einsum that is not a plain (batched) matmul raises instead of being reported


def replace_einsum(graph: gs.Graph, config: ReplaceEinsumConfig) -> PassReport:
    """Rewrite every two-operand Einsum that is a plain batched matmul as Transpose -> MatMul -> Transpose.

    Such an Einsum has one contracted letter, at most one free letter per operand, batch letters shared by
    both operands and the output, and no repeated letters or ellipsis. Anything else is reported as skipped.
    """
    report = PassReport("replace_einsum")
    with timed(report):
        index = next_index(graph, report.name)
        for node in [n for n in graph.nodes if n.op == "Einsum"]:
            report.matched += 1
            plan = _einsum_plan(str(node.attrs.get("equation", "")), len(node.inputs))
            if isinstance(plan, str):
                report.skipped.append(f"Einsum {node.name!r}: {plan}")
                continue
            index = _rewrite_einsum(graph, node, plan, index)
            report.rewritten += 1
        if config.strict and report.skipped:
            raise GraphPassError(f"replace_einsum: {'; '.join(report.skipped)} (--strict)")
        graph.cleanup().toposort()
    return report


@dataclass(frozen=True)
class _EinsumPlan:
    perm_a: list[int]  # operand A -> [batch..., m, k] (m may be absent: then no row axis)
    perm_b: list[int]  # operand B -> [batch..., k, n]
    perm_out: list[int]  # [batch..., m, n] -> output order


def _einsum_plan(equation: str, num_inputs: int) -> _EinsumPlan | str:
    eq = equation.replace(" ", "")
    if num_inputs != 2 or "->" not in eq or eq.count(",") != 1:
        return f"equation {equation!r} is not a two-operand einsum with an explicit output"
    if "." in eq:
        return f"equation {equation!r} uses an ellipsis (ranks are not part of the equation)"
    lhs, out = eq.split("->")
    a, b = lhs.split(",")
    if any(len(set(term)) != len(term) or not set(term) <= set(string.ascii_letters) for term in (a, b, out)):
        return f"equation {equation!r} repeats a letter within an operand (a diagonal or trace)"
    batch = [c for c in out if c in a and c in b]
    contracted = [c for c in a if c in b and c not in out]
    free_a = [c for c in a if c not in b]
    free_b = [c for c in b if c not in a]
    if len(contracted) != 1 or len(free_a) != 1 or len(free_b) != 1 or set(free_a + free_b) - set(out):
        return f"equation {equation!r} is not a plain matmul (one contracted letter, one free letter per operand)"
    if len(out) != len(batch) + 2:
        return f"equation {equation!r} sums over a letter of a single operand"
    k, m, n = contracted[0], free_a[0], free_b[0]
    order_out = [*batch, m, n]
    return _EinsumPlan(
        perm_a=[a.index(c) for c in [*batch, m, k]],
        perm_b=[b.index(c) for c in [*batch, k, n]],
        perm_out=[order_out.index(c) for c in out],
    )


def _rewrite_einsum(graph: gs.Graph, node: gs.Node, plan: _EinsumPlan, index: int) -> int:
    def transpose(tensor: gs.Tensor, perm: list[int]) -> gs.Tensor:
        nonlocal index
        if perm == sorted(perm):
            return tensor
        name = node_name("replace_einsum", index)
        index += 1
        out = gs.Variable(f"{name}/output", dtype=tensor.dtype)
        graph.nodes.append(gs.Node("Transpose", name=name, attrs={"perm": perm}, inputs=[tensor], outputs=[out]))
        return out

    a = transpose(node.inputs[0], plan.perm_a)
    b = transpose(node.inputs[1], plan.perm_b)
    result = node.outputs[0]
    node.outputs.clear()
    name = node_name("replace_einsum", index)
    index += 1
    if plan.perm_out == sorted(plan.perm_out):
        graph.nodes.append(gs.Node("MatMul", name=name, inputs=[a, b], outputs=[result]))
        return index
    product = gs.Variable(f"{name}/output", dtype=result.dtype)
    graph.nodes.append(gs.Node("MatMul", name=name, inputs=[a, b], outputs=[product]))
    name = node_name("replace_einsum", index)
    attrs = {"perm": plan.perm_out}
    graph.nodes.append(gs.Node("Transpose", name=name, attrs=attrs, inputs=[product], outputs=[result]))
    return index + 1


# ---------------------------------------------------------------------------------------------------------
# check_fused_norms


@dataclass(frozen=True)
class CheckFusedNormsConfig:
    expected_layer_norms: int | None = None  # from ModelSpec.expected_counts.get("layer_norm")
    expected_gelus: int | None = None  # from ModelSpec.expected_counts.get("gelu")
    strict: bool = False


def check_fused_norms(graph: gs.Graph, config: CheckFusedNormsConfig) -> PassReport:
    """Check that LayerNorm and GELU are single ``LayerNormalization`` / ``Gelu`` ops and report any that were
    written out as primitives. Changes nothing.

    A decomposed norm over the trailing axis should have been one LayerNormalization (TensorRT then keeps it
    in one FP32-capable layer); under ``strict`` it is an error. A decomposed norm over other axes (the
    channel-first ``LayerNorm3d`` of FastSAM3D, mean over axis 1) cannot be one LayerNormalization, which
    normalises trailing axes; it is reported so that hybrid precision keeps it in FP32. ``Erf`` outside a
    Gelu means a GELU written out by hand.
    """
    report = PassReport("check_fused_norms")
    with timed(report):
        ops = Counter(n.op for n in graph.nodes)
        report.matched = ops.get("LayerNormalization", 0) + ops.get("Gelu", 0)
        decomposed = [_decomposed_norm(n) for n in graph.nodes if n.op == "ReduceMean"]
        found = [d for d in decomposed if d is not None]
        trailing = [name for name, (axes, rank) in found if _is_trailing(axes, rank)]
        other = [f"{name} (axes {axes} of rank {rank})" for name, (axes, rank) in found if not _is_trailing(axes, rank)]
        for item in other:
            report.skipped.append(f"decomposed norm at {item}: not over the last axis, left as primitives")
        problems = [f"decomposed LayerNorm over the last axis at {name}" for name in trailing]
        if ops.get("Erf", 0):
            problems.append(f"{ops['Erf']} Erf node(s): a GELU written out as primitives")
        for problem in problems:
            if config.strict:
                raise GraphPassError(f"check_fused_norms: {problem} (--strict); export it as one op")
            report.warnings.append(f"check_fused_norms: {problem}")
        check_count(report, "LayerNormalization ops", ops.get("LayerNormalization", 0),
                    config.expected_layer_norms, config.strict)  # fmt: skip
        check_count(report, "Gelu ops", ops.get("Gelu", 0), config.expected_gelus, config.strict)
        report.details = {
            "layer_norm": ops.get("LayerNormalization", 0),
            "gelu": ops.get("Gelu", 0),
            "decomposed_norms": [name for name, _ in found],
            "erf": ops.get("Erf", 0),
        }
    return report


def _decomposed_norm(mean: gs.Node) -> tuple[str, tuple[list[int], int | None]] | None:
    """``ReduceMean(x) -> Sub(x, mean) -> Pow(., 2) | Mul(., .) -> ReduceMean -> ... -> Div(Sub, .)``:
    (name of the first ReduceMean, (its axes, the input rank)), else None."""
    x = mean.inputs[0]
    subs = [c for c in mean.outputs[0].outputs if c.op == "Sub" and c.inputs[0] is x]
    for sub in subs:
        centred = sub.outputs[0]
        squares = [c for c in centred.outputs if (c.op == "Pow") or (c.op == "Mul" and c.inputs[0] is c.inputs[1])]
        variance = [c for s in squares for c in s.outputs[0].outputs if c.op == "ReduceMean"]
        divides = [c for c in centred.outputs if c.op == "Div" and c.inputs[0] is centred]
        if variance and divides:
            return mean.name, _reduce_axes(mean, x)
    return None


def _is_trailing(axes: list[int], rank: int | None) -> bool:
    """Whether ``axes`` are the last ``len(axes)`` axes (what LayerNormalization normalises)."""
    if not axes:
        return False
    negative = sorted(a - rank if rank is not None and a >= 0 else a for a in axes)
    return negative == list(range(-len(axes), 0))


def _reduce_axes(node: gs.Node, x: gs.Tensor) -> tuple[list[int], int | None]:
    """(the axes a ReduceMean reduces, as written; the rank of its input when known)."""
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        axes = node.inputs[1].values.reshape(-1).tolist()
    return [int(a) for a in axes or []], len(x.shape) if x.shape is not None else None
