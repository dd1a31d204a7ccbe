"""What precision plans and the FP16 passes need to know about a graph.

* which tensors carry float data that depends on the graph's input *values* ("dynamic"); float tensors computed
  only from shapes and constants (RoPE tables from ``Range``, masks from ``ConstantOfShape``) are "static" and
  stay FP32: TensorRT folds them at build time, and FP16 there would only round index arithmetic;
* which nodes could compute in FP16 ("eligible"), and which input slots must keep their dtype whatever the node
  computes in (Resize scales, the input of Shape or Cast);
* the dtype every consumer slot wants under a given assignment, so that casts can be counted before any edit;
* estimated FLOPs and accumulation depth per node, from shapes.

Everything here reads the graph; nothing edits it except :func:`infer_types`, which only fills missing dtypes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)

FP32 = np.dtype(np.float32)
FP16 = np.dtype(np.float16)
FLOATS = (FP32, FP16)
PRECISION_DTYPES: dict[str, np.dtype] = {"fp16": FP16, "fp32": FP32}
ONNX_TYPE = {FP32: onnx.TensorProto.FLOAT, FP16: onnx.TensorProto.FLOAT16}
FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest positive subnormal; anything smaller becomes 0

# Slots that accept any dtype: never cast in front of them (a Cast or Shape reads FP16 as well as FP32).
ANY_DTYPE_SLOTS: dict[str, tuple[int, ...]] = {"Cast": (0,), "CastLike": (0,), "Shape": (0,), "Size": (0,)}
# Slots ONNX types independently of the data: Resize ``scales`` must be FP32 by the standard and its ``roi``
# keeps whatever it had (AutoCast keeps Resize scale inputs high as well).
KEEP_DTYPE_SLOTS: dict[str, tuple[int, ...]] = {"Resize": (1, 2), "Upsample": (1,)}
# Ops that never compute in FP16: ONNX defines no FP16 Range; CumSum is an unbounded accumulation; ordering and
# box ops (TopK, NonMaxSuppression, RoiAlign) change results on FP16 ties; control flow keeps its subgraph types;
# random/eye generators take their dtype from an attribute.
NEVER_FP16_OPS = frozenset(
    {
        "Range",
        "CumSum",
        "NonMaxSuppression",
        "RoiAlign",
        "TopK",
        "Upsample",
        "If",
        "Loop",
        "Scan",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "EyeLike",
    }
)
MATRIX_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Attention", "Einsum"})
# Ops whose output holds exactly the input's values (same multiset): their statistics are the input's.
VALUE_PRESERVING_OPS = frozenset(
    {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten", "DepthToSpace", "SpaceToDepth"}
)
_SHAPE_OPS = frozenset({"Shape", "Size"})
# Passes that insert boundary Casts; their Casts are never planned (a second run must leave them alone).
CAST_PASS_NAMES = ("convert_fp16", "apply_precision_plan")


def is_boundary_cast(node: gs.Node) -> bool:
    return node.op == "Cast" and node.name.split("/", 1)[0] in CAST_PASS_NAMES


def np_dtype(tensor: gs.Tensor) -> np.dtype | None:
    """The tensor's numpy dtype, or None when unknown (or a type numpy lacks)."""
    dtype = tensor.dtype
    if dtype is None:
        return None
    try:
        return np.dtype(dtype)
    except TypeError:
        return None


def is_float(tensor: gs.Tensor) -> bool:
    return bool(tensor.name) and np_dtype(tensor) in FLOATS


