"""The cases of bench/gpu_bench.py: PyTorch eager baselines, ONNX Runtime CUDA on artifacts, FastNN-Lite, profile.

Every case returns a JSON-able dict. Timing: `time_calls` synchronises the device, then times each call with
the host clock around a full synchronisation (ONNX Runtime runs on its own stream and synchronises before
returning, so CUDA events on torch's stream would not bracket its work); warm-up calls first.
"""

from __future__ import annotations

import gc
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export_engine.exporters.registry import get_family
from export_engine.runtime.match import MatchConfig as PairConfig
from export_engine.runtime.match import pair_matches
from export_engine.runtime.ort_cuda import CudaGraphRunner, CudaSessionConfig

GiB = 2**30


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": repeats}


def device_used() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


class DeviceMemory:
    """GPU memory in use on the device above the level at entry (torch's and ONNX Runtime's allocations)."""

    def __enter__(self) -> DeviceMemory:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.base, self.peak = device_used(), 0
        return self

    def sample(self) -> None:
        self.peak = max(self.peak, device_used() - self.base)

    def __exit__(self, *exc: object) -> None:
        self.sample()
        # torch's own peak can exceed what was resident at sample time
        self.peak = max(self.peak, torch.cuda.max_memory_reserved())


# --- PyTorch eager baselines -----------------------------------------------------------------------------------


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def torch_mast3r(images: torch.Tensor, warmup: int, repeats: int) -> list[dict[str, Any]]:
    """Our PyTorch MASt3R (upstream-equivalent, explicit attention) per pair: FP32, TF32; FP16 autocast + SDPA."""
    from export_engine.models.mast3r.model import MASt3R

    loaded = get_family("mast3r").load(None, None, 0)
    rows = []
    img1, img2 = images[0:1], images[1:2]
    for mode in ("fp32", "tf32", "fp16-autocast-sdpa"):
        impl = "sdpa" if "sdpa" in mode else "explicit"
        model = MASt3R(loaded.config, attn_impl=impl)
        model.load_state_dict(loaded.module.state_dict())
        model = model.cuda().eval()
        set_tf32(mode != "fp32")
        with DeviceMemory() as mem, torch.inference_mode():
            with torch.autocast("cuda", dtype=torch.float16, enabled="fp16" in mode):
                timing = time_calls(lambda m=model: m(img1, img2), warmup, repeats)
            mem.sample()
        rows.append({"case": f"MASt3R pair, PyTorch eager {mode}", **timing, "gpu_mem_gib": mem.peak / GiB})
        del model
    set_tf32(False)
    del loaded
    return rows


def torch_fastsam3d(warmup: int, repeats: int) -> list[dict[str, Any]]:
    from export_engine.exporters.fastsam3d import PromptDecoderGraph

    loaded = get_family("fastsam3d").load(None, None, 0)
    model = loaded.module.cuda().eval()
    size, m = model.config.img_size, model.config.mask_input_size
    image = torch.randn(1, 1, size, size, size).cuda()
    prompt = PromptDecoderGraph(model).cuda().eval()
    feed = click_feed(size, m)
    rows = []
    for mode in ("fp32", "tf32"):
        set_tf32(mode == "tf32")
        with DeviceMemory() as mem, torch.inference_mode():
            enc = time_calls(lambda: model.encode(image), warmup, repeats)
            embedding = model.encode(image)
            click = time_calls(lambda e=embedding: prompt(e, *feed.values()), warmup, repeats)
        rows.append({"case": f"FastSAM3D encoder 128^3, PyTorch eager {mode}", **enc, "gpu_mem_gib": mem.peak / GiB})
        rows.append({"case": f"FastSAM3D click, PyTorch eager {mode}", **click})
    set_tf32(False)
    return rows


def click_feed(size: int, m: int) -> dict[str, torch.Tensor]:
    """One click as the released loop sends it: the newest point plus the previous low-res logits."""
    gen = torch.Generator().manual_seed(1)
    return {
        "point_coords": (torch.rand(1, 2, 3, generator=gen) * (size - 1)).cuda(),
        "point_labels": torch.tensor([[1, 0]], dtype=torch.int64).cuda(),
        "mask_input": torch.randn(1, 1, m, m, m, generator=gen).cuda(),
        "has_mask_input": torch.ones(1).cuda(),
    }


