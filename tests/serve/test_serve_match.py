"""POST /match on a tiny MASt3R artifact served next to a FastSAM3D one: the same matches as Matcher in-process."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export_engine.calibration.synthetic import structured_image
from export_engine.serve.client import ServeClient, ServeError, multipart


@pytest.fixture(scope="module")
def mast3r_server(tmp_path_factory: pytest.TempPathFactory, tiny_fastsam3d: Path) -> Iterator[tuple[str, Path]]:
    from export_engine.cli import main
    from export_engine.exporters.mast3r import TINY_CONFIG
    from export_engine.serve.config import ServeConfig
    from export_engine.serve.server import BackgroundServer, build

    root = tmp_path_factory.mktemp("serve-match")
    (root / "config.json").write_text(json.dumps(TINY_CONFIG))
    art = root / "mast3r-tiny"
    argv = ["--model", "mast3r", "--random-weights", "--config", str(root / "config.json"), "--resolution", "96x64"]
    assert main([*argv, "--backend", "onnx", "--out", str(art), "--quiet"]) == 0
    config = ServeConfig(port=0)
    with BackgroundServer(build([art, tiny_fastsam3d], config), config) as server:
        yield server.url, art


def _png(path: Path, seed: int) -> Path:
    image = structured_image(128, 192, seed)
    Image.fromarray(((image.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)).save(path)
    return path


def test_match_route_equals_the_matcher(mast3r_server: tuple[str, Path], tmp_path: Path) -> None:
    from export_engine.families.mast3r.match import MatchConfig, Matcher
    from export_engine.runtime.session import load

    url, art = mast3r_server
    a, b = _png(tmp_path / "a.png", 1), _png(tmp_path / "b.png", 2)
    client = ServeClient(url)
    assert client.health()["artifacts"] == {"mast3r-tiny": "mast3r", "fastsam3d-tiny": "fastsam3d"}
    got = client.match(a, b)
    want = Matcher(load(art), MatchConfig()).match(a, b)
    assert got["count"] == len(want.xy1) > 0
    for key in ("xy1", "xy2", "xy1_original", "xy2_original", "conf"):
        np.testing.assert_allclose(np.asarray(got[key]), getattr(want, key), rtol=1e-6, atol=1e-6)
    body, content_type = multipart({"image1": ("a.png", a.read_bytes()), "image2": ("b.png", b.read_bytes())}, {})
    _, _, data = client.request("POST", "/match?format=npz", body, {"Content-Type": content_type})
    np.testing.assert_array_equal(np.load(io.BytesIO(data))["xy2"], want.xy2)
    bad, content_type = multipart({"image1": ("a.png", b"not a png"), "image2": ("b.png", b.read_bytes())}, {})
    with pytest.raises(ServeError) as err:
        client.request("POST", "/match", bad, {"Content-Type": content_type})
    assert 400 <= err.value.status < 500 and "could not be read" in err.value.detail
    assert client.create_session(np.ones((8, 8, 8), np.float32) + np.arange(8.0))["shape"] == [8, 8, 8]
