"""Whether an operator library file is whole and fits this machine, checked before ONNX Runtime loads it.

A library is refused, with one line saying why, when:

* its file is missing, empty or shorter than its ELF headers say (a truncated ``.so`` crashes the process that
  maps it with SIGBUS instead of failing to load, so the extents are checked before ``dlopen``), or its sha256
  is not the one its record (``build.json`` beside it) gives;
* it does not load (``ctypes``) or lacks ``ExportEngineOpsBuildInfo``, or what that says differs from the record;
* it was built from other operator sources than this export-engine's (the operators' inputs and attributes are
  part of the lowerings that write them);
* it needs a newer ONNX Runtime API than the installed ONNX Runtime has (OrtApi version N is ONNX Runtime 1.N);
* (CUDA) it links another CUDA major version than ONNX Runtime's CUDA provider (it opens that major's cuBLASLt)
  or than the driver runs, or it has neither SASS for a visible GPU nor PTX it can be compiled from.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RECORD_NAME = "build.json"
RECORD_FORMAT = 1
SOURCES = ("ops.cu", "ort_abi.h")
_HERE = Path(__file__).resolve().parent
# the fields a library reports about itself (ExportEngineOpsBuildInfo); build.json adds sha256, bytes, compiler
EMBEDDED = ("format", "providers", "cuda_runtime", "ort_api", "custom_op_version", "archs", "source_hash")


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """The hash of the operator sources this export-engine carries (what a fitting library was built from)."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((_HERE / name).read_bytes())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def source_api() -> int:
    """The ONNX Runtime API version a library built from these sources needs (ort_abi.h's two versions)."""
    text = (_HERE / "ort_abi.h").read_text()
    return max(int(v) for v in re.findall(r"#define EE_ORT_(?:API|CUSTOM_OP)_VERSION (\d+)", text))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def elf_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole 64-bit little-endian ELF shared object (None: it is)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            header = f.read(64)
            if size == 0:
                return "the file is empty (zero bytes)"
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
                return f"not a 64-bit ELF shared library ({size} bytes)"
            phoff, shoff = struct.unpack_from("<QQ", header, 32)
            phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", header, 54)
            end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if len(table) < phentsize * phnum:
        return f"truncated: {size} bytes, its program headers end at byte {phoff + phentsize * phnum}"
    for i in range(phnum):
        kind, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
        if kind == 1:  # PT_LOAD
            end = max(end, offset + filesz)
    if end > size:
        return f"truncated: {size} bytes where its ELF headers need {end}"
    return None


