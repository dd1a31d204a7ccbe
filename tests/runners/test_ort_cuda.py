"""ONNX Runtime CUDA runner: clear refusals without a GPU; on a GPU (marker gpu), the same numbers as the CPU.

The gpu tests run on the device machine (bench/gpu_bench.py runs them first); CI has no GPU and skips them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export_engine.cli import main
from export_engine.errors import BackendError, ModelInputError
from export_engine.exporters.fastsam3d import TINY_CONFIG as FASTSAM3D_TINY
from export_engine.exporters.mast3r import TINY_CONFIG as MAST3R_TINY
from export_engine.runners.ort_cuda import CudaGraphRunner, CudaSessionConfig, cuda_available
from export_engine.runners.ort_lowering import DEFAULT_LOWERINGS
from export_engine.runtime.session import load

CUDA, WHY = cuda_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason=f"needs ONNX Runtime CUDA and a GPU: {WHY}")


@pytest.fixture(scope="module")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight artifacts: MASt3R hybrid and FastSAM3D fp32 (ONNX only)."""
    root = tmp_path_factory.mktemp("ort_cuda")
    found = {}
    cases = (("mast3r", "hybrid", MAST3R_TINY, ["--resolution", "80x48"]), ("fastsam3d", "fp32", FASTSAM3D_TINY, []))
    for model, precision, config, extra in cases:
        (root / f"{model}.json").write_text(json.dumps(config))
        out = root / f"{model}-{precision}"
        args = ["--model", model, "--precision", precision, "--random-weights", "--backend", "onnx", "--out",
                str(out), "--quiet", "--config", str(root / f"{model}.json"), *extra]  # fmt: skip
        assert main(args) == 0
        found[model] = out
    return found


def test_config_and_availability_say_what_is_wrong() -> None:
    with pytest.raises(ModelInputError, match="attention must be"):
        CudaSessionConfig(attention="flash")  # type: ignore[arg-type]
    with pytest.raises(ModelInputError, match="unknown ONNX Runtime lowering"):
        CudaSessionConfig(lowerings=("warp",))
    fused, decomposed = CudaSessionConfig().lowering_names(), CudaSessionConfig("decomposed").lowering_names()
    assert "attention_fused" in fused and "decompose_attention" not in fused
    assert not {"attention_fused", "attention_bsh"} & set(decomposed) and decomposed[-1] == "decompose_attention"
    ok, why = cuda_available()
    assert isinstance(ok, bool) and why


@pytest.mark.skipif(CUDA, reason="checks the refusal on machines without ONNX Runtime CUDA")
def test_runner_refuses_without_cuda(tmp_path: Path) -> None:
    meta = {"inputs": [], "outputs": []}
    with pytest.raises(BackendError, match=r"cannot run x\.onnx on CUDA"):
        CudaGraphRunner(tmp_path / "x.onnx", meta)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("attention", ["fused", "decomposed"])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_runner_matches_cpu(tiny_artifacts: dict[str, Path], attention: str, cuda_graph: bool) -> None:
    for model, artifact in tiny_artifacts.items():
        manifest = json.loads((artifact / "manifest.json").read_text())
        for graph in manifest["graphs"]:
            check = graph["reference_check"]
            with np.load(artifact / check["inputs"]) as data:
                feed = {k: data[k] for k in data.files}
            runner = CudaGraphRunner(artifact / graph["file"], graph, CudaSessionConfig(attention, cuda_graph))
            tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
            for _ in range(3):  # capture, then replays
                got = {k: v.cpu().numpy() for k, v in runner.run(tensors).items()}
            with np.load(artifact / check["expected"]) as data:
                for name in data.files:
                    tol = check["tolerances"][name]
                    np.testing.assert_allclose(got[name], data[name], atol=tol["atol"], rtol=tol["rtol"],
                                               err_msg=f"{model}/{graph['name']}/{name}")  # fmt: skip


