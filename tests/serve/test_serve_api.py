"""The HTTP contract against a real uvicorn server (tiny FastSAM3D, CPU): sessions, clicks, masks, undo,
delete, errors as 4xx while the server keeps serving, concurrent clients, metrics and the MASt3R match route."""

from __future__ import annotations

import gzip
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from export_engine.calibration.synthetic import structured_volume
from export_engine.families.fastsam3d.segment import SegmentSession
from export_engine.runtime.session import load
from export_engine.serve.client import ServeClient, ServeError, multipart


def _alone(artifact: Path, volume: np.ndarray, clicks: list) -> list[np.ndarray]:
    """The same clicks through SegmentSession directly, as the server should run them (centred crop)."""
    session = SegmentSession(load(artifact))
    session.set_volume(volume)
    return [session.click(point, positive).mask for point, positive in clicks]


def test_the_client_contract(server_url: str, tiny_fastsam3d: Path, volumes_dir: Path) -> None:
    client = ServeClient(server_url)
    created = client.create_session(volumes_dir / "ct.nii.gz")
    assert created["shape"] == [80, 70, 60] and isinstance(created["id"], str)
    volume = np.asarray(nib.load(str(volumes_dir / "ct.nii.gz")).dataobj)
    clicks = [((40, 35, 30), True), ((45, 30, 28), False)]
    expected = _alone(tiny_fastsam3d, volume, clicks)
    first = client.click(created["id"], clicks[0][0], positive=True)
    assert 0 < first["voxels"] == int(expected[0].sum()) and isinstance(first["iou"], float)
    np.testing.assert_array_equal(client.mask(created["id"]), expected[0].astype(np.uint8))
    second = client.click(created["id"], clicks[1][0], positive=False)
    assert second["voxels"] == int(expected[1].sum()) and second["clicks"] == 2
    nifti = nib.Nifti1Image.from_bytes(gzip.decompress(client.mask_file(created["id"], "nii.gz")))
    np.testing.assert_array_equal(nifti.affine, np.diag([1.5, 1.5, 2.0, 1.0]))
    np.testing.assert_array_equal(np.asarray(nifti.dataobj), expected[1].astype(np.uint8))
    assert np.asarray(nifti.dataobj).dtype == np.uint8
    undone = client.undo(created["id"])
    assert undone["clicks"] == 1 and undone["voxels"] == first["voxels"]
    np.testing.assert_array_equal(client.mask(created["id"]), expected[0].astype(np.uint8))
    assert client.reset(created["id"])["voxels"] == 0 and not client.mask(created["id"]).any()
    client.delete(created["id"])
    with pytest.raises(ServeError) as err:
        client.click(created["id"], (1, 1, 1))
    assert err.value.status == 404 and "deleted" in err.value.detail


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server_url: str, volumes_dir: Path) -> None:
    client = ServeClient(server_url)
    good = (volumes_dir / "ct.nii.gz").read_bytes()
    nan = structured_volume(64, seed=1)
    nan[3, 4, 5] = np.nan
    session = client.create_session(structured_volume(64, seed=2))["id"]
    cases = {
        "truncated NIfTI": (lambda: client.create_session(good[: len(good) // 2], "ct.nii.gz"), 422, "truncated"),
        "NaN volume": (lambda: client.create_session(nan), 422, "NaN"),
        "not a volume": (lambda: client.create_session(b"hello", "notes.txt"), 422, "unknown format"),
        "2-D array": (lambda: client.create_session(np.ones((5, 5), np.float32)), 422, "3-D"),
        "click outside": (lambda: client.click(session, (64, 0, 0)), 422, "outside the volume"),
        "click of 2 numbers": (lambda: client.click(session, (3, 3)), 422, "point"),
        "unknown session": (lambda: client.click("no-such-id", (1, 1, 1)), 404, "not found"),
        "unknown session mask": (lambda: client.mask("no-such-id"), 404, "not found"),
        "oversized upload": (lambda: client.create_session(np.zeros((96, 96, 96), np.float32)), 413, "over"),
        "no file": (lambda: client.request("POST", "/sessions", *_form({}, {})), 400, "volume"),
        "path without root access": (lambda: client.create_session_from_path("../../etc/passwd"), 403, "outside"),
        "bad mask format": (lambda: client.request("GET", f"/sessions/{session}/mask?format=png"), 422, "format"),
    }
    for what, (call, status, text) in cases.items():
        with pytest.raises(ServeError) as err:
            call()
        assert (err.value.status, text in err.value.detail) == (status, True), f"{what}: {err.value}"
    body = b'{"point": [1, 2'  # broken JSON
    status, _, data = client.request("POST", f"/sessions/{session}/clicks", body,
                                     {"Content-Type": "application/json"}, check=False)  # fmt: skip
    assert status == 422 and b"json" in data.lower()
    assert client.health()["status"] == "ok"
    assert client.click(session, (30, 30, 30))["voxels"] >= 0  # the session survived its neighbours' errors
    client.delete(session)


def _form(files: dict, fields: dict) -> tuple[bytes, dict[str, str]]:
    body, content_type = multipart(files, fields)
    return body, {"Content-Type": content_type}


def test_sessions_from_an_allowed_path_and_a_click_outside_the_crop(server_url: str, volumes_dir: Path) -> None:
    client = ServeClient(server_url)
    created = client.create_session_from_path("big.npy")
    assert created["shape"] == [100, 100, 100] and created["crop_start"] == [18, 18, 18]
    # The first click outside the centred 64^3 crop moves the crop around it, as a viewer user expects.
    assert client.click(created["id"], (3, 4, 90))["clicks"] == 1
    assert client.session(created["id"])["crop_start"] != [18, 18, 18]
    with pytest.raises(ServeError) as err:  # later clicks must stay in that crop
        client.click(created["id"], (97, 95, 2))
    assert err.value.status == 422 and "outside the model's 64^3 crop" in err.value.detail
    assert "/reset" in err.value.detail
    client.reset(created["id"])  # after a reset, a click anywhere starts a crop around it
    assert client.click(created["id"], (97, 95, 2))["clicks"] == 1
    with pytest.raises(ServeError) as err:
        client.create_session_from_path("missing.npy")
    assert err.value.status == 403
    client.delete(created["id"])


def test_bad_server_side_paths_get_4xx(server_url: str, volumes_dir: Path) -> None:
    client = ServeClient(server_url)
    np.save(volumes_dir / "huge.npy", np.zeros((96, 96, 96), np.float32))  # 3.4 MiB: over the 2 MiB limit
    cases = {
        "over the upload limit": ("huge.npy", 413, "over this server's limit of 2 MiB"),
        "an embedded NUL": ("big\0.npy", 403, "cannot be used"),
        "a name too long": ("a" * 300 + ".npy", 403, "File name too long"),
    }
    for what, (path, status, text) in cases.items():
        with pytest.raises(ServeError) as err:
            client.create_session_from_path(path)
        assert (err.value.status, text in err.value.detail) == (status, True), f"{what}: {err.value}"
    assert client.health()["status"] == "ok"


def test_an_oversized_body_without_content_length_gets_413(server_url: str) -> None:
    import http.client
    from urllib.parse import urlsplit

    body, content_type = multipart({"volume": ("v.npy", b"\0" * 3 * 2**20)}, {})  # 3 MiB, the limit is 2 MiB
    chunks = (body[i : i + 2**16] for i in range(0, len(body), 2**16))
    url = urlsplit(server_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:  # http.client sends an iterable body chunked, with no Content-Length
        conn.request("POST", "/sessions", body=chunks, headers={"Content-Type": content_type}, encode_chunked=True)
        response = conn.getresponse()
        reply = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 413, reply
    assert reply["error"] == "PayloadTooLargeError" and "limit of 2 MiB" in reply["detail"]
    assert ServeClient(server_url).health()["status"] == "ok"


def test_an_unexpected_error_is_a_one_line_json_500(server_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from export_engine.serve.store import ServedSession

    client = ServeClient(server_url)
    sid = client.create_session(structured_volume(48, seed=4))["id"]

    def broken(self: ServedSession) -> dict:
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(ServedSession, "state", broken)  # the server runs in this process
    status, headers, data = client.request("GET", f"/sessions/{sid}", check=False)
    assert status == 500 and headers["content-type"] == "application/json"
    reply = json.loads(data)
    assert reply["error"] == "RuntimeError" and "something broke" in reply["detail"]
    assert "\n" not in reply["detail"] and "Traceback" not in reply["detail"]
    monkeypatch.undo()
    assert client.health()["status"] == "ok"
    client.delete(sid)


def test_the_volume_of_any_numeric_type_can_be_downloaded(server_url: str) -> None:
    client = ServeClient(server_url)
    for dtype in (np.int64, np.uint64, np.float16):
        volume = structured_volume(48, seed=3).astype(dtype)  # int64: 0.8 MiB
        sid = client.create_session(volume)["id"]
        status, _, body = client.request("GET", f"/sessions/{sid}/volume")
        back = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(body)).dataobj)
        assert status == 200 and np.array_equal(back, volume), dtype
        client.delete(sid)


def test_concurrent_clients_get_their_own_masks(server_url: str, tiny_fastsam3d: Path) -> None:
    rng = np.random.default_rng(0)
    jobs = []
    for seed in range(4):
        clicks = [(tuple(int(v) for v in rng.integers(15, 50, 3)), bool(i % 3 != 2)) for i in range(4)]
        jobs.append((structured_volume(64, seed=20 + seed), clicks))

    def run(job: tuple) -> list[np.ndarray]:
        volume, clicks = job
        with ServeClient(server_url) as client:
            sid = client.create_session(volume)["id"]
            masks = []
            for point, positive in clicks:
                client.click(sid, point, positive)
                masks.append(client.mask(sid))
            client.delete(sid)
            return masks

    with ThreadPoolExecutor(4) as pool:
        served = list(pool.map(run, jobs))
    for (volume, clicks), masks in zip(jobs, served, strict=True):
        for got, want in zip(masks, _alone(tiny_fastsam3d, volume, clicks), strict=True):
            np.testing.assert_array_equal(got, want.astype(np.uint8))


def test_health_metrics_docs_and_page(server_url: str) -> None:
    client = ServeClient(server_url)
    assert client.health()["artifacts"] == {"fastsam3d-tiny": "fastsam3d"}
    metrics = client.metrics()
    assert 'export_engine_requests_total{method="GET",route="/health",status="200"}' in metrics
    assert "# TYPE export_engine_request_seconds histogram" in metrics
    assert "export_engine_sessions " in metrics and "export_engine_process_resident_bytes " in metrics
    spec = json.loads(client.request("GET", "/openapi.json")[2])
    assert {"/sessions", "/sessions/{session_id}/clicks", "/sessions/{session_id}/mask", "/match"} <= set(spec["paths"])
    assert client.request("GET", "/docs")[0] == 200
    status, _, page = client.request("GET", "/", check=False)
    assert (status == 200 and b"/static/viewer.js" in page) or (status == 503 and b"build-viewer" in page)
    with pytest.raises(ServeError) as err:  # a FastSAM3D-only server has no matcher
        client.request("POST", "/match", *_form({"image1": ("a.png", b"x"), "image2": ("b.png", b"y")}, {}))
    assert err.value.status == 404 and "mast3r" in err.value.detail


def test_a_click_can_answer_with_its_packed_mask(server_url: str, tiny_fastsam3d: Path) -> None:
    volume = structured_volume(70, seed=9)[:, :66, 3:]  # (70, 66, 67): the 64^3 crop is cut on every axis
    clicks = [((35, 30, 40), True), ((30, 33, 28), False)]
    client = ServeClient(server_url)
    sid = client.create_session(volume)["id"]
    for (point, positive), want in zip(clicks, _alone(tiny_fastsam3d, volume, clicks), strict=True):
        info, packed = client.click_mask(sid, point, positive)
        assert len(packed.bits) == 64**3 // 8 and packed.shape == (70, 66, 67)
        np.testing.assert_array_equal(packed.unpack(), want.astype(np.uint8))
        assert info["voxels"] == int(want.sum())
    client.delete(sid)


def test_the_page_says_how_to_build_a_missing_bundle(server_url: str, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:  # fmt: skip
    import export_engine.serve.app as app_module

    monkeypatch.setattr(app_module, "BUNDLE", tmp_path / "viewer.js")  # the server runs in this process
    status, _, page = ServeClient(server_url).request("GET", "/", check=False)
    assert status == 503 and b"scripts/build-viewer" in page and b"/docs" in page
