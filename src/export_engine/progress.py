"""Progress for long work: a heartbeat log line while a stage runs, and timed stages."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("export_engine")

HEARTBEAT_SECONDS = 15.0


@contextmanager
def heartbeat(what: str, every: float = HEARTBEAT_SECONDS) -> Iterator[None]:
    """Log ``what`` now, then ``... still <what> (N s)`` every ``every`` seconds until the block ends."""
    log.info("%s ...", what)
    stop = threading.Event()
    start = time.perf_counter()

    def beat() -> None:
        while not stop.wait(every):
            log.info("... still %s (%.0f s)", what, time.perf_counter() - start)

    thread = threading.Thread(target=beat, name="export-engine-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Time a pipeline stage; log one line with its duration and store it in ``timings``."""
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)
    log.info("stage %-10s %.1f s", name, timings[name])
