"""Full-size exports (random weights) through the CLI: minutes and GBs, so marked slow.

Run with ``scripts/slow-tests`` (or ``python3 -m pytest -m slow``); figures go to bench/RESULTS.md through
bench/full_size_export.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model", ["mast3r", "fastsam3d"])
def test_full_size_export_passes_parity(model: str, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    cmd = [sys.executable, "-m", "export_engine.cli", "--model", model, "--random-weights", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"]
    if model == "mast3r":
        assert manifest["resolution"] == "512x384"
        tokens = next(g for g in manifest["graphs"] if g["name"] == "encoder")["outputs"][0]
        assert tokens["shape"] == ["batch", 768, 1024]
    else:
        assert manifest["resolution"] == "128x128x128"
