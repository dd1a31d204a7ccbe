"""CudaGraphRunner's capture accounting across threads, on the CPU: ONNX Runtime's CUDA provider keeps CUDA graphs
per thread, so every thread's first call of a shape must make its warm-up runs and its capture alone on the device.

The runner's ONNX Runtime and torch work is replaced by recorders; what is checked is the runner's own logic:
which calls take the gate exclusively and how many runs each makes.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

from export_engine.runners import gpu_gate, ort_cuda
from export_engine.runners.ort_cuda import CAPTURE_RUNS, CudaGraphRunner, CudaSessionConfig


class Recorder:
    """Stands in for the session: counts runs per (thread, kind of gate hold)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str, int]] = []  # (thread name, "exclusive" | "shared", runs in the call)
        self.local = threading.local()


def fake_runner(monkeypatch: pytest.MonkeyPatch, cuda_graph: bool = True) -> tuple[CudaGraphRunner, Recorder]:
    rec = Recorder()
    runner = CudaGraphRunner.__new__(CudaGraphRunner)  # no session: the recorders below stand in for it
    runner.path = ort_cuda.Path("fake.onnx")
    runner.config = CudaSessionConfig(cuda_graph=cuda_graph)
    runner.lock = threading.RLock()
    runner.session = object()
    runner._signatures = {}
    runner._local = threading.local()
    runner._generation = 1
    runner.close = lambda: None  # type: ignore[method-assign]  # nothing to release (and __del__ calls it)
    runner._check = lambda feeds: dict(feeds)  # type: ignore[method-assign]
    runner._upload = lambda tensors: tensors  # type: ignore[method-assign]
    runner._new_signature = lambda key, tensors: runner._signatures.setdefault(key, object())  # type: ignore

    def run_signature(sig: Any, tensors: Any, copy: bool) -> dict[str, Any]:
        rec.local.runs = getattr(rec.local, "runs", 0) + 1
        return {"out": tensors["x"]}

    runner._run_signature = run_signature  # type: ignore[method-assign]
    for kind in ("exclusive", "shared"):
        original = getattr(gpu_gate, kind)

        def wrapped(device: int = 0, _kind: str = kind, _original: Any = original) -> Any:
            @contextmanager
            def cm() -> Any:
                rec.local.runs = 0
                with _original(device):
                    yield
                with rec.lock:
                    rec.calls.append((threading.current_thread().name, _kind, rec.local.runs))

            return cm()

        monkeypatch.setattr(gpu_gate, kind, wrapped)
    return runner, rec


def test_every_threads_first_call_of_a_shape_captures_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    runner, rec = fake_runner(monkeypatch)
    barrier = threading.Barrier(3)

    def work() -> None:
        barrier.wait()
        for _ in range(3):
            runner.run({"x": np.zeros((2, 3))})

    threads = [threading.Thread(target=work, name=f"t{i}") for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    by_thread: dict[str, list[tuple[str, int]]] = {}
    for name, kind, runs in rec.calls:
        by_thread.setdefault(name, []).append((kind, runs))
    assert sorted(by_thread) == ["t0", "t1", "t2"]
    for calls in by_thread.values():  # each thread: one capturing call of CAPTURE_RUNS runs, then plain replays
        assert calls == [("exclusive", CAPTURE_RUNS), ("shared", 1), ("shared", 1)], calls


def test_a_new_shape_and_a_reopened_session_capture_again(monkeypatch: pytest.MonkeyPatch) -> None:
    runner, rec = fake_runner(monkeypatch)
    runner.run({"x": np.zeros((2, 3))})
    runner.run({"x": np.zeros((2, 3))})
    runner.run({"x": np.zeros((4, 3))})  # another shape: its own graph
    runner._generation += 1  # what _open does: the new session has no graphs on any thread
    runner.run({"x": np.zeros((2, 3))})
    assert [(kind, runs) for _, kind, runs in rec.calls] == [
        ("exclusive", CAPTURE_RUNS), ("shared", 1), ("exclusive", CAPTURE_RUNS), ("exclusive", CAPTURE_RUNS)
    ]  # fmt: skip


def test_runners_without_cuda_graphs_never_take_the_device_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    runner, rec = fake_runner(monkeypatch, cuda_graph=False)
    threads = [threading.Thread(target=lambda: [runner.run({"x": np.zeros((1,))}) for _ in range(2)]) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert [(kind, runs) for _, kind, runs in rec.calls] == [("shared", 1)] * 4
