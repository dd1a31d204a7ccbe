"""The FastAPI application of ``export-engine serve`` (OpenAPI at ``/docs``); its routes are in :mod:`.routes`.

FastSAM3D: ``POST /sessions`` (multipart ``volume``: .nii, .nii.gz, .npy; or form ``path`` under the
allow-listed root) -> 201 ``{"id", "shape"}``; ``POST /sessions/{id}/clicks`` ``{"point": [d, h, w],
"positive": true}`` -> ``{"iou", "voxels", ...}``; ``GET /sessions/{id}/mask?format=npy|nii.gz|nii`` (uint8, the
volume's grid); ``POST /sessions/{id}/undo`` and ``/reset``; ``GET /sessions/{id}`` and ``/volume``;
``DELETE /sessions/{id}``. MASt3R: ``POST /match`` (multipart ``image1``, ``image2``) -> matches as JSON or npz.
``/health``, ``/metrics`` (Prometheus text), and the viewer at ``/``.

Endpoints are plain functions that FastAPI runs in its thread pool; the state they share (:class:`ServeState`)
is thread-safe as :mod:`export_engine.serve.store` describes.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (see routes.py).

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from export_engine.errors import ExportError
from export_engine.serve.errors import http_status
from export_engine.serve.middleware import BodyLimit, Observe
from export_engine.serve.routes import add_match_route, add_session_routes
from export_engine.serve.state import ServeState

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("index.html")
STATIC = Path(__file__).with_name("static")
BUNDLE = STATIC / "viewer.js"
MISSING_BUNDLE = (
    "<!doctype html><title>export-engine</title><h1>The viewer is not built</h1><p>This installation has no "
    "viewer bundle ({bundle}). Build it with <code>scripts/build-viewer</code> (needs npm), then reload. "
    "The API works without it: see <a href='/docs'>/docs</a>.</p>"
)
REAP_EVERY_S = 10.0
__all__ = ["ServeState", "create_app"]


def create_app(state: ServeState) -> Any:
    """The FastAPI app over ``state`` (fastapi is imported here, at call time)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from fastapi.staticfiles import StaticFiles

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        stop = threading.Event()  # idle servers free expired sessions too, not only on the next request
        reaper = threading.Thread(target=state.reap, args=(stop, REAP_EVERY_S), name="session-reaper", daemon=True)
        reaper.start()
        try:
            yield
        finally:
            stop.set()
            state.devices.close()  # the steps already queued finish first

    app = FastAPI(title="export-engine", description="FastSAM3D interactive segmentation and MASt3R matching",
                  lifespan=lifespan)  # fmt: skip
    app.add_middleware(BodyLimit, limit=state.config.max_upload_bytes)
    app.add_middleware(Observe, metrics=state.metrics)  # outermost: it also sees BodyLimit's 413s

    @app.exception_handler(ExportError)
    async def export_error(request: Request, err: ExportError) -> JSONResponse:
        status = http_status(err)
        if status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, err)
        return JSONResponse({"error": type(err).__name__, "detail": str(err)}, status_code=status)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, err: Exception) -> JSONResponse:
        # Starlette runs this outside every middleware and re-raises afterwards, so the server's log has the
        # traceback; the client gets one line, not Starlette's plain-text page.
        message = " ".join(str(err).split())[:200]
        detail = f"{request.method} {request.url.path} failed: {type(err).__name__}: {message} (see the server's log)"
        return JSONResponse({"error": type(err).__name__, "detail": detail}, status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        if not BUNDLE.is_file():
            return HTMLResponse(MISSING_BUNDLE.format(bundle=BUNDLE), status_code=503)
        return HTMLResponse(PAGE.read_text())

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "sessions": len(state.store), "uptime_s": round(time.time() - state.started, 1),
                "artifacts": {n: a.manifest["model"] for n, a in state.artifacts.items()}}  # fmt: skip

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        state.store.evict_expired()
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    add_session_routes(app, state)
    add_match_route(app, state)
    return app
