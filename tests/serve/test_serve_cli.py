"""`export-engine serve` as users start it: a child process on a free port, the API, a clean stop on SIGTERM;
bad flags and artifacts refused with their exit codes before anything listens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from export_engine.cli import main
from export_engine.serve.client import ServeClient
from export_engine.serve.server import free_port

SRC = Path(__file__).resolve().parents[2] / "src"


def test_serve_runs_until_sigterm(tiny_fastsam3d: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "export_engine", "serve", str(tiny_fastsam3d), "--port", str(port), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = ServeClient(f"http://127.0.0.1:{port}", timeout=5)
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                assert client.health()["status"] == "ok"
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start within 60 s"
                time.sleep(0.2)
        sid = client.create_session(np.arange(27.0, dtype=np.float32).reshape(3, 3, 3) + 1)["id"]
        assert client.click(sid, (1, 1, 1))["clicks"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [(["--port", "70000"], 2, "--port 70000"), (["--max-upload-mb", "0"], 2, "--max-upload-mb must be positive"),
     (["--allow-root", "/no/such/folder"], 2, "is not a folder"), (["--ray", "--replicas", "0"], 2, "--replicas")],
)  # fmt: skip
def test_serve_refuses_bad_flags(tiny_fastsam3d: Path, capsys: pytest.CaptureFixture, extra: list[str], code: int,
                                 message: str) -> None:  # fmt: skip
    assert main(["serve", str(tiny_fastsam3d), *extra]) == code
    assert message in capsys.readouterr().err


def test_serve_refuses_a_missing_artifact(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", str(tmp_path / "nothing"), "--port", "0"]) == 9
    assert "not an artifact" in capsys.readouterr().err
