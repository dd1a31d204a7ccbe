"""`export-engine serve --ray` on a local Ray (2 CPUs, 2 CPU replicas, the tiny FastSAM3D): the served API
behaves as the embedded server does, sessions are pinned to their replica, replicas come and go without losing
the other replicas' sessions, and without Ray the CLI says how to install it."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export_engine.cli import main
from export_engine.serve.client import ServeClient, ServeError

CLICKS = [((40, 35, 30), True), ((45, 40, 28), True), ((38, 30, 33), False)]


@pytest.fixture(scope="module")
def ray_url(tiny_fastsam3d: Path, volumes_dir: Path) -> Iterator[str]:
    ray = pytest.importorskip("ray", reason="the Ray tests need the [ray] extra")
    from ray import serve

    from export_engine.serve.config import ServeConfig
    from export_engine.serve.ray_serve import deploy

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # not a Ray running here
    try:
        service = deploy([tiny_fastsam3d], ServeConfig(port=0, max_upload_mb=2.0, allow_root=volumes_dir, replicas=2))
        assert service.replicas == [0, 1]
        yield service.url
    finally:
        serve.shutdown()
        ray.shutdown()


def run_clicks(client: ServeClient, volume: Path) -> tuple[str, list[np.ndarray]]:
    sid = client.create_session(volume)["id"]
    masks = []
    for point, positive in CLICKS:
        client.click(sid, point, positive)
        masks.append(client.mask(sid))
    assert client.undo(sid)["clicks"] == len(CLICKS) - 1
    masks.append(client.mask(sid))
    return sid, masks


def test_ray_serve_answers_as_the_embedded_server(ray_url: str, server_url: str, volumes_dir: Path) -> None:
    with ServeClient(ray_url) as ray_client, ServeClient(server_url) as local:
        _, expected = run_clicks(local, volumes_dir / "ct.nii.gz")
        first, masks = run_clicks(ray_client, volumes_dir / "ct.nii.gz")
        second, again = run_clicks(ray_client, volumes_dir / "ct.nii.gz")
        assert {first[:3], second[:3]} == {"r0-", "r1-"}  # the two sessions went to different replicas
        for got in (masks, again):
            assert [m.shape for m in got] == [m.shape for m in expected]
            for a, b in zip(got, expected, strict=True):
                np.testing.assert_array_equal(a, b)
        state = ray_client.session(first)
        assert state["id"] == first and state["clicks"] == len(CLICKS) - 1
        info, packed = ray_client.click_mask(second, CLICKS[0][0])
        assert info["clicks"] == len(CLICKS) and packed.unpack().shape == tuple(state["shape"])
        health = ray_client.health()
        assert health["status"] == "ok" and [r["replica"] for r in health["replicas"]] == [0, 1]
        assert health["sessions"] >= 2
        metrics = ray_client.metrics()
        assert 'export_engine_sessions{replica="0"}' in metrics and 'export_engine_sessions{replica="1"}' in metrics
        ray_client.delete(first)
        ray_client.delete(second)


def test_ray_serve_errors_are_the_embedded_servers(ray_url: str) -> None:
    with ServeClient(ray_url) as client:
        for sid in ("nosuch", "r0-nosuch", "r7-nosuch"):
            with pytest.raises(ServeError) as err:
                client.click(sid, (1, 1, 1))
            assert err.value.status == 404, err.value.detail
        assert "replica 7" in err.value.detail
        sid = client.create_session(np.arange(64.0, dtype=np.float32).reshape(4, 4, 4) + 1)["id"]
        with pytest.raises(ServeError) as err:
            client.click(sid, (9, 1, 1))  # outside the volume: the replica's own 422, the router's id in it
        assert err.value.status == 422
        client.delete(sid)
        big = b"x" * (3 * 2**20)  # over the 2 MiB limit: refused by the router before any replica reads it
        status, _, body = client.request("POST", "/sessions", big, {"Content-Type": "text/plain"}, check=False)
        assert status == 413 and b"--max-upload-mb" in body
        assert client.request("GET", "/openapi.json")[0] == 200


def test_ray_serve_replicas_come_and_go(ray_url: str, tiny_fastsam3d: Path, volumes_dir: Path) -> None:
    from export_engine.serve.config import ServeConfig
    from export_engine.serve.ray_serve import add_replica, remove_replica

    with ServeClient(ray_url) as client:
        ids = [client.create_session(volumes_dir / "ct.nii.gz")["id"] for _ in range(2)]
        kept = next(i for i in ids if i.startswith("r0-"))
        lost = next(i for i in ids if i.startswith("r1-"))
        remove_replica(1)
        with pytest.raises(ServeError) as err:
            client.click(lost, (40, 35, 30))
        assert err.value.status == 404 and "replica 1" in err.value.detail
        assert client.click(kept, (40, 35, 30))["clicks"] == 1
        add_replica(1, [tiny_fastsam3d], ServeConfig(port=0, allow_root=volumes_dir))
        deadline = time.monotonic() + 30  # the router re-reads the replicas every few seconds
        while len(client.health()["replicas"]) < 2:
            assert time.monotonic() < deadline, "the router did not see the new replica"
            time.sleep(0.5)
        fresh = client.create_session(volumes_dir / "ct.nii.gz")["id"]
        assert fresh.startswith("r1-")  # the replica with fewer sessions
        assert client.click(fresh, (40, 35, 30))["clicks"] == 1
        assert client.click(kept, (45, 40, 28))["clicks"] == 2


@pytest.mark.slow
def test_serve_ray_cli_runs_until_sigterm(tiny_fastsam3d: Path, serve_child: Any) -> None:
    pytest.importorskip("ray", reason="the Ray tests need the [ray] extra")

    def ready(client: Any) -> None:
        assert [r["replica"] for r in client.health()["replicas"]] == [0]

    with serve_child([str(tiny_fastsam3d), "--ray", "--replicas", "1"], ready, (OSError, ServeError), start_s=180,
                     stop_s=60, poll_s=0.5, client_timeout=10) as client:  # fmt: skip
        sid = client.create_session(np.arange(27.0, dtype=np.float32).reshape(3, 3, 3) + 1)["id"]
        assert sid.startswith("r0-") and client.click(sid, (1, 1, 1))["clicks"] == 1


def test_serve_ray_without_ray_says_how_to_install(tiny_fastsam3d: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["serve", str(tiny_fastsam3d), "--ray", "--port", "0"]) == 8
    err = capsys.readouterr().err
    assert "pip install 'export-engine[ray]'" in err and len(err.strip().splitlines()) == 1


def test_metrics_get_a_replica_label() -> None:
    from export_engine.serve.ray_serve import labelled

    text = '# HELP a requests\n# TYPE a counter\na 3\nb{route="/x",status="200"} 1.5\n'
    assert labelled(text, 1, first=True) == (
        '# HELP a requests\n# TYPE a counter\na{replica="1"} 3\nb{replica="1",route="/x",status="200"} 1.5\n'
    )
    assert labelled(text, 2, first=False) == 'a{replica="2"} 3\nb{replica="2",route="/x",status="200"} 1.5\n'
