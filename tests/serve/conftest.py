"""Fixtures of the service's tests: a tiny FastSAM3D artifact (random weights, 64^3 crop), a real uvicorn
server on a free localhost port, in a thread of the test process (CPU runners), and `export-engine serve` as a
child process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service's tests need the [serve] extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="the service's tests need the [serve] extra (fastapi, uvicorn)")


@pytest.fixture(scope="session")
def tiny_fastsam3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported once per test run: pytest-xdist's workers share the base temporary folder's parent, and a file
    lock lets the first worker export while the others wait for it."""
    from filelock import FileLock

    from export_engine.cli import main
    from export_engine.exporters.fastsam3d import TINY_CONFIG

    root = tmp_path_factory.getbasetemp().parent / "serve-art"
    out = root / "fastsam3d-tiny"
    with FileLock(str(root) + ".lock"):
        if not (out / "manifest.json").exists():
            root.mkdir(exist_ok=True)
            (root / "config.json").write_text(json.dumps(TINY_CONFIG))
            argv = ["--model", "fastsam3d", "--random-weights", "--config", str(root / "config.json")]
            assert main([*argv, "--backend", "onnx", "--out", str(out), "--quiet", "--force"]) == 0
    return out


@pytest.fixture(scope="session")
def volumes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Test volumes: a NIfTI with a non-trivial affine, an int16 .npy larger than the 64^3 crop."""
    import nibabel as nib

    from export_engine.calibration.synthetic import structured_volume

    root = tmp_path_factory.mktemp("volumes")
    volume = structured_volume(80, seed=5)[:, 5:75, 10:70]  # (80, 70, 60)
    nib.save(nib.Nifti1Image(volume, np.diag([1.5, 1.5, 2.0, 1.0])), str(root / "ct.nii.gz"))
    np.save(root / "big.npy", (structured_volume(100, seed=6) * 1000).astype(np.int16))
    return root


@pytest.fixture(scope="session")
def server_url(tiny_fastsam3d: Path, volumes_dir: Path) -> Iterator[str]:
    from export_engine.serve.config import ServeConfig
    from export_engine.serve.server import BackgroundServer, build

    config = ServeConfig(port=0, max_upload_mb=2.0, allow_root=volumes_dir)
    with BackgroundServer(build([tiny_fastsam3d], config), config) as server:
        yield server.url


SRC = Path(__file__).resolve().parents[2] / "src"


@contextmanager
def _serve_child(args: list[str], ready: Callable[[Any], object], waiting: tuple[type[Exception], ...],
                 start_s: float, stop_s: float, poll_s: float, client_timeout: float) -> Iterator[Any]:  # fmt: skip
    """`export-engine serve ARGS --port P --quiet` in a child process; yields a client once ``ready(client)``
    passes (retried on ``waiting`` errors for ``start_s`` seconds); stops it with SIGTERM, which must end it
    with exit 0."""
    from export_engine.serve.client import ServeClient
    from export_engine.serve.server import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "export_engine", "serve", *args, "--port", str(port), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = ServeClient(f"http://127.0.0.1:{port}", timeout=client_timeout)
        deadline = time.monotonic() + start_s
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                ready(client)
                break
            except waiting:
                assert time.monotonic() < deadline, f"the server did not start within {start_s:.0f} s"
                time.sleep(poll_s)
        yield client
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=stop_s)
    assert code == 0, proc.stdout.read().decode()[-3000:] if proc.stdout else ""


@pytest.fixture
def serve_child() -> Callable[..., AbstractContextManager[Any]]:
    """The context manager that runs `export-engine serve` as a child process (see _serve_child)."""
    return _serve_child
