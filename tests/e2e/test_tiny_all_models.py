"""Every registered model goes through the whole CLI at its tiny size (completeness: new models must pass)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export_engine.cli import main
from export_engine.exporters.registry import FAMILIES
from export_engine.runtime.session import load


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_tiny_export_and_run(family, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(family.tiny_config()))
    out = tmp_path / "artifact"
    argv = [
        "--model",
        family.name,
        "--random-weights",
        "--seed",
        "3",
        "--config",
        str(config),
        "--out",
        str(out),
    ]
    if family.tiny_shape:
        argv += ["--resolution", family.tiny_shape]
    assert main([*argv, "--quiet", "--strict"]) == 0
    session = load(out)
    outputs = session.run(family.sample_inputs(session.graphs, 0))
    assert set(outputs) == set(family.run_output_names)
    for name, value in outputs.items():
        assert np.isfinite(value).all(), name
        assert value.size == 1 or value.std() > 0, f"{name} is constant: the tiny model is degenerate"
    assert json.loads((out / "manifest.json").read_text())["weights"] == {"random_weights": True, "seed": 3}
