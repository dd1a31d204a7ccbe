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
* Threads (see :class:`CudaGraphRunner`): calls are serialised per runner; each thread's first call of a new
  CUDA-graph shape warms up and captures (ONNX Runtime keeps CUDA graphs per thread), alone on the device
  (:mod:`export_engine.runners.gpu_gate`); every
  FLUSH_EVERY-th run without a CUDA graph, and a closing run, keep ONNX Runtime's end-of-run clean-up.
* NHWC convolutions (``nhwc``, default off): ONNX Runtime's ``prefer_nhwc`` provider option, which runs
  convolutions in channels-last layout and moves the layout transposes to where they cancel (on MASt3R it
  leaves nodes off the GPU, so no CUDA graph, and its transposes cost more than the convolutions gain).
* Outputs (``outputs``): a caller that reads some of a graph's outputs names them, and the session opens on a
  copy of the graph pruned of the others and of every node only they need (MASt3R's DPT heads, when only the
  descriptors are read: 38 % of the decoder's FLOPs). The runner then returns, binds and checks only those.
* ``provider_options``: any other CUDA provider option by ONNX Runtime's name (``fuse_conv_bias``,
  ``cudnn_conv_algo_search``, ...), for measuring them; they override the runner's own.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from export_engine.errors import BackendError, ModelInputError
