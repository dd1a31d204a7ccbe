"""The cases of bench/gpu_bench.py: PyTorch eager baselines, ONNX Runtime CUDA on artifacts, FastNN-Lite, profile.

Every case returns a JSON-able dict. Timing: `time_calls` synchronises the device, then times each call with
the host clock around a full device synchronisation (the wall time a caller waits for a result, host work
included: ONNX Runtime may queue on a stream of its own, so CUDA events on torch's stream alone would not
bracket its work); warm-up calls first.
"""

from __future__ import annotations

import dataclasses
import gc
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastnn_bench import time_calls

from export_engine.exporters.registry import get_family
from export_engine.families.mast3r.match import MatchConfig as PairConfig
from export_engine.families.mast3r.match import pair_matches
from export_engine.runners.ort_cuda import CudaGraphRunner, CudaSessionConfig

GiB = 2**30


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
    """Our PyTorch MASt3R (upstream-equivalent, explicit attention) per pair: FP32, TF32; FP16 autocast + SDPA.

    One set of weights on the GPU; the SDPA model is built on the meta device and takes the same tensors."""
    from export_engine.models.mast3r.model import MASt3R

    loaded = get_family("mast3r").load(None, None, 0)
    explicit = loaded.module.cuda().eval()
    with torch.device("meta"):
        sdpa = MASt3R(loaded.config, attn_impl="sdpa")
    sdpa.load_state_dict(explicit.state_dict(), assign=True)
    sdpa.eval()
    rows = []
    img1, img2 = images[0:1], images[1:2]
    for mode, model in (("fp32", explicit), ("tf32", explicit), ("fp16-autocast-sdpa", sdpa)):
        set_tf32(mode != "fp32")
        with DeviceMemory() as mem, torch.inference_mode():
            with torch.autocast("cuda", dtype=torch.float16, enabled="fp16" in mode):
                timing = time_calls(lambda m=model: m(img1, img2), warmup, repeats)
            mem.sample()
        rows.append({"case": f"MASt3R pair, PyTorch eager {mode}", **timing, "gpu_mem_gib": mem.peak / GiB})
    set_tf32(False)
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


def ort_fastsam3d(
    artifact: Path, config: CudaSessionConfig | dict[str, CudaSessionConfig], warmup: int, repeats: int, label: str
) -> list[dict]:
    """Encoder and click rows; ``config`` for every graph, or per graph name."""
    meta = graph_meta(artifact)
    size = meta["encoder"]["inputs"][0]["shape"][-1]
    m = meta["prompt_decoder"]["inputs"][3]["shape"][-1]
    configs = config if isinstance(config, dict) else dict.fromkeys(meta, config)
    with DeviceMemory() as mem:
        runners = {name: CudaGraphRunner(artifact / g["file"], g, configs[name]) for name, g in meta.items()}
        parity = gpu_parity(artifact, runners)
        image = torch.randn(1, 1, size, size, size).cuda()
        enc = time_calls(lambda: runners["encoder"].run({"image": image}, copy=False), warmup, repeats)
        embedding = runners["encoder"].run({"image": image})["image_embedding"]
        feed = {"image_embedding": embedding, **click_feed(size, m)}
        click = time_calls(lambda: runners["prompt_decoder"].run(feed, copy=False), warmup, repeats)
        mem.sample()
        click_kernels = profile(lambda: runners["prompt_decoder"].run(feed, copy=False), runs=10)
    return [
        {"case": f"FastSAM3D encoder 128^3, ORT CUDA {label}", **enc, "gpu_mem_gib": mem.peak / GiB,
         "gpu_parity": parity},
        {"case": f"FastSAM3D click, ORT CUDA {label}", **click, "profile": click_kernels},
    ]  # fmt: skip


def profile_fastsam3d(artifact: Path, config: CudaSessionConfig) -> dict[str, Any]:
    """Kernel profile of the FastSAM3D encoder (no CUDA graph: CUPTI sees each launch)."""
    meta = graph_meta(artifact)["encoder"]
    runner = CudaGraphRunner(artifact / meta["file"], meta, config)
    size = meta["inputs"][0]["shape"][-1]
    image = torch.randn(1, 1, size, size, size).cuda()
    return profile(lambda: runner.run({"image": image}, copy=False), runs=10)


