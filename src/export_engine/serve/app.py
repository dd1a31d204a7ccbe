"""The FastAPI application of ``export-engine serve`` (routes below; OpenAPI at ``/docs``).

FastSAM3D: ``POST /sessions`` (multipart ``volume``: .nii, .nii.gz, .npy; or form ``path`` under the
allow-listed root) -> 201 ``{"id", "shape"}``; ``POST /sessions/{id}/clicks`` ``{"point": [d, h, w],
"positive": true}`` -> ``{"iou", "voxels", ...}``; ``GET /sessions/{id}/mask?format=npy|nii.gz|nii`` (uint8, the
volume's grid); ``POST /sessions/{id}/undo`` and ``/reset``; ``GET /sessions/{id}`` and ``/volume``;
``DELETE /sessions/{id}``. MASt3R: ``POST /match`` (multipart ``image1``, ``image2``) -> matches as JSON or npz.
``/health``, ``/metrics`` (Prometheus text), and the viewer at ``/``.

Endpoints are plain functions that FastAPI runs in its thread pool; the state they share (:class:`ServeState`)
is thread-safe as :mod:`export_engine.serve.store` describes.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations, which name types
# imported inside create_app (fastapi is imported at call time), so they must be evaluated where they are written.

import contextlib
import io
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from export_engine.core.types import LoadedArtifact
from export_engine.errors import ExportError, UsageError
from export_engine.families.fastsam3d.segment import ClickResult, SegmentSession
from export_engine.serve.config import ServeConfig
from export_engine.serve.errors import NoSuchArtifactError, PathNotAllowedError, PayloadTooLargeError, http_status
from export_engine.serve.metrics import Metrics, gpu_memory_bytes, process_rss_bytes
from export_engine.serve.store import DeviceLocks, ServedSession, SessionStore, check_point
from export_engine.serve.uploads import mask_bytes, nifti_bytes, read_volume

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
DRAIN_FACTOR = 4  # oversized bodies up to this many times the limit are read (and dropped) before the 413
PACKED_HELP = (
    "packed: answer with the mask itself: the body is np.packbits of the crop window's voxels (C order); "
    "X-Iou, X-Voxels, X-Clicks, X-Crop-Start, X-Crop-Size and X-Shape headers carry the rest"
)


@dataclass
class ServeState:
    """What every request shares: artifacts by name, sessions, device locks, metrics (all thread-safe)."""

    artifacts: Mapping[str, LoadedArtifact]
    config: ServeConfig
    store: SessionStore = field(init=False)
    devices: DeviceLocks = field(default_factory=DeviceLocks)
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


def create_app(state: ServeState) -> Any:
    """The FastAPI app over ``state`` (fastapi is imported here, at call time)."""
    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, Field

    class Click(BaseModel):
        point: list[float] = Field(min_length=3, max_length=3, description="voxel (d, h, w) in the volume's grid")
        positive: bool = Field(True, description="true adds the region, false removes it")

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        stop = threading.Event()  # idle servers free expired sessions too, not only on the next request
        reaper = threading.Thread(target=state.reap, args=(stop, REAP_EVERY_S), name="session-reaper", daemon=True)
        reaper.start()
        try:
            yield
        finally:
            stop.set()

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

    @app.post("/sessions", status_code=201)
    def create_session(
        volume: Annotated[UploadFile | None, File(description=".nii, .nii.gz or .npy")] = None,
        path: Annotated[str | None, Form(description="a file under the server's --allow-root, instead")] = None,
        artifact: Annotated[str | None, Form(description="which FastSAM3D artifact (default: the first)")] = None,
    ) -> dict[str, Any]:
        name, loaded = state.of_model("fastsam3d", artifact)
        if volume is not None and volume.filename:
            body = volume.file.read(state.config.max_upload_bytes + 1)
            if len(body) > state.config.max_upload_bytes:
                raise PayloadTooLargeError(f"upload over this server's {state.config.max_upload_mb:g} MiB limit")
            uploaded = read_volume(volume.filename, body, state.config.max_voxels)
        elif path:
            file = allowed_path(path, state.config.allow_root)
            uploaded = read_volume(file.name, file.read_bytes(), state.config.max_voxels)
        else:
            raise UsageError("POST /sessions needs a multipart file field 'volume' (or a form field 'path')")
        session = ServedSession(state.store.new_id(), name, SegmentSession(loaded), uploaded.data,
                                uploaded.affine, state.devices)  # fmt: skip
        session.encode()
        state.store.add(session)
        return {"id": session.id, "shape": list(uploaded.data.shape), "artifact": name,
                "crop_start": list(session.segment.window.start) if session.segment.window else None}  # fmt: skip

    @app.get("/sessions/{session_id}")
    def session_state(session_id: str) -> dict[str, Any]:
        return state.store.get(session_id).state()

    @app.post("/sessions/{session_id}/clicks")
    def click(
        session_id: str,
        body: Click,
        mask: Annotated[str | None, Query(pattern="^packed$", description=PACKED_HELP)] = None,
    ) -> Any:
        session = state.store.get(session_id)
        check_point(body.point, session.volume.shape)
        result = session.click(body.point, body.positive)
        state.store.touched(session_id)
        info = outcome(session, result)
        if mask is None:
            return info
        triple = lambda values: ",".join(map(str, values))  # noqa: E731
        headers = {"X-Iou": f"{info['iou']:.9g}", "X-Voxels": str(info["voxels"]), "X-Clicks": str(info["clicks"]),
                   "X-Crop-Start": triple(result.window.start), "X-Crop-Size": triple(result.window.size),
                   "X-Shape": triple(info["shape"])}  # fmt: skip
        return Response(result.packed_crop(), media_type="application/octet-stream", headers=headers)

    @app.post("/sessions/{session_id}/undo")
    def undo(session_id: str) -> dict[str, Any]:
        session = state.store.get(session_id)
        return outcome(session, session.undo())

    @app.post("/sessions/{session_id}/reset")
    def reset(session_id: str) -> dict[str, Any]:
        session = state.store.get(session_id)
        session.reset()
        return outcome(session, None)

    @app.get("/sessions/{session_id}/mask")
    def mask(session_id: str, format: Annotated[str, Query(pattern="^(npy|nii\\.gz|nii)$")] = "npy") -> Response:
        session = state.store.get(session_id)
        body, media = mask_bytes(session.mask(), format, session.affine)
        return Response(body, media_type=media, headers=_attachment(f"mask.{format}"))

    @app.get("/sessions/{session_id}/volume")
    def volume_file(session_id: str) -> Response:
        session = state.store.get(session_id)
        body, media = nifti_bytes(session.volume, session.affine)
        return Response(body, media_type=media, headers=_attachment("volume.nii.gz"))

    @app.delete("/sessions/{session_id}", status_code=204)
    def delete(session_id: str) -> Response:
        state.store.remove(session_id)
        return Response(status_code=204)

    @app.post("/match")
    def match(
        image1: Annotated[UploadFile, File(description="first image (png, jpg)")],
        image2: Annotated[UploadFile, File(description="second image")],
        artifact: Annotated[str | None, Form(description="which MASt3R artifact (default: the first)")] = None,
        format: Annotated[str, Query(pattern="^(json|npz)$")] = "json",
    ) -> Any:
        name, loaded = state.of_model("mast3r", artifact)
        result = run_match(state, name, loaded, image1, image2)
        arrays = {k: getattr(result, k) for k in ("xy1", "xy2", "conf", "xy1_original", "xy2_original",
                                                  "pts3d1", "pts3d2")}  # fmt: skip
        if format == "npz":
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            return Response(buffer.getvalue(), media_type="application/octet-stream", headers=_attachment("m.npz"))
        return {"artifact": name, "count": len(result.xy1), **{k: np.asarray(v).tolist() for k, v in arrays.items()}}

    return app


def outcome(session: ServedSession, result: ClickResult | None) -> dict[str, Any]:
    info = session.state()
    info["voxels"] = 0 if result is None else result.voxels
    info["iou"] = None if result is None else result.iou_prediction
    return info


def allowed_path(path: str, root: Path | None) -> Path:
    if root is None:
        raise PathNotAllowedError(
            "this server reads no server-side paths; upload the file, or start it with --allow-root"
        )
    base = Path(root).resolve()
    target = (base / path).resolve()
    if not target.is_relative_to(base):
        raise PathNotAllowedError(f"path {path!r} is outside the server's allowed root; give a path under {base}")
    if not target.is_file():
        raise PathNotAllowedError(f"path {path!r} is not a file under the allowed root {base}")
    return target


def run_match(state: ServeState, name: str, loaded: LoadedArtifact, image1: Any, image2: Any) -> Any:
    from export_engine.families.mast3r.match import MatchConfig, Matcher

    on_device = all(callable(getattr(r, "run", None)) for r in loaded.runners.values())
    device_id = getattr(getattr(loaded.runners["encoder"], "config", None), "device_id", 0)
    device = f"cuda:{device_id}" if on_device else "cpu"  # the lock FastSAM3D sessions on that GPU take too
    with tempfile.TemporaryDirectory(prefix="export-engine-match-") as tmp:
        files = []
        for i, upload in enumerate((image1, image2)):
            suffix = Path(upload.filename or "").suffix.lower() or ".png"
            target = Path(tmp) / f"image{i}{suffix}"
            target.write_bytes(upload.file.read(state.config.max_upload_bytes))
            files.append(target)
        with state.devices.hold(device):
            matcher = state.matchers.get(name)
            if matcher is None:
                matcher = state.matchers[name] = Matcher(loaded, MatchConfig(device=device))
            try:
                return matcher.match(files[0], files[1])
            except ExportError:
                raise
            except (OSError, ValueError) as err:  # PIL: not an image, truncated
                raise UsageError(f"the images could not be read ({type(err).__name__}: {err})") from err


def _attachment(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"'}


class Observe:
    """ASGI middleware: each HTTP request's method, route template, status and latency into :class:`Metrics`
    (plain ASGI: no per-request objects beyond a closure, unlike an ``@app.middleware`` function)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def sent(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # the router records the matched route
            self.metrics.observe(scope["method"], route, status, time.perf_counter() - start)


class BodyLimit:
    """ASGI middleware: a request whose Content-Length is over ``limit`` gets 413 without its body being parsed;
    one that streams past it fails while being read.

    The body of a declared oversized request is read and dropped first when it is at most ``DRAIN_FACTOR``
    times the limit: a server that closes a connection with unread data makes the kernel reset it, and a client
    still sending (most do not read a response before their upload ends) would lose the 413 and its message."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            if int(declared) <= DRAIN_FACTOR * self.limit:
                more = True
                while more:
                    message = await receive()
                    more = message.get("type") == "http.request" and bool(message.get("more_body"))
            mib = int(declared) / 2**20
            await _reply_413(send, f"request body of {mib:.1f} MiB is over this server's limit of "
                                   f"{self.limit / 2**20:g} MiB (export-engine serve --max-upload-mb)")  # fmt: skip
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise PayloadTooLargeError(f"request body over this server's limit of {self.limit / 2**20:g} MiB")
            return message

        await self.app(scope, counted, send)


async def _reply_413(send: Any, detail: str) -> None:
    import json

    body = json.dumps({"error": "PayloadTooLargeError", "detail": detail}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
