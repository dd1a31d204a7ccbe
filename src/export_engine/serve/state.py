"""What every request of the service shares: artifacts by name, sessions, device workers, metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from export_engine.core.types import LoadedArtifact
from export_engine.serve.config import ServeConfig
from export_engine.serve.errors import NoSuchArtifactError
from export_engine.serve.metrics import Metrics, gpu_memory_bytes, process_rss_bytes
from export_engine.serve.store import DeviceWorkers, SessionStore


@dataclass
class ServeState:
    """What every request shares: artifacts by name, sessions, device workers, metrics (all thread-safe)."""

    artifacts: Mapping[str, LoadedArtifact]
    config: ServeConfig
    store: SessionStore = field(init=False)
    devices: DeviceWorkers = field(default_factory=DeviceWorkers)
    matchers: dict[str, Any] = field(default_factory=dict)
    metrics: Metrics = field(init=False)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        c = self.config
        self.store = SessionStore(c.gpu_budget_bytes, c.max_sessions, c.session_ttl_s)
        self.metrics = Metrics(self.gauges)

    def reap(self, stop: threading.Event, every_s: float) -> None:
        """Evict expired sessions every ``every_s`` seconds until ``stop`` is set (the app's lifespan runs it)."""
        while not stop.wait(every_s):
            self.store.evict_expired()

    def of_model(self, model: str, name: str | None) -> tuple[str, LoadedArtifact]:
        names = [n for n, a in self.artifacts.items() if a.manifest["model"] == model]
        if name is None and names:
            return names[0], self.artifacts[names[0]]
        if name in names:
            return name, self.artifacts[name]
        named = f" named {name!r}" if name else ""
        raise NoSuchArtifactError(
            f"this server has no {model} artifact{named}; its {model} artifacts: {names or 'none'} "
            f"(start export-engine serve with one)"
        )

    def gauges(self) -> dict[str, tuple[str, float]]:
        stats = self.store.stats()
        allocated, reserved = gpu_memory_bytes()
        return {
            "export_engine_sessions": ("FastSAM3D sessions held", stats["sessions"]),
            "export_engine_session_device_bytes": ("device memory held by sessions' state", stats["device_bytes"]),
            "export_engine_session_evictions_total": ("sessions evicted (expired, budget, count)",
                                                      sum(self.store.evictions.values())),
            "export_engine_process_resident_bytes": ("resident set size of the server process", process_rss_bytes()),
            "export_engine_gpu_allocated_bytes": ("torch CUDA allocator: allocated bytes", allocated),
            "export_engine_gpu_reserved_bytes": ("torch CUDA allocator: reserved bytes", reserved),
        }  # fmt: skip
