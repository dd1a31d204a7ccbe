"""Compiling the operator library: the compilers, the command, and the per-machine cache of first-use builds.

A build goes into a hidden staging folder beside its target, is checked the way any library is before use
(:mod:`.fit`: whole, loads, says what it was built against), and only then renamed into place with its
``build.json``. Builds of one target are serialised across processes by a lock file beside it: processes that
start together wait for the first build instead of compiling once each, and find it when they get the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from export_engine.errors import BackendError
from export_engine.runners.ort_ops import fit

log = logging.getLogger(__name__)

LIBRARY_NAME = "libexport_engine_ort_ops.so"
DEFAULT_ARCHS = ("80", "86", "89", "90", "100", "120")  # Ampere to Blackwell (those this nvcc supports), PTX for newer
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
def supported(compiler: str) -> frozenset[str]:
    """The architectures this nvcc compiles for (``--list-gpu-arch``); empty when it does not say."""
    try:
        done = subprocess.run([compiler, "--list-gpu-arch"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(line.strip().removeprefix("compute_") for line in done.stdout.splitlines() if line.strip())


def archs_for(compiler: str) -> tuple[str, ...]:
    """DEFAULT_ARCHS that this nvcc supports, plus a visible GPU's own architecture when it is not among them.

    The list does not depend on whether a GPU is visible for the usual GPUs, so a library built ahead of time on
    a machine without one (``export-engine doctor --build-ops`` in an image build) is the one the runner finds."""
    have = supported(compiler)
    archs = [a for a in DEFAULT_ARCHS if not have or a in have]
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            own = f"{major}{minor}"
            if own not in archs and (not have or own in have):
                archs.append(own)
    except Exception as err:  # no usable CUDA torch: the default list
        log.debug("no GPU architecture from torch (%s)", err)
    return tuple(sorted(archs, key=int))


def build_command(cuda: bool, output: Path, archs: Sequence[str] | None = None) -> list[str]:
    """The compiler command that writes the library to ``output``; ``archs`` overrides :func:`archs_for`."""
    source = str(_HERE / "ops.cu")
    record = [f"-DEE_SOURCE_HASH={fit.source_hash()}"]
    if cuda:
        compiler = nvcc()
        if compiler is None:
            raise BackendError(
                "export-engine's CUDA operators need nvcc to build once: install the CUDA toolkit (or set "
                "CUDA_HOME), or the prebuilt export-engine-ops wheel (pip install 'export-engine[gpu]'); without "
                "them the CUDA runner uses ONNX Runtime's own, slower operators"
            )
        archs = tuple(archs or archs_for(compiler))
        gencode = []
        for arch in archs:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
        # nvcc from PyPI (nvidia-cuda-nvcc) keeps libcudart_static.a in <toolkit>/lib, where its profile does not look
        libs = Path(compiler).resolve().parent.parent / "lib"
        found = [f"-L{libs}"] if (libs / "libcudart_static.a").is_file() else []
        return [compiler, "-O3", "-std=c++17", "-shared", "-cudart", "static", *found, "-Xcompiler",
                "-fPIC,-fvisibility=hidden", *gencode, *record, f"-DEE_ARCHS={'_'.join(archs)}", "-o", str(output),
                source]  # fmt: skip
    compiler = cxx()
    if compiler is None:
        raise BackendError("export-engine's CPU operators need a C++ compiler (set CXX, or install g++)")
    return [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", *record, "-x", "c++", "-o",
            str(output), source]  # fmt: skip


def compile_into(folder: Path, cuda: bool, archs: Sequence[str] | None = None) -> Path:
    """Build the library into ``folder`` (which must exist) with its ``build.json``; BackendError if it fails."""
    output = folder / LIBRARY_NAME
    command = build_command(cuda, output, archs)
    failed = f"building export-engine's ONNX Runtime operators failed ({command[0]})"
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BackendError(f"{failed}: {err}") from err
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-4:])
        raise BackendError(f"{failed}: {tail}")
    version = subprocess.run([command[0], "--version"], capture_output=True, text=True, check=False, timeout=60)
    lines = (version.stdout or "").strip().splitlines() or [""]
    said = next((line for line in lines if "release" in line), lines[0])  # nvcc: "... release 13.0, V13.0.88"
    fit.write_record(output, f"{Path(command[0]).name}: {said}")
    why, record = fit.whole_problem(output)
    why = why or fit.load_problem(output, record)  # loaded under the build's own (staging) path
    if why:
        raise BackendError(f"{failed}: the new library {why}")
    return output


def _key(cuda: bool) -> str:
    """The cache key: the sources and the build command (less its output path)."""
    digest = hashlib.sha256()
    for name in fit.SOURCES:
        digest.update((_HERE / name).read_bytes())
    digest.update(" ".join(build_command(cuda, Path(LIBRARY_NAME))).encode())
    return f"{'cuda' if cuda else 'cpu'}-{digest.hexdigest()[:20]}"


def target(cuda: bool) -> Path:
    """Where the first-use build of this machine's compiler lives (BackendError: no compiler)."""
    return cache_root() / _key(cuda) / LIBRARY_NAME