def profile_mast3r(artifact: Path, config: CudaSessionConfig, images: torch.Tensor) -> dict[str, Any]:
    """Kernel profile of the MASt3R network per pair (no CUDA graph: CUPTI sees each launch)."""
    runners = {name: CudaGraphRunner(artifact / m["file"], m, config) for name, m in graph_meta(artifact).items()}
    return profile(network(runners, images))


# --- profile -----------------------------------------------------------------------------------------------------

_CATEGORIES = (  # first match wins: cuDNN's convolution kernels have "sgemm" in their names
    ("attention", r"flash|fmha|attention|attn|mha"),
    ("conv", r"conv|cudnn|implicit|winograd|fft"),
    ("gemm", r"gemm|cutlass|xmma|cublas|wgmma|matmul|nvjet|sm90_|ampere_|s16816|h16816"),
    ("norm", r"layernorm|layer_norm|norm"),
    ("softmax", r"softmax"),
    ("copy/cast", r"cast|copy|transpose|memcpy|concat|slice|gather|pad"),
)


def profile(fn: Callable[[], Any], runs: int = 5, top: int = 30) -> dict[str, Any]:
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


def fastnn(
    warmup: int, repeats: int, ref_repeats: int, height: int = 384, width: int = 512
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Upstream algorithm (plain implementation) vs FastNN-Lite on 512x384 smooth 24-dim maps, subsample 8.

    Sweeps the fused kernel's launch shapes on the first round's shape (3072 x 196608, achieved FP32 rate),
    times a pair with the device round loop launched from Python and replayed as one CUDA graph, the symmetric
    mode (4 maps), and splits a pair's time into kernel time (the rows each step computes) and the rest."""
    from fastnn_bench import same, smooth_maps, to_numpy

    from export_engine.families.mast3r import fastnn_kernel as fk
    from export_engine.families.mast3r.fastnn import (
        CapturedCorrespondences,
        CapturedMatcher,
        MatchConfig,
        ReciprocalMatcher,
        extract_correspondences,
        matcher_reciprocal_nn,
        nearest_by_dot,
    )
    from export_engine.families.mast3r.matching_reference import (
        extract_correspondences_reference,
        reciprocal_nn_reference,
    )

    maps = [m.cuda() for m in smooth_maps(height, width, 4)]
    d1, d2 = maps[:2]
    flat1, flat2 = d1.reshape(-1, 24), d2.reshape(-1, 24)
    keys_t = fk.transposed(flat2)
    queries = flat1[::64][:3072].contiguous()  # as many rows as the first round asks for at 512x384
    exact = nearest_by_dot(queries, flat2)

    def kernel_call(tiles: fk.Tiles, rows: int) -> tuple[Callable[[], None], fk.NearestTable]:
        # pruned where the tiles prune (the keys' map shape is given), else the whole key range per row
        shape = (height, width) if tiles.prune_block[0] else None
        table = fk.NearestTable(queries, flat2, 3072, tiles, keys_t=keys_t, key_shape=shape)
        ids = torch.arange(rows, dtype=torch.int32, device="cuda")
        count = torch.tensor(rows, dtype=torch.int32, device="cuda")
        return (lambda: table.compute(ids, count)), table

    unpruned = dataclasses.replace(fk.DEFAULT_TILES, prune_block=(0, 0))
    sweep = []
    for tiles in (unpruned, dataclasses.replace(unpruned, block_m=64, block_n=64, warps=4),
                  dataclasses.replace(unpruned, target_programs=1056), fk.DEFAULT_TILES,
                  *(dataclasses.replace(fk.DEFAULT_TILES, **change) for change in (
                      {"prune_tf32": not fk.DEFAULT_TILES.prune_tf32}, {"prune_programs": 4224},
                      {"prune_pairs": 64, "prune_warps": 2}, {"prune_rows": 32}, {"prune_block": (4, 8)},
                      {"prune_bound_warps": 2}, {"prune_bound_programs": 1056}, {"prune_cb": 64},
                      {"prune_bound_rows": 16}, {"prune_probe_group": 1}))):  # fmt: skip
        try:
            call, table = kernel_call(tiles, 3072)
            timing = time_calls(call, 3, 20)
            equal = bool(torch.equal(table.table[:3072].long(), exact))
            fmas = queries.shape[0] * keys_t.shape[1]
            entry = {"tiles": asdict(tiles), **timing, "identical": equal,
                     "tflops_fp32_equivalent": 2 * fmas * 24 / timing["median_ms"] / 1e9}  # fmt: skip
            if table.pairs is not None:
                blocks = table._blocks
                assert blocks is not None
                entry["pairs_kept"] = int(table.pairs)
                entry["pairs_share"] = int(table.pairs) / (3072 * blocks.nb)
                entry["unpruned_fallback"] = bool(int(blocks.dense))
            sweep.append(entry)
        except Exception as err:  # a launch shape the compiler rejects is reported, not fatal
            sweep.append({"tiles": asdict(tiles), "error": f"{type(err).__name__}: {err}"[:300]})
    ranked = [r for r in sweep if "median_ms" in r and r["identical"]]
    best = fk.Tiles(**min(ranked, key=lambda r: r["median_ms"])["tiles"]) if ranked else fk.DEFAULT_TILES
    best_unpruned = min((r for r in ranked if not r["tiles"]["prune_block"][0]), key=lambda r: r["median_ms"],
                        default={"tiles": asdict(unpruned)})["tiles"]  # fmt: skip
    best_unpruned = fk.Tiles(**{**best_unpruned, "prune_block": tuple(best_unpruned["prune_block"])})

    def reference() -> tuple:
        return reciprocal_nn_reference(d1, d2, 8, device=d1.device)

    def run(config: MatchConfig) -> tuple:
        return matcher_reciprocal_nn(ReciprocalMatcher(d1, d2, config), 8)

    captured = CapturedMatcher(tuple(d1.shape), tuple(d2.shape), 8, MatchConfig(kernel="fused", tiles=best))
    captured_unpruned = CapturedMatcher(tuple(d1.shape), tuple(d2.shape), 8,
                                        MatchConfig(kernel="fused", tiles=best_unpruned))  # fmt: skip
    # the best tiles with other key blocks, the other precision of the centroid scores, other row counts from
    # which launches prune, and other rounds in the first of the two recorded graphs
    others = [MatchConfig(kernel="fused", tiles=t) for t in (
        dataclasses.replace(best, prune_block=(8, 8) if best.prune_block != (8, 8) else (8, 4)),
        dataclasses.replace(best, prune_tf32=not best.prune_tf32),
        *(dataclasses.replace(best, prune_from=rows) for rows in (1, 1024) if rows != best.prune_from),
    )] + [MatchConfig(kernel="fused", tiles=best, captured_rounds=k) for k in (4, 5, 8, 10)
          if k != MatchConfig().captured_rounds]  # fmt: skip
    captured_others = [CapturedMatcher(tuple(d1.shape), tuple(d2.shape), 8, c) for c in others]
    # Worst case for pruning: unit maps of independent random vectors (no block's bound excludes anything).
    noise = [torch.nn.functional.normalize(torch.randn(height, width, 24, generator=torch.Generator().manual_seed(k)),
                                           dim=2).cuda() for k in (7, 8)]  # fmt: skip
    expected_noise = to_numpy(captured_unpruned(*noise))
    gen = torch.Generator().manual_seed(2)
    confs = [(1 + torch.rand(height, width, generator=gen)).cuda() for _ in range(4)]

    captured_sym = CapturedCorrespondences(tuple(maps[0].shape), tuple(maps[1].shape), 8,
                                           MatchConfig(kernel="fused", tiles=best))  # fmt: skip
    captured_sym_unpruned = CapturedCorrespondences(tuple(maps[0].shape), tuple(maps[1].shape), 8,
                                                    MatchConfig(kernel="fused", tiles=best_unpruned))  # fmt: skip

    def symmetric(config: MatchConfig | None = None) -> tuple:
        if config is None:
            return extract_correspondences_reference(maps, confs, 8, device=d1.device)
        return extract_correspondences(maps, confs, 8, config)

    expected = to_numpy(reference())
    expected_sym = to_numpy(symmetric())

    def describe(tiles: fk.Tiles) -> str:
        text = f"tiles {tiles.block_m}x{tiles.block_n}/{tiles.warps}w/{tiles.target_programs}"
        if tiles.prune_block[0]:
            text += (f", pruned: {tiles.prune_block[0]}x{tiles.prune_block[1]} key blocks, {tiles.prune_pairs} "
                     f"pairs/step, {tiles.prune_rows}-row bound items, {'TF32' if tiles.prune_tf32 else 'FP32'} "
                     f"centroid scores, launches from {tiles.prune_from} rows pruned")  # fmt: skip
        else:
            text += ", unpruned"
        return text

    name, name_unpruned = describe(best), describe(best_unpruned)
    cases: list[tuple[str, Callable[[], tuple], int, Any]] = [
        ("reference (upstream algorithm)", reference, ref_repeats, expected),
        ("FastNN-Lite tiles", lambda: run(MatchConfig(kernel="tiles")), repeats, expected),
        ("FastNN-Lite fused, device loop", lambda: run(MatchConfig(kernel="fused")), repeats, expected),
        (f"FastNN-Lite fused, device loop, {name}", lambda: run(MatchConfig(tiles=best)), repeats, expected),
        (f"FastNN-Lite fused, CUDA graph, {name}, {MatchConfig().captured_rounds} rounds in the first graph",
         lambda: captured(d1, d2), repeats, expected),
        (f"FastNN-Lite fused, CUDA graph, {name_unpruned}", lambda: captured_unpruned(d1, d2), repeats, expected),
        *((f"FastNN-Lite fused, CUDA graph, {describe(o.tiles)}, {o.captured_rounds} rounds in the first graph",
           lambda c=c: c(d1, d2), repeats, expected) for o, c in zip(others, captured_others, strict=True)),
        (f"FastNN-Lite fused, CUDA graph, {name}, random maps (vs unpruned)", lambda: captured(*noise), repeats,
         expected_noise),
        (f"FastNN-Lite fused, CUDA graph, {name_unpruned}, random maps", lambda: captured_unpruned(*noise), repeats,
         expected_noise),
        ("symmetric reference (4 maps)", symmetric, max(2, ref_repeats // 4), expected_sym),
        (f"symmetric FastNN-Lite fused, {name} (4 maps)", lambda: symmetric(MatchConfig(tiles=best)), repeats,
         expected_sym),
        (f"symmetric FastNN-Lite fused, CUDA graph, {name} (4 maps)", lambda: captured_sym(maps, confs), repeats,
         expected_sym),
        (f"symmetric FastNN-Lite fused, CUDA graph, {name_unpruned} (4 maps)",
         lambda: captured_sym_unpruned(maps, confs), repeats, expected_sym),
    ]  # fmt: skip
    rows = []
    for label, fn, runs, want in cases:
        try:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            timing = time_calls(fn, warmup, runs)
            got = to_numpy(fn())
            identical = same(got, want)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            pair = "4 maps 512x384 s8" if label.startswith("symmetric") else "pair 512x384 s8"
            rows.append({"case": f"FastNN {label}, {pair}", **timing, "identical_to_reference": identical,
                         "matches": len(got[0]), "peak_extra_mib": peak})  # fmt: skip
        except Exception as err:  # a failing variant is reported, the others still run
            rows.append({"case": f"FastNN {label}", "error": f"{type(err).__name__}: {err}"[:400]})
    # Where a pair's time goes: the kernel on the rows each step computes (counted on this pair), the rest.
    matcher = ReciprocalMatcher(d1, d2, MatchConfig(tiles=best))
    matcher_reciprocal_nn(matcher, 8)
    counts = [int(c) for c in matcher.rows_per_step.tolist() if c > 0] if matcher.rows_per_step is not None else []
    kernel_ms = sum(time_calls(kernel_call(best, c)[0], 2, 10)["median_ms"] for c in counts)
    total_rows = sum(counts)
    # The measured ceiling of exact FP32 arithmetic on this GPU: cuBLAS SGEMM (TF32 off) on a large square
    # product, and on the first round's shape (K = 24, writing the whole score matrix instead of an argmax).
    peak = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        square = torch.randn(8192, 8192, device="cuda")
        big = time_calls(lambda: square @ square, 2, 10)["median_ms"]
        peak["sgemm_8192_tflops"] = 2 * 8192**3 / big / 1e9
        k24 = time_calls(lambda: queries @ keys_t, 2, 10)["median_ms"]
        peak["sgemm_k24_ms"] = k24
        peak["sgemm_k24_tflops"] = 2 * 24 * queries.shape[0] * keys_t.shape[1] / k24 / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    sym_rows = sum(int(r.sum()) for r in captured_sym.rows_per_step)  # the last replay's
    # Kernel time per pair by kernel (the device loop launched from Python: CUPTI sees each launch), pruned and
    # not, and the pruned search's kernels on one large and one small launch.
    profiles = {}
    for key, fn in (
        ("pair", lambda: run(MatchConfig(tiles=best))),
        ("pair_unpruned", lambda: run(MatchConfig(tiles=best_unpruned))),
        ("launch_3072_rows", kernel_call(best, 3072)[0]),
        ("launch_171_rows", kernel_call(best, 171)[0]),
    ):
        try:
            profiles[key] = profile(fn, top=12)
        except Exception as err:  # the profile is a detail: its failure is reported
            profiles[key] = {"error": f"{type(err).__name__}: {err}"[:300]}
    # calls that needed the second recorded graph (a seed still active after the first graph's rounds)
    second_graph = {"default": captured.rest_replays, "symmetric": captured_sym.rest_replays,
                    **{f"{o.captured_rounds} rounds, {describe(o.tiles)}": c.rest_replays
                       for o, c in zip(others, captured_others, strict=True)}}  # fmt: skip
    breakdown = {
        "second_graph_replays": second_graph,
        "kernel_profiles": profiles,
        "symmetric_rows": sym_rows,
        "symmetric_useful_gflop": 2 * 24 * sym_rows * flat2.shape[0] / 1e9,
        "fp32_ceiling": peak,
        "rows_per_call": counts,
        "steps_with_rows": len(counts),
        "kernel_ms_sum": kernel_ms,
        "best_tiles": asdict(best),
        "sweep": sweep,
        "useful_gflop": 2 * 24 * total_rows * flat2.shape[0] / 1e9,
    }
    return rows, breakdown


# --- torch.compile: the competitor -----------------------------------------------------------------------------


def worst_error(got: Any, ref: Any) -> float:
    """Largest absolute difference over all outputs (dicts, tuples or tensors), as float32."""
    if isinstance(ref, dict):
        return max(worst_error(got[k], ref[k]) for k in ref)
    if isinstance(ref, (tuple, list)):
        return max(worst_error(g, r) for g, r in zip(got, ref, strict=True))
    return float((got.float() - ref.float()).abs().max())


def _compiled_rows(label: str, target: Callable[..., Any], args: tuple, reference: Any, modes: tuple[str, ...],
                   warmup: int, repeats: int, autocast: bool = False,
                   profile_kernels: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for mode in modes:
        try:
            start = time.perf_counter()
            compiled = torch.compile(target, mode=mode)

            def fn(c: Callable[..., Any] = compiled) -> Any:
                with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
                    return c(*args)

            with torch.inference_mode():
                out = fn()  # compiles
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - start
                timing = time_calls(fn, warmup, repeats)
                err = worst_error(fn(), reference)
            row = {"case": f"{label}, torch.compile FP16 {mode}", **timing, "compile_s": round(compile_s, 1),
                   "worst_error_vs_fp32": err}  # fmt: skip
            if profile_kernels:
                with torch.inference_mode():
                    row["profile"] = profile(fn)
            rows.append(row)
            del out
        except Exception as err:  # a mode that does not compile is reported, the others still run
            rows.append({"case": f"{label}, torch.compile FP16 {mode}", "error": f"{type(err).__name__}: {err}"[:300]})
        torch._dynamo.reset()
    return rows


def compiled_mast3r(images: torch.Tensor, warmup: int, repeats: int, modes: tuple[str, ...]) -> list[dict[str, Any]]:
    """Our PyTorch MASt3R in FP16 (SDPA attention) under torch.compile: the pair, and one image through the
    encoder; worst error against the same weights in FP32 eager (explicit attention, TF32 off)."""
    from export_engine.models.mast3r.model import MASt3R

    loaded = get_family("mast3r").load(None, None, 0)
    fp32 = loaded.module.cuda().eval()
    set_tf32(False)
    img1, img2 = images[0:1], images[1:2]
    with torch.inference_mode():
        ref_pair = fp32(img1, img2)
        ref_enc = fp32.encode(img1)
    with torch.device("meta"):
        half = MASt3R(loaded.config, attn_impl="sdpa")
    half.load_state_dict(fp32.state_dict(), assign=True)
    half = half.half().eval()
    del fp32
    h1, h2 = img1.half(), img2.half()
    rows = []
    with torch.inference_mode():
        eager = time_calls(lambda: half(h1, h2), warmup, repeats)
        rows.append({"case": "MASt3R pair, PyTorch eager FP16 + SDPA", **eager,
                     "worst_error_vs_fp32": worst_error(half(h1, h2), ref_pair)})  # fmt: skip
    rows += _compiled_rows("MASt3R pair", half, (h1, h2), ref_pair, modes, warmup, repeats, profile_kernels=True)
    rows += _compiled_rows("MASt3R one image through the encoder", half.encode, (h1,), ref_enc, modes, warmup, repeats)
    return rows


def compiled_fastsam3d(warmup: int, repeats: int, modes: tuple[str, ...],
                       attention: str = "dense") -> list[dict[str, Any]]:  # fmt: skip
    """Our PyTorch FastSAM3D under torch.compile: the encoder in FP16, one click under FP16 autocast; worst
    error against FP32 eager. ``attention="sparse"``: the encoder rows only, for the sparse variant."""
    from export_engine.exporters.fastsam3d import PromptDecoderGraph

    loaded = get_family("fastsam3d").load(None, None, 0, attention)
    model = loaded.module.cuda().eval()
    size, m = model.config.img_size, model.config.mask_input_size
    image = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(0)).cuda()
    prompt = PromptDecoderGraph(model).cuda().eval()
    feed = click_feed(size, m)
    set_tf32(False)
    with torch.inference_mode():
        ref_emb = model.encode(image)
        ref_click = prompt(ref_emb, *feed.values())
    half = model.half()
    image16 = image.half()
    rows = []
    with torch.inference_mode():
        rows.append({"case": "FastSAM3D encoder 128^3, PyTorch eager FP16", **time_calls(lambda: half.encode(image16),
                     warmup, repeats), "worst_error_vs_fp32": worst_error(half.encode(image16), ref_emb)})  # fmt: skip
    label = "FastSAM3D encoder 128^3" + (f", {attention} attention" if attention != "dense" else "")
    rows += _compiled_rows(label, half.encode, (image16,), ref_emb, modes, warmup, repeats)
    if attention != "dense":
        return rows
    prompt32 = prompt.float()  # the click runs under FP16 autocast on FP32 weights
    rows += _compiled_rows("FastSAM3D click", prompt32, (ref_emb, *feed.values()), ref_click, modes, warmup, repeats,
                           autocast=True, profile_kernels=True)  # fmt: skip
    return rows
