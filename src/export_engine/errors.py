"""Error hierarchy: one class per stage, each with its own CLI exit code.

The CLI catches :class:`ExportError`, prints ``str(err)`` on one line and exits with ``err.exit_code``.
Messages say what failed, where, what was observed vs expected and what to do next.
"""

from __future__ import annotations


class ExportError(Exception):
    """Root of every error export-engine raises on purpose."""

    exit_code = 1


class UsageError(ExportError):
    """Bad command-line arguments or configuration (unknown model, precision, resolution ...)."""

    exit_code = 2


class CheckpointError(ExportError):
    """A checkpoint is missing, corrupt, or holds the weights of another model."""

    exit_code = 3


class ModelInputError(ExportError):
    """Inputs given to a model or artifact have the wrong names, shapes, dtypes or values."""

    exit_code = 4


class OnnxExportError(ExportError):
    """torch -> ONNX export failed."""

    exit_code = 5


class GraphPassError(ExportError):
    """A graph pass failed or (under --strict) matched an unexpected number of patterns."""

    exit_code = 6


class ParityError(ExportError):
    """Numerical parity against the FP32 reference failed; no artifact is written."""

    exit_code = 7


class BackendError(ExportError):
    """A requested backend (TensorRT, TensorRT-RTX, onnxruntime provider) is missing or failed."""

    exit_code = 8


class ArtifactError(ExportError):
    """An artifact is missing, incomplete, tampered with, or already present at the target."""

    exit_code = 9


class EngineBuildError(ExportError):
    """The engine builder failed or crashed."""

    exit_code = 10
