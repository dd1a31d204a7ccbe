"""Stream ordering of the engine runner, on a real GPU (marker gpu).

TensorRT cannot run on the GPU machines we have (Hopper; TensorRT-RTX targets other GPUs), so a stand-in
backend takes the engine's place: its ``execute_async_v3`` enqueues real GPU work on the stream handle the
runner passes, reading and writing the tensor addresses the runner set, exactly as an engine does. A long
device-side sleep at the start of that work, or a longer one before the producer's write, makes a missing wait
show up as a wrong value rather than a rare race. A control run with the runner's waits disabled proves the test
can see the race.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from export_engine.runners.engine import EngineRunner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (stream ordering is device-side)"),
]
SLEEP_CYCLES = 100_000_000  # ~50 ms of device time at ~2 GHz: far longer than any host-side step here


def _view(address: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A torch tensor over device memory the runner handed to the engine by address (float32)."""
    interface = {"shape": shape, "typestr": "<f4", "data": (address, False), "version": 3, "strides": None}
    return torch.as_tensor(SimpleNamespace(__cuda_array_interface__=interface), device="cuda")


class _Context:
    """Execution context of the stand-in engine: out = 2 * x, after a device-side sleep on the given stream."""

    launches = 0  # Python-side calls of execute_async_v3 (a replayed CUDA graph makes none)

    def __init__(self) -> None:
        self.addresses: dict[str, int] = {}
        self.shape: tuple[int, ...] = ()

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def set_tensor_address(self, name: str, address: int) -> None:
        self.addresses[name] = address

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shape

    def execute_async_v3(self, handle: int) -> bool:
        _Context.launches += 1
        with torch.cuda.stream(torch.cuda.ExternalStream(handle)):
            torch.cuda._sleep(SLEEP_CYCLES)  # the engine takes a while: readers must wait for it
            x, out = _view(self.addresses["x"], self.shape), _view(self.addresses["out"], self.shape)
            torch.mul(x, 2.0, out=out)
        return True


class _Logger:
    WARNING = 2

    def __init__(self, level: int) -> None:
        self.level = level


def _backend() -> Any:
    modes = SimpleNamespace(INPUT="in", OUTPUT="out")
    engine = SimpleNamespace(
        num_io_tensors=2,
        get_tensor_name=lambda i: ("x", "out")[i],
        get_tensor_mode=lambda n: modes.INPUT if n == "x" else modes.OUTPUT,
        get_tensor_dtype=lambda n: "f32",
        get_tensor_shape=lambda n: (-1,),
        create_execution_context=_Context,
    )
    runtime = SimpleNamespace(deserialize_cuda_engine=lambda blob: engine)
    return SimpleNamespace(Logger=_Logger, Runtime=lambda logger: runtime, TensorIOMode=modes,
                           float32="f32", float16="f16", int32="i32", int64="i64", bool="b", int8="i8")  # fmt: skip


@pytest.fixture(params=[False, True], ids=["launch", "cuda-graph"])
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, request: pytest.FixtureRequest) -> EngineRunner:
    import export_engine.runners.backends as backends

    monkeypatch.setattr(backends, "import_backend", lambda name: _backend())
    monkeypatch.setattr(_Context, "launches", 0)
    (tmp_path / "stand-in.engine").write_bytes(b"not an engine")
    return EngineRunner(tmp_path / "stand-in.engine", "tensorrt", cuda_graph=request.param)


def _round_trip(runner: EngineRunner, value: float, producer_cycles: int) -> float:
    """Produce x on the current stream (busy for ``producer_cycles`` first), run the engine, read its output on
    the current stream; the mean of the output as the host finally sees it."""
    x = torch.zeros(1 << 20, device="cuda")
    if producer_cycles:
        torch.cuda._sleep(producer_cycles)  # the producer is still busy when run() enqueues the engine
    x.fill_(value)
    out = runner.run({"x": x})["out"]
    result = out.sum()  # a reader on the current stream, enqueued while the engine may still be running
    torch.cuda.synchronize()
    return float(result) / x.numel()


# (value, producer's device time): a slow producer exposes an engine that does not wait for its inputs; a quick
# one (the engine is then the slow side) exposes readers that do not wait for the engine
CASES = ((3.0, 2 * SLEEP_CYCLES), (5.0, 0), (7.0, 2 * SLEEP_CYCLES), (9.0, 0))


def test_engine_waits_for_its_inputs_and_readers_wait_for_the_engine(runner: EngineRunner) -> None:
    with runner:
        for value, cycles in CASES:  # fresh values each time: a stale buffer cannot pass by accident
            assert _round_trip(runner, value, cycles) == pytest.approx(2 * value), (value, cycles)
        # one shape: a CUDA graph is captured once (a plain launch, the captured one, the first call's launch)
        # and replayed for every later call, which makes no Python-side launch
        assert _Context.launches == (3 if runner.cuda_graph else len(CASES))
        host = runner.infer({"x": np.full(16, 1.5, dtype=np.float32)})  # the Polygraphy edge: numpy in and out
        assert np.allclose(host["out"], 3.0)


def test_the_check_sees_both_races_when_the_waits_are_missing(
    runner: EngineRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda.Stream, "wait_stream", lambda self, other: None)
    with runner:
        wrong = [_round_trip(runner, value, cycles) != pytest.approx(2 * value) for value, cycles in CASES]
        torch.cuda.synchronize()
    assert wrong == [True] * len(CASES)
