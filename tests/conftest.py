"""Shared fixtures: where the upstream reference data lives, skipping with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

# Without a GPU, Triton kernels (FastNN-Lite's fused kernel) run in Triton's interpreter. The flag must be set
# before triton is first imported: triton decides at import which of its own functions are interpreted.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI clones the repo with shared/ beside it; EXPORT_ENGINE_REFERENCE overrides.
REFERENCE_ROOT = Path(os.environ.get("EXPORT_ENGINE_REFERENCE", REPO_ROOT.parent / "shared" / "reference"))


def reference_path(model: str) -> Path:
    path = REFERENCE_ROOT / model
    if not path.is_dir():
        pytest.skip(f"reference data {path} is absent (it lives in ../shared/reference beside the clone)")
    return path


@pytest.fixture(scope="session")
def mast3r_ref() -> Path:
    return reference_path("mast3r")


@pytest.fixture(scope="session")
def fastsam3d_ref() -> Path:
    return reference_path("fastsam3d")


# ---------------------------------------------------------------------------------------------------------
# Tiny exported graphs of every registered model, shared by pass/calibration/builder tests.


class TinyGraph:
    """One exported FP32 graph of a tiny random-weight model: its ONNX path, spec and representative feeds."""

    def __init__(self, path: Path, spec: object, feeds: list[dict]):
        self.path = path
        self.spec = spec
        self.feeds = feeds


@pytest.fixture(scope="session")
def tiny_graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyGraph]:
    """``{"mast3r.encoder": TinyGraph, "mast3r.decoder": ..., "fastsam3d.encoder": ..., ...}`` (FP32, ORT-checked
    by the exporter tests; two feeds per graph)."""
    import torch

    from export_engine.exporters.onnx_from_torch import onnx_from_torch
    from export_engine.exporters.registry import FAMILIES

    root = tmp_path_factory.mktemp("tiny_graphs")
    graphs: dict[str, TinyGraph] = {}
    for family in FAMILIES:
        loaded = family.load(family.tiny_config(), None, 0)
        specs = family.graphs(loaded.config, family.tiny_shape or None)
        feeds = family.parity_feeds(loaded, specs, 2, 0)
        for spec in specs:
            example = tuple(torch.from_numpy(feeds[spec.name][0][n]) for n in spec.input_names)
            path = root / f"{family.name}.{spec.name}.onnx"
            onnx_from_torch(spec.build_module(loaded.module), example, path, spec)
            graphs[f"{family.name}.{spec.name}"] = TinyGraph(path, spec, feeds[spec.name])
    return graphs


@pytest.fixture(scope="session")
def tiny_mast3r_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight MASt3R artifact at 96x64, ONNX only (exported once per test process: ~10 s on 2 cores;
    no engines, so that a GPU machine runs the same graphs through ONNX Runtime CUDA)."""
    import json

    from export_engine.cli import main
    from export_engine.exporters.mast3r import TINY_CONFIG

    root = tmp_path_factory.mktemp("tiny_mast3r")
    (root / "config.json").write_text(json.dumps(TINY_CONFIG))
    out = root / "art"
    argv = ["--model", "mast3r", "--random-weights", "--config", str(root / "config.json"), "--resolution", "96x64"]
    assert main([*argv, "--backend", "onnx", "--out", str(out), "--quiet"]) == 0
    return out
