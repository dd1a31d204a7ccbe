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
* Lowering for ONNX Runtime, in memory (:mod:`export_engine.runners.ort_lowering`): ``lowerings`` names the
  graph passes applied to a copy of the graph before the session opens (RoPE, LayerNorm, residual and GELU
  fusions into ONNX Runtime's contrib kernels, patch convolutions as MatMuls; defaults from measurements on
  Hopper, bench/RESULTS.md). The artifact's files, which TensorRT consumes, are never changed.
* Attention: the artifact's graphs keep the standard ``Attention`` op, which is what TensorRT wants.
  ``attention="fused"`` runs it as is (ONNX Runtime >= 1.31 dispatches it to flash or memory-efficient
  attention kernels); ``"decomposed"`` adds the ``decompose_attention`` lowering (MatMul/Softmax/MatMul).
  Which is faster depends on the model: each family says which it wants (``RuntimeFamily.ort_attention``).
* TF32 (``tf32``): ``None`` (default) turns ONNX Runtime's TF32 mode on only for graphs none of whose matrix
  products (MatMul, Gemm, Conv, Attention) computes in FP32, i.e. where it changes no FP32 result; in that
  mode cuDNN also gives FP16 convolutions their tensor-core engines (measured on an H200: MASt3R hybrid
  33.5 ms per pair with TF32 mode off, 16.7 ms with it on, same outputs). FP32 graphs keep it off, so an FP32
  artifact computes in FP32 as its parity report says.
* Every rewrite is checked where it runs (``check``, default on): the first session of a graph runs the
  artifact's stored reference input and compares with the stored FP32 outputs at the artifact's tolerances
  (:mod:`export_engine.runners.self_check`); on failure it logs which rewrite failed by how much and runs the
  graph as stored, or with ``strict`` refuses (exit 7 from the CLI). The check costs one inference.

* Streams (``own_stream``, default on): ONNX Runtime computes on a torch CUDA stream the runner creates and
  hands it as the provider's compute stream. A run waits for the caller's current stream on the device (an
  event, not a host synchronisation), runs without ONNX Runtime's end-of-run synchronisation, and makes the
  caller's stream wait for it: the host returns as soon as the work is queued, so consecutive runs (the MASt3R
  encoder, then its decoder) and the caller's own kernels follow each other on the GPU with no host round trip
  between them. Results are ready for anything the caller queues on its current stream; reading them on the
  host (``.cpu()``, ``__call__``) waits as usual. With ``own_stream=False`` ONNX Runtime uses a stream of its own
  and every run synchronises the host twice (before and after), as before.
* NHWC convolutions (``nhwc``, default off): ONNX Runtime's ``prefer_nhwc`` provider option, which runs
  convolutions in channels-last layout and moves the layout transposes to where they cancel (on MASt3R it
  leaves nodes off the GPU, so no CUDA graph, and its transposes cost more than the convolutions gain).
* ``provider_options``: any other CUDA provider option by ONNX Runtime's name (``fuse_conv_bias``,
  ``cudnn_conv_algo_search``, ...), for measuring them; they override the runner's own.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from export_engine.errors import BackendError, ModelInputError
from export_engine.runners.ort_lowering import (
    ATTENTION_LOWERINGS,
    DEFAULT_LOWERINGS,
    check_lowerings,
    fp32_matrix_products,
    lowered_graph,
    register_own_ops,
    with_own_ops,
)
from export_engine.runners.self_check import open_checked

log = logging.getLogger(__name__)

DEFAULT_ATTENTION: Literal["fused", "decomposed"] = "fused"
MAX_CAPTURED_SHAPES = 8  # distinct input-shape signatures a session captures a CUDA graph for
_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