def read_record(path: Path) -> dict[str, Any] | None:
    """The ``build.json`` beside a library (None when absent or unreadable)."""
    try:
        record = json.loads((path.parent / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def embedded_info(path: Path) -> dict[str, Any]:
    """What a (checked, whole) library says about its build. OSError / AttributeError / ValueError if it can't.

    dlopen hands back a library already loaded from the same path, whatever the file holds now: a library is
    replaced by a rename (a new file), never rewritten in place, and checked under a path of its own first."""
    lib = ctypes.CDLL(str(path))
    lib.ExportEngineOpsBuildInfo.restype = ctypes.c_char_p
    info = json.loads(lib.ExportEngineOpsBuildInfo().decode())
    if not isinstance(info, dict):
        raise ValueError("its build record is not a JSON object")
    return info


def embedded_info_from_bytes(data: bytes) -> dict[str, Any]:
    """The build record as it stands in the library's bytes (no loading): {} where there is none."""
    found = re.search(rb'\{"format": \d+, "providers": [^}]*\}', data)
    try:
        return json.loads(found.group(0)) if found else {}
    except ValueError:
        return {}


def whole_problem(path: Path) -> tuple[str | None, dict[str, Any]]:
    """(why the file is not a whole library of ours, None if it is; its build record), without loading it."""
    if not path.is_file():
        return "missing", {}
    problem = elf_problem(path)
    if problem:
        return problem, {}
    record = read_record(path)
    if record is None:
        return f"no readable {RECORD_NAME} beside it", {}
    if record.get("sha256") != sha256(path):
        return f"its sha256 is not the one {RECORD_NAME} records (the file was changed or damaged)", record
    return _differs(embedded_info_from_bytes(path.read_bytes()), record), record


def _differs(info: dict[str, Any], record: dict[str, Any]) -> str | None:
    differs = [k for k in EMBEDDED if info.get(k) != record.get(k)]
    return f"{RECORD_NAME} does not describe it ({', '.join(differs)} differ)" if differs else None


def load_problem(path: Path, record: dict[str, Any]) -> str | None:
    """Why a whole, fitting library does not load here (None: it loads and says what its record says). Loaded
    last, once everything that can be read from the file says it fits: a library a process has loaded stays the
    one it gets for that path (see :func:`embedded_info`)."""
    try:
        info = embedded_info(path)
    except (OSError, AttributeError, ValueError) as err:
        return f"does not load as export-engine's operator library ({' '.join(str(err).split())[:160]})"
    return _differs(info, record)


@dataclass(frozen=True)
class Machine:
    """What a library must fit: the installed ONNX Runtime and (for CUDA) its CUDA major, the driver, the GPUs."""

    ort_api: int | None  # OrtApi version of the installed ONNX Runtime (None: not installed)
    ort_cuda_major: int | None = None  # CUDA major ONNX Runtime's CUDA provider was built with (None: unknown)
    driver_cuda: int | None = None  # cuDriverGetVersion, e.g. 13000 (None: no driver)
    capabilities: tuple[str, ...] = ()  # visible GPUs, e.g. ("90",)


def _ort_api() -> int | None:
    try:
        from importlib import metadata

        import onnxruntime
    except ImportError:
        return None
    version = getattr(onnxruntime, "__version__", None) or metadata.version("onnxruntime")
    major, minor = (int(part) for part in version.split(".")[:2])
    return minor if major == 1 else 10**6  # OrtApi N ships in 1.N; a 2.x would have them all


def _ort_cuda_major() -> int | None:
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return None
    version = getattr(info, "cuda_version", None)
    try:
        return int(str(version).split(".")[0]) if version else None
    except ValueError:
        return None


def _driver() -> tuple[int | None, tuple[str, ...]]:
    """The CUDA driver's version and the visible GPUs' compute capabilities, through libcuda (no torch)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None, ()
    version, count = ctypes.c_int(0), ctypes.c_int(0)
    if cuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None, ()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return version.value, ()
    found = []
    for index in range(count.value):
        device, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
        if cuda.cuDeviceGet(ctypes.byref(device), index) == 0:
            cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # COMPUTE_CAPABILITY_MAJOR
            cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # COMPUTE_CAPABILITY_MINOR
            found.append(f"{major.value}{minor.value}")
    return version.value, tuple(found)


_MACHINES: dict[bool, Machine] = {}  # looked up once per process (forget_machine: again)


def this_machine(cuda: bool) -> Machine:
    if cuda not in _MACHINES:
        driver, capabilities = _driver() if cuda else (None, ())
        _MACHINES[cuda] = Machine(_ort_api(), _ort_cuda_major() if cuda else None, driver, capabilities)
    return _MACHINES[cuda]


def forget_machine() -> None:
    _MACHINES.clear()


def _archs(record: dict[str, Any]) -> list[int]:
    return [int(a) for a in str(record.get("archs", "")).replace(",", "_").split("_") if a.isdigit()]


def misfit(record: dict[str, Any], machine: Machine, cuda: bool) -> str | None:
    """Why a whole library with this build record does not fit ``machine`` (None: it fits)."""
    if record.get("format") != RECORD_FORMAT:
        return f"its build record has format {record.get('format')!r}, this export-engine reads {RECORD_FORMAT}"
    if record.get("source_hash") != source_hash():
        return (f"built from other operator sources ({record.get('source_hash')}) than this export-engine's "
                f"({source_hash()}): install the export-engine-ops of the same release")  # fmt: skip
    need = int(record.get("ort_api", 0)), int(record.get("custom_op_version", 0))
    if machine.ort_api is None:
        return "onnxruntime is not installed"
    if max(need) > machine.ort_api:
        have = machine.ort_api
        return f"needs ONNX Runtime API {max(need)} (onnxruntime >= 1.{max(need)}), the installed one has API {have}"
    runtime = int(record.get("cuda_runtime", 0))
    if not cuda:
        return None
    if "cuda" not in str(record.get("providers", "")).split(",") or not runtime:
        return "it has no CUDA kernels (a CPU build)"
    major = runtime // 1000
    if machine.ort_cuda_major is not None and machine.ort_cuda_major != major:
        return f"built for CUDA {major}, ONNX Runtime's CUDA provider uses CUDA {machine.ort_cuda_major}"
    if machine.driver_cuda is not None and machine.driver_cuda < major * 1000:
        driver = f"{machine.driver_cuda // 1000}.{machine.driver_cuda % 1000 // 10}"
        return f"built for CUDA {major}, the driver supports CUDA {driver}: update the NVIDIA driver"
    archs = _archs(record)
    for capability in machine.capabilities:
        if archs and not runs_on(archs, int(capability)):
            return f"has no code for this GPU (sm_{capability}; built for sm_{', sm_'.join(map(str, archs))})"
    return None


def runs_on(archs: list[int], capability: int) -> bool:
    """Whether a library with SASS for ``archs`` (and PTX for the last) runs on a GPU of ``capability``: SASS
    runs on its major's later minors (sm_86 code on sm_89), the PTX is compiled by the driver for newer GPUs."""
    same_major = any(a // 10 == capability // 10 and a % 10 <= capability % 10 for a in archs)
    return same_major or capability > max(archs)


def problem(path: Path, cuda: bool, machine: Machine | None = None) -> str | None:
    """Why the library at ``path`` cannot serve a session here (None: it can)."""
    why, record = whole_problem(path)
    if why:
        return why
    return misfit(record, machine or this_machine(cuda), cuda) or load_problem(path, record)


def write_record(library: Path, compiler: str) -> dict[str, Any]:
    """Write ``build.json`` beside a freshly built library: what it says about itself, its hash and size."""
    record = {k: embedded_info_from_bytes(library.read_bytes()).get(k) for k in EMBEDDED}
    record.update(sha256=sha256(library), bytes=library.stat().st_size, compiler=compiler)
    scratch = library.parent / f".{RECORD_NAME}.{os.getpid()}"
    scratch.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(scratch, library.parent / RECORD_NAME)
    return record
