"""`export-engine serve` as users start it: a child process on a free port, the API, a clean stop on SIGTERM;
bad flags and artifacts refused with their exit codes before anything listens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export_engine.cli import main


def test_serve_runs_until_sigterm(tiny_fastsam3d: Path, serve_child: Any) -> None:
    def ready(client: Any) -> None:
        assert client.health()["status"] == "ok"

    with serve_child([str(tiny_fastsam3d)], ready, (OSError,), start_s=60, stop_s=30, poll_s=0.2,
                     client_timeout=5) as client:  # fmt: skip
        sid = client.create_session(np.arange(27.0, dtype=np.float32).reshape(3, 3, 3) + 1)["id"]
        assert client.click(sid, (1, 1, 1))["clicks"] == 1


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
