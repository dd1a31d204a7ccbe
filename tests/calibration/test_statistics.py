"""collect_activation_stats: exact magnitudes, bounded chunks, external-data models, rearranged tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from calibration.hybrid_testing import attention_block, block_feeds, run_ort, save_model

from export_engine.calibration.statistics import collect_activation_stats, measure
from export_engine.errors import ModelInputError


def _exposed(model: onnx.ModelProto, names: list[str], feeds: list) -> list[dict[str, np.ndarray]]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return run_ort(probe, feeds)


def test_stats_match_numpy_in_both_modes(tmp_path: Path) -> None:
    model = attention_block()
    path = save_model(model, tmp_path / "block.onnx")
    feeds = block_feeds(3)
    one = collect_activation_stats(path, feeds)  # measured inside the graph, one session
    # Tensors exposed as outputs (needed for percentiles), a few per session.
    many = collect_activation_stats(path, feeds, max_bytes_per_run=600, percentiles=(50.0,))
    assert one.keys() == many.keys()
    for name in one:
        assert one[name].absmax == many[name].absmax and one[name].samples == many[name].samples == 3, name
        assert (
            one[name].mean_abs == pytest.approx(many[name].mean_abs, rel=1e-5) and one[name].shape == many[name].shape
        )
        assert many[name].percentiles["50"] <= many[name].absmax
    names = ["h", "att", "conf", "ln1"]
    runs = _exposed(model, names, feeds)
    for name in names:
        expected = max(float(np.abs(r[name]).max()) for r in runs)
        assert one[name].absmax == pytest.approx(expected, rel=1e-6), name
        assert one[name].shape == runs[-1][name].shape
    assert one["x"].absmax == pytest.approx(max(float(np.abs(f["x"]).max()) for f in feeds))  # graph input
    # Rearranged tensors are not measured, they inherit their source's statistics.
    assert one["q3"].derived_from == "q" and one["q4"].derived_from == "q"
    assert one["q4"].absmax == one["q"].absmax and one["q4"].shape == (1, 2, 8, 8)


def test_external_data_model(tmp_path: Path) -> None:
    model = attention_block(dim=32)
    inline = save_model(model, tmp_path / "inline.onnx")
    folder = tmp_path / "external"
    folder.mkdir()
    external = folder / "block.onnx"
    onnx.save_model(model, str(external), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="block.onnx.data", size_threshold=64)  # fmt: skip
    assert (folder / "block.onnx.data").stat().st_size > 0
    feeds = block_feeds(2, dim=32)
    a = collect_activation_stats(inline, feeds)
    b = collect_activation_stats(external, feeds, percentiles=(99.0,))
    assert {k: v.absmax for k, v in a.items()} == {k: v.absmax for k, v in b.items()}
    assert "99" in b["h"].percentiles and b["h"].percentiles["99"] <= b["h"].absmax


def test_non_finite_reference_values_are_flagged() -> None:
    stats = measure(np.array([1.0, -3.0, np.inf], np.float32))
    assert not stats.finite and stats.absmax == float("inf") and stats.mean_abs == 2.0
    merged = stats.merged(measure(np.array([5.0], np.float32)))
    assert merged.absmax == float("inf") and not merged.finite and merged.samples == 2


def test_no_feeds_is_an_input_error(tmp_path: Path) -> None:
    path = save_model(attention_block(), tmp_path / "block.onnx")
    with pytest.raises(ModelInputError, match="at least one"):
        collect_activation_stats(path, [])


def test_kept_outputs_are_the_graphs_fp32_outputs_from_the_same_run(tmp_path: Path) -> None:
    model = attention_block()
    path = save_model(model, tmp_path / "block.onnx")
    feeds = block_feeds(2)
    kept: list[dict[str, np.ndarray]] = []
    stats = collect_activation_stats(path, feeds, keep_outputs=kept)
    plain = run_ort(model, feeds)
    assert len(kept) == len(feeds) and stats
    for got, want in zip(kept, plain, strict=True):
        assert got.keys() == {o.name for o in model.graph.output}
        for name, value in got.items():
            np.testing.assert_allclose(value, want[name], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="in-graph"):
        collect_activation_stats(path, feeds, percentiles=(50.0,), keep_outputs=[])
