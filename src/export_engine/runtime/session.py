"""Load an artifact and run it (ONNX Runtime on the artifact's ONNX graphs)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export_engine.artifacts.store import read_manifest, verify_files
from export_engine.errors import BackendError, ModelInputError
from export_engine.exporters.registry import get_family
from export_engine.exporters.spec import FamilySpec, GraphRunner

log = logging.getLogger(__name__)


@dataclass
class ArtifactSession:
    """A loaded artifact: ``session.run({"view1_img": ..., ...})`` returns the outputs by name."""

    path: Path
    manifest: dict[str, Any]
    family: FamilySpec
    runners: dict[str, GraphRunner]
    provider: str
    graphs: dict[str, Any] = field(default_factory=dict)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.family.run(self.runners, inputs, self.graphs)

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.family.run_input_names


def _ort_runner(path: Path, providers: list[str]) -> GraphRunner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # onnxruntime raises its own untyped exceptions
        raise BackendError(f"ONNX Runtime cannot load {path.name}: {' '.join(str(err).split())[:300]}") from err
    declared = {i.name: i for i in session.get_inputs()}

    def run(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in declared if n not in feed]
        if missing:
            raise ModelInputError(f"graph {path.stem} needs inputs {missing}")
        try:
            outputs = session.run(None, {n: feed[n] for n in declared})
        except Exception as err:  # invalid shapes and types surface here as onnxruntime errors
            raise ModelInputError(f"graph {path.stem} rejected its inputs: {' '.join(str(err).split())[:300]}") from err
        return {o.name: v for o, v in zip(session.get_outputs(), outputs, strict=True)}

    return run


def load(artifact: str | Path, verify: bool = True) -> ArtifactSession:
    """Open ``artifact`` (verifying every file's sha256 unless ``verify=False``) and prepare its graphs."""
    path = Path(artifact)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    family = get_family(manifest["model"])
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        providers.insert(0, "CUDAExecutionProvider")
    log.info("running %s with ONNX Runtime (%s)", path.name, ", ".join(providers))
    graphs = {g["name"]: g for g in manifest["graphs"]}
    runners = {name: _ort_runner(path / g["file"], providers) for name, g in graphs.items()}
    return ArtifactSession(path, manifest, family, runners, providers[0], graphs)
