"""FastSAM3D interactive sessions and `export-engine segment` on a tiny artifact and a synthetic NIfTI volume."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from export_engine.calibration.synthetic import structured_volume
from export_engine.cli import main
from export_engine.errors import ModelInputError, UsageError
from export_engine.exporters.fastsam3d import TINY_CONFIG
from export_engine.families.fastsam3d.segment import SegmentSession
from export_engine.runtime.session import load


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seg")
    (root / "config.json").write_text(json.dumps(TINY_CONFIG))
    out = root / "art"
    argv = ["--model", "fastsam3d", "--random-weights", "--config", str(root / "config.json"), "--out", str(out)]
    assert main([*argv, "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def nifti(tmp_path_factory: pytest.TempPathFactory) -> Path:
    volume = structured_volume(80, seed=5)[:, 5:75, 10:70]  # (80, 70, 60): larger and smaller than 64
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    path = tmp_path_factory.mktemp("vol") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    return path


def test_session_feeds_previous_mask_back(artifact: Path) -> None:
    volume = structured_volume(64, seed=1)
    session = SegmentSession(load(artifact))
    session.set_volume(volume)
    first = session.click((30, 32, 33))
    second = session.click((20, 25, 40), positive=False)
    assert first.mask.shape == volume.shape and first.mask.dtype == bool
    assert not np.array_equal(first.low_res_logits, second.low_res_logits)
    # Replaying the second click with a zero previous mask gives another answer: the feedback is used.
    fresh = SegmentSession(load(artifact))
    fresh.set_volume(volume)
    alone = fresh.click((20, 25, 40), positive=False)
    assert not np.allclose(alone.low_res_logits, second.low_res_logits)


def test_segment_cli_writes_mask_in_original_geometry(artifact: Path, nifti: Path, tmp_path: Path) -> None:
    out, plot = tmp_path / "mask.nii.gz", tmp_path / "slices.png"
    argv = ["segment", str(artifact), str(nifti), "--click", "40,35,30", "--click", "45,30,28,0"]
    assert main([*argv, "--out", str(out), "--plot", str(plot)]) == 0
    mask = nib.load(str(out))
    assert mask.shape == (80, 70, 60)
    np.testing.assert_array_equal(mask.affine, nib.load(str(nifti)).affine)
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("click", "message"), [("90,3,3", "outside the volume"), ("1,2", "D,H,W"), ("3,3,3,2", "LABEL 1")]
)
def test_segment_rejects_bad_clicks(
    artifact: Path, nifti: Path, tmp_path: Path, capsys: pytest.CaptureFixture, click: str, message: str
) -> None:
    code = main(["segment", str(artifact), str(nifti), "--click", click, "--out", str(tmp_path / "m.nii.gz")])
    assert code in (2, 4)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.nii.gz").exists()


def test_segment_rejects_unreadable_volume(artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"garbage")
    assert main(["segment", str(artifact), str(bad), "--click", "1,1,1", "--out", str(tmp_path / "m.npy")]) == 4
    assert "could not be read" in capsys.readouterr().err


def test_click_before_volume_is_an_error(artifact: Path) -> None:
    session = SegmentSession(load(artifact))
    with pytest.raises(Exception, match="set_volume"):
        session.click((1, 1, 1))
    session.set_volume(structured_volume(64, seed=2))
    with pytest.raises(ModelInputError, match="outside"):
        session.click((64, 1, 1))


# --- the device path, the results' host copies, undo and threads --------------------------------------------


class _TensorRunner:
    """A device runner's interface (``run(feeds, copy)`` on torch tensors) over a CPU runner, on torch CPU
    tensors: SegmentSession takes its device path, as with CUDA runners, on this machine. It records what it was
    fed to prove that tensors, not numpy arrays, crossed it."""

    device = "cpu"

    def __init__(self, runner: object) -> None:
        self.runner = runner
        self.fed: list[str] = []

    def run(self, feeds: dict, copy: bool = True) -> dict:
        import torch

        self.fed += [type(v).__name__ for v in feeds.values()]
        out = self.runner({k: v.numpy() for k, v in feeds.items()})  # type: ignore[operator]
        return {k: torch.from_numpy(v) for k, v in out.items()}

    def __call__(self, feed: dict) -> dict:
        raise AssertionError("the device path must call run(), not the numpy interface")


class _NumpyRunner:
    """Only the numpy interface of a runner: SegmentSession takes its host path, whatever the machine runs."""

    def __init__(self, runner: object) -> None:
        self.runner = runner

    def __call__(self, feed: dict) -> dict:
        return self.runner(feed)  # type: ignore[operator,no-any-return]


def _reference_clicks(artifact: Path, volume: np.ndarray, clicks: list, around: list | None = None) -> list:
    """The numpy pipeline as the CLI ran it before the device path: preprocess_volume, runners, paste_back."""
    from export_engine.families.fastsam3d.preprocess import preprocess_volume

    loaded = load(artifact)
    pts = None if around is None else np.asarray(around, dtype=np.float64)
    prepared = preprocess_volume(volume, 64, points=pts)
    embedding = loaded.runners["encoder"]({"image": prepared.image})["image_embedding"]
    low_res = np.zeros((1, 1, 32, 32, 32), np.float32)
    results = []
    for point, label in clicks:
        feed = {"image_embedding": embedding,
                "point_coords": prepared.window.points_to_crop(np.asarray([[point]], np.float32)),
                "point_labels": np.asarray([[label]], np.int64), "mask_input": low_res,
                "has_mask_input": np.ones((1,), np.float32)}  # fmt: skip
        out = loaded.runners["prompt_decoder"](feed)
        low_res = out["low_res_masks"]
        results.append((prepared.window.paste_back(out["masks_upscaled"][0, 0] > 0, fill=False), low_res))
    return results


@pytest.mark.parametrize("device_path", [False, True])
def test_session_matches_the_numpy_pipeline(artifact: Path, device_path: bool) -> None:
    volume = (structured_volume(80, seed=7)[:, 5:75, 10:70] * 900).astype(np.int16)  # cropped and padded
    clicks = [((40, 35, 30), 1), ((45, 30, 28), 0), ((38, 40, 33), 1)]
    loaded = load(artifact)
    wrap = _TensorRunner if device_path else _NumpyRunner
    loaded.runners = {name: wrap(r) for name, r in loaded.runners.items()}  # type: ignore[misc]
    session = SegmentSession(loaded)
    assert session.on_device is device_path
    session.set_volume(volume, around=[clicks[0][0]])
    expected = _reference_clicks(artifact, volume, clicks, around=[clicks[0][0]])
    for (point, label), (mask, low_res) in zip(clicks, expected, strict=True):
        result = session.click(point, positive=bool(label))
        np.testing.assert_array_equal(result.mask, mask)
        np.testing.assert_array_equal(result.low_res_logits, low_res)
        assert result.voxels == int(mask.sum())
        assert result.packed() == np.packbits(mask.reshape(-1)).tobytes()
        np.testing.assert_array_equal(result.device_mask().numpy(), mask)
    if device_path:
        assert set(loaded.runners["encoder"].fed) == {"Tensor"}  # type: ignore[attr-defined]
        assert set(loaded.runners["prompt_decoder"].fed) == {"Tensor"}  # type: ignore[attr-defined]


def test_undo_returns_to_the_previous_click_and_reset_forgets(artifact: Path) -> None:
    session = SegmentSession(load(artifact))
    session.set_volume(structured_volume(64, seed=3))
    first = session.click((30, 32, 33))
    session.click((20, 25, 40), positive=False)
    assert session.undo() is first and len(session.clicks) == 1
    again = session.click((20, 25, 40), positive=False)  # same state again -> the same answer
    other = SegmentSession(load(artifact))
    other.set_volume(structured_volume(64, seed=3))
    other.click((30, 32, 33))
    np.testing.assert_array_equal(again.mask, other.click((20, 25, 40), positive=False).mask)
    assert session.undo() is first and session.undo() is None and session.clicks == []
    with pytest.raises(UsageError, match="nothing to undo"):
        session.undo()
    session.click((30, 32, 33))
    session.reset()
    assert session.last is None and session.clicks == []
    assert session.device_bytes() > 0


def test_nan_volume_is_refused_and_the_session_keeps_its_volume(artifact: Path) -> None:
    session = SegmentSession(load(artifact))
    session.set_volume(structured_volume(64, seed=3))
    before = session.click((30, 32, 33)).mask
    bad = structured_volume(64, seed=4)
    bad[1, 2, 3] = np.nan
    with pytest.raises(ModelInputError, match="NaN"):
        session.set_volume(bad)
    with pytest.raises(ModelInputError, match="0 voxel"):
        session.set_volume(np.zeros((64, 64, 64), np.float32))
    np.testing.assert_array_equal(session.click((30, 32, 33)).mask.shape, before.shape)
    assert len(session.clicks) == 2


def test_threads_on_one_session_serialise_and_sessions_stay_apart(artifact: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    loaded = load(artifact)
    volumes = [structured_volume(64, seed=s) for s in (11, 12)]
    points = [(30, 32, 33), (20, 25, 40), (33, 30, 30)]

    def alone(v: np.ndarray) -> list[np.ndarray]:
        s = SegmentSession(load(artifact))
        s.set_volume(v)
        return [s.click(p).mask for p in points]

    def shared(v: np.ndarray) -> list[np.ndarray]:
        s = SegmentSession(loaded)  # both threads share the artifact's runners
        s.set_volume(v)
        return [s.click(p).mask for p in points]

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(shared, volumes))
    for v, masks in zip(volumes, got, strict=True):
        for a, b in zip(alone(v), masks, strict=True):
            np.testing.assert_array_equal(a, b)
    one = SegmentSession(loaded)
    one.set_volume(volumes[0])
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: one.click(p), points * 3))
    assert len(one.clicks) == 9


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_torch_preprocessing_equals_numpy_bit_for_bit(seed: int) -> None:
    import torch

    from export_engine.families.fastsam3d.preprocess import (
        check_preprocessed,
        preprocess_tensor,
        preprocess_volume,
    )

    volume = structured_volume(48, seed=seed)[:, 3:40, 5:48]  # cropped on one axis, padded on others
    if seed % 2:
        volume = (volume * 1000).astype(np.int16)
    points = None if seed < 2 else np.array([[20.0, 18.0, 25.0]])
    want = preprocess_volume(volume, 40, points=points)
    got = preprocess_tensor(torch.from_numpy(volume), 40, points=points)
    check_preprocessed(got)
    assert got.window == want.window
    np.testing.assert_array_equal(got.image.numpy(), want.image)


def test_torch_preprocessing_defers_its_checks_with_the_numpy_messages() -> None:
    import torch

    from export_engine.families.fastsam3d.preprocess import check_preprocessed, preprocess_tensor

    bad = structured_volume(24, seed=1)
    bad[0, 0, 0] = np.inf
    for volume, message in [(bad, "NaN or infinite"), (np.zeros((24, 24, 24), np.float32), "0 voxel"),
                            (np.full((24, 24, 24), 3.0, np.float32), "std 0")]:  # fmt: skip
        with pytest.raises(ModelInputError, match=message):
            check_preprocessed(preprocess_tensor(torch.from_numpy(volume), 16))


@pytest.mark.gpu
def test_cuda_runners_take_the_device_path_with_the_numpy_path_results(artifact: Path) -> None:
    """On a GPU machine (ONNX Runtime's CUDA provider): pre-processing on the GPU is bit-identical to numpy's,
    and the masks of the device path equal those of the same runners fed host arrays."""
    import torch

    from export_engine.families.fastsam3d.preprocess import (
        check_preprocessed,
        preprocess_tensor,
        preprocess_volume,
    )

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    loaded = load(artifact)
    session = SegmentSession(loaded)
    if not session.on_device:
        pytest.skip("the artifact runs on the CPU here: install ONNX Runtime's CUDA build (the [gpu] extra)")
    big = (structured_volume(160, seed=8) * 700).astype(np.int16)
    on_gpu = preprocess_tensor(torch.from_numpy(big).cuda(), 128)
    check_preprocessed(on_gpu)
    np.testing.assert_array_equal(on_gpu.image.cpu().numpy(), preprocess_volume(big, 128).image)
    volume = (structured_volume(80, seed=7)[:, 5:75, 10:70] * 900).astype(np.int16)
    clicks = [((40, 35, 30), 1), ((45, 30, 28), 0), ((38, 40, 33), 1)]
    session.set_volume(volume, around=[clicks[0][0]])
    expected = _reference_clicks(artifact, volume, clicks, around=[clicks[0][0]])
    for (point, label), (mask, low_res) in zip(clicks, expected, strict=True):
        result = session.click(point, positive=bool(label))
        assert result.device_mask().is_cuda
        np.testing.assert_allclose(result.low_res_logits, low_res, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(result.mask, mask)
        assert result.voxels == int(mask.sum())


def test_the_device_packing_equals_numpys() -> None:
    """What a GPU session copies to the host (packed bits, count inside the volume, IoU in one transfer), run
    on CPU tensors: the same as numpy's packbits and count."""
    import torch

    from export_engine.families.fastsam3d.preprocess import CropWindow
    from export_engine.families.fastsam3d.segment import _fetch_packed

    window = CropWindow((-3, 5, 2), (9, 9, 9), (20, 12, 30))  # padded before axis 0, cut after axis 1
    mask = np.random.default_rng(0).random((9, 9, 9)) > 0.6
    _, inside = window.overlap()
    packed, count, iou = _fetch_packed(torch.from_numpy(mask), inside, torch.tensor([[0.625]]))
    np.testing.assert_array_equal(packed, np.packbits(mask.reshape(-1)))
    assert count == int(mask[inside].sum()) < int(mask.sum()) and iou == 0.625


@pytest.mark.parametrize("dtype", ["int16", "float32"])
def test_device_preprocessing_keeps_every_tensor_on_the_volume_device(dtype: str) -> None:
    """On torch's "meta" device (shapes only), as a stand-in for a GPU: a tensor made on the CPU by mistake
    would fail to combine with the volume's, as it would with a CUDA volume."""
    import torch

    from export_engine.families.fastsam3d.preprocess import preprocess_tensor

    volume = torch.empty((40, 30, 50), dtype=getattr(torch, dtype), device="meta")
    result = preprocess_tensor(volume, 32, points=np.array([[10.0, 12.0, 20.0]]))
    assert result.image.device.type == result.checks.device.type == "meta"
    assert tuple(result.image.shape) == (1, 1, 32, 32, 32)
    pasted = result.window.paste_back_tensor(torch.empty((32, 32, 32), dtype=torch.bool, device="meta"), False)
    assert pasted.device.type == "meta" and tuple(pasted.shape) == (40, 30, 50)


def test_device_index_reads_names_and_torch_devices() -> None:
    """A session's device may be given as a name ("cuda:1"), whose str has an .index method of its own."""
    from export_engine.families.fastsam3d.segment import _device_index

    assert [_device_index(d) for d in ("cuda:1", "cuda", torch.device("cuda:2"), torch.device("cuda"))] == [1, 0, 2, 0]
