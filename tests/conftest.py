"""Shared fixtures: where the upstream reference data lives, skipping with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

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