@dataclass(frozen=True)
class CudaSessionConfig:
    attention: Literal["fused", "decomposed"] = DEFAULT_ATTENTION
    cuda_graph: bool = False
    tf32: bool | None = None  # None: on where no matrix product computes in FP32 (see the module docstring)
    device_id: int = 0
    lowerings: tuple[str, ...] = DEFAULT_LOWERINGS
    check: bool = True  # run the stored reference through a rewritten graph before using it
    strict: bool = False  # a rewrite that fails its check is an error instead of a fallback
    own_stream: bool = True  # run on a stream of the runner's, ordered by device-side waits (no host sync)
    nhwc: bool = False  # ONNX Runtime's prefer_nhwc: convolutions in channels-last layout
    provider_options: tuple[tuple[str, str], ...] = ()  # more CUDA provider options, by ONNX Runtime's names

    def __post_init__(self) -> None:
        if self.attention not in ("fused", "decomposed"):
            raise ModelInputError(f"attention must be 'fused' or 'decomposed', got {self.attention!r}")
        check_lowerings(self.lowerings)

    def lowering_names(self) -> tuple[str, ...]:
        """The rewrites to apply. Decomposed attention replaces ``attention_*`` (which would turn the same
        Attention nodes into MultiHeadAttention): a family that measured MatMul/Softmax faster gets them."""
        if self.attention == "decomposed":
            names = tuple(n for n in self.lowerings if n not in ATTENTION_LOWERINGS)
            return check_lowerings((*names, "decompose_attention"))
        return check_lowerings(self.lowerings)


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
    options: Any = None  # the RunOptions of this signature's runs


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
        self._ort = ort
        self._inputs = {i["name"]: i for i in self.graph_meta["inputs"]}
        self._outputs = {o["name"]: o for o in self.graph_meta["outputs"]}
        self._signatures: dict[tuple, _Signature] = {}
        c = self.config
        self._stream = None
        if c.own_stream:
            import torch

            self._stream = torch.cuda.Stream(device=_device(c.device_id))
        names = with_own_ops(c.lowering_names(), cuda=True, strict=c.strict)
        _, self.outcome = open_checked(self._open, self.path, self.graph_meta, names, self._tf32_choice(), c.check,
                                       c.strict)  # fmt: skip

    def __del__(self) -> None:
        # Without a CUDA graph ONNX Runtime frees a run's host staging buffers from a callback queued on the
        # stream, holding its allocator; a session dropped while such a callback is pending would be destroyed
        # inside it, where CUDA forbids freeing pinned memory (the process aborts). Runs on the own stream return
        # before the GPU finishes, so let them finish while the session is alive.
        # Not at interpreter exit: CUDA may already be torn down, and the process ends anyway.
        stream = getattr(self, "_stream", None)
        if stream is not None and getattr(self, "session", None) is not None and not sys.is_finalizing():
            stream.synchronize()

    def _tf32_choice(self) -> bool:
        if self.config.tf32 is not None:
            return self.config.tf32
        total, fp32 = fp32_matrix_products(self.path)
        if fp32:
            log.debug("%s: TF32 off: %d matrix products compute in FP32 (%s, ...)", self.path.name, len(fp32), fp32[0])
        return total > 0 and not fp32

    def _open(self, lowerings: tuple[str, ...], tf32: bool) -> CudaGraphRunner:
        """(Re)open the session on the graph rewritten by ``lowerings``; captured shapes start afresh."""
        source = lowered_graph(self.path, lowerings)
        if self._stream is not None:
            self._stream.synchronize()  # a session this replaces may have host callbacks pending (see __del__)
        options = self._ort.SessionOptions()
        options.log_severity_level = 3
        register_own_ops(options, source, cuda=True)
        provider = {"device_id": str(self.config.device_id), "use_tf32": "1" if tf32 else "0"}
        if self.config.cuda_graph:
            provider["enable_cuda_graph"] = "1"
        if self._stream is not None:
            provider["has_user_compute_stream"] = "1"
            provider["user_compute_stream"] = str(self._stream.cuda_stream)
        if self.config.nhwc:
            provider["prefer_nhwc"] = "1"
        provider.update(dict(self.config.provider_options))
        try:
            self.session = self._ort.InferenceSession(
                str(source), options, providers=[("CUDAExecutionProvider", provider)]
            )
        except Exception as err:  # onnxruntime raises its own untyped exceptions
            hint = (
                " (a CUDA graph needs every node on CUDA: retry with cuda_graph=False)"
                if self.config.cuda_graph
                else ""
            )
            raise BackendError(f"ONNX Runtime CUDA cannot load {self.path.name}: {_short(err)}{hint}") from err
        self._signatures = {}
        return self

    # --- running -------------------------------------------------------------------------------------------

    def run(self, feeds: Mapping[str, Any], copy: bool = True) -> dict[str, Any]:
        """Outputs as torch CUDA tensors. With ``copy=False`` they are this runner's buffers, overwritten by the
        next run with the same input shapes (no extra device copy)."""
        import torch

        tensors = self._check(feeds)
        key = tuple((name, tuple(t.shape)) for name, t in tensors.items())
        sig = self._signatures.get(key) or self._new_signature(key, tensors)
        caller = torch.cuda.current_stream(_device(self.config.device_id))
        if self._stream is not None:
            # The previous run's buffers are rewritten below and by ONNX Runtime: whatever stream the caller
            # now runs on waits (on the device) for that run, not only the stream it ran from.
            caller.wait_stream(self._stream)
        if self.config.cuda_graph:
            for name, tensor in tensors.items():
                sig.inputs[name].copy_(tensor)
        else:
            for name, tensor in tensors.items():
                self._bind(sig.binding.bind_input, name, tensor)
        if self._stream is None:
            caller.synchronize()  # ONNX Runtime reads the inputs on its own stream
        else:
            self._stream.wait_stream(caller)  # device-side: ONNX Runtime's kernels start after the caller's
            if not self.config.cuda_graph:
                for tensor in tensors.values():
                    tensor.record_stream(self._stream)  # the caller's allocator keeps them until ORT is done
        try:
            self.session.run_with_iobinding(sig.binding, sig.options)
        except Exception as err:  # onnxruntime raises its own untyped exceptions
            raise BackendError(f"ONNX Runtime CUDA failed running {self.path.name}: {_short(err)}") from err
        if self._stream is not None:
            caller.wait_stream(self._stream)  # the caller's next kernels see the outputs
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
        options = None
        if graph_id is not None or self._stream is not None:
            options = self._ort.RunOptions()
            if graph_id is not None:
                options.add_run_config_entry("gpu_graph_id", str(graph_id))
            if self._stream is not None:  # ordering is the streams' business (see run)
                options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        sig = _Signature(inputs, outputs, binding, graph_id, options)
        self._signatures[key] = sig
        return sig

    def _bind(self, bind: Any, name: str, tensor: Any) -> None:
        element = _DTYPES[str(tensor.dtype).removeprefix("torch.")]
        bind(name, "cuda", self.config.device_id, element, list(tensor.shape), tensor.data_ptr())


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
