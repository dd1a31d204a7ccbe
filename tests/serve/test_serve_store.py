"""The session store without a server: LRU by device bytes and count, expiry on a fake clock, clear 404s."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export_engine.calibration.synthetic import structured_volume
from export_engine.errors import ModelInputError
from export_engine.families.fastsam3d.segment import SegmentSession
from export_engine.runtime.session import load
from export_engine.serve.errors import SessionNotFoundError
from export_engine.serve.store import DeviceWorkers, ServedSession, SessionStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def loaded(tiny_fastsam3d: Path) -> object:
    return load(tiny_fastsam3d)


def _session(loaded: object, store: SessionStore, seed: int) -> ServedSession:
    volume = structured_volume(64, seed=seed)
    served = ServedSession(store.new_id(), "tiny", SegmentSession(loaded), volume, np.eye(4), DeviceWorkers())  # type: ignore[arg-type]
    served.encode()
    return served


def test_budget_evicts_the_least_recently_used(loaded: object) -> None:
    probe = SessionStore(1 << 40, 10, 60)
    one = _session(loaded, probe, 1)
    per_session = one.held_bytes
    assert per_session > 0
    store = SessionStore(budget_bytes=int(2.5 * per_session), max_sessions=10, ttl_s=60)
    a, b = _session(loaded, store, 1), _session(loaded, store, 2)
    store.add(a)
    store.add(b)
    store.get(a.id)  # a is now the most recently used
    c = _session(loaded, store, 3)
    store.add(c)
    assert len(store) == 2 and store.evictions["budget"] == 1
    with pytest.raises(SessionNotFoundError, match="evicted to make room in device memory"):
        store.get(b.id)
    store.get(a.id)
    store.get(c.id)
    a.click((30, 32, 33), True)  # a grows: its history now holds a mask; c goes
    store.touched(a.id)
    assert store.stats()["sessions"] == 1 and store.stats()["device_bytes"] == a.held_bytes > per_session


def test_count_limit_expiry_and_delete(loaded: object) -> None:
    clock = Clock()
    store = SessionStore(budget_bytes=1 << 40, max_sessions=2, ttl_s=10, clock=clock)
    sessions = [_session(loaded, store, s) for s in (4, 5, 6)]
    for s in sessions:
        store.add(s)
    with pytest.raises(SessionNotFoundError, match="too many sessions"):
        store.get(sessions[0].id)
    clock.now = 5.0
    store.get(sessions[2].id)
    clock.now = 12.0  # sessions[1] idle 12 s, sessions[2] idle 7 s
    with pytest.raises(SessionNotFoundError, match="expired after 10 s idle"):
        store.get(sessions[1].id)
    assert store.get(sessions[2].id) is sessions[2]
    store.remove(sessions[2].id)
    with pytest.raises(SessionNotFoundError, match="deleted"):
        store.get(sessions[2].id)
    with pytest.raises(SessionNotFoundError, match="no session has this id"):
        store.get("never")
    assert len(store) == 0


def test_device_workers_serialise_one_device_on_one_thread_and_not_two() -> None:
    import threading

    workers = DeviceWorkers()
    order: list[str] = []
    threads: dict[str, set[str]] = {}
    held = threading.Event()
    release = threading.Event()

    def note(device: str) -> None:
        threads.setdefault(device, set()).add(threading.current_thread().name)

    def first() -> None:
        def step() -> None:
            note("cuda:0")
            order.append("first in")
            held.set()
            release.wait(5)
            order.append("first out")

        workers.run("cuda", step)

    def second(device: str) -> None:
        workers.run(device, lambda: (note(device.replace("cuda", "cuda:0") if device == "cuda" else device),
                                     order.append(f"{device} in")))  # fmt: skip

    a = threading.Thread(target=first)
    a.start()
    held.wait(5)
    other = threading.Thread(target=second, args=("cpu",))  # another device does not wait
    other.start()
    other.join(5)
    same = threading.Thread(target=second, args=("cuda:0",))  # the same GPU under another name waits
    same.start()
    same.join(0.2)
    assert same.is_alive()
    release.set()
    a.join(5)
    same.join(5)
    assert order == ["first in", "cpu in", "first out", "cuda:0 in"]
    assert len(threads["cuda:0"]) == 1 and threads["cuda:0"] != threads["cpu"]  # one thread per device, always
    workers.close()


def test_device_workers_return_raise_and_nest() -> None:
    workers = DeviceWorkers()
    assert workers.run("cpu", lambda x, y=0: x + y, 2, y=3) == 5
    with pytest.raises(ModelInputError, match="bad click"):
        workers.run("cpu", _raise, ModelInputError("bad click"))
    # a step that runs another step of its own device runs it in place (no deadlock on the one worker)
    assert workers.run("cpu", lambda: workers.run("cpu", lambda: "inner")) == "inner"
    workers.close()
    assert workers.run("cpu", lambda: "after close") == "after close"  # a new worker
    workers.close()


def _raise(err: Exception) -> None:
    raise err
