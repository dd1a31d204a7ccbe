"""``export-engine serve --ray``: the same FastAPI app on Ray Serve, one replica per GPU, sessions pinned.

A FastSAM3D session lives on the replica that encoded its volume (its embedding is in that replica's device
memory), so its requests must reach that replica. Each replica is its own Serve application
(``export-engine-r<k>``, no HTTP route) holding the whole app of :mod:`.app`; one router application on ``/``
takes every HTTP request:

- ``POST /sessions`` goes to the replica with the fewest sessions (ties in turn); the id it answers is prefixed
  with the replica's index, ``r<k>-<id>``;
- ``/sessions/r<k>-<id>/...`` goes to replica ``k`` with the replica's own id; a replica that is gone answers
  404 with a message that says so;
- ``/health`` and ``/metrics`` gather every replica's (metrics carry a ``replica`` label); anything else (the
  viewer, ``/docs``, ``/match``) goes to any replica.

Replicas are added and removed one application at a time (:func:`add_replica`, :func:`remove_replica`), which
leaves the other replicas and their sessions untouched. Ray is imported at call time (the ``[ray]`` extra).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export_engine.errors import BackendError
from export_engine.serve.config import ServeConfig

log = logging.getLogger(__name__)

PREFIX = "export-engine-r"  # replica k is the Serve application f"{PREFIX}{k}"
ROUTER = "export-engine"
SESSION_PATH = re.compile(r"^/sessions/([^/]+)(/.*)?$")
OUTER_ID = re.compile(r"^r(\d+)-(.+)$")
INSTALL = "pip install 'export-engine[ray]' (ray[serve] >= 2.40)"
REFRESH_S = 5.0  # how often the router re-reads which replicas exist (and at once when an id names an unknown one)


def ray_serve() -> tuple[Any, Any]:
    """``ray`` and ``ray.serve``, or a BackendError that says how to install them."""
    try:
        import ray
        from ray import serve
    except ImportError as err:
        raise BackendError(f"export-engine serve --ray needs Ray Serve ({err}); {INSTALL}") from err
    return ray, serve


@dataclass(frozen=True)
class RayService:
    url: str
    replicas: list[int]


def deploy(paths: Sequence[str | Path], config: ServeConfig, address: str | None = None) -> RayService:
    """Start (or join) Ray and Serve, one replica per GPU of the cluster (``config.replicas`` CPU ones where it
    has none), and the router on ``config.host:config.port``."""
    ray, serve = ray_serve()
    if not ray.is_initialized():  # no address: a Ray of our own, never one that happens to run on this machine
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)
    port = config.port or _free_port(config.host)
    serve.start(http_options={"host": config.host, "port": port})
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = gpus or config.replicas
    files = [str(Path(p).resolve()) for p in paths]
    for k in range(count):
        add_replica(k, files, config)
    router = serve.deployment(Router, name="router", ray_actor_options={"num_cpus": 0})
    serve.run(router.bind(config.max_upload_bytes), name=ROUTER, route_prefix="/", blocking=False)
    _wait_running(serve, ROUTER)
    log.info("export-engine serve on Ray: %d %s replicas at http://%s:%d/", count, "GPU" if gpus else "CPU",
             config.host, port)  # fmt: skip
    return RayService(f"http://{config.host}:{port}", list(range(count)))


def add_replica(index: int, paths: Sequence[str | Path], config: ServeConfig) -> None:
    """Deploy replica ``index`` (one GPU where the cluster has GPUs, else one CPU); the others are untouched."""
    ray, serve = ray_serve()
    gpu = int(ray.cluster_resources().get("GPU", 0)) > 0
    options = {"num_gpus": 1} if gpu else {"num_cpus": 1}
    replica = serve.deployment(Replica, name="replica", num_replicas=1, ray_actor_options=options)
    files = [str(Path(p).resolve()) for p in paths]
    serve.run(replica.bind(files, config), name=f"{PREFIX}{index}", route_prefix=None, blocking=False)
    _wait_running(serve, f"{PREFIX}{index}")


def remove_replica(index: int) -> None:
    """Stop replica ``index``; its sessions are gone (their ids answer 404), the others' are kept."""
    _, serve = ray_serve()
    serve.delete(f"{PREFIX}{index}")


