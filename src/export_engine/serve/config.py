"""The service's knobs (the CLI's ``serve`` flags are these fields in kebab-case)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export_engine.errors import UsageError


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless asked: the service has no authentication
    port: int = 8000
    max_upload_mb: float = 1024.0  # a request body over this is refused (413) before it is read
    max_voxels: int = 512**3  # a volume over this many voxels is refused (413): host and device memory
    gpu_budget_mb: float = 8192.0  # device memory all sessions' state may hold; the least recently used go
    max_sessions: int = 256
    session_ttl_s: float = 3600.0  # sessions idle this long are evicted
    allow_root: Path | None = None  # POST /sessions with a `path` reads files under this folder only
    cuda_graph: bool = True  # capture CUDA graphs for the fixed-shape graphs (GPU runners only)
    replicas: int = 2  # serve --ray on a cluster without GPUs: this many CPU replicas (with GPUs: one per GPU)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise UsageError(f"--port {self.port}: give 0..65535 (0 picks a free port)")
        for name in ("max_upload_mb", "gpu_budget_mb", "session_ttl_s"):
            if not getattr(self, name) > 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_sessions < 1 or self.max_voxels < 1 or self.replicas < 1:
            raise UsageError("--max-sessions, --max-voxels and --replicas must be at least 1")
        if self.allow_root is not None and not Path(self.allow_root).is_dir():
            raise UsageError(f"--allow-root {self.allow_root} is not a folder")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def gpu_budget_bytes(self) -> int:
        return int(self.gpu_budget_mb * 2**20)
