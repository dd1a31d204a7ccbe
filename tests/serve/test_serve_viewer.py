"""The web page in a real browser: Playwright drives Debian's Chromium (headless, WebGL2 through SwiftShader),
loads a test volume through the page's file input, clicks the view, and the overlay NiiVue shows must hold
exactly the voxels of the API's mask for that click, replayed on a fresh session by the Python client.

Skips (with the reason) only where Playwright or a Chromium binary is missing, or the viewer bundle is not
built; CI installs all three (.ci/run), and under CI (``CI`` set) a missing one fails instead."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export_engine.serve.app import BUNDLE
from export_engine.serve.client import ServeClient

CHROMIUM = os.environ.get("EXPORT_ENGINE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
GL_ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]


def _missing(reason: str) -> None:
    (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)


@pytest.fixture(scope="module")
def page(server_url: str) -> Iterator[Any]:
    try:
        from playwright import sync_api
    except ImportError:
        _missing("the browser test needs Playwright: pip install -e '.[browser]'")
    if CHROMIUM is None:
        _missing("no Chromium binary (apt-get install chromium, or set EXPORT_ENGINE_CHROMIUM)")
    if not BUNDLE.is_file():
        _missing(f"the viewer bundle is not built ({BUNDLE}); run scripts/build-viewer")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=GL_ARGS)
        page = browser.new_page(viewport={"width": 1000, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(server_url + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        assert not errors, errors
        yield page
        browser.close()


def _wait_idle(page: Any) -> None:
    page.wait_for_function("() => !window.viewer.state.busy", timeout=30_000)
    error = page.evaluate("() => window.viewer.state.error")
    assert error is None, error


def _overlay(page: Any, shape: list[int]) -> np.ndarray:
    """The overlay volume's voxels as NiiVue holds them (the file's order: first axis fastest)."""
    flat = np.asarray(page.evaluate("() => Array.from(window.viewer.nv.volumes[1].img)"), dtype=np.uint8)
    return flat.reshape(shape[::-1]).transpose(2, 1, 0)


def _click_view(page: Any, shift: bool) -> dict:
    box = page.locator("#gl").bounding_box()
    before = page.evaluate("() => window.viewer.state.lastClick")
    if shift:
        page.keyboard.down("Shift")
    page.mouse.click(box["x"] + box["width"] * 0.22, box["y"] + box["height"] * 0.27)
    if shift:
        page.keyboard.up("Shift")
    page.wait_for_function("(b) => window.viewer.state.lastClick !== b && !window.viewer.state.busy",
                           arg=before, timeout=30_000)  # fmt: skip
    _wait_idle(page)
    return dict(page.evaluate("() => window.viewer.state.lastClick"))


def test_page_click_overlay_matches_the_api(page: Any, server_url: str, volumes_dir: Path) -> None:
    page.set_input_files("#file", str(volumes_dir / "ct.nii.gz"))
    page.wait_for_function("() => window.viewer.state.session && window.viewer.nv.volumes.length === 2",
                           timeout=30_000)  # fmt: skip
    _wait_idle(page)
    shape = page.evaluate("() => window.viewer.state.shape")
    assert shape == [80, 70, 60]
    assert not _overlay(page, shape).any()

    first = _click_view(page, shift=False)
    assert first["positive"] is True and first["voxels"] > 0
    # The voxel sent is the one under the cursor: NiiVue's crosshair (moved there by the same click) lies within
    # a voxel of it in world millimetres (the volume's affine: 1.5 x 1.5 x 2 mm voxels).
    crosshair = page.evaluate("() => Array.from(window.viewer.nv.frac2mm(window.viewer.nv.scene.crosshairPos))")
    world = np.diag([1.5, 1.5, 2.0, 1.0]) @ np.asarray([*first["point"], 1.0])
    assert np.all(np.abs(np.asarray(crosshair[:3]) - world[:3]) <= np.array([1.5, 1.5, 2.0]))
    client = ServeClient(server_url)
    np.testing.assert_array_equal(_overlay(page, shape), client.mask(first["session"]))

    second = _click_view(page, shift=True)  # shift-click removes
    assert second["positive"] is False

    # Replay the page's clicks on a fresh session: the overlay holds exactly that mask.
    replay = client.create_session(volumes_dir / "ct.nii.gz")["id"]
    for click in (first, second):
        client.click(replay, click["point"], click["positive"])
    expected = client.mask(replay)
    np.testing.assert_array_equal(_overlay(page, shape), expected)
    assert int(expected.sum()) == second["voxels"]

    page.click("#undo")  # back to the first click's mask, in the page and in the API
    page.wait_for_function("() => window.viewer.state.lastStep?.action === 'undo'", timeout=30_000)
    _wait_idle(page)
    np.testing.assert_array_equal(_overlay(page, shape), client.mask(first["session"]))
    assert int(_overlay(page, shape).sum()) == first["voxels"]
    page.click("#reset")
    page.wait_for_function("() => window.viewer.state.lastStep?.action === 'reset'", timeout=30_000)
    _wait_idle(page)
    assert not _overlay(page, shape).any()
    client.delete(replay)