# --- ONNX Runtime CUDA on artifacts ------------------------------------------------------------------------------


def graph_meta(artifact: Path) -> dict[str, dict[str, Any]]:
    import json

    manifest = json.loads((artifact / "manifest.json").read_text())
    return {g["name"]: g for g in manifest["graphs"]}


def gpu_parity(artifact: Path, runners: dict[str, CudaGraphRunner]) -> dict[str, Any]:
    """Each graph on its stored reference input, against the stored FP32 reference outputs (artifact tolerances)."""
    worst: dict[str, Any] = {}
    passed = True
    for name, meta in graph_meta(artifact).items():
        check = meta["reference_check"]
        with np.load(artifact / check["inputs"]) as data:
            feed = {k: torch.from_numpy(data[k]) for k in data.files}
        got = runners[name].run(feed)
        with np.load(artifact / check["expected"]) as data:
            for out in data.files:
                ref, tol = data[out], check["tolerances"][out]
                err = np.abs(got[out].float().cpu().numpy() - ref)
                bound = tol["atol"] + tol["rtol"] * np.abs(ref)
                share = float((err > bound).mean())
                worst[f"{name}/{out}"] = float(err.max())
                passed &= share <= tol.get("max_share", 0.0) and bool(np.isfinite(err).all())
    return {"passed": passed, "max_abs": worst}


def network(runners: dict[str, CudaGraphRunner], images: torch.Tensor) -> Callable[[], dict[str, torch.Tensor]]:
    """One pair through the MASt3R network: the two images as one encoder batch, then the decoder."""
    encoder, decoder = runners["encoder"], runners["decoder"]

    def pair() -> dict[str, torch.Tensor]:
        tokens = encoder.run({"images": images}, copy=False)["tokens"]
        return decoder.run({"feat1": tokens[0:1], "feat2": tokens[1:2]}, copy=False)

    return pair


def ort_mast3r(artifact: Path, config: CudaSessionConfig, images: torch.Tensor, warmup: int, repeats: int,
               label: str) -> tuple[dict[str, Any], dict[str, CudaGraphRunner]]:  # fmt: skip
    """Network per pair (encoder on the pair as one batch of 2, decoder) on ONNX Runtime CUDA."""
    meta = graph_meta(artifact)
    with DeviceMemory() as mem:
        start = time.perf_counter()
        runners = {name: CudaGraphRunner(artifact / m["file"], m, config) for name, m in meta.items()}
        load_s = time.perf_counter() - start
        parity = gpu_parity(artifact, runners)
        timing = time_calls(network(runners, images), warmup, repeats)
        encoder = runners["encoder"]
        enc = time_calls(lambda: encoder.run({"images": images[0:1]}, copy=False), warmup, repeats)
        mem.sample()
    row = {"case": f"MASt3R pair, ORT CUDA {label}", **timing, "encoder_one_image_ms": enc["median_ms"],
           "gpu_mem_gib": mem.peak / GiB, "session_s": load_s, "gpu_parity": parity}  # fmt: skip
    return row, runners


def end_to_end(runners: dict[str, CudaGraphRunner], images: torch.Tensor, warmup: int, repeats: int,
               label: str) -> dict[str, Any]:  # fmt: skip
    """Two images on the GPU -> matches: encoder, decoder, FastNN-Lite (fused), border filter, conf, points."""
    encoder, decoder = runners["encoder"], runners["decoder"]
    config = PairConfig()

    def run() -> dict[str, torch.Tensor]:
        tokens = encoder.run({"images": images}, copy=False)["tokens"]
        out = decoder.run({"feat1": tokens[0:1], "feat2": tokens[1:2]}, copy=False)
        return pair_matches(out, config)

    timing = time_calls(run, warmup, repeats)
    matches = int(run()["xy1"].shape[0])
    return {"case": f"MASt3R pair end to end + FastNN-Lite, ORT CUDA {label}", **timing, "matches": matches}


