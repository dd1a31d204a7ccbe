"""A Python client of the service's API, on the standard library only (``http.client``).

    client = ServeClient("http://127.0.0.1:8000")
    session = client.create_session("ct.nii.gz")              # {"id": ..., "shape": [d, h, w], ...}
    client.click(session["id"], (40, 60, 60))                 # {"iou": ..., "voxels": ..., ...}
    client.click(session["id"], (42, 70, 61), positive=False)
    mask = client.mask(session["id"])                         # (d, h, w) uint8
    client.undo(session["id"]); client.delete(session["id"])

Threads: a client keeps one persistent connection, used under a lock (one request at a time); give each
thread its own client for parallel requests.
"""

from __future__ import annotations

import http.client
import io
import json
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from export_engine.errors import ExportError


class ServeError(ExportError):
    """The server answered with an error status; ``status`` and ``detail`` say which and why."""

    exit_code = 1

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


@dataclass(frozen=True)
class PackedMask:
    """A click's mask as the service sends it: the crop window's voxels bit-packed (C order), where the window
    starts in the volume (may be negative: padding) and its size; outside the window the mask is empty."""

    bits: bytes
    start: tuple[int, ...]
    size: tuple[int, ...]
    shape: tuple[int, ...]

    def unpack(self) -> np.ndarray:
        """The (d, h, w) uint8 mask in the volume's grid."""
        crop = np.unpackbits(np.frombuffer(self.bits, np.uint8), count=int(np.prod(self.size))).reshape(self.size)
        out = np.zeros(self.shape, np.uint8)
        src, dst = [], []
        for start, size, extent in zip(self.start, self.size, self.shape, strict=True):
            lo, hi = max(start, 0), max(min(start + size, extent), max(start, 0))
            src.append(slice(lo, hi))
            dst.append(slice(lo - start, hi - start))
        out[tuple(src)] = crop[tuple(dst)]
        return out


class ServeClient:
    def __init__(self, url: str, timeout: float = 120.0) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    # --- the API ------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def metrics(self) -> str:
        return self.request("GET", "/metrics")[2].decode()

    def create_session(self, volume: str | Path | np.ndarray | bytes, name: str | None = None,
                       artifact: str | None = None) -> dict[str, Any]:  # fmt: skip
        """Upload a volume: a .nii/.nii.gz/.npy file, an array (sent as .npy), or a file's bytes named ``name``."""
        if isinstance(volume, bytes):
            data, filename = volume, name or "volume"
        elif isinstance(volume, np.ndarray):
            buffer = io.BytesIO()
            np.save(buffer, volume)
            data, filename = buffer.getvalue(), name or "volume.npy"
        else:
            data, filename = Path(volume).read_bytes(), name or Path(volume).name
        fields = {"artifact": artifact} if artifact else {}
        body, content_type = multipart({"volume": (filename, data)}, fields)
        return self._json("POST", "/sessions", body, {"Content-Type": content_type})

    def create_session_from_path(self, path: str, artifact: str | None = None) -> dict[str, Any]:
        """A session from a file under the server's allow-listed root (``--allow-root``)."""
        body, content_type = multipart({}, {"path": path, **({"artifact": artifact} if artifact else {})})
        return self._json("POST", "/sessions", body, {"Content-Type": content_type})

    def session(self, session_id: str) -> dict[str, Any]:
        return self._json("GET", f"/sessions/{session_id}")

    def click(self, session_id: str, point: Any, positive: bool = True) -> dict[str, Any]:
        body = json.dumps({"point": [float(c) for c in point], "positive": bool(positive)}).encode()
        return self._json("POST", f"/sessions/{session_id}/clicks", body, {"Content-Type": "application/json"})

    def click_mask(self, session_id: str, point: Any, positive: bool = True) -> tuple[dict[str, Any], PackedMask]:
        """A click answered with its mask (compact: the crop window's bits), as a viewer wants it."""
        body = json.dumps({"point": [float(c) for c in point], "positive": bool(positive)}).encode()
        _, headers, data = self.request("POST", f"/sessions/{session_id}/clicks?mask=packed", body,
                                        {"Content-Type": "application/json"})  # fmt: skip
        triple = lambda name: tuple(int(v) for v in headers[name].split(","))  # noqa: E731
        info = {"iou": float(headers["x-iou"]), "voxels": int(headers["x-voxels"]), "clicks": int(headers["x-clicks"])}
        return info, PackedMask(data, triple("x-crop-start"), triple("x-crop-size"), triple("x-shape"))

    def undo(self, session_id: str) -> dict[str, Any]:
        return self._json("POST", f"/sessions/{session_id}/undo")

    def reset(self, session_id: str) -> dict[str, Any]:
        return self._json("POST", f"/sessions/{session_id}/reset")

    def mask(self, session_id: str) -> np.ndarray:
        """The current mask, (d, h, w) uint8 in the volume's grid."""
        data = self.request("GET", f"/sessions/{session_id}/mask?format=npy")[2]
        return np.asarray(np.load(io.BytesIO(data), allow_pickle=False))

    def mask_file(self, session_id: str, fmt: str = "nii.gz") -> bytes:
        return self.request("GET", f"/sessions/{session_id}/mask?format={fmt}")[2]

    def delete(self, session_id: str) -> None:
        self.request("DELETE", f"/sessions/{session_id}")

    def match(self, image1: str | Path, image2: str | Path, artifact: str | None = None) -> dict[str, Any]:
        files = {f"image{i}": (Path(p).name, Path(p).read_bytes()) for i, p in ((1, image1), (2, image2))}
        body, content_type = multipart(files, {"artifact": artifact} if artifact else {})
        return self._json("POST", "/match", body, {"Content-Type": content_type})

    # --- transport ------------------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        check: bool = True,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on the persistent connection. A kept-alive connection the server has closed meanwhile
        (its idle timeout) fails before the request reaches it; the request is then sent once more, on a new
        connection. A request that fails on a new connection is not repeated (a click is not idempotent)."""
        with self._lock:
            for attempt in (0, 1):
                reused = self._conn is not None
                conn = self._conn or http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                self._conn = conn
                try:
                    try:
                        conn.request(method, path, body=body, headers=headers or {})
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the server answered early (413) and closed: its answer is still there to read
                    response = conn.getresponse()
                    data = response.read()
                    break
                except (ConnectionError, http.client.HTTPException):
                    conn.close()
                    self._conn = None
                    if attempt or not reused:
                        raise
            if response.getheader("connection", "").lower() == "close":
                conn.close()
                self._conn = None
        status, reply_headers = response.status, {k.lower(): v for k, v in response.getheaders()}
        if check and status >= 400:
            raise ServeError(status, _detail(data))
        return status, reply_headers, data

    def _json(self, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
        data = self.request(method, path, body, headers)[2]
        return dict(json.loads(data)) if data else {}

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> ServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def multipart(files: dict[str, tuple[str, bytes]], fields: dict[str, str]) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type."""
    boundary = "export-engine-" + secrets.token_hex(12)
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")  # fmt: skip
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _detail(data: bytes) -> str:
    try:
        parsed = json.loads(data)
    except ValueError:
        return data.decode(errors="replace")[:300]
    detail = parsed.get("detail", parsed) if isinstance(parsed, dict) else parsed
    return detail if isinstance(detail, str) else json.dumps(detail)[:300]
