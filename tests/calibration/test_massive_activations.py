"""THE case HybridCast exists for: activations beyond FP16's range, as real ViT-L weights produce.

The tiny MASt3R encoder with one block's MLP rescaled (see ``massive_mast3r_encoder``):
* ``hidden``: fc1 x 1e5 and fc2 / 1e5, so the MLP hidden state reaches ~1e5 (same function);
* ``residual``: fc2 x 1e5, so the residual stream itself reaches ~1e5.
The naive FP16 graph gives inf/NaN or errors far over tolerance; the data-driven hybrid plan keeps exactly the
nodes touching those values in FP32 and stays within tolerance, with most FLOPs still in FP16. Both are checked
with plain ONNX Runtime and with FP16 storage emulated (what a GPU engine stores; see fp16_emulation).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from calibration.hybrid_testing import compare_all, massive_mast3r_encoder, run_emulated, run_ort

from export_engine.calibration.plan import plan_precision
from export_engine.calibration.statistics import collect_activation_stats
from export_engine.core.types import Tolerance
from export_engine.graph_passes.apply_precision_plan import ApplyPrecisionPlanConfig, apply_precision_plan
from export_engine.graph_passes.base import load_graph, save_graph
from export_engine.graph_passes.convert_fp16 import ConvertFp16Config, convert_fp16

log = logging.getLogger(__name__)
# Tokens are O(1) after enc_norm; FP16 storage error on the benign tiny encoder is ~2.5e-3 (hybrid, measured).
TOKENS = Tolerance(atol=1e-2, rtol=1e-2)


@pytest.fixture(scope="module", params=["hidden", "residual"])
def massive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, list]:
    path, feeds = massive_mast3r_encoder(tmp_path_factory.mktemp("massive"), request.param)
    return request.param, path, feeds


def test_naive_fp16_fails_and_hybrid_passes(massive: tuple[str, Path, list], tmp_path: Path) -> None:
    mode, path, feeds = massive
    calib, check = feeds[:2], feeds[2:]  # the plan is judged on a feed it was not measured on
    stats = collect_activation_stats(path, calib)
    assert max(s.absmax for s in stats.values()) > 65504  # beyond FP16's largest finite value
    reference = run_ort(path, check)

    naive = load_graph(path)
    convert_fp16(naive, ConvertFp16Config())
    save_graph(naive, tmp_path / "fp16.onnx", external_data=False)
    fp16 = compare_all(reference, run_ort(tmp_path / "fp16.onnx", check), TOKENS)["tokens"]

    graph = load_graph(path)
    plan = plan_precision(graph, stats)
    apply_precision_plan(graph, ApplyPrecisionPlanConfig(plan))
    save_graph(graph, tmp_path / "hybrid.onnx", external_data=False)
    hybrid = compare_all(reference, run_ort(tmp_path / "hybrid.onnx", check), TOKENS)["tokens"]

    emulated_fp16 = compare_all(reference, run_emulated(tmp_path / "fp16.onnx", check), TOKENS)["tokens"]
    emulated_hybrid = compare_all(reference, run_emulated(tmp_path / "hybrid.onnx", check), TOKENS)["tokens"]
    assert not emulated_fp16.finite  # stored in FP16, the huge values overflow in both variants
    assert emulated_hybrid.passed, (emulated_hybrid.max_abs, emulated_hybrid.share_over)
    log.info("massive %s: fp16 max abs %.3g (%.1f%% over tol, finite %s); hybrid max abs %.3g; %s", mode,
             fp16.max_abs, 100 * fp16.share_over, fp16.finite, hybrid.max_abs, plan.summary_line())  # fmt: skip
    if mode == "residual":
        assert not fp16.finite  # the residual stream overflows to inf, LayerNorm turns it into NaN
    else:
        # ONNX Runtime on the CPU runs MatMul->Add->Gelu->MatMul in FP32 internally, so the hidden state itself does
        # not overflow here (a GPU engine would); what remains is FP16's loss on the rescaled weights.
        assert fp16.share_over > 0.05
    assert not fp16.passed
    assert hybrid.passed, (hybrid.max_abs, hybrid.share_over)
    magnitude = {k for k, e in plan.nodes.items() if e.rule == "magnitude"}
    assert "/enc_blocks.1/mlp/fc2/MatMul" in magnitude  # it reads (hidden) or writes (residual) the huge values
    assert not any(k.startswith("/enc_blocks.0/") for k in magnitude)  # blocks before the huge values are FP16
    assert plan.fp16_flop_share() > 0.75
