"""MASt3R matching on a tiny artifact: CLI, encoder cache, coordinates, bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export_engine.calibration.synthetic import structured_image
from export_engine.cli import main
from export_engine.families.mast3r.images import load_image
from export_engine.families.mast3r.match import MatchConfig, Matcher
from export_engine.runtime.session import load


@pytest.fixture(scope="module")
def artifact(tiny_mast3r_artifact: Path) -> Path:
    return tiny_mast3r_artifact


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


def test_tokens_are_cached_by_file_and_by_object(artifact: Path, tmp_path: Path) -> None:
    a, b = _png(tmp_path / "a.png", 1), _png(tmp_path / "b.png", 2)
    matcher = Matcher(load(artifact), MatchConfig(subsample=4))
    matcher.prefetch(a, b)
    first = matcher.match(a, b)
    assert matcher.encoded == 2
    assert matcher.match(str(a), b).image1 is first.image1  # same file: neither decoded nor encoded again
    assert matcher.encoded == 2
    _png(a, 3)  # the file changes: its size or modification time differ, so it is read and encoded anew
    os.utime(a, ns=(1, 1))
    changed = matcher.match(a, b)
    assert matcher.encoded == 3 and not np.array_equal(changed.image1.rgb, first.image1.rgb)
    assert matcher.load(b) is changed.image2  # a cached file's image comes from the cache
    loaded, twin = load_image(b, 96, 64), load_image(b, 96, 64)
    matcher.match(loaded, twin)  # distinct objects with equal pixels: keyed by identity, so each is encoded
    assert matcher.encoded == 5
    matcher.match(loaded, twin)
    assert matcher.encoded == 5
    matcher.close()


def test_matcher_shared_by_threads_gives_the_sequential_results(artifact: Path, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    files = [_png(tmp_path / f"{k}.png", k) for k in range(4)]
    pairs = [(files[i], files[j]) for i in range(4) for j in range(i + 1, 4)]
    sequential = Matcher(load(artifact), MatchConfig(subsample=4, cache_size=2))
    expected = [sequential.match(a, b) for a, b in pairs]
    shared = Matcher(load(artifact), MatchConfig(subsample=4, cache_size=2, workers=3))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: shared.match(*p), pairs * 2))
    for got, want in zip(results, expected * 2, strict=True):
        np.testing.assert_array_equal(got.xy1, want.xy1)
        np.testing.assert_array_equal(got.xy2, want.xy2)
        np.testing.assert_array_equal(got.conf, want.conf)
    shared.close()
