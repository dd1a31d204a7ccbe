"""Keeps CUDA-graph captures apart from every other thread's GPU calls, per device.

ONNX Runtime captures a CUDA graph in CUDA's *global* capture mode (so does ``torch.cuda.graph`` by default):
while one thread is between the start and the end of a capture, a call such as ``cudaMalloc``, a synchronising
copy or a synchronisation made by any other thread of the process is refused ("operation not permitted when
stream is capturing") and invalidates the capture. Measured on an H100 with one CUDA-graph runner shared by
4 threads, that turned into failed kernels inside ONNX Runtime, hung threads and results handed to the wrong
caller. The gate is a readers-writer lock per device:

* ``shared(device)``: ordinary GPU work (a replay, a plain run, a copy to the host). Any number of threads at
  once; it waits while a capture is in progress.
* ``exclusive(device)``: a run that may capture. It waits until no shared holder is left, and no shared holder
  enters before it leaves.

A thread may nest both (re-entrant); asking for ``exclusive`` while holding ``shared`` gives the shared hold
up, waits for the gate and takes it back on leaving, so two threads that both upgrade cannot deadlock. A runner
waits for its own lock with the caller's shared hold suspended (``suspended``), so a caller may call runners from
inside ``shared``. Code
that does GPU work from several threads next to export-engine's runners (its own torch kernels, ``.cpu()``)
takes ``shared`` around it to be sure no capture sees it; the runners, :class:`~export_engine.families.mast3r.
match.Matcher` and the segmentation session do so themselves.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager


class DeviceGate:
    """A re-entrant readers-writer lock: many shared holders or one exclusive holder (see the module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers: dict[int, int] = {}  # thread id -> shared depth
        self._writer: int | None = None  # thread id holding it exclusively
        self._writer_depth = 0
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer != me and me not in self._readers:
                # writers first: a steady stream of shared holders must not starve a capture
                while self._writer is not None or self._writers_waiting:
                    self._cond.wait()
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                depth = self._readers[me] - 1
                if depth:
                    self._readers[me] = depth
                else:
                    del self._readers[me]
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._writer_depth += 1
                held = 0
            else:
                held = self._readers.pop(me, 0)  # give a shared hold up while waiting (no upgrade deadlock)
                if held:
                    self._cond.notify_all()
                self._writers_waiting += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._writers_waiting -= 1
                self._writer, self._writer_depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._writer_depth -= 1
                if not self._writer_depth:
                    self._writer = None
                    if held:  # take the shared hold back before anyone else may capture
                        self._readers[me] = held
                    self._cond.notify_all()

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """This thread's shared hold given up for a while (to wait for something another gate user may hold, such
        as a runner's lock), then taken back. A no-op for a thread that holds no shared hold or holds the gate
        exclusively."""
        me = threading.get_ident()
        with self._cond:
            held = 0 if self._writer == me else self._readers.pop(me, 0)
            if held:
                self._cond.notify_all()
        try:
            yield
        finally:
            if held:
                with self._cond:
                    while self._writer is not None or self._writers_waiting:
                        self._cond.wait()
                    self._readers[me] = held

    def state(self) -> tuple[int, bool]:
        """(threads holding it shared, whether a thread holds it exclusively): for tests and diagnostics."""
        with self._cond:
            return len(self._readers), self._writer is not None


_GATES: dict[int, DeviceGate] = {}
_GATES_LOCK = threading.Lock()


def gate(device: int = 0) -> DeviceGate:
    """The gate of CUDA device ``device`` (one per process and device)."""
    with _GATES_LOCK:
        found = _GATES.get(device)
        if found is None:
            found = _GATES[device] = DeviceGate()
        return found


def shared(device: int = 0) -> AbstractContextManager[None]:
    """Ordinary GPU work on ``device``: waits while a capture is in progress (see the module docstring)."""
    return gate(device).shared()


@contextmanager
def holding(lock: threading.RLock, device: int = 0) -> Iterator[None]:
    """A runner's ``lock``, waited for with this thread's shared hold of ``device``'s gate suspended (a thread
    that holds the gate must never wait for a runner whose holder waits for the gate), held until the block ends."""
    with gate(device).suspended():
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def exclusive(device: int = 0) -> AbstractContextManager[None]:
    """GPU work that may capture a CUDA graph on ``device``: runs alone among the gate's users."""
    return gate(device).exclusive()
