"""Rewrites for ONNX Runtime are checked against the artifact's stored FP32 reference before they are used:
a rewrite that fails falls back to the graph as stored (naming the rewrite and its error) or, strict, refuses.
Runs on ONNX Runtime's CPU provider, which has every contrib op the default rewrites write but NhwcConv (the
default minus nhwc_conv here; the GPU tests run it)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from export_engine.cli import main
from export_engine.errors import BackendError, ModelInputError, ParityError
from export_engine.exporters.mast3r import TINY_CONFIG
from export_engine.runners import ort_lowering, self_check
from export_engine.runners.ort_lowering import DEFAULT_LOWERINGS, check_lowerings, fp32_matrix_products
from export_engine.runners.self_check import check_runner, open_checked
from export_engine.runtime.session import ort_cpu_runner

CPU_DEFAULTS = tuple(n for n in DEFAULT_LOWERINGS if n != "nhwc_conv")


def _export(root: Path, precision: str) -> Path:
    (root / "config.json").write_text(json.dumps(TINY_CONFIG))
    out = root / f"mast3r-{precision}"
    args = ["--model", "mast3r", "--precision", precision, "--random-weights", "--backend", "onnx", "--quiet",
            "--config", str(root / "config.json"), "--resolution", "80x48", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("self_check"), "hybrid")


def _graph(artifact: Path, name: str) -> dict[str, Any]:
    manifest = json.loads((artifact / "manifest.json").read_text())
    return next(g for g in manifest["graphs"] if g["name"] == name)


def _feed(artifact: Path, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    with np.load(artifact / meta["reference_check"]["inputs"]) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture
def broken_bias_gelu(monkeypatch: pytest.MonkeyPatch) -> None:
    """``bias_gelu`` that also scales every FP16 weight matrix by 1.5: a rewrite that computes the wrong thing."""
    real = ort_lowering._passes

    def passes() -> dict[str, Any]:
        table = real()
        good = table["bias_gelu"]

        def bad(graph: gs.Graph) -> Any:
            report = good(graph)
            for tensor in graph.tensors().values():
                if isinstance(tensor, gs.Constant) and tensor.values.ndim == 2 and tensor.values.dtype == np.float16:
                    tensor.values = (tensor.values * 1.5).astype(np.float16)
            return report

        table["bias_gelu"] = bad
        return table

    monkeypatch.setattr(ort_lowering, "_passes", passes)
    monkeypatch.setattr(ort_lowering, "_LOWERED", {})
    monkeypatch.setattr(self_check, "_CHECKED", {})  # verdicts on the real passes do not apply to these


@pytest.mark.parametrize("name", ["encoder", "decoder"])
def test_default_rewrites_pass_the_check_and_stay_close_to_the_stored_graph(hybrid: Path, name: str) -> None:
    meta = _graph(hybrid, name)
    path = hybrid / meta["file"]
    opened: list[tuple[tuple[str, ...], bool]] = []

    def open_fn(names: tuple[str, ...], tf32: bool) -> Any:
        opened.append((names, tf32))
        return ort_cpu_runner(path, meta, names, check=False)

    runner, outcome = open_checked(open_fn, path, meta, CPU_DEFAULTS, False)
    assert outcome.check is not None and outcome.check.passed and outcome.fallback is None
    assert opened == [(CPU_DEFAULTS, False)]  # one session, no bisection
    _, same = open_checked(open_fn, path, meta, CPU_DEFAULTS, False)
    assert same is outcome and len(opened) == 2  # checked once per process: the second session reuses it
    stored = ort_cpu_runner(path, meta)
    feed = _feed(hybrid, meta)
    for key, want in stored(feed).items():
        got = runner(feed)[key]
        scale = max(float(np.abs(want).max()), 1.0)
        np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2 * scale, err_msg=key)


def test_a_failing_rewrite_falls_back_to_the_stored_graph_and_is_named(
    hybrid: Path, broken_bias_gelu: None, caplog: pytest.LogCaptureFixture
) -> None:
    meta = _graph(hybrid, "decoder")
    path = hybrid / meta["file"]
    with caplog.at_level(logging.WARNING):
        runner = ort_cpu_runner(path, meta, ("rotary", "bias_gelu"))
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "rewrite bias_gelu (" in message and "rotary (" not in message  # the culprit alone, by how much
    assert "max abs error" in message and "running the graph without rewrites" in message
    feed = _feed(hybrid, meta)
    stored = ort_cpu_runner(path, meta)(feed)
    for key, value in runner(feed).items():
        np.testing.assert_array_equal(value, stored[key])  # it really runs the stored graph


def test_strict_refuses_a_failing_rewrite(hybrid: Path, broken_bias_gelu: None) -> None:
    meta = _graph(hybrid, "decoder")
    with pytest.raises(ParityError, match=r"rewrite bias_gelu .*refusing to run \(strict\)"):
        ort_cpu_runner(hybrid / meta["file"], meta, ("bias_gelu",), strict=True)


def test_a_rewrite_the_runtime_cannot_open_falls_back_or_is_refused(
    hybrid: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An ONNX Runtime that lacks an op or attribute a rewrite writes cannot open the rewritten graph: the
    session runs the stored graph and says why; strict refuses."""
    monkeypatch.setattr(self_check, "_CHECKED", {})
    meta = _graph(hybrid, "encoder")
    path = hybrid / meta["file"]
    opened: list[tuple[str, ...]] = []

    def open_fn(names: tuple[str, ...], tf32: bool) -> Any:
        opened.append(names)
        if names:
            raise BackendError("ONNX Runtime CUDA cannot load encoder.onnx: Unrecognized attribute: causal")
        return ort_cpu_runner(path, meta, names, check=False)

    with caplog.at_level(logging.WARNING):
        _, outcome = open_checked(open_fn, path, meta, ("attention_gqa",), False)
    assert opened == [("attention_gqa",), ()] and outcome.lowerings == ()
    assert outcome.fallback and "cannot open the graph rewritten by attention_gqa" in outcome.fallback
    assert any("Unrecognized attribute" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(self_check, "_CHECKED", {})
    with pytest.raises(BackendError, match=r"attention_gqa.*refusing to run \(strict\)"):
        open_checked(open_fn, path, meta, ("attention_gqa",), False, strict=True)

    def nothing_opens(names: tuple[str, ...], tf32: bool) -> Any:
        raise BackendError(f"cannot load encoder.onnx {'rewritten' if names else 'as stored'}: no CUDA provider")

    monkeypatch.setattr(self_check, "_CHECKED", {})
    for strict in (False, True):  # the stored graph's own error, not a rewrite blamed for it
        with pytest.raises(BackendError, match="as stored: no CUDA provider"):
            open_checked(nothing_opens, path, meta, ("attention_gqa",), False, strict=strict)


def test_a_rewrite_whose_kernels_fail_at_run_time_falls_back_or_is_refused(
    hybrid: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A rewritten graph that opens but fails when the check runs it (an operator refusing its inputs, a kernel
    launch failing) is treated like one that does not open: the stored graph runs; strict refuses."""
    monkeypatch.setattr(self_check, "_CHECKED", {})
    meta = _graph(hybrid, "encoder")
    path = hybrid / meta["file"]

    def failing(feed: Any) -> Any:
        raise BackendError("ONNX Runtime CUDA failed running encoder.onnx: BiasRotarySplit: CUDA launch failed")

    def open_fn(names: tuple[str, ...], tf32: bool) -> Any:
        return failing if names else ort_cpu_runner(path, meta, names, check=False)

    with caplog.at_level(logging.WARNING):
        runner, outcome = open_checked(open_fn, path, meta, ("attention_fused",), False)
    assert outcome.lowerings == () and outcome.fallback
    assert "cannot run the graph rewritten by attention_fused" in outcome.fallback and "launch failed" in caplog.text
    assert runner is not failing
    monkeypatch.setattr(self_check, "_CHECKED", {})
    with pytest.raises(BackendError, match=r"attention_fused.*refusing to run \(strict\)"):
        open_checked(open_fn, path, meta, ("attention_fused",), False, strict=True)


def test_an_artifact_without_reference_data_runs_the_rewrites_unchecked(
    hybrid: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = tmp_path / "art"
    shutil.copytree(hybrid, copy)
    shutil.rmtree(copy / "reference")
    meta = _graph(copy, "encoder")
    with caplog.at_level(logging.WARNING):
        ort_cpu_runner(copy / meta["file"], meta, ("rotary",))
    assert any("run unchecked" in r.getMessage() for r in caplog.records)


def test_check_runner_reports_every_output(hybrid: Path) -> None:
    meta = _graph(hybrid, "decoder")
    report = check_runner(ort_cpu_runner(hybrid / meta["file"], meta), hybrid, meta, "onnxruntime cpu")
    assert report.passed and {o.output for o in report.outputs} == set(meta["reference_check"]["tolerances"])


def test_tf32_is_only_chosen_where_no_matrix_product_is_fp32(hybrid: Path, tmp_path: Path) -> None:
    for name in ("encoder", "decoder"):
        total, fp32 = fp32_matrix_products(hybrid / f"{name}.onnx")
        assert total > 0 and fp32 == []  # hybrid: every MatMul / Conv / Attention is FP16
    fp32_artifact = _export(tmp_path, "fp32")
    total, fp32 = fp32_matrix_products(fp32_artifact / "decoder.onnx")
    assert len(fp32) == total > 0


def test_unknown_lowerings_are_refused_with_the_valid_names() -> None:
    with pytest.raises(ModelInputError, match=r"unknown ONNX Runtime lowering.*valid"):
        check_lowerings(("rotary", "warp_speed"))
    assert check_lowerings(("bias_gelu", "rotary")) == ("rotary", "bias_gelu")  # one canonical order


def test_a_verdict_holds_per_context_only(hybrid: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A verdict is reused for the same graph, rewrites and context (GPU, session options) and checked again
    for another: a runner on another GPU or with other options never runs a rewrite unchecked."""
    monkeypatch.setattr(self_check, "_CHECKED", {})
    meta = _graph(hybrid, "encoder")
    path = hybrid / meta["file"]
    checks: list[tuple[str, ...]] = []

    def open_fn(names: tuple[str, ...], tf32: bool) -> Any:
        runner = ort_cpu_runner(path, meta, names, check=False)

        def counted(feed: Any) -> Any:
            checks.append(names)
            return runner(feed)

        return counted

    gpu_a = (("NVIDIA H100 80GB HBM3", 9, 0), "1.31.1", False, True, False, ())
    gpu_b = (("NVIDIA H200", 9, 0), "1.31.1", False, True, False, ())
    options = (("NVIDIA H100 80GB HBM3", 9, 0), "1.31.1", True, True, False, ())
    for context in (gpu_a, gpu_a, gpu_b, options, gpu_b):
        _, outcome = open_checked(open_fn, path, meta, ("rotary",), False, context=context)
        assert outcome.lowerings == ("rotary",) and outcome.check is not None and outcome.check.passed
    assert len(checks) == 3  # gpu_a once, gpu_b once, the other options once: the repeats reused their verdicts
