"""ONNX Runtime CUDA runner: clear refusals without a GPU; on a GPU (marker gpu), the same numbers as the CPU.

The gpu tests run on the device machine (bench/gpu_bench.py runs them first); CI has no GPU and skips them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from export_engine.cli import main
from export_engine.errors import BackendError, ModelInputError
from export_engine.exporters.fastsam3d import TINY_CONFIG as FASTSAM3D_TINY
from export_engine.exporters.mast3r import TINY_CONFIG as MAST3R_TINY
from export_engine.runners import gpu_gate
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


def _reference_feed(artifact: Path, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    graph = next(g for g in json.loads((artifact / "manifest.json").read_text())["graphs"] if g["name"] == name)
    with np.load(artifact / graph["reference_check"]["inputs"]) as data:
        return graph, {k: torch.from_numpy(data[k]).cuda() for k in data.files}


def _variants(feed: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` distinct feeds of the same shapes (float inputs scaled and shifted; others as they are)."""
    out = []
    for i in range(count):
        out.append({k: (v * (1 - 0.05 * i) + 0.01 * i if v.is_floating_point() else v) for k, v in feed.items()})
    return out


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("threads", [4, 8])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_a_runner_shared_by_threads_answers_each_caller(tiny_artifacts: dict[str, Path], threads: int,
                                                        cuda_graph: bool) -> None:  # fmt: skip
    """One runner called from several threads (captures included): no error, no hang, and every call gets the
    outputs of its own inputs, equal to the same inputs run alone."""
    from concurrent.futures import ThreadPoolExecutor

    artifact = tiny_artifacts["mast3r"]
    graph, feed = _reference_feed(artifact, "decoder")
    feeds = _variants(feed, 6)
    alone_runner = CudaGraphRunner(artifact / graph["file"], graph, CudaSessionConfig(cuda_graph=False))
    alone = [{k: v.cpu() for k, v in alone_runner.run(f).items()} for f in feeds]
    shared = CudaGraphRunner(artifact / graph["file"], graph, CudaSessionConfig(cuda_graph=cuda_graph))

    def call(i: int) -> tuple[int, dict[str, torch.Tensor]]:
        with gpu_gate.shared():  # creating a stream is GPU work too: never inside another thread's capture
            stream = torch.cuda.Stream()  # each thread on a stream of its own, as a server's workers are
        with torch.cuda.stream(stream):
            out = shared.run(feeds[i % len(feeds)])
            with gpu_gate.shared():  # a caller's own copies stay out of another thread's capture
                return i, {k: v.cpu() for k, v in out.items()}

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(call, range(threads * 12), timeout=120))
    for i, got in results:
        want = alone[i % len(feeds)]
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=2e-3, rtol=2e-3, msg=f"call {i} output {name}")


@pytest.mark.gpu
@needs_cuda
def test_kept_buffers_are_safe_for_work_the_previous_caller_queued(tiny_artifacts: dict[str, Path]) -> None:
    """copy=False: a read the previous caller queued on its stream (behind slow work) still sees its own
    outputs when another stream runs the runner next."""
    artifact = tiny_artifacts["mast3r"]
    graph, feed = _reference_feed(artifact, "encoder")
    first, second = _variants(feed, 2)
    runner = CudaGraphRunner(artifact / graph["file"], graph, CudaSessionConfig(cuda_graph=True))
    want = runner.run(first)["tokens"].cpu()
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(s1):
        kept = runner.run(first, copy=False)["tokens"]
        torch.cuda._sleep(100_000_000)  # the read below queues behind ~50 ms of GPU time
        read = kept.clone()
    with torch.cuda.stream(s2):
        runner.run(second, copy=False)  # overwrites the buffers only after s1's queued read
    torch.cuda.synchronize()
    torch.testing.assert_close(read.cpu(), want)


@pytest.mark.gpu
@needs_cuda
def test_bad_inputs_raise_clearly_and_the_runner_stays_correct(tiny_artifacts: dict[str, Path]) -> None:
    artifact = tiny_artifacts["mast3r"]
    graph, feed = _reference_feed(artifact, "encoder")
    runner = CudaGraphRunner(artifact / graph["file"], graph, CudaSessionConfig(cuda_graph=True))
    want = runner.run(feed)["tokens"].cpu()
    images = feed["images"]
    nan = images.cpu().clone()
    nan[0, 0, 0, 0] = float("nan")
    bad = {
        "shape": ({"images": images[:, :, :16]}, "shape"),
        "dtype": ({"images": images.half()}, "dtype"),
        "nan": ({"images": nan}, "NaN or infinite"),
        "empty": ({"images": images[:0]}, "empty"),
        "missing": ({}, "needs inputs"),
        "type": ({"images": [1, 2, 3]}, "torch tensor or numpy array"),
    }
    for label, (value, message) in bad.items():
        with pytest.raises(ModelInputError, match=message):
            runner.run(value)
        torch.testing.assert_close(runner.run(feed)["tokens"].cpu(), want, msg=f"after {label}")
    torch.testing.assert_close(runner.run({"images": images.cpu()})["tokens"].cpu(), want)  # CPU tensors move


