"""export-engine's own ONNX Runtime operators (domain ``ai.export_engine``): a prebuilt library, or one built here.

ONNX Runtime's CUDA provider runs an attention block's projection tail (bias add, q/k/v split, rotary embedding)
as four kernels that each read and write the whole tensor; ``BiasRotarySplit`` (``ops.cu``) does it in one pass.
Lowerings that emit these operators (``attention_fused``) need the library registered in the session
(:func:`register`). The library is taken from the first of these that fits (:mod:`.fit` says what fits):

1. ``bundled``: the library an artifact carries (``export --bundle-operators``), once the runtime named the
   artifact with :func:`use_bundled`;
2. ``prebuilt``: the ``export-engine-ops`` wheel that ``pip install 'export-engine[gpu]'`` brings (or the folder
   ``$EXPORT_ENGINE_OPS_PREBUILT``), built ahead of time by ``scripts/build-ort-ops``: a CPU build and a CUDA
   build with SASS for Ampere to Blackwell and PTX for newer GPUs, the CUDA runtime linked statically;
3. ``cached build``: built on first use on this machine, by ``nvcc`` (``$CUDA_HOME/bin``, ``PATH`` or
   ``/usr/local/cuda/bin``) or, CPU kernels only, a C++ compiler (``$CXX``, ``c++``, ``g++``), and cached by a
   hash of the sources and the build command under ``$EXPORT_ENGINE_CACHE`` (default ``~/.cache/export-engine``)
   ``/ort-ops/``. A cached library that is truncated, empty or changed is rebuilt.

A library that does not fit (another CUDA major, an older ONNX Runtime API, a damaged file) is passed over with
one log line saying why. Where none can be had, :func:`available` says why and the runner falls back to ONNX
Runtime's own operators (``ort_lowering.with_own_ops``), or refuses under ``strict``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from export_engine.errors import BackendError
from export_engine.graph_passes.base import OWN_DOMAIN
from export_engine.runners.ort_ops import build, fit
from export_engine.runners.ort_ops.build import DEFAULT_ARCHS, LIBRARY_NAME, cache_root, cxx, nvcc

__all__ = [
    "DEFAULT_ARCHS",
    "DOMAIN",
    "LIBRARY_NAME",
    "PREBUILT_ENV",
    "Choice",
    "available",
    "build_here",
    "cache_root",
    "choose",
    "cxx",
    "forget",
    "library",
    "nvcc",
    "prebuilt_folders",
    "providers",
    "register",
    "status",
    "use_bundled",
]

log = logging.getLogger(__name__)

DOMAIN = OWN_DOMAIN  # the operators' ONNX domain, as the lowerings write it
PREBUILT_PACKAGE = "export_engine_ops"  # the companion wheel's import package (export-engine-ops on PyPI)
PREBUILT_ENV = "EXPORT_ENGINE_OPS_PREBUILT"  # or a folder of the same layout: cpu/, cuda13/, ... each lib + build.json
_FAILED: dict[bool, BackendError] = {}  # no library in this process: not looked for again on every session
_BUNDLED: list[Path] = []  # operator libraries of the artifact named last by use_bundled


@dataclass(frozen=True)
class Choice:
    """The library a session registers: its path, where it came from, and the libraries passed over first."""

    path: Path
    source: str  # "bundled", "prebuilt", "cached build" or "built now"
    refused: tuple[str, ...] = ()

    def describe(self) -> str:
        record = fit.read_record(self.path) or {}
        what = str(record.get("providers", "?"))
        if record.get("cuda_runtime"):
            what += f", CUDA {int(record['cuda_runtime']) // 1000}, sm_{str(record.get('archs', '')).replace('_', '/')}"
        return f"{self.source} ({what}): {self.path}"


def prebuilt_folders() -> list[Path]:
    """Folders that may hold prebuilt libraries: ``$EXPORT_ENGINE_OPS_PREBUILT``, then the installed wheel's."""
    folders = [Path(os.environ[PREBUILT_ENV])] if os.environ.get(PREBUILT_ENV) else []
    spec = importlib.util.find_spec(PREBUILT_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(p) for p in spec.submodule_search_locations]
    return folders


def _ordered(libraries: list[Path], cuda: bool) -> list[Path]:
    """CUDA sessions take CUDA builds, newest CUDA major first; CPU sessions the CPU build, then any other."""
    if cuda:
        return sorted((p for p in libraries if p.parent.name != "cpu"), key=lambda p: p.parent.name, reverse=True)
    return sorted(libraries, key=lambda p: (p.parent.name != "cpu", p.parent.name))


def _candidates(cuda: bool) -> list[tuple[str, Path]]:
    prebuilt = [p for folder in prebuilt_folders() for p in folder.glob(f"*/{LIBRARY_NAME}")]
    return [("bundled", p) for p in _ordered(_BUNDLED, cuda)] + [("prebuilt", p) for p in _ordered(prebuilt, cuda)]