def unwritable(root: Path, err: OSError) -> BackendError:
    return BackendError(
        f"export-engine's operator cache {root} is not writable ({type(err).__name__}: {err.strerror or err}): set "
        "EXPORT_ENGINE_CACHE to a writable folder"
    )


@contextlib.contextmanager
def _locked(path: Path, wait_s: float) -> Iterator[None]:
    with path.open("a") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BackendError(f"another process has held {path} for {wait_s:.0f} s (a stuck build?)") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _problem(library: Path, cuda: bool) -> str | None:
    """Why a cached build cannot serve (None: it can): not whole, or made for another machine than this one (a
    toolkit or ONNX Runtime replaced in place since); either way a new build may."""
    return fit.problem(library, cuda)


def cached(cuda: bool) -> tuple[Path, str]:
    """The first-use build for this machine: (path, "cached build" or "built now"). A cached library that is not
    whole (truncated, empty, changed) or does not fit is rebuilt with one log line; BackendError where none can
    be had."""
    library = target(cuda)
    root = library.parent.parent
    have = fit.this_machine(cuda).ort_api
    if have is not None and have < fit.source_api():  # no build of these sources can fit: none is tried
        raise BackendError(f"export-engine's operators need ONNX Runtime API {fit.source_api()} (onnxruntime >= "
                           f"1.{fit.source_api()}), the installed one has API {have}: upgrade onnxruntime")  # fmt: skip
    if library.is_file() and _problem(library, cuda) is None:
        return library, "cached build"
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = root / f"{library.parent.name}.lock"
        with _locked(lock, BUILD_TIMEOUT_S):
            if library.parent.exists():
                why = _problem(library, cuda)
                if why is None:  # another process built it while this one waited
                    return library, "cached build"
                log.warning("cached operator library %s refused (%s): rebuilding it", library, why)
            _build_in_place(library, cuda)
    except BackendError:
        raise
    except OSError as err:
        raise unwritable(root, err) from err
    return library, "built now"


def _build_in_place(library: Path, cuda: bool) -> None:
    log.info("building export-engine's ONNX Runtime operators (%s, once) into %s", "CUDA" if cuda else "CPU",
             library.parent)  # fmt: skip
    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{library.parent.name}.build-", dir=library.parent.parent))
    staging.chmod(0o755)  # as a plain mkdir would make it: others on the machine may read the cache
    try:
        compile_into(staging, cuda)
        if library.parent.exists():  # a damaged build: moved aside first (a rename, then removed)
            old = Path(tempfile.mkdtemp(prefix=f".{library.parent.name}.old-", dir=library.parent.parent))
            os.replace(library.parent, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, library.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("built %s in %.1f s", library, time.perf_counter() - start)
