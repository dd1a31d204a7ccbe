"""TensorRT calls of a build, shared by full TensorRT and TensorRT-RTX (the module is passed in as ``trt``).

Only the build child process runs this code. Features one module lacks are looked up with ``getattr`` so one
code path serves both; options the module cannot honour raise :class:`BuildStepError` with the reason.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from export_engine.builders.config import RTX_COMPUTE_CAPABILITIES, BuildConfig, Profile

Emit = Callable[..., None]  # emit(event_name, **fields): one JSON line to the parent

_SEVERITY = ("internal_error", "error", "warning", "info", "verbose")


class BuildStepError(Exception):
    """A handled failure inside the child: the stage reports it and the parent raises EngineBuildError."""


def make_logger(trt: Any, emit: Emit, keep: int = 50) -> Any:
    """A trt.ILogger that forwards messages (INFO and above) to the parent and keeps the last errors."""

    class ForwardingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self._lock = threading.Lock()

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)
            if level > 3:  # VERBOSE
                return
            name = _SEVERITY[level] if level < len(_SEVERITY) else str(level)
            with self._lock:
                if level <= 1:
                    self.errors = [*self.errors[-(keep - 1) :], msg]
                emit("trt_log", severity=name, message=msg)

    return ForwardingLogger()


def make_progress_monitor(trt: Any, emit: Emit, interval_s: float) -> Any | None:
    """A trt.IProgressMonitor. Every phase start is sent (the parent tracks where a crash happened); ``show``
    marks the ones worth a log line: top-level phases always, anything else at most once per interval."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class ThrottledMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._depth: dict[str, int] = {}
            self._last = 0.0

        def _show(self, depth: int) -> bool:
            now = time.monotonic()
            if depth == 0 or now - self._last >= interval_s:
                self._last = now
                return True
            return False

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self._depth[phase_name] = depth
                emit("phase", phase=phase_name, depth=depth, state="start", steps=num_steps, show=self._show(depth))

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                if self._show(1):
                    emit("phase", phase=phase_name, state="step", step=step + 1, show=True)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                depth = self._depth.pop(phase_name, 0)
                emit("phase", phase=phase_name, depth=depth, state="finish", show=depth == 0)

    return ThrottledMonitor()