def serve_on_ray(paths: Sequence[str | Path], config: ServeConfig, address: str | None) -> None:
    """The CLI's ``serve --ray``: deploy, then keep the driver alive until interrupted."""
    ray, serve = ray_serve()
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the service as Ctrl-C does: Serve shut down, exit 0

    signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs a handler of its own
    try:
        service = deploy(paths, config, address)
        log.info("%s (API docs at /docs); Ctrl-C stops it", service.url)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if address:  # a shared cluster: remove this service's applications only
            for name in serve.status().applications:
                if name == ROUTER or name.startswith(PREFIX):
                    serve.delete(name)
        else:
            serve.shutdown()


def _wait_running(serve: Any, app: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(app)
        state = str(getattr(status, "status", ""))
        if state.endswith("RUNNING"):
            return
        if state.endswith("DEPLOY_FAILED") or time.monotonic() > deadline:
            message = " ".join(str(getattr(status, "message", "") or "no message").split())[:300]
            raise BackendError(f"Ray Serve application {app} did not start ({state or 'missing'}): {message}")
        time.sleep(0.5)


def _free_port(host: str) -> int:
    from export_engine.serve.server import free_port

    return free_port(host)


# --- what runs inside Ray: a replica holds the app, the router forwards to replicas --------------------------


Reply = tuple[int, list[tuple[str, str]], bytes]


class Replica:
    """One replica: the whole app of :func:`export_engine.serve.app.create_app` on this replica's device,
    called in-process over ASGI with the request the router forwards."""

    def __init__(self, paths: list[str], config: ServeConfig) -> None:
        from export_engine.serve.app import REAP_EVERY_S, create_app
        from export_engine.serve.server import load_artifacts
        from export_engine.serve.state import ServeState

        self.state = ServeState(load_artifacts(paths, config.cuda_graph), config)
        self.app = create_app(self.state)
        self._stop = threading.Event()  # the app's lifespan does not run in-process: reap expired sessions here
        threading.Thread(target=self.state.reap, args=(self._stop, REAP_EVERY_S), daemon=True).start()

    def sessions(self) -> int:
        return len(self.state.store)

    async def call(self, method: str, path: str, query: bytes, headers: list[tuple[str, str]], body: bytes) -> Reply:
        return await asgi_call(self.app, method, path, query, headers, body)

    def __del__(self) -> None:
        self._stop.set()


class Router:
    """The HTTP ingress: picks the replica of a request (see the module's description) and forwards it."""

    def __init__(self, max_upload_bytes: int) -> None:
        self.max_upload_bytes = max_upload_bytes
        self._handles: dict[int, Any] = {}
        self._read_at = 0.0
        self._turn = itertools.count()

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        status, headers, body = await self.route(request)
        response = Response(body, status_code=status)
        response.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in _sized(headers, body)]
        return response

    async def route(self, request: Any) -> Reply:
        method, path, query = request.method, request.url.path, request.url.query.encode()
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_upload_bytes:
            limit = f"{self.max_upload_bytes / 2**20:g} MiB"
            return error(413, "PayloadTooLargeError", f"request body over this server's {limit} limit "
                         "(export-engine serve --max-upload-mb)")  # fmt: skip
        headers = [(k, v) for k, v in request.headers.items() if k.lower() != "host"]
        body = await request.body()
        match = SESSION_PATH.match(path)
        if match:
            return await self.to_session(method, match.group(1), match.group(2) or "", query, headers, body)
        for attempt in (0, 1):  # a replica removed since the router last looked: look again, once
            replicas = self.replicas(refresh=bool(attempt))
            if not replicas:
                return error(503, "BackendError", "this service runs no replica now; add one (export-engine serve "
                             "--ray)")  # fmt: skip
            try:
                if path in ("/health", "/metrics"):
                    return await self.gather(path, replicas)
                creating = (method, path) == ("POST", "/sessions")
                k = await self.least_loaded(replicas) if creating else self.any(replicas)
                status, out, data = await self._handles[k].call.remote(method, path, query, headers, body)
                break
            except Exception:
                if attempt or self.replicas(refresh=True) == replicas:
                    raise
        if (method, path, status) == ("POST", "/sessions", 201):
            inner = json.loads(data)["id"]
            data = data.replace(inner.encode(), f"r{k}-{inner}".encode())
        return status, out, data

    async def to_session(self, method: str, outer: str, rest: str, query: bytes, headers: list[tuple[str, str]],
                         body: bytes) -> Reply:  # fmt: skip
        found = OUTER_ID.match(outer)
        if not found:
            return error(404, "SessionNotFoundError", f"no session {outer!r} on this service (ids read r<k>-...)")
        k, inner = int(found.group(1)), found.group(2)
        gone = error(404, "SessionNotFoundError", f"session {outer!r} was held by replica {k}, which this service "
                     "no longer runs (removed or lost); create a new session")  # fmt: skip
        if k not in self.replicas(refresh=k not in self._handles):
            return gone
        try:
            status, out, data = await self._handles[k].call.remote(method, f"/sessions/{inner}{rest}", query,
                                                                   headers, body)  # fmt: skip
        except Exception:
            if k not in self.replicas(refresh=True):  # removed since the router last looked
                return gone
            raise
        if any(n.lower() == "content-type" and "json" in v for n, v in out):
            data = data.replace(inner.encode(), outer.encode())
        return status, out, data

    async def gather(self, path: str, replicas: list[int]) -> Reply:
        replies = await asyncio.gather(*(self._handles[k].call.remote("GET", path, b"", [], b"") for k in replicas))
        if path == "/metrics":
            text = "".join(labelled(data.decode(), k, first=i == 0) for i, (k, (_, _, data)) in
                           enumerate(zip(replicas, replies, strict=True)))  # fmt: skip
            return 200, [("content-type", "text/plain; version=0.0.4")], text.encode()
        each = [{"replica": k, **json.loads(data)} for k, (_, _, data) in zip(replicas, replies, strict=True)]
        ok = all(r.get("status") == "ok" for r in each)
        health = {"status": "ok" if ok else "degraded", "sessions": sum(r.get("sessions", 0) for r in each),
                  "replicas": each}  # fmt: skip
        return 200, [("content-type", "application/json")], json.dumps(health).encode()

    async def least_loaded(self, replicas: list[int]) -> int:
        counts = await asyncio.gather(*(self._handles[k].sessions.remote() for k in replicas))
        turn = next(self._turn)
        order = replicas[turn % len(replicas) :] + replicas[: turn % len(replicas)]
        return min(order, key=lambda k: counts[replicas.index(k)])

    def any(self, replicas: list[int]) -> int:
        return replicas[next(self._turn) % len(replicas)]

    def replicas(self, refresh: bool = False) -> list[int]:
        """Indices of the replica applications that run now (re-read every REFRESH_S, or when asked)."""
        from ray import serve

        if refresh or time.monotonic() - self._read_at > REFRESH_S:
            running = {int(name[len(PREFIX) :]) for name, app in serve.status().applications.items()
                       if name.startswith(PREFIX) and str(app.status).endswith("RUNNING")}  # fmt: skip
            self._handles = {k: self._handles.get(k) or serve.get_app_handle(f"{PREFIX}{k}") for k in running}
            self._read_at = time.monotonic()
        return sorted(self._handles)


