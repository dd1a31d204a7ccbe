"""Prometheus text exposition (format 0.0.4) of the service's counters, written here (no client library).

Thread-safe: one lock around every update and the rendering.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections import defaultdict
from collections.abc import Callable

# Latency buckets in seconds: clicks take milliseconds, uploads and encodings up to seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, gauges: Callable[[], dict[str, tuple[str, float]]]) -> None:
        """``gauges()`` -> {name: (help, value)}, read at each scrape (sessions, memory)."""
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self._buckets: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
        self._sum: dict[tuple[str, str], float] = defaultdict(float)
        self._count: dict[tuple[str, str], int] = defaultdict(int)
        self._gauges = gauges

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(method, route, status)] += 1
            key = (method, route)
            index = bisect.bisect_left(BUCKETS, seconds)
            if index < len(BUCKETS):
                self._buckets[key][index] += 1
            self._sum[key] += seconds
            self._count[key] += 1

    def render(self) -> str:
        lines = ["# HELP export_engine_requests_total HTTP requests by method, route and status",
                 "# TYPE export_engine_requests_total counter"]  # fmt: skip
        with self._lock:
            for (method, route, status), n in sorted(self._requests.items()):
                lines.append(f'export_engine_requests_total{{method="{method}",route="{route}",status="{status}"}} {n}')
            lines += ["# HELP export_engine_request_seconds request latency (handler and body, seconds)",
                      "# TYPE export_engine_request_seconds histogram"]  # fmt: skip
            for (method, route), counts in sorted(self._buckets.items()):
                labels = f'method="{method}",route="{route}"'
                running = 0
                for bound, n in zip(BUCKETS, counts, strict=True):
                    running += n
                    lines.append(f'export_engine_request_seconds_bucket{{{labels},le="{bound:g}"}} {running}')
                total = self._count[(method, route)]
                lines.append(f'export_engine_request_seconds_bucket{{{labels},le="+Inf"}} {total}')
                lines.append(f"export_engine_request_seconds_sum{{{labels}}} {self._sum[(method, route)]:.6f}")
                lines.append(f"export_engine_request_seconds_count{{{labels}}} {total}")
        for name, (text, value) in sorted(self._gauges().items()):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"


def process_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where it cannot be read)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def gpu_memory_bytes() -> tuple[int, int]:
    """(allocated, reserved) bytes of torch's CUDA allocator on the current device; (0, 0) without CUDA use."""
    import sys

    torch = sys.modules.get("torch")  # never imports torch (or initialises CUDA) just to report
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0, 0
    return int(torch.cuda.memory_allocated()), int(torch.cuda.memory_reserved())