@pytest.mark.gpu
@needs_cuda
def test_load_runs_on_cuda_and_refuses_bad_shapes(tiny_artifacts: dict[str, Path]) -> None:
    session = load(tiny_artifacts["mast3r"], cuda_graph=True)
    assert "CUDAExecutionProvider" in session.provider
    encoder = session.runners["encoder"]
    assert isinstance(encoder, CudaGraphRunner)
    with pytest.raises(ModelInputError, match="input images: shape"):
        encoder.run({"images": torch.zeros(1, 3, 7, 7, device="cuda")})


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_own_stream_queues_without_host_sync_and_orders_results(tiny_artifacts: dict[str, Path],
                                                                cuda_graph: bool) -> None:  # fmt: skip
    """A run on the runner's own stream returns while the caller's earlier kernels still run (no host
    synchronisation), yet its outputs are what a synchronised run gives once the caller's stream reaches them."""
    artifact = tiny_artifacts["mast3r"]
    graph = next(g for g in json.loads((artifact / "manifest.json").read_text())["graphs"] if g["name"] == "encoder")
    with np.load(artifact / graph["reference_check"]["inputs"]) as data:
        images = torch.from_numpy(data["images"]).cuda()
    synced = CudaGraphRunner(artifact / graph["file"], graph, CudaSessionConfig(cuda_graph=cuda_graph,
                             own_stream=False))  # fmt: skip
    queued = CudaGraphRunner(artifact / graph["file"], graph, CudaSessionConfig(cuda_graph=cuda_graph))
    want = synced.run({"images": images})["tokens"]
    for _ in range(2):
        queued.run({"images": images})  # first use, capture
    torch.cuda.synchronize()
    done = torch.cuda.Event()
    source = torch.zeros_like(images)
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on the caller's stream
    source.copy_(images)  # written after the sleep: a run that read it too early would see zeros
    done.record()
    out = queued.run({"images": source}, copy=False)["tokens"]
    assert not done.query(), "the run waited for the caller's stream on the host"
    torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-2)  # read on the caller's stream


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "options",
    [
        {"nhwc": True},
        {"lowerings": ("attention_gqa", "rotary", "norm_casts")},
        {"lowerings": ("patch_conv", "attention_bsh", "rotary", "norm_casts", "skip_layernorm", "nhwc_conv")},
        {"lowerings": tuple(n for n in DEFAULT_LOWERINGS if n not in ("matmul_gelu", "nhwc_conv"))},
    ],
)
def test_runtime_options_match_the_reference(tiny_artifacts: dict[str, Path], options: dict) -> None:
    """NHWC convolutions (ONNX Runtime's prefer_nhwc; nhwc_conv next to ONNX Runtime's own Resize and bias
    handling), the default without nhwc_conv and matmul_gelu, and attention as GroupQueryAttention (strict: a
    failing check or a graph ONNX Runtime cannot open is an error here, not a fallback)."""
    artifact = tiny_artifacts["mast3r"]
    for graph in json.loads((artifact / "manifest.json").read_text())["graphs"]:
        check = graph["reference_check"]
        with np.load(artifact / check["inputs"]) as data:
            feed = {k: data[k] for k in data.files}
        runner = CudaGraphRunner(artifact / graph["file"], graph, CudaSessionConfig(strict=True, **options))
        assert runner.outcome.lowerings == runner.config.lowering_names()
        got = runner(feed)
        with np.load(artifact / check["expected"]) as data:
            for name in data.files:
                tol = check["tolerances"][name]
                np.testing.assert_allclose(got[name], data[name], atol=tol["atol"], rtol=tol["rtol"],
                                           err_msg=f"{graph['name']}/{name}")  # fmt: skip


@pytest.mark.gpu
@needs_cuda
def test_a_runner_dropped_right_after_a_run_does_not_abort(tiny_artifacts: dict[str, Path]) -> None:
    """Without a CUDA graph ONNX Runtime frees a run's host staging buffers from a stream callback that holds the
    session's allocator; a runner dropped while its own stream still works must not have its session destroyed
    inside that callback (CUDA error 800, abort)."""
    import gc

    artifact = tiny_artifacts["mast3r"]
    graph = next(g for g in json.loads((artifact / "manifest.json").read_text())["graphs"] if g["name"] == "decoder")
    with np.load(artifact / graph["reference_check"]["inputs"]) as data:
        feed = {k: torch.from_numpy(data[k]).cuda() for k in data.files}
    for lowerings in (("attention_bsh", "rotary", "norm_casts"), ()):
        for _ in range(3):
            runner = CudaGraphRunner(artifact / graph["file"], graph, CudaSessionConfig(lowerings=lowerings))
            torch.cuda._sleep(50_000_000)  # the run queues behind this: the host returns long before it ends
            runner.run(feed, copy=False)
            del runner
            gc.collect()
    torch.cuda.synchronize()
