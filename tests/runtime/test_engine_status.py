"""Engine parity status through the runtime and verify: passed runs, failed is refused, pending is checked on
the stored reference at load (or settled by verify --run's record), never shown as passed.

No engine can run on a CPU machine, so an ONNX Runtime runner of the same graph stands in for one (a correct
engine), or the same runner with its outputs scaled (an engine that computes the wrong thing)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export_engine.artifacts.status import VERIFICATION, artifact_status
from export_engine.cli import main
from export_engine.errors import ParityError
from export_engine.exporters.fastsam3d import TINY_CONFIG
from export_engine.runners import engine as engine_runner
from export_engine.runtime import session
from export_engine.runtime.session import load, ort_cpu_runner


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("engine_status")
    (root / "config.json").write_text(json.dumps(TINY_CONFIG))
    out = root / "fastsam3d"
    args = ["--model", "fastsam3d", "--random-weights", "--backend", "onnx", "--quiet", "--config",
            str(root / "config.json"), "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    return out


def _with_engines(exported: Path, tmp_path: Path, status: str) -> Path:
    """A copy of the artifact whose manifest records a (stand-in) engine per graph with parity ``status``."""
    import shutil

    art = tmp_path / f"art-{status}"
    shutil.copytree(exported, art)
    manifest = json.loads((art / "manifest.json").read_text())
    (art / "engines").mkdir()
    manifest["engines"] = []
    for graph in manifest["graphs"]:
        (art / "engines" / f"{graph['name']}.engine").write_bytes(b"stand-in")
        parity: dict[str, Any] = {"status": status}
        if status == "pending":
            parity["reason"] = "no GPU of the engine's compute capability on the exporting machine"
        manifest["engines"].append({"graph": graph["name"], "file": f"engines/{graph['name']}.engine",
                                    "backend": "tensorrt", "backend_version": "10.0", "parity": parity})  # fmt: skip
    (art / "manifest.json").write_text(json.dumps(manifest))
    return art


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], list[str]]:
    """Make every engine 'runnable' and run it as ONNX Runtime on its graph, outputs times ``scale``;
    returns the list that records each engine opened."""
    opened: list[str] = []

    def install(scale: float) -> list[str]:
        opened.clear()

        def fake_runner(path: Path, backend: str, cuda_graph: bool = False) -> Any:
            artifact = path.parent.parent
            name = path.stem
            meta = next(g for g in json.loads((artifact / "manifest.json").read_text())["graphs"] if g["name"] == name)
            run = ort_cpu_runner(artifact / meta["file"], meta)
            opened.append(name)
            return lambda feed: {k: (v * scale if v.dtype.kind == "f" else v) for k, v in run(feed).items()}

        monkeypatch.setattr(engine_runner, "can_run_engine", lambda path, backend: (True, "stand-in engine"))
        monkeypatch.setattr(session, "_engine_runner", fake_runner)
        return opened

    return install


def test_passed_engines_run_without_a_check(exported: Path, tmp_path: Path, stand_in: Any) -> None:
    opened = stand_in(1.0)
    art = _with_engines(exported, tmp_path, "passed")
    loaded = load(art)
    assert loaded.engine_graphs == {"encoder", "prompt_decoder"} and sorted(opened) == sorted(loaded.engine_graphs)
    assert artifact_status(json.loads((art / "manifest.json").read_text())).status == "passed"


def test_failed_engines_are_refused(exported: Path, tmp_path: Path, stand_in: Any) -> None:
    stand_in(1.0)
    art = _with_engines(exported, tmp_path, "failed")
    with pytest.raises(ParityError, match="failed its parity check at export"):
        load(art)
    assert load(art, use_engines=False).engine_graphs == frozenset()  # ONNX Runtime instead, on request
    assert main(["verify", str(art)]) == 7


def test_pending_engines_are_checked_at_load(exported: Path, tmp_path: Path, stand_in: Any,
                                             caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    stand_in(1.0)
    art = _with_engines(exported, tmp_path, "pending")
    # the package's logger: a CLI run earlier in this process (--quiet) may have left it at WARNING
    with caplog.at_level(logging.INFO, logger="export_engine"):
        loaded = load(art)
    assert loaded.engine_graphs == {"encoder", "prompt_decoder"}
    assert sum("engine parity passed here" in r.getMessage() for r in caplog.records) == 2


def test_a_pending_engine_that_computes_wrong_is_refused_with_the_table(exported: Path, tmp_path: Path,
                                                                         stand_in: Any) -> None:  # fmt: skip
    stand_in(1.5)
    art = _with_engines(exported, tmp_path, "pending")
    with pytest.raises(ParityError, match=r"fails parity on this machine(.|\n)*max abs"):
        load(art)
    loaded = load(art, self_check=False)  # documented opt-out: runs unchecked, with a warning
    assert loaded.engine_graphs == {"encoder", "prompt_decoder"}


def test_verify_says_pending_and_verify_run_writes_a_record_later_loads_accept(
    exported: Path, tmp_path: Path, stand_in: Any, capsys: pytest.CaptureFixture
) -> None:
    stand_in(1.0)
    art = _with_engines(exported, tmp_path, "pending")
    capsys.readouterr()
    assert main(["verify", str(art)]) == 0
    out = capsys.readouterr().out
    assert "pending  engine encoder (tensorrt) parity" in out and "check(s) pending" in out
    assert "ok       engine encoder (tensorrt) parity" not in out
    assert main(["inspect", str(art)]) == 0
    assert "status      pending" in capsys.readouterr().out

    assert main(["verify", str(art), "--run"]) == 0
    record = json.loads((art / VERIFICATION).read_text())
    assert {e["graph"]: e["status"] for e in record["engines"]} == {"encoder": "passed", "prompt_decoder": "passed"}
    assert main(["verify", str(art)]) == 0  # the record is outside the hashed set: files still verify
    out = capsys.readouterr().out
    assert "pending " not in out and out.strip().endswith("verified")

    opened = stand_in(1.5)  # a later load on the same machine trusts the record: no check, no refusal
    assert load(art).engine_graphs == {"encoder", "prompt_decoder"} and len(opened) == 2


def test_verify_run_records_a_failing_engine_and_later_loads_refuse_it(exported: Path, tmp_path: Path,
                                                                        stand_in: Any) -> None:  # fmt: skip
    stand_in(1.5)
    art = _with_engines(exported, tmp_path, "pending")
    assert main(["verify", str(art), "--run"]) == 7
    record = json.loads((art / VERIFICATION).read_text())
    assert {e["status"] for e in record["engines"]} == {"failed"}
    stand_in(1.0)
    with pytest.raises(ParityError, match="failed its parity check on this GPU"):
        load(art)
    np.testing.assert_equal(artifact_status(json.loads((art / "manifest.json").read_text()), record).status,
                            "failed")  # fmt: skip
