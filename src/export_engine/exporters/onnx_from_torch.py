"""torch module -> ONNX file, with external data when the weights do not fit protobuf's 2 GB limit."""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from export_engine.config import EXTERNAL_DATA_BYTES
from export_engine.core.types import ModelSpec
from export_engine.errors import OnnxExportError
from export_engine.progress import heartbeat

log = logging.getLogger(__name__)

# protobuf refuses messages over 2 GiB; keep a margin for the graph itself.
_INLINE_LIMIT_BYTES = 1_900_000_000
EXPORTERS = ("torchscript", "dynamo")


@dataclass(frozen=True)
class OnnxExportResult:
    path: Path
    data_files: tuple[Path, ...]  # external data files next to ``path`` (empty when inline)
    exporter: str
    opset: int
    seconds: float
    num_nodes: int
    parameter_bytes: int


def _parameter_bytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _expm1_symbolic(g: Any, x: Any) -> Any:
    # ONNX has no Expm1: Exp(x) - 1 loses relative precision only for |x| << 1e-3, where the MASt3R depth
    # scale is irrelevant (expm1 is applied to a norm that random and trained weights keep well above that).
    one = g.op("Constant", value_t=torch.tensor(1.0, dtype=torch.float32))
    return g.op("Sub", g.op("Exp", x), g.op("CastLike", one, x))


def onnx_from_torch(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: Path,
    spec: ModelSpec,
    exporter: str = "torchscript",
) -> OnnxExportResult:
    """Export ``module`` to ``path`` following ``spec`` (names, dynamic axes, opset).

    Weights over ~1.9 GB go to one external data file ``<path>.data`` (TensorRT and ONNX Runtime read it).
    """
    if exporter not in EXPORTERS:
        raise OnnxExportError(f"unknown exporter {exporter!r}; choose one of: {', '.join(EXPORTERS)}")
    path = Path(path)
    param_bytes = _parameter_bytes(module)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}-export-", dir=path.parent) as tmp:
        raw = Path(tmp) / path.name
        with heartbeat(f"exporting {spec.name} ({param_bytes / 1e9:.2f} GB of weights, {exporter})"):
            try:
                _export(module, example_inputs, raw, spec, exporter, param_bytes > _INLINE_LIMIT_BYTES)
            except OnnxExportError:
                raise
            except Exception as err:  # the exporters raise many unrelated types
                raise OnnxExportError(
                    f"ONNX export of graph {spec.name!r} failed ({type(err).__name__}: "
                    f"{' '.join(str(err).split())[:300]}); rerun with --debug for the traceback"
                ) from err
        proto = onnx.load(str(raw), load_external_data=True)
    _stamp_io_shapes(proto, spec)
    num_nodes = len(proto.graph.node)
    data_files = _save(proto, path, external=param_bytes > EXTERNAL_DATA_BYTES)
    del proto
    seconds = time.perf_counter() - start
    log.info(
        "exported %s: %d nodes, opset %d, %.1f s%s",
        spec.name,
        num_nodes,
        spec.opset,
        seconds,
        f", weights in {data_files[0].name}" if data_files else "",
    )
    return OnnxExportResult(path, tuple(data_files), exporter, spec.opset, seconds, num_nodes, param_bytes)


def _export(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    raw: Path,
    spec: ModelSpec,
    exporter: str,
    external: bool,
) -> None:
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings are noise for users
        if exporter == "torchscript":
            torch.onnx.register_custom_op_symbolic("aten::expm1", _expm1_symbolic, 9)
            torch.onnx.export(
                module,
                example_inputs,
                str(raw),
                dynamo=False,
                opset_version=spec.opset,
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_axes=spec.dynamic_axes() or None,
                do_constant_folding=True,
            )
        else:
            dynamic_shapes = _dynamo_dynamic_shapes(spec)
            program = torch.onnx.export(
                module,
                example_inputs,
                dynamo=True,
                opset_version=spec.opset,
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_shapes=dynamic_shapes,
                external_data=external,
                optimize=True,
                verbose=False,
            )
            if program is None:
                raise OnnxExportError(f"dynamo export of {spec.name!r} returned no program")
            program.save(str(raw), external_data=external)


def _dynamo_dynamic_shapes(spec: ModelSpec) -> tuple[dict[int, object], ...] | None:
    axes = spec.dynamic_axes()
    if not axes:
        return None
    dims: dict[str, object] = {}
    shapes = []
    for tensor in spec.inputs:
        named = {}
        for i, dim in enumerate(tensor.shape):
            if isinstance(dim, str):
                named[i] = dims.setdefault(dim, torch.export.Dim(dim))
        shapes.append(named)
    return tuple(shapes)


def _stamp_io_shapes(proto: onnx.ModelProto, spec: ModelSpec) -> None:
    """Declare the spec's I/O shapes on the graph.

    The exporters' symbolic shape inference sometimes names static dims after unrelated symbols (the
    TorchScript exporter called MASt3R's output height 'batch'); the spec is the contract, and the parity
    gate checks the real output shapes against PyTorch.
    """
    declared = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for value in [*proto.graph.input, *proto.graph.output]:
        tensor = declared.get(value.name)
        if tensor is None:
            raise OnnxExportError(f"graph {spec.name!r}: exported I/O {value.name!r} is not declared by its spec")
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(tensor.shape):
            raise OnnxExportError(
                f"graph {spec.name!r}: {value.name} has rank {len(dims)}, the spec declares {tensor.shape}"
            )
        for dim, want in zip(dims, tensor.shape, strict=True):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want


def _save(proto: onnx.ModelProto, path: Path, external: bool) -> list[Path]:
    """Write the graph; with ``external`` all weights go to one ``<name>.data`` file next to it."""
    if not external:
        onnx.save_model(proto, str(path))
        return []
    data = path.with_name(path.name + ".data")
    # save_model appends to an existing data file (measured pitfall): always start from nothing.
    data.unlink(missing_ok=True)
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    return [data] if data.exists() else []
