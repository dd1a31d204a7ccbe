"""MASt3R matching on a tiny artifact: CLI, encoder cache, coordinates, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export_engine.calibration.synthetic import structured_image
from export_engine.cli import main
from export_engine.exporters.mast3r import TINY_CONFIG
from export_engine.families.mast3r.match import MatchConfig, Matcher
from export_engine.runtime.session import load


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("match")
    (root / "config.json").write_text(json.dumps(TINY_CONFIG))
    out = root / "art"
    argv = ["--model", "mast3r", "--random-weights", "--config", str(root / "config.json"), "--resolution", "96x64"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    return out


def _png(path: Path, seed: int, size: tuple[int, int] = (192, 128)) -> Path:
    image = structured_image(size[1], size[0], seed)
    Image.fromarray(((image.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)).save(path)
    return path


def test_match_cli_writes_matches_and_plot(artifact: Path, tmp_path: Path) -> None:
    a, b = _png(tmp_path / "a.png", 1), _png(tmp_path / "b.png", 2)
    out, plot = tmp_path / "m.npz", tmp_path / "m.png"
    argv = ["match", str(artifact), str(a), str(b), "--out", str(out), "--plot", str(plot), "--subsample", "4"]
    assert main(argv) == 0
    data = np.load(out)
    assert set(data.files) == {"xy1", "xy2", "conf", "xy1_original", "xy2_original", "pts3d1", "pts3d2"}
    assert len(data["xy1"]) > 0 and data["xy1"].shape == data["xy2"].shape
    assert data["xy1"][:, 0].max() < 96 - 3 and data["xy1"][:, 1].min() >= 3  # border filter
    np.testing.assert_allclose(data["xy1_original"], (data["xy1"] + 0.5) * 2 - 0.5)  # 192x128 -> 96x64
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_one_image_against_many_encodes_it_once(artifact: Path, tmp_path: Path) -> None:
    a, b, c = (_png(tmp_path / f"{n}.png", s) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    matcher = Matcher(load(artifact), MatchConfig(subsample=4))
    first = matcher.match(a, b)
    matcher.match(a, c)
    assert matcher.encoded == 3
    again = matcher.match(a, b)
    assert matcher.encoded == 3
    np.testing.assert_array_equal(first.xy1, again.xy1)


def test_match_rejects_other_artifacts_and_bad_images(
    artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "bad.png").write_bytes(b"nope")
    a = _png(tmp_path / "a.png", 1)
    assert main(["match", str(artifact), str(a), str(tmp_path / "bad.png"), "--out", str(tmp_path / "m.npz")]) == 4
    assert "could not be read" in capsys.readouterr().err
    assert not (tmp_path / "m.npz").exists()