@pytest.mark.gpu
@needs_cuda
def test_load_and_close_cycles_do_not_grow_gpu_memory(tiny_artifacts: dict[str, Path]) -> None:
    """Every session releases what it took: 12 load -> run -> close cycles (CUDA graphs on) leave device memory
    where the second cycle left it (the first one builds process-wide state: kernels, handles)."""
    import gc

    def used() -> int:
        """This process's device memory (NVML's per-process figure; the device's when that is unavailable)."""
        import os
        import subprocess

        try:
            query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
            done = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True)
            rows = [line.split(",") for line in done.stdout.splitlines()]
            mine = [row for row in rows if row[0].strip() == str(os.getpid())]
            if mine:
                return int(mine[0][1]) << 20
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
        free, total = torch.cuda.mem_get_info()
        return total - free

    from export_engine.families import runtime_family

    artifact = tiny_artifacts["fastsam3d"]
    graphs = {g["name"]: g for g in json.loads((artifact / "manifest.json").read_text())["graphs"]}
    sample = runtime_family("fastsam3d").sample_inputs(graphs, 0)
    levels = []
    for _ in range(12):
        with load(artifact, cuda_graph=True) as session:
            for _ in range(3):
                session.run(sample)
        gc.collect()
        torch.cuda.synchronize()
        levels.append(used())
    growth = (levels[-1] - levels[1]) / 2**20
    assert growth < 16, f"device memory grew by {growth:.1f} MiB over 10 cycles: {[x >> 20 for x in levels]}"


@pytest.mark.gpu
@needs_cuda
def test_a_closed_runner_refuses(tiny_artifacts: dict[str, Path]) -> None:
    artifact = tiny_artifacts["mast3r"]
    graph, feed = _reference_feed(artifact, "encoder")
    with CudaGraphRunner(artifact / graph["file"], graph) as runner:
        runner.run(feed)
    with pytest.raises(BackendError, match="closed"):
        runner.run(feed)


DROP_PROBE = """
import gc, json, sys, torch, numpy as np
from pathlib import Path
from export_engine.runners.ort_cuda import CudaGraphRunner, CudaSessionConfig
artifact = Path(sys.argv[1])
for graph in json.loads((artifact / "manifest.json").read_text())["graphs"]:
    with np.load(artifact / graph["reference_check"]["inputs"]) as data:
        feed = {k: torch.from_numpy(data[k]).cuda() for k in data.files}
    for cycle in range(6):
        runner = CudaGraphRunner(artifact / graph["file"], graph, CudaSessionConfig())
        for _ in range(45):  # past one periodic clean-up, then some left for the closing one
            runner.run(feed, copy=False)
        if cycle % 2:
            runner.close()
        del runner
        gc.collect()
print("done")
"""


@pytest.mark.gpu
@needs_cuda
def test_runners_closed_or_dropped_after_many_runs_do_not_abort(tiny_artifacts: dict[str, Path]) -> None:
    """Without a CUDA graph, ONNX Runtime's kernels leave pinned host buffers for its end-of-run clean-up, which
    runs on the own stream only where the runner asks for it; a session destroyed with buffers left frees its
    pinned arena from a CUDA callback and the process aborts. In a child process, so that an abort is a failure
    here rather than the end of the test run."""
    import subprocess
    import sys

    for artifact in tiny_artifacts.values():
        done = subprocess.run([sys.executable, "-c", DROP_PROBE, str(artifact)], capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0 and "done" in done.stdout, done.stderr[-2000:]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_a_runner_of_some_outputs_computes_those_as_the_reference_and_checks_its_rewrites(
    tiny_artifacts: dict[str, Path], cuda_graph: bool
) -> None:
    artifact = tiny_artifacts["mast3r"]
    graph = next(g for g in json.loads((artifact / "manifest.json").read_text())["graphs"] if g["name"] == "decoder")
    kept = ("view2_desc_conf", "view1_desc")
    check = graph["reference_check"]
    with np.load(artifact / check["inputs"]) as data:
        feed = {k: torch.from_numpy(data[k]) for k in data.files}
    config = CudaSessionConfig(cuda_graph=cuda_graph, outputs=kept)
    with CudaGraphRunner(artifact / graph["file"], graph, config) as runner:
        assert runner.outcome.lowerings and runner.outcome.fallback is None  # the rewrites passed on the pruned graph
        assert [r.output for r in runner.outcome.check.outputs] == ["view1_desc", "view2_desc_conf"]
        for _ in range(3):
            got = {k: v.cpu().numpy() for k, v in runner.run(feed).items()}
        assert sorted(got) == sorted(kept)
        with np.load(artifact / check["expected"]) as data:
            for name in kept:
                tol = check["tolerances"][name]
                np.testing.assert_allclose(got[name], data[name], atol=tol["atol"], rtol=tol["rtol"], err_msg=name)
    with pytest.raises(ModelInputError, match=r"has no output\(s\) \['pts'\]"):
        CudaGraphRunner(artifact / graph["file"], graph, CudaSessionConfig(outputs=("pts",)))
