"""export-engine's own ONNX Runtime operators (domain ``ai.export_engine``), built from source on first use.

ONNX Runtime's CUDA provider runs an attention block's projection tail (bias add, q/k/v split, rotary embedding)
as four kernels that each read and write the whole tensor; ``BiasRotarySplit`` (``ops.cu``) does it in one pass.
Lowerings that emit these operators (``attention_fused``) need the library registered in the session
(:func:`register`), which compiles it the first time:

* with CUDA kernels by ``nvcc`` (``$CUDA_HOME/bin``, ``PATH`` or ``/usr/local/cuda/bin``), for Ampere to
  Blackwell (and a visible GPU outside that list), the CUDA runtime linked statically, so the library needs
  nothing at run time but a driver of nvcc's CUDA version or newer;
* CPU kernels only by a C++ compiler (``$CXX``, ``c++``, ``g++``), for the CPU provider (tests, CPU sessions).

Built libraries are cached by a hash of the sources and the build command under ``$EXPORT_ENGINE_CACHE`` (default
``~/.cache/export-engine``)``/ort-ops/``; a build writes a temporary file and renames it into place, so a failed or
concurrent build never leaves a broken library behind. Where no compiler is available, :func:`available` says
why and the runner falls back to ONNX Runtime's own operators.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from export_engine.errors import BackendError
from export_engine.graph_passes.base import OWN_DOMAIN

log = logging.getLogger(__name__)

DOMAIN = OWN_DOMAIN  # the operators' ONNX domain, as the lowerings write it
SOURCES = ("ops.cu", "ort_abi.h")
LIBRARY_NAME = "libexport_engine_ort_ops.so"
DEFAULT_ARCHS = ("80", "86", "89", "90", "100", "120")  # Ampere to Blackwell (those this nvcc supports), PTX for newer
_FAILED: dict[bool, BackendError] = {}  # builds that failed in this process: not retried on every session
BUILD_TIMEOUT_S = 900
_HERE = Path(__file__).resolve().parent


def cache_root() -> Path:
    return Path(os.environ.get("EXPORT_ENGINE_CACHE") or Path.home() / ".cache" / "export-engine") / "ort-ops"


def nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for candidate in ([str(Path(home) / "bin" / "nvcc")] if home else []) + ["nvcc", "/usr/local/cuda/bin/nvcc"]:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def cxx() -> str | None:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        found = shutil.which(candidate) if candidate else None
        if found:
            return found
    return None


@functools.lru_cache(maxsize=4)
def _supported(compiler: str) -> frozenset[str]:
    """The architectures this nvcc compiles for (``--list-gpu-arch``); empty when it does not say."""
    try:
        done = subprocess.run([compiler, "--list-gpu-arch"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(line.strip().removeprefix("compute_") for line in done.stdout.splitlines() if line.strip())


def _archs(compiler: str) -> tuple[str, ...]:
    """DEFAULT_ARCHS that this nvcc supports, plus a visible GPU's own architecture when it is not among them.

    The list does not depend on whether a GPU is visible for the usual GPUs, so a library built ahead of time on
    a machine without one (``export-engine doctor --build-ops`` in an image build) is the one the runner finds."""
    supported = _supported(compiler)
    archs = [a for a in DEFAULT_ARCHS if not supported or a in supported]
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            own = f"{major}{minor}"
            if own not in archs and (not supported or own in supported):
                archs.append(own)
    except Exception as err:  # no usable CUDA torch: the default list
        log.debug("no GPU architecture from torch (%s)", err)
    return tuple(sorted(archs, key=int))


def build_command(cuda: bool, output: Path) -> list[str]:
    source = str(_HERE / "ops.cu")
    if cuda:
        compiler = nvcc()
        if compiler is None:
            raise BackendError(
                "export-engine's CUDA operators need nvcc to build once: install the CUDA toolkit (or set "
                "CUDA_HOME); without them the CUDA runner uses ONNX Runtime's own, slower operators"
            )
        gencode = []
        archs = _archs(compiler)
        for arch in archs:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
        return [compiler, "-O3", "-std=c++17", "-shared", "-cudart", "static", "-Xcompiler",
                "-fPIC,-fvisibility=hidden", *gencode, "-o", str(output), source]  # fmt: skip
    compiler = cxx()
    if compiler is None:
        raise BackendError("export-engine's CPU operators need a C++ compiler (set CXX, or install g++)")
    return [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-x", "c++", "-o",
            str(output), source]  # fmt: skip


def _key(command: list[str]) -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((_HERE / name).read_bytes())
    # the command minus the output path (a temporary name)
    digest.update(" ".join(c for c in command if "export-engine-build-" not in c).encode())
    return digest.hexdigest()[:20]


def _target(cuda: bool) -> Path:
    probe = build_command(cuda, Path("export-engine-build-probe"))
    return cache_root() / f"{'cuda' if cuda else 'cpu'}-{_key(probe)}" / LIBRARY_NAME


def status(cuda: bool) -> str:
    """One line for ``export-engine doctor``: built, buildable on first use, or why not (builds nothing)."""
    try:
        target = _target(cuda)
    except BackendError as err:
        return f"not available: {err}"
    if target.exists():
        return f"built ({target})"
    compiler = nvcc() if cuda else cxx()
    return f"built on first use by {compiler} into {target.parent}"


@functools.lru_cache(maxsize=2)
def library(cuda: bool) -> Path:
    """The built operator library (with CUDA kernels or CPU-only), compiled on first use and cached."""
    if cuda in _FAILED:
        raise _FAILED[cuda]
    target = _target(cuda)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix="export-engine-build-", suffix=".so", dir=target.parent)
    os.close(fd)
    command = build_command(cuda, Path(scratch))
    log.info("building export-engine's ONNX Runtime operators (%s, once): %s", "CUDA" if cuda else "CPU",
             Path(command[0]).name)  # fmt: skip
    start = time.perf_counter()
    failed = f"building export-engine's ONNX Runtime operators failed ({command[0]})"
    try:
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=BUILD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            _FAILED[cuda] = BackendError(f"{failed}: {err}")
            raise _FAILED[cuda] from err
        if done.returncode != 0:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-4:])
            _FAILED[cuda] = BackendError(f"{failed}: {tail}")
            raise _FAILED[cuda]
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    log.info("built %s in %.1f s", target, time.perf_counter() - start)
    return target


def forget() -> None:
    """Forget built and failed libraries of this process (the files stay cached): the next use looks again."""
    library.cache_clear()
    _FAILED.clear()


def providers(path: Path) -> tuple[str, ...]:
    """Which kernels a built library has: ("cpu",) or ("cpu", "cuda")."""
    lib = ctypes.CDLL(str(path))
    lib.ExportEngineOpsProviders.restype = ctypes.c_char_p
    return tuple(lib.ExportEngineOpsProviders().decode().split(","))


def available(cuda: bool) -> tuple[bool, str]:
    """Whether the library can be had here (built now if needed), with the reason when it cannot."""
    try:
        library(cuda)
    except BackendError as err:
        return False, str(err)
    return True, "built"


def register(options: object, cuda: bool) -> Path:
    """Register the operator library with ONNX Runtime ``SessionOptions`` (building it first if needed)."""
    path = library(cuda)
    options.register_custom_ops_library(str(path))  # type: ignore[attr-defined]
    return path
