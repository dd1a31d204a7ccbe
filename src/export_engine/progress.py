"""Progress for long work: a heartbeat log line while a stage runs, and timed stages."""

from __future__ import annotations

import logging
import resource
import sys
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


def peak_rss_gib() -> float:
    """High-water mark of this process's resident memory so far, in GiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**3 if sys.platform == "darwin" else peak / 1024**2  # bytes on macOS, KiB on Linux


@contextmanager
def stage(name: str, timings: dict[str, float], peaks: dict[str, float] | None = None) -> Iterator[None]:
    """Time a pipeline stage; log one line with its duration and the process's peak memory so far."""
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)
    peak = peak_rss_gib()
    if peaks is not None:
        peaks[name] = round(peak, 3)
    log.info("stage %-16s %6.1f s   peak RSS so far %.2f GiB", name, timings[name], peak)
