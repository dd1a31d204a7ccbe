"""``export --bundle-operators``: the artifact carries the operator libraries this machine validated.

Each library goes to ``operators/<build>/`` (``cpu``, ``cuda13``, ...) with its ``build.json``; the manifest then
hashes them like every other file and lists them under ``operators``. A runtime that names the artifact
(:func:`export_engine.runners.ort_ops.use_bundled`) prefers them to prebuilt or cached libraries where they fit,
and a Triton ONNX Runtime model can name one as its ``op_library_filename``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from export_engine.errors import BackendError
from export_engine.runners.ort_ops import build, fit

log = logging.getLogger(__name__)

FOLDER = "operators"


def build_name(record: dict[str, Any]) -> str:
    """``cpu`` or ``cuda<major>``: the folder a library goes to in an artifact or the prebuilt wheel."""
    runtime = int(record.get("cuda_runtime", 0))
    return f"cuda{runtime // 1000}" if runtime else "cpu"


def _validated(path: Path) -> None:
    """The copy must register with the installed ONNX Runtime (which calls its RegisterCustomOps)."""
    import onnxruntime as ort

    try:
        ort.SessionOptions().register_custom_ops_library(str(path))
    except Exception as err:  # onnxruntime raises its own untyped exceptions
        detail = " ".join(str(err).split())[:200]
        raise BackendError(f"--bundle-operators: ONNX Runtime refuses {path}: {detail}") from err


def bundle_into(folder: Path) -> list[dict[str, Any]]:
    """Copy the CPU library and (where one is to be had) the CUDA library into ``folder/operators/``; returns the
    manifest's ``operators`` records. BackendError (with why) when not even the CPU library can be had."""
    from export_engine.runners import ort_ops

    chosen = [ort_ops.choose(cuda=False)]
    ok, why = ort_ops.available(cuda=True)
    if ok:
        chosen.append(ort_ops.choose(cuda=True))
    else:
        log.info("--bundle-operators: no CUDA operator library to bundle (%s)", why)
    records = []
    for choice in chosen:
        record = fit.read_record(choice.path) or {}
        target = folder / FOLDER / build_name(record)
        if target.exists():  # a CUDA build also serves the CPU: the same library chosen twice
            continue
        target.mkdir(parents=True)
        shutil.copy2(choice.path, target / build.LIBRARY_NAME)
        shutil.copy2(choice.path.parent / fit.RECORD_NAME, target / fit.RECORD_NAME)
        why_not, record = fit.whole_problem(target / build.LIBRARY_NAME)
        why_not = why_not or fit.load_problem(target / build.LIBRARY_NAME, record)
        if why_not:
            raise BackendError(f"--bundle-operators: the copy of {choice.path} {why_not}")
        _validated(target / build.LIBRARY_NAME)
        records.append({"file": f"{FOLDER}/{target.name}/{build.LIBRARY_NAME}", "source": choice.source,
                        **{k: record.get(k) for k in (*fit.EMBEDDED, "compiler")}})  # fmt: skip
        log.info("bundled export-engine's operators (%s) from %s", record.get("providers"), choice.path)
    return records