def constant_values(tensor: gs.Tensor) -> np.ndarray | None:
    """Values of an initializer or of a ``Constant`` node's output; None for anything computed at run time."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1:
        producer = tensor.inputs[0]
        value = producer.attrs.get("value") if producer.op == "Constant" else None
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None


def is_constant_source(tensor: gs.Tensor) -> bool:
    if isinstance(tensor, gs.Constant):
        return True
    if len(tensor.inputs) != 1 or tensor.inputs[0].op != "Constant":
        return False
    return isinstance(tensor.inputs[0].attrs.get("value"), gs.Constant)


def implicit_uses(node: gs.Node) -> list[tuple[gs.Node, int]]:
    """(inner node, slot) pairs where a subgraph of ``node`` reads a tensor of an enclosing graph."""
    uses: list[tuple[gs.Node, int]] = []
    for sub in node.subgraphs():
        _foreign_uses(sub, set(), uses)
    return uses


def _foreign_uses(sub: gs.Graph, outer_local: set[str], uses: list[tuple[gs.Node, int]]) -> None:
    local = {t.name for t in sub.inputs} | {t.name for n in sub.nodes for t in n.outputs}
    for inner in sub.nodes:
        for slot, tensor in enumerate(inner.inputs):
            if tensor.name and tensor.name not in local and tensor.name not in outer_local:
                if not isinstance(tensor, gs.Constant):
                    uses.append((inner, slot))
        for nested in inner.subgraphs():
            _foreign_uses(nested, outer_local | local, uses)


def infer_types(graph: gs.Graph) -> dict[str, tuple[np.dtype | None, tuple[int | str | None, ...] | None]]:
    """Fill in missing dtypes of the graph's tensors with ONNX shape inference; return (dtype, shape) by name.

    Inference runs on a copy whose large initializers are replaced by typed graph inputs, so it costs no weight
    copies and works for models over protobuf's 2 GB limit.
    """
    skeleton = graph.copy()
    placeholders = []
    for tensor in skeleton.tensors().values():
        if isinstance(tensor, gs.Constant) and int(np.prod(tensor.shape)) > 64:
            const_dtype, const_shape = tensor.dtype, list(tensor.shape)
            tensor.to_variable(const_dtype, const_shape)
            tensor.type = "tensor_type"  # Constant.to_variable (gs 0.6.1) leaves this unset; export reads it
            placeholders.append(tensor)
    skeleton.inputs = [*skeleton.inputs, *placeholders]
    model = gs.export_onnx(skeleton, do_type_check=False)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except onnx.shape_inference.InferenceError as err:  # partial results are still in the model
        log.warning("shape inference stopped early (%s); unknown dtypes stay unknown", " ".join(str(err).split())[:200])
    inferred: dict[str, tuple[np.dtype | None, tuple[int | str | None, ...] | None]] = {}
    for info in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        ttype = info.type.tensor_type
        if not info.type.HasField("tensor_type") or ttype.elem_type == 0:
            continue
        try:
            dtype: np.dtype | None = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        except (KeyError, TypeError):
            dtype = None
        shape: tuple[int | str | None, ...] | None = None
        if ttype.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in ttype.shape.dim)
        inferred[info.name] = (dtype, shape)
    filled = 0
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Variable) and name and tensor.dtype is None and name in inferred:
            dtype = inferred[name][0]
            if dtype is not None:
                tensor.dtype = dtype
                filled += 1
    log.debug("infer_types: filled %d dtypes", filled)
    return inferred


def fill_missing_dtypes(graph: gs.Graph) -> None:
    """Run :func:`infer_types` only when some tensor of ``graph`` has no dtype yet."""
    if any(isinstance(t, gs.Variable) and t.name and t.dtype is None for t in graph.tensors().values()):
        infer_types(graph)


@dataclass
class GraphFacts:
    """Read-only analysis of an (outer) graph: dynamic tensors, eligible nodes, stable keys."""

    graph: gs.Graph
    dynamic: set[str] = field(default_factory=set)
    eligible: list[gs.Node] = field(default_factory=list)
    ineligible_reason: dict[int, str] = field(default_factory=dict)
    keys: dict[int, str] = field(default_factory=dict)  # id(node) -> plan key
    by_key: dict[str, gs.Node] = field(default_factory=dict)
    ordinal: dict[int, int] = field(default_factory=dict)  # id(node) -> index among nodes of its op

    @classmethod
    def of(cls, graph: gs.Graph) -> GraphFacts:
        facts = cls(graph)
        facts._find_dynamic()
        facts._assign_keys()
        for node in graph.nodes:
            reason = facts._why_not_eligible(node)
            if reason is None:
                facts.eligible.append(node)
            else:
                facts.ineligible_reason[id(node)] = reason
        return facts

    def _find_dynamic(self) -> None:
        self.dynamic = {t.name for t in self.graph.inputs if t.name}
        for node in self.graph.nodes:
            if node.op in _SHAPE_OPS or node.op == "Constant":
                continue
            reads = [t.name for t in node.inputs] + [inner.inputs[slot].name for inner, slot in implicit_uses(node)]
            if any(name in self.dynamic for name in reads if name):
                self.dynamic.update(t.name for t in node.outputs if t.name)

    def _assign_keys(self) -> None:
        names: dict[str, int] = {}
        for node in self.graph.nodes:
            names[node.name] = names.get(node.name, 0) + 1
        counters: dict[str, int] = {}
        for node in self.graph.nodes:
            k = counters.get(node.op, 0)
            counters[node.op] = k + 1
            self.ordinal[id(node)] = k
            key = node.name if node.name and names[node.name] == 1 else f"{node.op}#{k}"
            self.keys[id(node)] = key
            self.by_key[key] = node

    def _why_not_eligible(self, node: gs.Node) -> str | None:
        if node.domain not in ("", "ai.onnx", None):
            return f"custom domain {node.domain}"
        if node.op in NEVER_FP16_OPS:
            return f"{node.op} never computes in FP16"
        if any(True for _ in node.subgraphs()):
            return "has subgraphs"
        if node.op == "Constant":
            return "constant"
        if is_boundary_cast(node):
            return "boundary cast of a precision pass"
        skip = (*ANY_DTYPE_SLOTS.get(node.op, ()), *KEEP_DTYPE_SLOTS.get(node.op, ()))
        data_inputs = [t for slot, t in enumerate(node.inputs) if slot not in skip and is_float(t)]
        if not data_inputs and not any(is_float(t) for t in node.outputs):
            return "no float tensors it could retype"
        if not any(t.name in self.dynamic for t in node.outputs):
            return "static (computed from shapes and constants only)"
        return None

    def key(self, node: gs.Node) -> str:
        return self.keys[id(node)]

    def consumers(self, tensor: gs.Tensor) -> list[gs.Node]:
        """Unique consumer nodes (subgraph nodes included), in first-use order."""
        seen: dict[int, gs.Node] = {}
        for node in tensor.outputs:
            seen.setdefault(id(node), node)
        return list(seen.values())


def wanted_dtype(node: gs.Node, slot: int, current: np.dtype | None, target: np.dtype | None) -> np.dtype | None:
    """The dtype ``node`` needs at input ``slot``: None when any dtype will do.

    ``current`` is the slot's dtype before any change, ``target`` the node's planned precision (None for nodes
    left as they are, which keep what they had).
    """
    if slot in ANY_DTYPE_SLOTS.get(node.op, ()):
        return None
    if target is None or slot in KEEP_DTYPE_SLOTS.get(node.op, ()) or current not in FLOATS:
        return current
    return target


ShapeFn = Callable[[gs.Tensor], "tuple[int, ...] | None"]


def static_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    shape = tensor.shape
    if shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


def node_flops(node: gs.Node, shape_of: ShapeFn) -> int:
    """Multiply-adds x 2 of the matrix ops (MatMul, Gemm, Conv, ConvTranspose, Attention); 0 for the rest."""
    ins = [shape_of(t) if t.name else None for t in node.inputs]
    outs = [shape_of(t) for t in node.outputs]
    depth = reduction_depth(node, shape_of)
    if node.op in ("MatMul", "Gemm", "Conv") and outs and outs[0] is not None and depth is not None:
        return 2 * int(np.prod(outs[0], dtype=np.int64)) * depth
    if node.op == "ConvTranspose" and ins and ins[0] is not None and len(ins) > 1 and ins[1] is not None:
        weight = ins[1]  # (C_in, C_out / group, k...)
        return 2 * int(np.prod(ins[0], dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64))
    if node.op == "Attention" and len(ins) >= 3 and all(s is not None for s in ins[:3]):
        return _attention_flops(node, ins[0], ins[1], ins[2])  # type: ignore[arg-type]
    return 0


def _attention_flops(node: gs.Node, q: tuple[int, ...], k: tuple[int, ...], v: tuple[int, ...]) -> int:
    if not len(q) == len(k) == len(v) or len(q) not in (3, 4):
        return 0  # not a layout the standard allows
    if len(q) == 4:  # (B, H, S, D)
        batch, heads, sq, dk = q
        skv, dv = k[2], v[3]
    else:  # (B, S, H*D) with q_num_heads / kv_num_heads
        heads = int(node.attrs.get("q_num_heads", 1))
        kv_heads = int(node.attrs.get("kv_num_heads", heads))
        batch, sq = q[0], q[1]
        dk, skv, dv = q[2] // heads, k[1], v[2] // kv_heads
    return 2 * batch * heads * sq * skv * (dk + dv)


def reduction_depth(node: gs.Node, shape_of: ShapeFn) -> int | None:
    """Terms summed per output element (K of a GEMM, C_in/group x kernel volume of a convolution)."""
    shapes = [shape_of(t) if t.name else None for t in node.inputs]
    if node.op == "MatMul" and shapes and shapes[0]:
        return shapes[0][-1]
    if node.op == "Gemm" and shapes and shapes[0]:
        return shapes[0][0] if int(node.attrs.get("transA", 0)) else shapes[0][-1]
    if node.op == "Conv" and len(shapes) > 1 and shapes[1]:
        return int(np.prod(shapes[1][1:], dtype=np.int64))
    if node.op == "ConvTranspose" and len(shapes) > 1 and shapes[1]:
        strides = node.attrs.get("strides") or [1] * (len(shapes[1]) - 2)
        kernel = int(np.prod(shapes[1][2:], dtype=np.int64))
        return max(1, shapes[1][0] * kernel // max(1, int(np.prod(strides))))
    if node.op == "Attention" and len(shapes) > 2 and shapes[0] and shapes[1]:
        return max(shapes[0][-1], shapes[1][-2])
    return None


def reduced_elements(node: gs.Node, shape_of: ShapeFn) -> int | None:
    """Number of input elements behind each output element of a Reduce* node (None if unknown)."""
    shape = shape_of(node.inputs[0]) if node.inputs else None
    if shape is None:
        return None
    axes_attr = node.attrs.get("axes")
    if axes_attr is not None:
        axes = [int(a) for a in axes_attr]
    elif len(node.inputs) > 1 and node.inputs[1].name:
        values = constant_values(node.inputs[1])
        if values is None:
            return None
        axes = [int(a) for a in values.reshape(-1)]
    else:
        axes = []
    if not axes:
        return 0 if int(node.attrs.get("noop_with_empty_axes", 0)) else int(np.prod(shape, dtype=np.int64))
    return int(np.prod([shape[a] for a in axes], dtype=np.int64))


def count_conversions(facts: GraphFacts, targets: dict[int, np.dtype]) -> tuple[int, int]:
    """(Cast nodes, converted initializer copies) that retyping the graph to ``targets`` would need.

    Mirrors what the retyping pass does: one Cast per tensor and target dtype, shared by all consumers; a
    constant wanted in a single other dtype is converted in place (no copy).
    """
    produced: dict[str, np.dtype] = {}
    for node in facts.graph.nodes:
        target = targets.get(id(node))
        if target is not None:
            produced.update((t.name, target) for t in node.outputs if is_float(t))
    casts: set[tuple[str, str]] = set()
    copies: dict[str, set[str]] = {}
    kept: set[str] = set()

    def need(tensor: gs.Tensor, wanted: np.dtype | None) -> None:
        have = produced.get(tensor.name, np_dtype(tensor))
        if not tensor.name or wanted is None or have is None:
            return
        constant = is_constant_source(tensor)
        if wanted == have:
            if constant:
                kept.add(tensor.name)
            return
        if constant:
            copies.setdefault(tensor.name, set()).add(wanted.str)
        else:
            casts.add((tensor.name, wanted.str))

    for node in facts.graph.nodes:
        target = targets.get(id(node))
        for slot, tensor in enumerate(node.inputs):
            need(tensor, wanted_dtype(node, slot, np_dtype(tensor), target))
        for inner, slot in implicit_uses(node):
            need(inner.inputs[slot], np_dtype(inner.inputs[slot]))
    for tensor in facts.graph.outputs:
        need(tensor, np_dtype(tensor))
    n_copies = sum(len(wanted) - (0 if name in kept else 1) for name, wanted in copies.items())
    return len(casts), n_copies
