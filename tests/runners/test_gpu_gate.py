"""The device gate: many shared holders or one exclusive holder, re-entrant, upgrades that cannot deadlock, and a
waiting capture that is not starved. Plain threads (no GPU needed)."""

from __future__ import annotations

import threading
import time

import pytest

from export_engine.runners import gpu_gate
from export_engine.runners.gpu_gate import DeviceGate


def _in_thread(fn: object) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


def test_shared_holders_run_together_and_exclusive_waits_for_them() -> None:
    gate = DeviceGate()
    inside = threading.Barrier(3, timeout=5)
    release = threading.Event()
    order: list[str] = []

    def reader() -> None:
        with gate.shared():
            inside.wait()  # all three threads hold it at once, or this times out
            release.wait(5)
            order.append("reader out")

    def writer() -> None:
        with gate.exclusive():
            order.append("writer in")

    readers = [_in_thread(reader), _in_thread(reader)]
    inside.wait()
    assert gate.state() == (2, False)
    w = _in_thread(writer)
    time.sleep(0.1)
    assert "writer in" not in order  # two shared holders keep it out
    release.set()
    for t in (*readers, w):
        t.join(5)
    assert order == ["reader out", "reader out", "writer in"]
    assert gate.state() == (0, False)


def test_a_waiting_exclusive_holder_blocks_new_shared_holders() -> None:
    gate = DeviceGate()
    order: list[str] = []
    first_in = threading.Event()
    release_first = threading.Event()

    def first() -> None:
        with gate.shared():
            first_in.set()
            release_first.wait(5)
        order.append("first out")

    def writer() -> None:
        with gate.exclusive():
            order.append("writer")

    def late_reader() -> None:
        with gate.shared():
            order.append("late reader")

    t1 = _in_thread(first)
    first_in.wait(5)
    tw = _in_thread(writer)
    time.sleep(0.1)
    t2 = _in_thread(late_reader)
    time.sleep(0.1)
    assert order == []  # the late reader queues behind the waiting writer
    release_first.set()
    for t in (t1, tw, t2):
        t.join(5)
    assert order.index("writer") < order.index("late reader")


def test_reentrant_and_upgrade_from_two_threads_does_not_deadlock() -> None:
    gate = DeviceGate()
    both_shared = threading.Barrier(2, timeout=5)
    done: list[int] = []

    def upgrade(i: int) -> None:
        with gate.shared(), gate.shared():
            both_shared.wait()
            with gate.exclusive(), gate.exclusive():  # each gives its shared hold up while it waits
                assert gate.state()[1]
                done.append(i)
            assert gate.state()[0] >= 1  # the shared hold is back
        done.append(-i)

    threads = [_in_thread(lambda i=i: upgrade(i)) for i in (1, 2)]
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads), "two upgrading threads deadlocked"
    assert sorted(done) == [-2, -1, 1, 2]
    assert gate.state() == (0, False)


def test_suspended_lets_a_capture_through_and_takes_the_hold_back() -> None:
    gate = DeviceGate()
    captured = threading.Event()

    def capture() -> None:
        with gate.exclusive():
            captured.set()

    with gate.shared():
        t = _in_thread(capture)
        time.sleep(0.05)
        assert not captured.is_set()
        with gate.suspended():
            assert captured.wait(5)  # the capture ran while this thread's hold was suspended
        assert gate.state() == (1, False)
    t.join(5)
    assert gate.state() == (0, False)


def test_errors_inside_release_the_gate() -> None:
    gate = DeviceGate()
    with pytest.raises(RuntimeError), gate.exclusive():
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError), gate.shared():
        raise RuntimeError("boom")
    assert gate.state() == (0, False)


def test_one_gate_per_device() -> None:
    assert gpu_gate.gate(0) is gpu_gate.gate(0)
    assert gpu_gate.gate(0) is not gpu_gate.gate(1)


def test_holding_a_runner_lock_never_deadlocks_with_a_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread inside ``shared`` waits for a runner's lock whose holder wants ``exclusive`` (a capture): the
    waiting thread's hold is suspended, so the capture runs and both finish."""
    gate = DeviceGate()
    monkeypatch.setattr(gpu_gate, "_GATES", {0: gate})
    lock = threading.RLock()
    holder_in = threading.Event()
    order: list[str] = []

    def capturer() -> None:
        with gpu_gate.holding(lock):
            holder_in.set()
            time.sleep(0.1)  # the other thread is now waiting for the lock inside its shared hold
            with gpu_gate.exclusive():
                order.append("captured")

    def caller() -> None:
        holder_in.wait(5)
        with gpu_gate.shared(), gpu_gate.holding(lock):
            order.append("ran")

    threads = [_in_thread(capturer), _in_thread(caller)]
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads), "deadlocked"
    assert order == ["captured", "ran"]
    assert gate.state() == (0, False)