def error(status: int, kind: str, detail: str) -> Reply:
    return status, [("content-type", "application/json")], json.dumps({"error": kind, "detail": detail}).encode()


def labelled(text: str, replica: int, first: bool) -> str:
    """Prometheus text with a ``replica`` label on every sample; HELP/TYPE lines once (from the first replica)."""
    lines = []
    for line in text.splitlines():
        if line.startswith("#"):
            if first:
                lines.append(line)
            continue
        if not line.strip():
            continue
        name, _, rest = line.partition(" ")
        if "{" in name:
            metric, _, labels = name.partition("{")
            name = f'{metric}{{replica="{replica}",{labels}'
        else:
            name = f'{name}{{replica="{replica}"}}'
        lines.append(f"{name} {rest}")
    return "\n".join(lines) + "\n"


def _sized(headers: list[tuple[str, str]], body: bytes) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() != "content-length"] + [("content-length", str(len(body)))]


async def asgi_call(app: Any, method: str, path: str, query: bytes, headers: list[tuple[str, str]],
                    body: bytes) -> Reply:  # fmt: skip
    """One HTTP request through an ASGI app in this process: status, headers, body."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}  # fmt: skip
    done = asyncio.Event()
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    reply: dict[str, Any] = {"status": 500, "headers": [], "body": []}

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            reply["status"] = message["status"]
            reply["headers"] = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            reply["body"].append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    await app(scope, receive, send)
    done.set()
    return int(reply["status"]), reply["headers"], b"".join(reply["body"])
