"""Provoke each operator-library fault on purpose, for tests and stress benches (never called by the runtime).

Every fault leaves the runner on ONNX Runtime's own operators with one log line (or a BackendError under
``strict``), except ``corrupt``, ``truncated`` and ``zero-length`` on a cached build, which is rebuilt where a
compiler is found (``other-cuda`` and ``old-ort`` on a cached build too: a new build fits). ``provoke(kind,
library)`` damages the library file ``library`` (a cached build: ``cached_library(cuda)``, a copy of a prebuilt
one, a bundled one); ``unwritable_cache(where)`` returns a cache path that cannot be created.

=================  ==========================================================================================
``truncated``      the file cut to half its size (mapped as is, it would crash the process with SIGBUS)
``zero-length``    the file emptied
``corrupt``        bytes in its middle overwritten: its sha256 no longer matches ``build.json``
``other-cuda``     its build record says another CUDA major (the file and ``build.json`` agree: a library that is
                   whole, built for CUDA N-1)
``old-ort``        its build record says it needs a newer ONNX Runtime API than any installed (as a library
                   built for a newer ABI meets an older ONNX Runtime)
=================  ==========================================================================================
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from export_engine.runners.ort_ops import fit

LIBRARY_FAULTS = ("truncated", "zero-length", "corrupt", "other-cuda", "old-ort")  # provoke(kind, library)
KINDS = (*LIBRARY_FAULTS, "unwritable-cache")  # the last: unwritable_cache(where)


def cached_library(cuda: bool) -> Path:
    """Where this machine's first-use build lives (it exists once a session or ``doctor --build-ops`` built it);
    BackendError where no compiler is found."""
    from export_engine.runners.ort_ops import build

    return build.target(cuda)


def unwritable_cache(where: Path) -> Path:
    """A value for ``$EXPORT_ENGINE_CACHE`` that cannot be created: a folder below a regular file."""
    where.mkdir(parents=True, exist_ok=True)
    blocker = where / "not-a-folder"
    blocker.write_text("a regular file where the operator cache's parent folder should be\n")
    return blocker / "cache"


def _replace(library: Path, data: bytes) -> None:
    """A new file renamed over the old one: a process that has the old one mapped keeps it intact (writing into a
    mapped library, or truncating it, would crash that process with SIGBUS instead of showing the fault)."""
    scratch = library.with_name(f".{library.name}.fault")
    scratch.write_bytes(data)
    os.replace(scratch, library)


def _patch_record(library: Path, pattern: bytes, replace: bytes) -> None:
    """Rewrite a field of the library's embedded build record (same length), and its build.json to match."""
    data = library.read_bytes()
    found = re.search(pattern, data)
    if found is None or len(found.group(0)) != len(replace):
        raise ValueError(f"{library}: no {pattern!r} of that length in its build record")
    _replace(library, data[: found.start()] + replace + data[found.end() :])
    record = json.loads((library.parent / fit.RECORD_NAME).read_text())
    record.update({k: v for k, v in fit.embedded_info_from_bytes(library.read_bytes()).items() if k in fit.EMBEDDED})
    record.update(sha256=fit.sha256(library), bytes=library.stat().st_size)
    (library.parent / fit.RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n")


def provoke(kind: str, library: Path) -> None:
    """Damage ``library`` (a library file with its ``build.json``) in place in the way ``kind`` names."""
    data = library.read_bytes()
    middle = len(data) // 2
    if kind == "truncated":
        _replace(library, data[:middle])
    elif kind == "zero-length":
        _replace(library, b"")
    elif kind == "corrupt":
        _replace(library, data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 4096]) + data[middle + 4096 :])
    elif kind == "other-cuda":
        runtime = int(fit.embedded_info_from_bytes(library.read_bytes()).get("cuda_runtime", 0))
        if not runtime:
            raise ValueError(f"{library} is a CPU build: other-cuda needs a CUDA build")
        other = str(runtime - 1000).rjust(len(str(runtime)), "0").encode()
        _patch_record(library, rb'"cuda_runtime": ' + str(runtime).encode(), b'"cuda_runtime": ' + other)
    elif kind == "old-ort":
        _patch_record(library, rb'"ort_api": \d\d', b'"ort_api": 99')
    else:
        raise ValueError(f"unknown fault {kind!r}; valid: {list(LIBRARY_FAULTS)} (and unwritable_cache())")
