"""ONNX Runtime's CUDA provider with inputs and outputs in device memory: the GPU path where no engine runs.

    runner = CudaGraphRunner(artifact / "encoder.onnx", graph_meta, CudaSessionConfig(cuda_graph=True))
    tokens = runner.run({"images": images_cuda})["tokens"]      # torch CUDA tensors in and out

* I/O binding: inputs are bound where they already are (torch CUDA tensors), outputs to buffers allocated
  once per input-shape signature from the graph's declared shapes (named dims resolved from the inputs), so a
  run copies nothing through the host.
* CUDA graphs (``cuda_graph=True``): ONNX Runtime captures the whole graph on first use of a shape signature
  and replays it afterwards (one ``gpu_graph_id`` per signature, so a few different shapes can each have one).
  Captured graphs read fixed addresses: inputs are copied into per-signature buffers first. Every node must
  run on CUDA for a capture; session creation fails otherwise, and the error says so.
* Lowering for ONNX Runtime, in memory: ``patch_conv`` (default on) rewrites kernel == stride convolutions
  as MatMuls (:mod:`export_engine.graph_passes.lower_patch_conv`; cuDNN ran them with slow direct kernels),
  ``im2col`` (off by default) stride-1 2-D convolutions as im2col + MatMul (:mod:`...lower_conv_im2col`:
  0.5x to 0.9x the speed of cuDNN on DPT-shaped FP16 convolutions, bench/RESULTS.md). ONNX Runtime's
  ``prefer_nhwc`` was tried too: it leaves nodes on the CPU, so no CUDA graph can be captured.
* Attention: the artifact's graphs keep the standard ``Attention`` op, which is what TensorRT wants.
  ``attention="fused"`` runs it as is (ONNX Runtime >= 1.31 dispatches it to flash or memory-efficient
  attention kernels); ``"decomposed"`` rewrites it into MatMul/Softmax/MatMul first
  (:mod:`export_engine.graph_passes.decompose_attention`). Which is faster depends on the model (measured on
  an H100, bench/RESULTS.md): each family says which it wants (``FamilySpec.ort_attention``);
  ``DEFAULT_ATTENTION`` is for graphs outside a family. The artifact's files are never changed.
* TF32: off by default (``tf32=False``) so that an FP32 artifact computes in FP32 as its parity report says;
  ONNX Runtime's own default is on.

ONNX Runtime runs on its own CUDA stream: the runner synchronises torch's current stream before a run, and
ONNX Runtime synchronises its stream before returning, so results are ready for torch afterwards.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from export_engine.errors import BackendError, ModelInputError

log = logging.getLogger(__name__)

DEFAULT_ATTENTION: Literal["fused", "decomposed"] = "fused"
MAX_CAPTURED_SHAPES = 8  # distinct input-shape signatures a session captures a CUDA graph for
_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


@dataclass(frozen=True)
class CudaSessionConfig:
    attention: Literal["fused", "decomposed"] = DEFAULT_ATTENTION
    cuda_graph: bool = False
    tf32: bool = False
    device_id: int = 0
    patch_conv: bool = True  # kernel == stride (transposed) convolutions as MatMuls (lower_patch_conv)
    im2col: bool = False  # stride-1 2-D convolutions as im2col + MatMul (lower_conv_im2col; measured slower)

    def __post_init__(self) -> None:
        if self.attention not in ("fused", "decomposed"):
            raise ModelInputError(f"attention must be 'fused' or 'decomposed', got {self.attention!r}")


def cuda_available() -> tuple[bool, str]:
    """Whether ONNX Runtime can run on a CUDA GPU here, with the reason when it cannot."""
    try:
        import onnxruntime as ort
        import torch
    except ImportError as err:  # pragma: no cover - both are dependencies
        return False, f"{err.name} is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "this onnxruntime has no CUDA provider (install onnxruntime-gpu)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to torch"
    return True, f"onnxruntime {ort.__version__} CUDA provider"


@dataclass
class _Signature:
    """Buffers and binding for one set of input shapes."""

    inputs: dict[str, Any]  # torch tensors (CUDA graph: the captured addresses)
    outputs: dict[str, Any]
    binding: Any
    graph_id: int | None = None


@dataclass
class CudaGraphRunner:
    """One ONNX graph in an ONNX Runtime CUDA session, I/O as torch CUDA tensors (see the module docstring)."""

    path: Path
    graph_meta: Mapping[str, Any]  # the manifest's graph entry: inputs/outputs with names, shapes, dtypes
    config: CudaSessionConfig = field(default_factory=CudaSessionConfig)

    def __post_init__(self) -> None:
        import onnxruntime as ort

        ok, why = cuda_available()
        if not ok:
            raise BackendError(f"cannot run {self.path.name} on CUDA: {why}")
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # onnxruntime-gpu finds the CUDA libraries that torch ships
        source = self._lowered_source()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        provider = {"device_id": str(self.config.device_id), "use_tf32": "1" if self.config.tf32 else "0"}
        if self.config.cuda_graph:
            provider["enable_cuda_graph"] = "1"
        try:
            self.session = ort.InferenceSession(str(source), options, providers=[("CUDAExecutionProvider", provider)])
        except Exception as err:  # onnxruntime raises its own untyped exceptions
            hint = (
                " (a CUDA graph needs every node on CUDA: retry with cuda_graph=False)"
                if self.config.cuda_graph
                else ""
            )
            raise BackendError(f"ONNX Runtime CUDA cannot load {self.path.name}: {_short(err)}{hint}") from err
        self._ort = ort
        self._inputs = {i["name"]: i for i in self.graph_meta["inputs"]}
        self._outputs = {o["name"]: o for o in self.graph_meta["outputs"]}
        self._signatures: dict[tuple, _Signature] = {}

    def _lowered_source(self) -> Path:
        """The artifact's graph, or a rewritten copy in a scratch folder (see the module docstring)."""
        c = self.config
        if c.attention == "fused" and not c.patch_conv and not c.im2col:
            return self.path
        stat = self.path.stat()
        key = (str(self.path.resolve()), stat.st_mtime_ns, stat.st_size, c.attention, c.patch_conv, c.im2col)
        if key not in _LOWERED:  # one rewrite per graph and lowering per process (sessions of other options share it)
            _LOWERED[key] = _lower(self.path, self.config)
        return Path(_LOWERED[key].name) / self.path.name

    # --- running -------------------------------------------------------------------------------------------

    def run(self, feeds: Mapping[str, Any], copy: bool = True) -> dict[str, Any]:
        """Outputs as torch CUDA tensors. With ``copy=False`` they are this runner's buffers, overwritten by the
        next run with the same input shapes (no extra device copy)."""
        import torch

        tensors = self._check(feeds)
        key = tuple((name, tuple(t.shape)) for name, t in tensors.items())
        sig = self._signatures.get(key) or self._new_signature(key, tensors)
        if self.config.cuda_graph:
            for name, tensor in tensors.items():
                sig.inputs[name].copy_(tensor)
        else:
            for name, tensor in tensors.items():
                self._bind(sig.binding.bind_input, name, tensor)
        torch.cuda.current_stream().synchronize()  # ONNX Runtime reads the inputs on its own stream
        options = None
        if sig.graph_id is not None:
            options = self._ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(sig.graph_id))
        try:
            self.session.run_with_iobinding(sig.binding, options)
        except Exception as err:  # onnxruntime raises its own untyped exceptions
            raise BackendError(f"ONNX Runtime CUDA failed running {self.path.name}: {_short(err)}") from err
        return {name: (t.clone() if copy else t) for name, t in sig.outputs.items()}

    def __call__(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The :data:`GraphRunner` interface (numpy in and out), for the generic artifact code."""
        import torch

        device = _device(self.config.device_id)
        outputs = self.run({k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in feed.items()})
        return {name: t.cpu().numpy() for name, t in outputs.items()}

    def _check(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise ModelInputError(f"graph {self.path.stem} needs inputs {missing} (got {sorted(feeds)})")
        tensors = {}
        for name, meta in self._inputs.items():
            value = feeds[name]
            if not isinstance(value, torch.Tensor):
                value = torch.from_numpy(np.ascontiguousarray(value))
            want = _torch_dtype(meta["dtype"])
            if value.dtype != want:
                raise ModelInputError(f"{self.path.stem} input {name}: dtype {value.dtype}, expected {want}")
            shape = meta["shape"]
            if len(value.shape) != len(shape) or any(
                isinstance(d, int) and d != s for d, s in zip(shape, value.shape, strict=True)
            ):
                raise ModelInputError(f"{self.path.stem} input {name}: shape {tuple(value.shape)}, expected {shape}")
            tensors[name] = value.to(_device(self.config.device_id), non_blocking=True).contiguous()
        return tensors

    def _new_signature(self, key: tuple, tensors: dict[str, Any]) -> _Signature:
        import torch

        dims: dict[str, int] = {}
        for name, meta in self._inputs.items():
            for d, s in zip(meta["shape"], tensors[name].shape, strict=True):
                if isinstance(d, str) and dims.setdefault(d, int(s)) != int(s):
                    raise ModelInputError(f"{self.path.stem}: dimension {d!r} differs between inputs ({dims[d]}, {s})")
        device = _device(self.config.device_id)
        outputs = {}
        for name, meta in self._outputs.items():
            unresolved = [d for d in meta["shape"] if isinstance(d, str) and d not in dims]
            if unresolved:
                raise BackendError(f"{self.path.stem} output {name}: dims {unresolved} are not input dims")
            shape = [dims[d] if isinstance(d, str) else int(d) for d in meta["shape"]]
            outputs[name] = torch.empty(shape, dtype=_torch_dtype(meta["dtype"]), device=device)
        inputs = {n: (t.clone() if self.config.cuda_graph else t) for n, t in tensors.items()}
        binding = self.session.io_binding()
        for name, tensor in inputs.items():
            self._bind(binding.bind_input, name, tensor)
        for name, tensor in outputs.items():
            self._bind(binding.bind_output, name, tensor)
        graph_id = None
        if self.config.cuda_graph:
            if len(self._signatures) >= MAX_CAPTURED_SHAPES:
                raise ModelInputError(
                    f"{self.path.stem}: more than {MAX_CAPTURED_SHAPES} input shapes with CUDA graphs; "
                    "use a runner without cuda_graph for varying shapes"
                )
            graph_id = len(self._signatures)
        sig = _Signature(inputs, outputs, binding, graph_id)
        self._signatures[key] = sig
        return sig

    def _bind(self, bind: Any, name: str, tensor: Any) -> None:
        element = _DTYPES[str(tensor.dtype).removeprefix("torch.")]
        bind(name, "cuda", self.config.device_id, element, list(tensor.shape), tensor.data_ptr())


_LOWERED: dict[tuple, tempfile.TemporaryDirectory] = {}


def _lower(path: Path, config: CudaSessionConfig) -> tempfile.TemporaryDirectory:
    from export_engine.graph_passes.base import load_graph, save_graph
    from export_engine.graph_passes.decompose_attention import DecomposeAttentionConfig, decompose_attention
    from export_engine.graph_passes.lower_conv_im2col import LowerConvIm2colConfig, lower_conv_im2col
    from export_engine.graph_passes.lower_patch_conv import LowerPatchConvConfig, lower_patch_conv

    graph = load_graph(path)
    reports = []
    if config.patch_conv:
        reports.append(lower_patch_conv(graph, LowerPatchConvConfig()))
    if config.im2col:
        reports.append(lower_conv_im2col(graph, LowerConvIm2colConfig()))
    if config.attention == "decomposed":
        reports.append(decompose_attention(graph, DecomposeAttentionConfig()))
    for report in reports:
        log.info("%s: %s (for ONNX Runtime only; the artifact is unchanged)", path.name, report.summary())
    scratch = tempfile.TemporaryDirectory(prefix="export-engine-ort-")  # removed at exit
    save_graph(graph, Path(scratch.name) / path.name)
    return scratch


def _device(device_id: int) -> Any:
    import torch

    return torch.device("cuda", device_id)


def _torch_dtype(name: str) -> Any:
    import torch

    if name not in _DTYPES:
        raise BackendError(f"graph tensor dtype {name} is not supported by the CUDA runner")
    return getattr(torch, name)


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:300]
