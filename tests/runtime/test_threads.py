"""The runtime's thread contract on the CPU: an artifact session and its runners shared by several threads give
every caller its own, correct outputs, and a closed session refuses to run. (The same on CUDA, with CUDA graphs,
is a gpu test in tests/runners/test_ort_cuda.py and bench/gpu_stress.py.)"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from export_engine.cli import main
from export_engine.errors import BackendError
from export_engine.exporters.mast3r import TINY_CONFIG
from export_engine.runtime.session import load


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("threads")
    (root / "config.json").write_text(json.dumps(TINY_CONFIG))
    out = root / "mast3r-fp32"
    args = ["--model", "mast3r", "--precision", "fp32", "--random-weights", "--backend", "onnx", "--quiet",
            "--config", str(root / "config.json"), "--resolution", "64x48", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    return out


def test_a_session_shared_by_threads_gives_each_caller_its_own_answer(artifact: Path) -> None:
    session = load(artifact)
    rng = np.random.default_rng(0)
    feeds = [
        {name: rng.uniform(-1, 1, (1, 3, 48, 64)).astype(np.float32) for name in ("view1_img", "view2_img")}
        for _ in range(6)
    ]
    alone = [session.run(feed) for feed in feeds]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(session.run, feeds * 3))
    for i, got in enumerate(together):
        want = alone[i % len(feeds)]
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"call {i}, output {name}")


def test_a_closed_session_releases_and_refuses(artifact: Path) -> None:
    with load(artifact) as session:
        encoder = session.runners["encoder"]
        assert callable(encoder)
    session.close()  # idempotent
    with pytest.raises(BackendError, match="closed"):
        session.run({n: np.zeros((1, 3, 48, 64), np.float32) for n in ("view1_img", "view2_img")})
