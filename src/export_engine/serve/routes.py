"""The API's routes: FastSAM3D sessions (upload, clicks, masks, undo/reset, delete) and MASt3R matching.

Endpoints are plain functions that FastAPI runs in its thread pool; the state they share is thread-safe as
:mod:`export_engine.serve.store` describes.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations, which name types
# imported inside the functions below (fastapi is imported at call time), so they must be evaluated where they
# are written.

import io
import tempfile
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from export_engine.core.types import LoadedArtifact
from export_engine.errors import ExportError, UsageError
from export_engine.families.fastsam3d.segment import ClickResult, SegmentSession
from export_engine.serve.errors import PathNotAllowedError, PayloadTooLargeError
from export_engine.serve.state import ServeState
from export_engine.serve.store import ServedSession, check_point
from export_engine.serve.uploads import mask_bytes, nifti_bytes, read_volume

PACKED_HELP = (
    "packed: answer with the mask itself: the body is np.packbits of the crop window's voxels (C order); "
    "X-Iou, X-Voxels, X-Clicks, X-Crop-Start, X-Crop-Size and X-Shape headers carry the rest"
)


def add_session_routes(app: Any, state: ServeState) -> None:
    """POST /sessions, GET/DELETE /sessions/{id}, clicks, undo, reset, mask, volume."""
    from fastapi import File, Form, Query, UploadFile
    from fastapi.responses import Response
    from pydantic import BaseModel, Field

    class Click(BaseModel):
        point: list[float] = Field(min_length=3, max_length=3, description="voxel (d, h, w) in the volume's grid")
        positive: bool = Field(True, description="true adds the region, false removes it")

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
            uploaded = read_volume(file.name, read_allowed(path, file, state.config.max_upload_bytes),
                                   state.config.max_voxels)  # fmt: skip
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


def add_match_route(app: Any, state: ServeState) -> None:
    """POST /match: two images -> MASt3R matches as JSON or npz."""
    from fastapi import File, Form, Query, UploadFile
    from fastapi.responses import Response

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
    try:
        target = (base / path).resolve()
        if not target.is_relative_to(base):
            raise PathNotAllowedError(f"path {path!r} is outside the server's allowed root; give a path under {base}")
        if not target.is_file():
            raise PathNotAllowedError(f"path {path!r} is not a file under the allowed root {base}")
    except (OSError, ValueError) as err:  # an embedded NUL, a name too long, a folder it may not enter
        raise PathNotAllowedError(
            f"path {_shown(path)} cannot be used under the allowed root {base}: {_why(err)}"
        ) from err
    return target


def read_allowed(path: str, file: Path, limit: int) -> bytes:
    """The bytes of an allowed file, refused (413) from its size before it is read."""
    try:
        size = file.stat().st_size
        if size > limit:
            raise PayloadTooLargeError(
                f"path {path!r} holds {size / 2**20:.1f} MiB, over this server's limit of {limit / 2**20:g} MiB "
                "(export-engine serve --max-upload-mb)"
            )
        with file.open("rb") as stream:
            body = stream.read(limit + 1)  # the file may have grown since its size was read
    except OSError as err:
        raise PathNotAllowedError(f"path {_shown(path)} cannot be read: {_why(err)}") from err
    if len(body) > limit:
        raise PayloadTooLargeError(f"path {path!r} is over this server's limit of {limit / 2**20:g} MiB")
    return body


def _shown(path: str) -> str:
    return repr(path) if len(path) <= 80 else repr(path[:80]) + f"... ({len(path)} characters)"


def _why(err: Exception) -> str:
    return getattr(err, "strerror", None) or " ".join(str(err).split())[:200]


def run_match(state: ServeState, name: str, loaded: LoadedArtifact, image1: Any, image2: Any) -> Any:
    on_device = all(callable(getattr(r, "run", None)) for r in loaded.runners.values())
    device_id = getattr(getattr(loaded.runners["encoder"], "config", None), "device_id", 0)
    device = f"cuda:{device_id}" if on_device else "cpu"  # the worker FastSAM3D sessions on that GPU use too
    with tempfile.TemporaryDirectory(prefix="export-engine-match-") as tmp:
        files = []
        for i, upload in enumerate((image1, image2)):
            suffix = Path(upload.filename or "").suffix.lower() or ".png"
            target = Path(tmp) / f"image{i}{suffix}"
            target.write_bytes(upload.file.read(state.config.max_upload_bytes))
            files.append(target)
        return state.devices.run(device, _match_files, state, name, loaded, device, files)


def _match_files(state: ServeState, name: str, loaded: LoadedArtifact, device: str, files: list[Path]) -> Any:
    """The match's device step (on the device's worker): the artifact's Matcher, made on first use."""
    from export_engine.families.mast3r.match import MatchConfig, Matcher

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
