"""Running the service: load artifacts, build the app, serve it with uvicorn (foreground or a thread)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from export_engine.errors import BackendError, UsageError
from export_engine.serve.app import create_app
from export_engine.serve.config import ServeConfig
from export_engine.serve.state import ServeState

log = logging.getLogger(__name__)


def load_artifacts(paths: Sequence[str | Path], cuda_graph: bool) -> dict[str, Any]:
    """Artifacts by name (the folder's name; a repeated name gets ``-2``, ``-3``...)."""
    from export_engine.runtime.session import load

    if not paths:
        raise UsageError("export-engine serve needs at least one artifact folder")
    loaded: dict[str, Any] = {}
    for path in paths:
        artifact = load(path, cuda_graph=cuda_graph)
        name, n = Path(path).resolve().name, 1
        while name in loaded:
            n += 1
            name = f"{Path(path).resolve().name}-{n}"
        loaded[name] = artifact
        log.info("serving %s (%s) as %r", path, artifact.manifest["model"], name)
    return loaded


def build(paths: Sequence[str | Path], config: ServeConfig) -> Any:
    return create_app(ServeState(load_artifacts(paths, config.cuda_graph), config))


def _uvicorn() -> Any:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise BackendError(
            f"export-engine serve needs the [serve] extra ({err}); pip install 'export-engine[serve]'"
        ) from err
    return uvicorn


def serve(paths: Sequence[str | Path], config: ServeConfig) -> None:
    """Serve until interrupted (the CLI's ``serve``)."""
    uvicorn = _uvicorn()
    app = build(paths, config)
    log.info("export-engine serve on http://%s:%d/ (API docs at /docs)", config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False)


class BackgroundServer:
    """A uvicorn server in a thread of this process, on ``config.port`` (0: a free port); for tests and benches.

    with BackgroundServer(app, ServeConfig(port=0)) as server:
        Client(server.url).health()
    """

    def __init__(self, app: Any, config: ServeConfig) -> None:
        uvicorn = _uvicorn()
        port = config.port or free_port(config.host)
        self.url = f"http://{config.host}:{port}"
        settings = uvicorn.Config(app, host=config.host, port=port, log_level="warning", access_log=False)
        self._server = uvicorn.Server(settings)
        self._thread = threading.Thread(target=self._server.run, name="export-engine-serve", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise BackendError(f"the server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
