"""FastSAM3D sessions of the service: an LRU bounded by device memory and count, idle ones expire.

Threads: :class:`SessionStore` guards its table with one lock (held only for bookkeeping, never while a model
runs); each :class:`ServedSession` serialises its own state changes with its lock, and every step that runs on a
device is handed to that device's worker thread (:class:`DeviceWorkers`), which runs the device's steps one at a
time in arrival order. A request thread holds its session's lock while it waits for the worker; the worker never
takes a session's lock.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from export_engine.errors import ModelInputError
from export_engine.families.fastsam3d.segment import ClickResult, SegmentSession
from export_engine.serve.errors import SessionNotFoundError

log = logging.getLogger(__name__)

T = TypeVar("T")
EXPIRED_MEMORY = 4096  # ids remembered after expiry or eviction, to say so instead of "unknown"


class DeviceWorkers:
    """One worker thread per device runs that device's steps, one at a time, in arrival order.

    ONNX Runtime's CUDA provider keeps per thread its cuBLAS and cuDNN handles, workspaces and captured CUDA graphs,
    so graphs run from a server's pool of request threads set all of that up again on each new thread of the pool
    (a warm-up and a capture, alone on the device, in the middle of other clients' clicks). One thread per device
    sets it up once, and queues the device's work as a lock would."""

    def __init__(self) -> None:
        self._workers: dict[str, ThreadPoolExecutor] = {}
        self._guard = threading.Lock()
        self._local = threading.local()  # on a worker thread: the device it serves

    def run(self, device: str, step: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``step(*args, **kwargs)`` on ``device``'s worker thread; its result, or its exception raised here."""
        device = "cuda:0" if device == "cuda" else device  # one GPU, one worker, however it is named
        if getattr(self._local, "device", None) == device:
            return step(*args, **kwargs)  # a step that runs another step of its own device
        with self._guard:
            worker = self._workers.get(device)
            if worker is None:
                worker = self._workers[device] = ThreadPoolExecutor(
                    1, thread_name_prefix=f"device-{device}", initializer=self._serve, initargs=(device,)
                )
        return worker.submit(step, *args, **kwargs).result()

    def _serve(self, device: str) -> None:
        self._local.device = device

    def close(self) -> None:
        """Let each worker finish the steps already queued, then end it (a later step starts a new one)."""
        with self._guard:
            workers, self._workers = list(self._workers.values()), {}
        for worker in workers:
            worker.shutdown(wait=True)


@dataclass
class ServedSession:
    """One client's volume and clicks (thread-safe: one lock around each operation)."""

    id: str
    artifact: str  # the artifact's name on this server
    segment: SegmentSession
    volume: np.ndarray  # host copy in the upload's dtype: re-centring the crop, GET .../volume
    affine: np.ndarray
    devices: DeviceWorkers
    created: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    held_bytes: int = 0  # device bytes after the last operation (read by the store without this lock)

    def _measure(self) -> None:
        self.held_bytes = self.segment.device_bytes()

    def encode(self, around: Sequence[Sequence[float]] | None = None) -> None:
        with self.lock:
            self.devices.run(self.segment.device, self.segment.set_volume, self.volume, around=around)
            self._measure()

    def click(self, point: Sequence[float], positive: bool) -> ClickResult:
        """A click; the first click outside the crop (volumes larger than the model's) re-centres it there."""
        with self.lock:
            result = self.devices.run(self.segment.device, self._click, point, positive)
            self._measure()
            return result

    def _click(self, point: Sequence[float], positive: bool) -> ClickResult:
        """The click's device step (on the device's worker, with the session's lock held by the caller)."""
        window = self.segment.window
        assert window is not None
        crop = window.points_to_crop(np.asarray(point, dtype=np.float32))
        outside = bool(np.any(crop < 0) or np.any(crop > self.segment.size - 1))
        if outside and not self.segment.clicks and _inside(point, self.volume.shape):
            self.segment.set_volume(self.volume, around=[point])
        elif outside:
            raise ModelInputError(
                f"click {list(point)} lies outside the model's {self.segment.size}^3 crop, which starts at "
                f"{list(window.start)} since the first click; click inside it, or reset the session "
                f"(POST /sessions/{self.id}/reset) and click there first"
            )
        result = self.segment.click(point, positive)
        result.fetch()  # the compact copy, on the device's worker too
        return result

    def undo(self) -> ClickResult | None:
        with self.lock:
            result = self.segment.undo()
            self._measure()
            return result

    def reset(self) -> None:
        with self.lock:
            self.segment.reset()
            self._measure()

    def mask(self) -> np.ndarray:
        """The current (D, H, W) bool mask on the host (empty before the first click)."""
        with self.lock:
            last = self.segment.last
            if last is None:
                return np.zeros(self.volume.shape, dtype=bool)
            self.devices.run(self.segment.device, last.fetch)
            return last.mask

    def state(self) -> dict[str, Any]:
        with self.lock:
            last = self.segment.last
            return {"id": self.id, "artifact": self.artifact, "shape": list(self.volume.shape),
                    "clicks": len(self.segment.clicks),
                    "crop_start": list(self.segment.window.start) if self.segment.window else None,
                    "iou": None if last is None else last.iou_prediction}  # fmt: skip


class SessionStore:
    """Sessions by id, least recently used first; bounded by ``budget_bytes`` of device state and ``max_sessions``;
    those idle for ``ttl_s`` are evicted (on every access; :meth:`evict_expired` for a timer). Thread-safe."""

    def __init__(self, budget_bytes: int, max_sessions: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.budget_bytes, self.max_sessions, self.ttl_s, self.clock = budget_bytes, max_sessions, ttl_s, clock
        self._sessions: OrderedDict[str, ServedSession] = OrderedDict()
        self._last_used: dict[str, float] = {}
        self._gone: OrderedDict[str, str] = OrderedDict()  # id -> why it is gone
        self._lock = threading.Lock()
        self.evictions = {"expired": 0, "budget": 0, "count": 0}

    @staticmethod
    def new_id() -> str:
        return secrets.token_urlsafe(12)

    def add(self, session: ServedSession) -> None:
        with self._lock:
            self._sessions[session.id] = session
            self._last_used[session.id] = self.clock()
            self._evict_locked(keep=session.id)

    def get(self, session_id: str) -> ServedSession:
        with self._lock:
            self._expire_locked()
            session = self._sessions.get(session_id)
            if session is None:
                why = self._gone.get(session_id)
                hint = f"it was {why}" if why else "no session has this id"
                raise SessionNotFoundError(f"session {session_id!r} not found: {hint}; create one with POST /sessions")
            self._sessions.move_to_end(session_id)
            self._last_used[session_id] = self.clock()
            return session

    def touched(self, session_id: str) -> None:
        """Re-check the budget after a session grew (a click adds to its history)."""
        with self._lock:
            if session_id in self._sessions:
                self._evict_locked(keep=session_id)

    def remove(self, session_id: str) -> None:
        with self._lock:
            if self._sessions.pop(session_id, None) is None:
                raise SessionNotFoundError(f"session {session_id!r} not found (already deleted, or never created)")
            self._last_used.pop(session_id, None)
            self._forget_locked(session_id, "deleted")

    def evict_expired(self) -> None:
        with self._lock:
            self._expire_locked()

    def stats(self) -> dict[str, int]:
        with self._lock:
            sessions = list(self._sessions.values())
        return {"sessions": len(sessions), "device_bytes": sum(s.held_bytes for s in sessions)}

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    # --- under the lock ----------------------------------------------------------------------------------

    def _expire_locked(self) -> None:
        now = self.clock()
        for session_id in [i for i, t in self._last_used.items() if now - t > self.ttl_s]:
            self._drop_locked(session_id, "expired", f"expired after {self.ttl_s:g} s idle")

    def _evict_locked(self, keep: str) -> None:
        self._expire_locked()
        while len(self._sessions) > self.max_sessions:
            self._drop_locked(self._oldest_but(keep), "count", "evicted: the server holds too many sessions")
        used = sum(s.held_bytes for s in self._sessions.values())
        while used > self.budget_bytes and len(self._sessions) > 1:
            victim = self._oldest_but(keep)
            used -= self._sessions[victim].held_bytes
            self._drop_locked(victim, "budget", "evicted to make room in device memory (least recently used)")

    def _oldest_but(self, keep: str) -> str:
        return next(i for i in self._sessions if i != keep)

    def _drop_locked(self, session_id: str, kind: str, why: str) -> None:
        self._sessions.pop(session_id, None)
        self._last_used.pop(session_id, None)
        self.evictions[kind] += 1
        self._forget_locked(session_id, why)
        log.info("session %s %s", session_id, why)

    def _forget_locked(self, session_id: str, why: str) -> None:
        self._gone[session_id] = why
        while len(self._gone) > EXPIRED_MEMORY:
            self._gone.popitem(last=False)


def _inside(point: Sequence[float], shape: Sequence[int]) -> bool:
    p = np.asarray(point, dtype=np.float64)
    return bool(np.isfinite(p).all() and np.all(p >= 0) and np.all(p <= np.asarray(shape) - 1))


def check_point(point: Sequence[float], shape: Sequence[int]) -> None:
    if len(point) != 3 or not _inside(point, shape):
        raise ModelInputError(
            f"click {list(point)} is outside the volume of shape {list(shape)}: give [d, h, w] voxel indices "
            f"with 0 <= d < {shape[0]}, 0 <= h < {shape[1]}, 0 <= w < {shape[2]}"
        )
