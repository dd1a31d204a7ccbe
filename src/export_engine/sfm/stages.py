"""What a collection run measured (seconds per stage, counters) and the memory it was allowed, and the lock
decorator its objects share."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

_F = TypeVar("_F", bound=Callable[..., Any])


def serialised(method: _F) -> _F:
    """The method runs under the instance's lock."""

    @functools.wraps(method)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return cast(_F, locked)


@dataclass
class Stages:
    """Seconds per stage (device time from CUDA events where the stage runs on the GPU) and counters."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("read", "encode", "decode", "match",
                                                                             "write"), 0.0))  # fmt: skip
    encodes: int = 0
    matches: int = 0
    pairs: int = 0
    _events: list[tuple[str, Any, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)  # readers add from several threads

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    def interval(self, stage: str, start: Any, end: Any) -> None:
        """A device interval between two recorded CUDA events, added up by :meth:`settle`."""
        self._events.append((stage, start, end))

    def settle(self) -> None:
        """Add the CUDA event intervals recorded so far (after the device finished them)."""
        for stage, start, end in self._events:
            end.synchronize()
            self.seconds[stage] += start.elapsed_time(end) / 1000.0
        self._events.clear()


@dataclass(frozen=True)
class Budget:
    """How many token slots fit, and why."""

    slots: int
    token_bytes: int
    budget_bytes: float
    fixed_bytes: float  # measured after warm-up on CUDA (weights, workspaces, recorded graphs), else estimated
