"""Which engine backends this machine has, and which one a build should use.

``tensorrt`` (full TensorRT) needs a CUDA GPU to build; ``tensorrt-rtx`` builds ahead of time without one (its
engines run on Ampere+ RTX-class GPUs, not Hopper); ``onnx`` (ONNX Runtime) is always there.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import logging
import shutil
import subprocess
from types import ModuleType

from export_engine.errors import BackendError, UsageError

log = logging.getLogger(__name__)

BACKEND_CHOICES: tuple[str, ...] = ("auto", "tensorrt", "tensorrt-rtx", "onnx")

# Module names per builder backend, tried in order. `tensorrt_rtx` comes from the `tensorrt-rtx-cu13` sdist,
# a thin re-export of `tensorrt_rtx_bindings` (from `tensorrt-rtx-cu13-bindings`), which works on its own.
BACKEND_MODULES: dict[str, tuple[str, ...]] = {
    "tensorrt": ("tensorrt",),
    "tensorrt-rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings"),
}

INSTALL_HINTS: dict[str, str] = {
    "tensorrt": (
        "install NVIDIA TensorRT >= 10.12 for your CUDA (e.g. `pip install tensorrt-cu12`) on a machine with an "
        "NVIDIA GPU and driver; it cannot be installed on CPU-only machines"
    ),
    "tensorrt-rtx": "pip install 'export-engine[rtx]' (or: pip install tensorrt-rtx-cu13)",
    "onnx": "pip install 'export-engine[cpu]' (or 'export-engine[gpu]' on an NVIDIA GPU machine)",
}


@functools.cache
def _import(backend: str) -> tuple[ModuleType | None, str]:
    errors = []
    for name in BACKEND_MODULES[backend]:
        try:
            return importlib.import_module(name), name
        except (ImportError, OSError) as err:  # OSError: a wheel whose shared libraries fail to load
            errors.append(f"{name}: {err}")
    return None, "; ".join(errors)


def import_backend(backend: str) -> ModuleType:
    """The TensorRT Python module for a builder backend, or :class:`BackendError` telling how to install it."""
    if backend not in BACKEND_MODULES:
        raise UsageError(f"unknown builder backend {backend!r}; choose one of: {', '.join(BACKEND_MODULES)}")
    module, detail = _import(backend)
    if module is None:
        raise BackendError(f"backend {backend!r} is not available ({detail}); {INSTALL_HINTS[backend]}")
    return module


def backend_version(backend: str) -> str | None:
    """Version of an importable backend, None when it does not import."""
    if backend == "onnx":
        try:
            return str(importlib.import_module("onnxruntime").__version__)
        except ImportError:
            return None
    module, _ = _import(backend)
    return None if module is None else str(module.__version__)


@functools.lru_cache(maxsize=1)
def cuda_devices() -> tuple[int, str]:
    """(number of CUDA devices, how that was found out). Uses the driver API, so no CUDA toolkit is needed."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as err:
        count, how = _nvidia_smi_devices()
        return count, how if count else f"no CUDA driver (libcuda.so.1: {err})"
    status = cuda.cuInit(0)
    if status != 0:
        return 0, f"CUDA driver present but cuInit failed (CUresult {status})"
    devices = ctypes.c_int(0)
    status = cuda.cuDeviceGetCount(ctypes.byref(devices))
    if status != 0:
        return 0, f"cuDeviceGetCount failed (CUresult {status})"
    return devices.value, f"{devices.value} CUDA device(s) via the driver API"


def _nvidia_smi_devices() -> tuple[int, str]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0, "nvidia-smi not found"
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return 0, f"nvidia-smi failed: {err}"
    gpus = [line for line in out.splitlines() if line.startswith("GPU ")]
    return len(gpus), f"{len(gpus)} GPU(s) listed by nvidia-smi"


def available_backends() -> dict[str, str | None]:
    """``{"tensorrt": version|None, "tensorrt-rtx": version|None, "onnx": version|None, "gpu": text|None}``.

    A backend's value is its version when its module imports, else None. ``gpu`` describes the CUDA devices
    found, or is None when there is none.
    """
    count, how = cuda_devices()
    return {
        "tensorrt": backend_version("tensorrt"),
        "tensorrt-rtx": backend_version("tensorrt-rtx"),
        "onnx": backend_version("onnx"),
        "gpu": how if count else None,
    }


def choose_backend(requested: str = "auto") -> tuple[str, str]:
    """(backend name, one-line reason). ``auto``: full TensorRT when it imports and a GPU is there, else
    TensorRT-RTX when it imports, else ``onnx``. An explicit backend that cannot work raises BackendError."""
    requested = requested.lower()
    if requested not in BACKEND_CHOICES:
        raise UsageError(f"unknown backend {requested!r}; choose one of: {', '.join(BACKEND_CHOICES)}")
    count, gpu_how = cuda_devices()
    if requested == "auto":
        trt, rtx = backend_version("tensorrt"), backend_version("tensorrt-rtx")
        if trt and count:
            return "tensorrt", f"TensorRT {trt} imports and {gpu_how}"
        if rtx:
            why = "no GPU for full TensorRT" if trt else "full TensorRT is not installed"
            return "tensorrt-rtx", f"TensorRT-RTX {rtx} builds ahead of time without a GPU ({why}; {gpu_how})"
        return "onnx", f"no TensorRT builder installed (tensorrt-rtx: {INSTALL_HINTS['tensorrt-rtx']}); ONNX only"
    if requested == "onnx":
        version = backend_version("onnx")
        if version is None:
            raise BackendError(f"onnxruntime does not import; {INSTALL_HINTS['onnx']}")
        return "onnx", f"requested; onnxruntime {version}"
    version = import_backend(requested).__version__
    if requested == "tensorrt" and not count:
        raise BackendError(
            f"full TensorRT {version} imports but needs a CUDA GPU to build engines ({gpu_how}); use "
            "backend 'tensorrt-rtx' to build ahead of time without a GPU, or build on a GPU machine"
        )
    return requested, f"requested; {requested} {version}" + (f" ({gpu_how})" if requested == "tensorrt" else "")
