"""match-many and Matcher on a GPU (ONNX Runtime CUDA, the recorded FastNN-Lite): the same matches as the
unrecorded path, and a database like the CPU run's."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export_engine.families.mast3r.images import load_image
from export_engine.families.mast3r.match import MatchConfig, Matcher
from export_engine.runners.ort_cuda import cuda_available
from export_engine.runtime.session import load
from export_engine.sfm.database import image_ids_of, read_keypoints, read_matches, reading
from export_engine.sfm.run import MatchManyConfig, match_many

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_available()[0], reason="needs a CUDA GPU and onnxruntime-gpu (the [gpu] extra)"),
]


def _pairs(out: Path) -> dict[tuple[int, int], set]:
    """Each pair's matches as (x1, y1, x2, y2) keypoint coordinates (sqlite3 only: no pycolmap needed here)."""
    with reading(out / "database.db") as db:
        keypoints, matches = read_keypoints(db), read_matches(db)
    found = {}
    for pid, (indices, _) in matches.items():
        a, b = image_ids_of(pid)
        found[a, b] = {(*keypoints[a][i], *keypoints[b][j]) for i, j in indices}
    return found


def _overlap(first: dict[tuple[int, int], set], second: dict[tuple[int, int], set]) -> float:
    """Share of matches two runs agree on, over all pairs (1.0: the same matches)."""
    assert first.keys() == second.keys()
    shared = sum(len(first[k] & second[k]) for k in first)
    return shared / max(1, sum(max(len(first[k]), len(second[k])) for k in first))


def test_recorded_matcher_gives_the_unrecorded_matches(tiny_mast3r_artifact: Path, photos: Path) -> None:
    files = sorted(photos.glob("*.jpg"))[:3]
    recorded = Matcher(load(tiny_mast3r_artifact, cuda_graph=True), MatchConfig(subsample=4))
    plain = Matcher(load(tiny_mast3r_artifact, cuda_graph=True), MatchConfig(subsample=4, recorded=False))
    assert recorded.on_device
    for a, b in ((files[0], files[1]), (files[1], files[2]), (files[0], files[1])):
        got, want = recorded.match(a, b), plain.match(a, b)
        assert len(got.xy1) > 0
        np.testing.assert_array_equal(got.xy1, want.xy1)
        np.testing.assert_array_equal(got.xy2, want.xy2)
        np.testing.assert_array_equal(got.conf, want.conf)
    loaded = load_image(files[2], 96, 64)
    assert recorded.match(loaded, files[0]).xy1.shape[1] == 2


def test_gpu_run_matches_the_cpu_run(tiny_mast3r_artifact: Path, photos: Path, tmp_path: Path) -> None:
    config = MatchManyConfig(pairs="complete", match=MatchConfig(subsample=4), batch=2, encode_batch=2, workers=2,
                             hloc=False)  # fmt: skip
    gpu = match_many(tiny_mast3r_artifact, [photos], tmp_path / "gpu", config)
    assert gpu.peak_gpu_gib is not None and gpu.computed == 21 and gpu.encodes == 7
    evicting = MatchManyConfig(**{**config.__dict__, "token_slots": 4})
    small = match_many(tiny_mast3r_artifact, [photos], tmp_path / "small", evicting)
    assert small.encodes > 7
    assert _overlap(_pairs(tmp_path / "small"), _pairs(tmp_path / "gpu")) >= 0.98  # other batch neighbours only
    with pytest.MonkeyPatch.context() as patch:  # the same run on the CPU: ONNX Runtime's CPU provider
        patch.setattr("export_engine.runtime.session._ort_on_cuda", lambda: False)
        cpu = match_many(tiny_mast3r_artifact, [photos], tmp_path / "cpu", config)
    assert cpu.peak_gpu_gib is None
    assert _overlap(_pairs(tmp_path / "cpu"), _pairs(tmp_path / "gpu")) >= 0.9  # providers' float differences
    shutil.rmtree(tmp_path / "cpu")
    torch.cuda.synchronize()
