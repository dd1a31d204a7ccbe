"""export-engine: validated inference artifacts for MASt3R and FastSAM3D.

    import export_engine as ee

    result = ee.export("fastsam3d", "hybrid", random_weights=True, backend="onnx")   # -> ExportResult
    session = ee.load(result.artifact)                                            # -> ArtifactSession
    outputs = session.run(inputs)                                                 # numpy in, numpy out

    matcher = ee.Matcher(ee.load("mast3r-hybrid-512x384", cuda_graph=True))      # image matching
    segmenter = ee.SegmentSession(ee.load("fastsam3d-hybrid-128"))               # click segmentation

Importing this package is light: torch, ONNX Runtime and the model code load when a function needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from export_engine.families.fastsam3d.segment import SegmentSession
    from export_engine.families.mast3r.match import MatchConfig, Matcher
    from export_engine.pipeline import ExportResult
    from export_engine.runtime.session import ArtifactSession

__all__ = ["ArtifactSession", "MatchConfig", "Matcher", "SegmentSession", "__version__", "export", "list_models",
           "load"]  # fmt: skip


def export(model: str, precision: str = "fp32", **options: Any) -> ExportResult:
    """Export ``model`` ("mast3r" or "fastsam3d") at ``precision`` ("fp32", "fp16" or "hybrid") to an artifact.

    ``options`` are the CLI's flags in snake case: ``checkpoint`` (path or Hugging Face id) or
    ``random_weights=True``, ``out`` (default ``./<model>-<precision>-<shape>``), ``force``, ``resolution``
    ("512x384"), ``backend`` ("auto", "onnx", "tensorrt", "tensorrt-rtx"), ``config_file``, ``seed``,
    ``calibration_data``, ``precision_plan``, ``strict``... Returns the :class:`ExportResult` (``.artifact`` is
    the folder). Raises a subclass of :class:`export_engine.errors.ExportError` (its ``exit_code`` is the CLI's)
    and writes nothing when a gate fails.
    """
    from export_engine.pipeline import export as run_export
    from export_engine.pipeline import export_config

    return run_export(export_config(model, precision, **options))


def load(artifact: str | Path, **options: Any) -> ArtifactSession:
    """Open an artifact: files verified against their sha256, each graph on its engine where one runs here (and
    its parity holds), else ONNX Runtime on CUDA or the CPU. ``options``: ``verify`` (default True),
    ``use_engines``, ``cuda_graph`` (for repeated shapes), ``self_check`` (check rewrites and pending engines
    on the stored reference input: one inference per graph, default True), ``strict``."""
    from export_engine.runtime.session import load as load_session

    return load_session(artifact, **options)


def list_models() -> list[str]:
    """The model names ``export`` takes."""
    from export_engine.exporters.registry import list_models as names

    return names()


def __getattr__(name: str) -> Any:
    """The session classes, imported on first use."""
    if name in ("Matcher", "MatchConfig"):
        from export_engine.families.mast3r import match

        return getattr(match, name)
    if name == "SegmentSession":
        from export_engine.families.fastsam3d.segment import SegmentSession

        return SegmentSession
    if name == "ArtifactSession":
        from export_engine.runtime.session import ArtifactSession

        return ArtifactSession
    raise AttributeError(f"module 'export_engine' has no attribute {name!r}")