def _bundled_problem(path: Path) -> str | None:
    """A bundled library must also be the one its artifact's manifest hashed."""
    artifact = path.parent.parent.parent
    try:
        files = json.loads((artifact / "manifest.json").read_text()).get("files", {})
    except (OSError, ValueError):
        return "its artifact has no readable manifest.json"
    record = files.get(path.relative_to(artifact).as_posix())
    if record is None:
        return "not listed in its artifact's manifest"
    if record.get("sha256") != fit.sha256(path):
        return "does not match the sha256 in its artifact's manifest"
    return None


def _problem(source: str, path: Path, cuda: bool) -> str | None:
    return (_bundled_problem(path) if source == "bundled" else None) or fit.problem(path, cuda)


@functools.lru_cache(maxsize=2)
def choose(cuda: bool) -> Choice:
    """The library to use (with CUDA kernels or CPU-only): bundled, prebuilt, cached or built now."""
    if cuda in _FAILED:
        raise _FAILED[cuda]
    refused: list[str] = []
    for source, path in _candidates(cuda):
        why = _problem(source, path, cuda)
        if why is None:
            if refused:
                log.info("export-engine's operators: %s; using the %s library %s", "; ".join(refused), source, path)
            return Choice(path, source, tuple(refused))
        refused.append(f"{source} {path} refused: {why}")
    try:
        path, how = build.cached(cuda)
    except BackendError as err:
        _FAILED[cuda] = BackendError("; ".join([*refused, str(err)]))
        raise _FAILED[cuda] from err
    why = fit.misfit(fit.read_record(path) or {}, fit.this_machine(cuda), cuda)
    if why:  # built here, yet it does not fit (e.g. nvcc of another CUDA major than ONNX Runtime's)
        _FAILED[cuda] = BackendError("; ".join([*refused, f"the {how} library {path} does not fit: {why}"]))
        raise _FAILED[cuda]
    if refused:
        log.info("export-engine's operators: %s; using the %s library %s", "; ".join(refused), how, path)
    return Choice(path, how, tuple(refused))


def library(cuda: bool) -> Path:
    """The operator library's path (with CUDA kernels or CPU-only); BackendError says why there is none."""
    return choose(cuda).path


def build_here(cuda: bool) -> Path:
    """Build (or find cached) this machine's own library, whatever prebuilt one there is (``doctor --build-ops``)."""
    return build.cached(cuda)[0]


def forget() -> None:
    """Forget chosen and failed libraries of this process (the files stay): the next use looks again."""
    choose.cache_clear()
    fit.forget_machine()
    _FAILED.clear()


def use_bundled(artifact: Path | None) -> tuple[Path, ...]:
    """Prefer the operator libraries ``artifact`` carries (``operators/<build>/``) from now on in this process;
    None (or an artifact without any) goes back to prebuilt and cached libraries. Returns those found."""
    found = sorted(Path(artifact).glob(f"operators/*/{LIBRARY_NAME}")) if artifact is not None else []
    if found != _BUNDLED:
        _BUNDLED[:] = found
        forget()
    return tuple(found)


def providers(path: Path) -> tuple[str, ...]:
    """Which kernels a built library has: ("cpu",) or ("cpu", "cuda")."""
    return tuple(str(fit.embedded_info(path)["providers"]).split(","))


def available(cuda: bool) -> tuple[bool, str]:
    """Whether the library can be had here (built now if needed): (True, where from) or (False, why not)."""
    try:
        return True, choose(cuda).describe()
    except BackendError as err:
        return False, str(err)


def register(options: object, cuda: bool) -> Path:
    """Register the operator library with ONNX Runtime ``SessionOptions`` (building it first if needed)."""
    path = library(cuda)
    options.register_custom_ops_library(str(path))  # type: ignore[attr-defined]
    return path


def status(cuda: bool) -> str:
    """One line for ``export-engine doctor``: which library a session would use and why (builds nothing)."""
    refused: list[str] = []
    for source, path in _candidates(cuda):
        why = _problem(source, path, cuda)
        if why is None:
            return Choice(path, source).describe() + (f" ({'; '.join(refused)})" if refused else "")
        refused.append(f"{source} {path} refused: {why}")
    after = f" ({'; '.join(refused)})" if refused else " (no prebuilt library installed: export-engine-ops)"
    have = fit.this_machine(cuda).ort_api
    if have is not None and have < fit.source_api():
        return f"none: the operators need ONNX Runtime API {fit.source_api()}, the installed one has API {have}{after}"
    try:
        target = build.target(cuda)
    except BackendError as err:
        return f"none: {err}{after}"
    damaged = fit.problem(target, cuda) if target.is_file() else None
    if target.is_file() and damaged is None:
        return Choice(target, "cached build").describe() + after
    compiler = build.nvcc() if cuda else build.cxx()
    again = f"rebuilt ({damaged}) " if damaged else "built "
    return f"{again}on first use by {compiler} into {target.parent}{after}"
