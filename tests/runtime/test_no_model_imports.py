"""A deployment loads and runs artifacts without the model definitions: `run`, `match` and `segment` work in a
process where importing ``export_engine.models`` (or the exporters and the export pipeline) fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export_engine.calibration.synthetic import structured_image, structured_volume
from export_engine.cli import main
from export_engine.exporters.fastsam3d import TINY_CONFIG as FASTSAM3D_TINY
from export_engine.exporters.mast3r import TINY_CONFIG as MAST3R_TINY
from export_engine.families import runtime_family

BLOCKED = ("export_engine.models", "export_engine.exporters", "export_engine.pipeline")
_RUNNER = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # importing it now raises ImportError
from export_engine.cli import main
code = main(sys.argv[1:])
assert not any(sys.modules.get(name) for name in {blocked!r})
sys.exit(code)
"""


def _cli_without_models(*argv: str) -> subprocess.CompletedProcess:
    code = _RUNNER.format(blocked=BLOCKED)
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("no_models")
    found = {}
    for model, config, extra in (("mast3r", MAST3R_TINY, ["--resolution", "96x64"]), ("fastsam3d", FASTSAM3D_TINY, [])):
        (root / f"{model}.json").write_text(json.dumps(config))
        out = root / model
        argv = ["--model", model, "--random-weights", "--config", str(root / f"{model}.json"), "--out", str(out)]
        assert main([*argv, *extra, "--quiet"]) == 0
        found[model] = out
    return found


@pytest.mark.parametrize("model", ["mast3r", "fastsam3d"])
def test_run_without_model_code(artifacts: dict[str, Path], tmp_path: Path, model: str) -> None:
    manifest = json.loads((artifacts[model] / "manifest.json").read_text())
    family = runtime_family(model)
    inputs = family.sample_inputs({g["name"]: g for g in manifest["graphs"]}, 0)
    np.savez(tmp_path / "in.npz", **inputs)
    done = _cli_without_models("run", str(artifacts[model]), "--inputs", str(tmp_path / "in.npz"), "--outputs",
                               str(tmp_path / "out.npz"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "out.npz") as out:
        assert set(out.files) == set(family.run_output_names)
        assert all(np.isfinite(out[k]).all() for k in out.files)


def test_match_and_segment_without_model_code(artifacts: dict[str, Path], tmp_path: Path) -> None:
    images = []
    for seed in (1, 2):
        image = structured_image(128, 192, seed)
        path = tmp_path / f"{seed}.png"
        Image.fromarray(((image.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)).save(path)
        images.append(str(path))
    done = _cli_without_models("match", str(artifacts["mast3r"]), *images, "--out", str(tmp_path / "m.npz"))
    assert done.returncode == 0, done.stderr
    np.save(tmp_path / "ct.npy", structured_volume(72, seed=3))
    done = _cli_without_models("segment", str(artifacts["fastsam3d"]), str(tmp_path / "ct.npy"), "--click",
                               "36,30,40", "--out", str(tmp_path / "mask.npy"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    mask = np.load(tmp_path / "mask.npy")
    assert mask.shape == (72, 72, 72)


def test_blocking_really_blocks() -> None:
    done = subprocess.run([sys.executable, "-c", _RUNNER.format(blocked=BLOCKED), "models"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0  # listing models for export needs the exporters: the block is effective