from export_engine.runners import gpu_gate
from export_engine.runners.ort_lowering import (
    ATTENTION_LOWERINGS,
    DEFAULT_LOWERINGS,
    check_lowerings,
    fp32_matrix_products,
    lowered_graph,
    pruned_entry,
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
    outputs: tuple[str, ...] = ()  # compute only these outputs (empty: all); see the module docstring

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
    flush_options: Any = None  # the same, with ONNX Runtime's end-of-run clean-up (see FLUSH_EVERY)


# ONNX Runtime runs a graph id uncaptured a few times before it captures it (one or two runs, depending on the
# release), and its CUDA provider keeps the captured graphs, and the count of runs before them, per thread (in
# its per-thread context, beside the thread's cuBLAS and cuDNN handles, attention plans and workspaces, which a
# thread's first run creates). So each thread's first call of a CUDA-graph signature makes this many runs back to
# back, on that thread and alone on the device (gpu_gate): its warm-up runs create the thread's state outside
# any capture, and the capture never sees another thread's CUDA calls. Measured on an H100 with 4 threads
# sharing runners: 393 of 800 calls failed when the warm-up and the capture fell on different threads, and 108 of
# 800 when only the runner's first caller warmed up (every other thread then captured while the others ran).
CAPTURE_RUNS = 4
# With the runner's own stream, runs skip ONNX Runtime's end-of-run synchronisation, and with it the provider's
# end-of-run clean-up: the pinned host buffers its kernels used are then only released when the session is
# destroyed, by a host function queued on the stream during the destruction, which can outlive the session and
# free the session's pinned-memory arena inside a CUDA callback, where CUDA forbids it (error 800: the process
# aborts; seen on an H100 when a runner was dropped). Every FLUSH_EVERY-th run of a runner without CUDA graphs,
# and a last run when it closes, keep the clean-up (one host synchronisation each), so the buffers go back to the
# arena while the session is alive and the host function finds nothing to do at destruction.
FLUSH_EVERY = 32
_LIVE: weakref.WeakSet[CudaGraphRunner] = weakref.WeakSet()


@dataclass(eq=False)
class CudaGraphRunner:
    """One ONNX graph in an ONNX Runtime CUDA session, I/O as torch CUDA tensors (see the module docstring).

    Threads: a runner may be shared. Its calls are serialised by ``lock`` (re-entrant; a call holds it only
    while queueing work, not while the GPU computes), a run that may capture a CUDA graph runs alone on the device
    (:mod:`export_engine.runners.gpu_gate`), and each caller gets its own outputs (``copy=True``). ``close()``
    (or dropping the last reference) finishes the runner's queued work before its session goes."""

    path: Path
    graph_meta: Mapping[str, Any]  # the manifest's graph entry: inputs/outputs with names, shapes, dtypes
    config: CudaSessionConfig = field(default_factory=CudaSessionConfig)

    def __post_init__(self) -> None:
        import onnxruntime as ort

        self.lock = threading.RLock()
        self.session: Any = None
        self._stream: Any = None
        self._last_caller: Any = None  # the stream of the previous run's caller (see run)
        self._kept: tuple[_Signature, dict[str, Any]] | None = None  # the last run's inputs, for the closing flush
        self._unflushed = 0  # runs since ONNX Runtime last cleaned up at a run's end
        self._signatures: dict[tuple, _Signature] = {}
        self._local = threading.local()  # per thread: runs of each signature on the current session (see run)
        self._generation = 0  # the current session's number: a reopened session starts every thread afresh
        ok, why = cuda_available()
        if not ok:
            raise BackendError(f"cannot run {self.path.name} on CUDA: {why}")
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # onnxruntime-gpu finds the CUDA libraries that torch ships
        self._ort = ort
        c = self.config
        # the graph entry as the pruned graph has it: its outputs, and only those bound and checked
        self._kept_outputs, self.graph_meta = pruned_entry(self.graph_meta, c.outputs, self.path.name)
        self._inputs = {i["name"]: i for i in self.graph_meta["inputs"]}
        self._outputs = {o["name"]: o for o in self.graph_meta["outputs"]}
        if c.own_stream:
            import torch

            self._stream = torch.cuda.Stream(device=_device(c.device_id))
        names = with_own_ops(c.lowering_names(), cuda=True, strict=c.strict)
        _, self.outcome = open_checked(self._open, self.path, self.graph_meta, names, self._tf32_choice(), c.check,
                                       c.strict, context=self._check_context())  # fmt: skip
        _LIVE.add(self)

    def close(self) -> None:
        """Finish this runner's queued work, then release its session, CUDA graphs and buffers. Idempotent; a
        closed runner refuses further runs.

        Without a CUDA graph, ONNX Runtime's kernels leave pinned host buffers that its end-of-run clean-up hands
        to a host function on the compute stream; that function holds a reference to the session's pinned-memory
        arena. Runs on the own stream skip the clean-up (see FLUSH_EVERY), and a session destroyed with buffers
        left queues the function itself, which can then hold the arena's last reference and free it inside the
        CUDA callback, where CUDA forbids it (error 800: the process aborts). So a closing run with the clean-up
        comes first, then the stream and the last caller's stream are drained, and only then the session goes."""
        with self.lock:
            if self.session is None:
                return
            with gpu_gate.shared(self.config.device_id):
                self._retire()

    def _retire(self) -> None:
        """Flush, drain and drop the session (with ``lock`` and the gate held)."""
        if self._unflushed and self._kept is not None and self.session is not None:
            sig, tensors = self._kept
            try:  # one more run of the last inputs, with ONNX Runtime's end-of-run clean-up (see FLUSH_EVERY)
                for name, tensor in tensors.items():
                    self._bind(sig.binding.bind_input, name, tensor)
                self._stream.wait_stream(self._last_caller or self._stream)
                self.session.run_with_iobinding(sig.binding, sig.flush_options)
            except Exception as err:  # onnxruntime raises its own untyped exceptions; closing goes on
                log.warning("%s: the closing run failed (%s)", self.path.name, _short(err))
        self._drain()
        self._signatures = {}
        self._kept = None
        self._unflushed = 0
        self._last_caller = None
        self.session = None  # the session, its arenas and captured graphs go here, with no work pending

    def __del__(self) -> None:
        # Not at interpreter exit: CUDA may already be torn down and the process ends anyway (close_all ran at exit).
        if not sys.is_finalizing() and getattr(self, "session", None) is not None:
            self.close()

    def __enter__(self) -> CudaGraphRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drain(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        if self._last_caller is not None:
            self._last_caller.synchronize()

    def _check_context(self) -> tuple:
        """What a rewrite's check holds for besides the graph and rewrites: this GPU and the session options."""
        import torch

        c = self.config
        index = _device(c.device_id)
        props = torch.cuda.get_device_properties(index)
        gpu = (props.name, props.major, props.minor, getattr(props, "uuid", None) and str(props.uuid))
        return (gpu, self._ort.__version__, c.cuda_graph, c.own_stream, c.nhwc, c.provider_options, self._kept_outputs)

    def _tf32_choice(self) -> bool:
        if self.config.tf32 is not None:
            return self.config.tf32
        total, fp32 = fp32_matrix_products(self.path)
        if fp32:
            log.debug("%s: TF32 off: %d matrix products compute in FP32 (%s, ...)", self.path.name, len(fp32), fp32[0])
        return total > 0 and not fp32

    def _open(self, lowerings: tuple[str, ...], tf32: bool) -> CudaGraphRunner:
        """(Re)open the session on the graph rewritten by ``lowerings``; captured shapes start afresh."""
        source = lowered_graph(self.path, lowerings, self._kept_outputs)
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
        with self.lock, gpu_gate.shared(self.config.device_id):  # a session's allocations stay out of captures
            self._retire()  # a session this replaces: flushed and drained first (see close)
            self._generation += 1
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
        return self

    # --- running -------------------------------------------------------------------------------------------

    def run(self, feeds: Mapping[str, Any], copy: bool = True) -> dict[str, Any]:
        """Outputs as torch CUDA tensors, ready for work queued on the caller's current stream.

        Inputs are torch tensors (CUDA, or CPU: copied to the GPU) or numpy arrays of the graph's dtypes and
        shapes; a wrong name, dtype or shape, an empty dimension or (for inputs that come from the host) a NaN or
        infinity raises ModelInputError and leaves the runner as it was.

        ``copy=True`` (default): tensors of the caller's own. ``copy=False``: this runner's output buffers, with
        no device copy; they stay valid until the runner's next run (from any thread), which first waits (on the
        device) for the work that the previous caller had queued on its stream by then. A caller that shares the
        runner with other threads and keeps such buffers holds ``lock`` until it has queued its reads."""
        device = self.config.device_id
        tensors = self._check(feeds)
        key = tuple((name, tuple(t.shape)) for name, t in tensors.items())
        with gpu_gate.holding(self.lock, device):
            if self.session is None:
                raise BackendError(f"{self.path.name}: the runner is closed; load the artifact again")
            sig = self._signatures.get(key)
            done = self._thread_runs()
            runs = done.get(key, 0)
            capturing = self.config.cuda_graph and runs < CAPTURE_RUNS
            with gpu_gate.exclusive(device) if capturing else gpu_gate.shared(device):
                tensors = self._upload(tensors)
                if sig is None:
                    sig = self._new_signature(key, tensors)
                repeats = CAPTURE_RUNS - runs if capturing else 1  # warm-up and capture in this call
                for _ in range(repeats - 1):
                    self._run_signature(sig, tensors, copy=False)
                    runs = done[key] = runs + 1
                outputs = self._run_signature(sig, tensors, copy)
            done[key] = runs + 1
            return outputs

    def _thread_runs(self) -> dict[tuple, int]:
        """The calling thread's completed runs of each signature on the current session (CAPTURE_RUNS says why
        they are counted per thread)."""
        local = self._local
        if getattr(local, "generation", None) != self._generation:
            local.generation, local.runs = self._generation, {}
        return local.runs

    def _run_signature(self, sig: _Signature, tensors: dict[str, Any], copy: bool) -> dict[str, Any]:
        import torch

        caller = torch.cuda.current_stream(_device(self.config.device_id))
        previous, self._last_caller = self._last_caller, caller
        if self._stream is not None:
            # The buffers are rewritten below and by ONNX Runtime: the caller's copies wait (on the device) for the
            # previous run, and ONNX Runtime for what the previous caller queued on its stream (its reads).
            caller.wait_stream(self._stream)
            if previous is not None and previous != caller:
                self._stream.wait_stream(previous)
        elif previous is not None and previous != caller:
            previous.synchronize()
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
        options = sig.options
        if self._stream is not None and not self.config.cuda_graph:
            self._kept = (sig, tensors)
            self._unflushed += 1
            if self._unflushed >= FLUSH_EVERY:
                options, self._unflushed = sig.flush_options, 0
        try:
            self.session.run_with_iobinding(sig.binding, options)
        except Exception as err:  # onnxruntime raises its own untyped exceptions
            raise BackendError(f"ONNX Runtime CUDA failed running {self.path.name}: {_short(err)}") from err
        if not copy:
            if self._stream is not None:
                caller.wait_stream(self._stream)  # the caller's next kernels see the outputs
            return dict(sig.outputs)
        # The copies are allocated on the caller's stream (its to keep) and written on the runner's, before the
        # next run can touch the buffers (that run queues behind them on the same stream).
        copies = {name: torch.empty_like(t) for name, t in sig.outputs.items()}
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                for name, t in sig.outputs.items():
                    copies[name].copy_(t)
            caller.wait_stream(self._stream)
        else:
            for name, t in sig.outputs.items():
                copies[name].copy_(t)
        return copies

    def __call__(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The :data:`GraphRunner` interface (numpy in and out), for the generic artifact code."""
        with self.lock:
            outputs = self.run(feed, copy=False)
            with gpu_gate.shared(self.config.device_id):  # a copy to the host synchronises: never inside a capture
                return {name: t.cpu().numpy() for name, t in outputs.items()}

    def _check(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """The inputs as torch tensors (still where they were), checked against the graph's inputs."""
        import torch

        if not isinstance(feeds, Mapping):
            raise ModelInputError(f"{self.path.stem} takes a mapping of input names to tensors, got "
                                  f"{type(feeds).__name__}")  # fmt: skip
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise ModelInputError(f"graph {self.path.stem} needs inputs {missing} (got {sorted(feeds)})")
        tensors = {}
        for name, meta in self._inputs.items():
            value = feeds[name]
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(np.ascontiguousarray(value))
            elif not isinstance(value, torch.Tensor):
                raise ModelInputError(f"{self.path.stem} input {name}: a torch tensor or numpy array, got "
                                      f"{type(value).__name__}")  # fmt: skip
            want = _torch_dtype(meta["dtype"])
            if value.dtype != want:
                raise ModelInputError(f"{self.path.stem} input {name}: dtype {value.dtype}, expected {want}")
            shape = meta["shape"]
            if len(value.shape) != len(shape) or any(
                isinstance(d, int) and d != s for d, s in zip(shape, value.shape, strict=True)
            ):
                raise ModelInputError(f"{self.path.stem} input {name}: shape {tuple(value.shape)}, expected {shape}")
            if value.numel() == 0:
                raise ModelInputError(f"{self.path.stem} input {name}: shape {tuple(value.shape)} is empty "
                                      "(a batch needs at least one item)")  # fmt: skip
            if value.is_cuda and value.device.index != self.config.device_id:
                raise ModelInputError(f"{self.path.stem} input {name} is on {value.device}; this runner runs on "
                                      f"cuda:{self.config.device_id}")  # fmt: skip
            if not value.is_cuda and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise ModelInputError(f"{self.path.stem} input {name} holds {bad} NaN or infinite values")
            tensors[name] = value
        return tensors

    def _upload(self, tensors: dict[str, Any]) -> dict[str, Any]:
        device = _device(self.config.device_id)
        return {n: t.to(device, non_blocking=True).contiguous() for n, t in tensors.items()}

    def _new_signature(self, key: tuple, tensors: dict[str, Any]) -> _Signature:
        import torch

        dims: dict[str, int] = {}
        for name, meta in self._inputs.items():
            for d, s in zip(meta["shape"], tensors[name].shape, strict=True):
                if isinstance(d, str) and dims.setdefault(d, int(s)) != int(s):
                    raise ModelInputError(f"{self.path.stem}: dimension {d!r} differs between inputs ({dims[d]}, {s})")
        if self.config.cuda_graph and len(self._signatures) >= MAX_CAPTURED_SHAPES:
            raise ModelInputError(
                f"{self.path.stem}: more than {MAX_CAPTURED_SHAPES} input shapes with CUDA graphs; "
                "use a runner without cuda_graph for varying shapes"
            )
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
        graph_id = len(self._signatures) if self.config.cuda_graph else None
        options = flush_options = None
        if graph_id is not None or self._stream is not None:
            options, flush_options = self._ort.RunOptions(), self._ort.RunOptions()
            if graph_id is not None:
                for o in (options, flush_options):
                    o.add_run_config_entry("gpu_graph_id", str(graph_id))
            if self._stream is not None:  # ordering is the streams' business (see run)
                options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        sig = _Signature(inputs, outputs, binding, graph_id, options, flush_options)
        self._signatures[key] = sig
        return sig

    def _bind(self, bind: Any, name: str, tensor: Any) -> None:
        element = _DTYPES[str(tensor.dtype).removeprefix("torch.")]
        bind(name, "cuda", self.config.device_id, element, list(tensor.shape), tensor.data_ptr())


def close_all() -> None:
    """Close every live runner (finishing its queued work first); runs at interpreter exit, before CUDA goes."""
    for runner in list(_LIVE):
        try:
            runner.close()
        except Exception as err:  # at exit: report, never raise
            log.debug("closing %s at exit: %s", getattr(runner, "path", "?"), err)


atexit.register(close_all)


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