def create_network(trt: Any, builder: Any) -> tuple[Any, bool]:
    """A strongly typed network where the flag exists (TRT >= 10.12, TRT-RTX; ignored but harmless on 11)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        return builder.create_network(0), False
    return builder.create_network(1 << int(flag)), True


def parse_onnx(trt: Any, network: Any, logger: Any, onnx_path: Path) -> tuple[Any, list[dict[str, Any]]]:
    """Parse from the file path, so external data next to the model is found. Returns (parser, errors)."""
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
    if not ok and not errors:
        errors.append({"desc": "parser returned failure without an error record"})
    return parser, errors


def _parser_error(err: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"desc": str(err.desc())}
    for key, getter in (("code", "code"), ("node_index", "node"), ("node_name", "node_name"), ("op", "node_operator")):
        method = getattr(err, getter, None)
        if method is not None:
            value = method()
            record[key] = value if isinstance(value, (int, str)) else str(value)
    return record


def network_summary(trt: Any, network: Any) -> dict[str, Any]:
    types: dict[str, int] = {}
    for i in range(network.num_layers):
        name = str(network.get_layer(i).type).rsplit(".", 1)[-1]
        types[name] = types.get(name, 0) + 1
    return {
        "network_layers": network.num_layers,
        "layer_types": dict(sorted(types.items())),
        "inputs": [_tensor_info(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [_tensor_info(network.get_output(i)) for i in range(network.num_outputs)],
    }


def _tensor_info(tensor: Any) -> dict[str, Any]:
    return {"name": tensor.name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).rsplit(".", 1)[-1]}


def mark_attention(trt: Any, network: Any, mode: str) -> list[dict[str, Any]]:
    """Set IAttention.decomposable per ``mode`` ("fp32": where no fused kernel can exist; "all"; "none").

    "fp32" marks attention whose Q is FP32 (fused kernels need FP16/BF16) and attention whose head size is outside
    what the fused kernels take (16 <= head size <= 256, a multiple of 8: toolchain facts A3), e.g. the tiny
    FastSAM3D decoder's head sizes 12 and 6; every other attention must get its fused kernel or fail the build.

    Each IAttention shows up as an ATTENTION_INPUT and an ATTENTION_OUTPUT boundary layer; pybind returns them as
    plain ILayer, so the layer is re-typed to its boundary class to reach ``.attention``.
    """
    input_type = getattr(trt.LayerType, "ATTENTION_INPUT", None)
    if input_type is None:
        return []
    found = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != input_type:
            continue
        layer.__class__ = trt.IAttentionInputLayer
        attention = layer.attention
        q_dtype = str(attention.get_input(0).dtype).rsplit(".", 1)[-1]
        head = attention.get_input(0).shape[-1]
        unfusable_head = head > 0 and not (16 <= head <= 256 and head % 8 == 0)
        parsed = bool(attention.decomposable)  # ONNX attribute TRT_decomposable may have set it
        want = mode == "all" or (mode == "fp32" and (q_dtype == "FLOAT" or unfusable_head))
        if want and not parsed:
            attention.decomposable = True
        found.append(
            {
                "name": attention.name,
                "q_dtype": q_dtype,
                "head_size": int(head),
                "decomposable": bool(attention.decomposable),
                "set_by_builder": want and not parsed,
            }
        )
    return found


def configure(trt: Any, builder: Any, network: Any, config: BuildConfig, monitor: Any | None) -> Any:
    """IBuilderConfig from a BuildConfig: optimisation level, profiles, compatibility, compute capabilities."""
    builder_config = builder.create_builder_config()
    builder_config.builder_optimization_level = config.opt_level
    if monitor is not None:
        builder_config.progress_monitor = monitor
    _add_profiles(builder, network, builder_config, config.profiles)
    if config.hardware_compatibility != "none":
        levels = {"ampere_plus": "AMPERE_PLUS", "same_cc": "SAME_COMPUTE_CAPABILITY"}
        builder_config.hardware_compatibility_level = getattr(
            trt.HardwareCompatibilityLevel, levels[config.hardware_compatibility]
        )
    if config.version_compatible:
        builder_config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if config.compute_capabilities:
        _set_compute_capabilities(trt, builder_config, config.compute_capabilities)
    return builder_config


def _add_profiles(builder: Any, network: Any, builder_config: Any, profiles: tuple[Profile, ...]) -> None:
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    dynamic = sorted(name for name, t in inputs.items() if any(d < 0 for d in t.shape))
    if dynamic and not profiles:
        shapes = ", ".join(f"{n}{list(inputs[n].shape)}" for n in dynamic)
        raise BuildStepError(
            f"the network has dynamic inputs ({shapes}) but no optimisation profile was given; "
            "pass BuildConfig(profiles=(profiles_from_spec(spec, dims),))"
        )
    for index, profile in enumerate(profiles):
        named = {s.name: s for s in profile}
        unknown = sorted(set(named) - set(inputs))
        missing = [n for n in dynamic if n not in named]
        if unknown or missing:
            raise BuildStepError(
                f"profile {index}: inputs {unknown} are not network inputs and dynamic inputs {missing} have no "
                f"shapes; network inputs: {sorted(inputs)}"
            )
        trt_profile = builder.create_optimization_profile()
        for item in profile:
            trt_profile.set_shape(item.name, item.min, item.opt, item.max)
        if builder_config.add_optimization_profile(trt_profile) < 0:
            raise BuildStepError(f"profile {index} was rejected by the builder: {[s.to_dict() for s in profile]}")


def _set_compute_capabilities(trt: Any, builder_config: Any, ccs: tuple[str, ...]) -> None:
    enum = getattr(trt, "ComputeCapability", None)
    if enum is None or not hasattr(builder_config, "set_compute_capability"):
        raise BuildStepError(f"module {trt.__name__} cannot select compute capabilities (TensorRT-RTX only)")
    builder_config.num_compute_capabilities = len(ccs)
    for index, cc in enumerate(ccs):
        member = getattr(enum, RTX_COMPUTE_CAPABILITIES[cc], None)
        if member is None:
            raise BuildStepError(f"{trt.__name__} {trt.__version__} has no ComputeCapability for {cc}")
        if not builder_config.set_compute_capability(member, index):
            raise BuildStepError(f"the builder rejected compute capability {cc} at index {index}")
