"""The service's ASGI middleware: request metrics and the request body limit (plain ASGI, no per-request
objects beyond a closure)."""

from __future__ import annotations

import json
import time
from typing import Any

from export_engine.serve.metrics import Metrics

DRAIN_FACTOR = 4  # oversized bodies up to this many times the limit are read (and dropped) before the 413


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
    one that streams past it (no Content-Length) gets 413 too, once the app has stopped reading it.

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
        seen, over, started, pending = 0, False, False, True

        async def counted() -> dict:
            # Past the limit the app is told the client left (it stops reading) and its answer is replaced by
            # the 413 below: an exception raised here would reach the body parser, which answers 400.
            nonlocal seen, over, pending
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            pending = message.get("type") == "http.request" and bool(message.get("more_body"))
            if seen > self.limit:
                over = True
                return {"type": "http.disconnect"}
            return message

        async def unless_over(message: dict) -> None:
            nonlocal started
            if over and not started:
                return  # the app's answer to the disconnect (a 400 or 500): the 413 goes instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, unless_over)
        except Exception:
            if not over:  # the app's failure after the disconnect it was told of is no error of its own
                raise
        if over and not started:
            while pending and seen <= DRAIN_FACTOR * self.limit:  # as above: let the client finish sending
                message = await receive()
                seen += len(message.get("body", b""))
                pending = message.get("type") == "http.request" and bool(message.get("more_body"))
            await _reply_413(send, f"request body over this server's limit of {self.limit / 2**20:g} MiB "
                                   "(export-engine serve --max-upload-mb)")  # fmt: skip


async def _reply_413(send: Any, detail: str) -> None:
    body = json.dumps({"error": "PayloadTooLargeError", "detail": detail}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