def ort_fastsam3d(artifact: Path, config: CudaSessionConfig, warmup: int, repeats: int, label: str) -> list[dict]:
    meta = graph_meta(artifact)
    size = meta["encoder"]["inputs"][0]["shape"][-1]
    m = meta["prompt_decoder"]["inputs"][3]["shape"][-1]
    with DeviceMemory() as mem:
        runners = {name: CudaGraphRunner(artifact / g["file"], g, config) for name, g in meta.items()}
        parity = gpu_parity(artifact, runners)
        image = torch.randn(1, 1, size, size, size).cuda()
        enc = time_calls(lambda: runners["encoder"].run({"image": image}, copy=False), warmup, repeats)
        embedding = runners["encoder"].run({"image": image})["image_embedding"]
        feed = {"image_embedding": embedding, **click_feed(size, m)}
        click = time_calls(lambda: runners["prompt_decoder"].run(feed, copy=False), warmup, repeats)
        mem.sample()
    return [
        {"case": f"FastSAM3D encoder 128^3, ORT CUDA {label}", **enc, "gpu_mem_gib": mem.peak / GiB,
         "gpu_parity": parity},
        {"case": f"FastSAM3D click, ORT CUDA {label}", **click},
    ]  # fmt: skip


# --- profile -----------------------------------------------------------------------------------------------------

_CATEGORIES = (
    ("attention", r"flash|fmha|attention|attn|mha"),
    ("gemm", r"gemm|cutlass|xmma|cublas|wgmma|matmul|sm90_|ampere_|s16816|h16816"),
    ("conv", r"conv|cudnn|implicit|winograd|fft"),
    ("norm", r"layernorm|layer_norm|norm"),
    ("softmax", r"softmax"),
    ("copy/cast", r"cast|copy|transpose|memcpy|concat|slice|gather|pad"),
)


def profile(fn: Callable[[], Any], runs: int = 5, top: int = 12) -> dict[str, Any]:
    """GPU kernels of `fn` (all libraries in this process, through CUPTI): top kernels and time by category."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for event in prof.events():
        if getattr(event, "device_type", None) is not None and "CUDA" in str(event.device_type):
            duration = getattr(event, "device_time", None) or getattr(event, "cuda_time", 0.0)
            kernels[event.name] = kernels.get(event.name, 0.0) + float(duration) / 1e3 / runs  # us -> ms per run
    total = sum(kernels.values())
    by_category: dict[str, float] = {}
    for name, ms in kernels.items():
        category = next((c for c, rx in _CATEGORIES if re.search(rx, name, re.IGNORECASE)), "other")
        by_category[category] = by_category.get(category, 0.0) + ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return {
        "gpu_kernel_ms_per_run": total,
        "by_category_ms": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "top_kernels_ms": [{"kernel": name[:160], "ms": ms} for name, ms in ranked],
    }


# --- FastNN-Lite ---------------------------------------------------------------------------------------------------


def fastnn(warmup: int, repeats: int, ref_repeats: int) -> list[dict[str, Any]]:
    """Upstream algorithm (plain implementation) vs FastNN-Lite kernels on 512x384 smooth 24-dim maps, subsample 8."""
    from fastnn_bench import smooth_maps

    from export_engine.runtime.fastnn import fast_reciprocal_nn
    from export_engine.runtime.matching_reference import reciprocal_nn_reference

    d1, d2 = (m.cuda() for m in smooth_maps(384, 512, 2))

    def as_numpy(result: tuple) -> tuple[np.ndarray, ...]:
        return tuple(np.asarray(r.cpu().numpy() if isinstance(r, torch.Tensor) else r) for r in result)

    def reference() -> tuple:
        return reciprocal_nn_reference(d1, d2, 8, device="cuda")

    expected = as_numpy(reference())
    rows = []
    cases: list[tuple[str, Callable[[], tuple], int]] = [("reference (upstream algorithm)", reference, ref_repeats)]
    for kernel in ("tiles", "fused", "fused-dot"):
        cases.append((f"FastNN-Lite {kernel}", lambda k=kernel: fast_reciprocal_nn(d1, d2, 8, kernel=k), repeats))
    for name, fn, runs in cases:
        try:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            timing = time_calls(fn, warmup, runs)
            got = as_numpy(fn())
            identical = all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            rows.append({"case": f"FastNN {name}, pair 512x384 s8", **timing, "identical_to_reference": identical,
                         "matches": len(got[0]), "peak_extra_mib": peak})  # fmt: skip
        except Exception as err:  # a failing variant is reported, the others still run
            rows.append({"case": f"FastNN {name}", "error": f"{type(err).__name__}: {err}"[:400]})
    return rows
