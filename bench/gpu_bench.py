#!/usr/bin/env python3
"""Everything we measure on the GPU, in one run: a table printed last, JSON written.

    python3 bench/gpu_bench.py --work DIR [--plans DIR] [--out DIR] [--budget-s 540]

1. Exports, in the background on all cores but two (CPU work, same command as users run): full-size MASt3R
   and FastSAM3D at fp32 and hybrid, random weights (seed 0), ONNX only (`--backend onnx`: no TensorRT here).
   `--plans DIR` reuses precision plans (`<model>-hybrid.json`, written by an earlier export of the same
   model) instead of calibrating again. Artifacts already in --work are reused.
2. Meanwhile, on the GPU (this process pinned to the two other cores): PyTorch eager baselines (MASt3R pair
   FP32 / TF32 with explicit attention, the upstream-equivalent model, and FP16 autocast + SDPA for reference;
   FastSAM3D encoder and click), FastNN-Lite against the upstream algorithm (identical matches checked).
3. Then ONNX Runtime CUDA on the artifacts (I/O bound to device memory; CUDA graphs; attention fused or
   decomposed; FP32 with TF32 off and on), GPU parity of each against the artifact's stored FP32 reference,
   MASt3R end to end with FastNN-Lite, FastSAM3D encoder and click, and a CUPTI kernel profile of the MASt3R
   network (which kernels the time goes to).
Sections past --budget-s are skipped and say so; the JSON is rewritten after every section.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gpu_cases as cases  # noqa: E402
import torch  # noqa: E402

from export_engine.runners.ort_cuda import CudaSessionConfig  # noqa: E402
from export_engine.runners.ort_lowering import (  # noqa: E402
    ATTENTION_LOWERINGS,
    DEFAULT_LOWERINGS,
    OWN_OP_LOWERINGS,
)

EXPORTS = (("mast3r", "fp32"), ("mast3r", "hybrid"), ("fastsam3d", "fp32"), ("fastsam3d", "hybrid"),
           ("fastsam3d-sparse", "hybrid"))  # fmt: skip


def export_command(work: Path, model: str, precision: str, plan: Path | None) -> list[str]:
    family, _, variant = model.partition("-")  # "fastsam3d-sparse": FastSAM3D with --attention sparse
    cmd = [sys.executable, "-m", "export_engine", "--model", family, "--precision", precision, "--random-weights",
           "--backend", "onnx", "--out", str(work / f"{model}-{precision}"), "--force"]  # fmt: skip
    cmd += ["--attention", variant] if variant else []
    return cmd + (["--precision-plan", str(plan)] if plan else [])


def launch(cmd: list[str], log: Path, cores: set[int], detach: bool = False) -> subprocess.Popen:
    """Start an export pinned to ``cores``; ``detach`` gives it its own process session, so that it outlives this
    process (a later run of this script finds it through ``exports.pids`` and waits for it)."""
    with open(log, "a") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=detach,
                                preexec_fn=lambda: os.sched_setaffinity(0, cores))  # fmt: skip


def wait_detached(work: Path, deadline: float) -> None:
    """Wait for exports an earlier run of this script left running (``--detach-exports``)."""
    pids_file = work / "exports.pids"
    if not pids_file.exists():
        return
    pids = json.loads(pids_file.read_text())
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids.values()):
        time.sleep(2)
    pids_file.unlink()


def start_exports(work: Path, plans: Path | None, cores: set[int], wanted: set[str],
                  detach: bool = False) -> dict[str, tuple[subprocess.Popen, list[str]]]:  # fmt: skip
    procs = {}
    for model, precision in EXPORTS:
        if f"{model}-{precision}" not in wanted or (work / f"{model}-{precision}" / "manifest.json").exists():
            continue
        plan = plans / f"{model}-hybrid.json" if plans and precision == "hybrid" else None  # none for sparse
        cmd = export_command(work, model, precision, plan if plan and plan.exists() else None)
        alone = detach and model == "mast3r"  # the large ones; FastSAM3D's take a minute and are waited for
        procs[f"{model}-{precision}"] = (launch(cmd, work / f"export-{model}-{precision}.log", cores, alone), cmd)
    if detach:
        pids = {name: proc.pid for name, (proc, _) in procs.items() if name.startswith("mast3r")}
        (work / "exports.pids").write_text(json.dumps(pids))
    return procs


def wait_exports(procs: dict[str, tuple[subprocess.Popen, list[str]]], work: Path, deadline: float,
                 cores: set[int]) -> dict[str, Any]:  # fmt: skip
    """Wait for every export; a hybrid export that fails with a reused plan (say, node names of another
    exporter version) is started again with calibration while time allows."""
    status = {}
    pending = dict(procs)
    while pending:
        name, (proc, cmd) = next(iter(pending.items()))
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -9
        del pending[name]
        log = work / f"export-{name}.log"
        if code != 0 and "--precision-plan" in cmd and time.monotonic() < deadline - 120:
            retry = cmd[: cmd.index("--precision-plan")]
            status[f"{name} (with the reused plan)"] = {"exit": code, "log_tail": log.read_text().splitlines()[-3:]}
            pending[name] = (launch(retry, log, cores), retry)
            continue
        status[name] = {"exit": code, "log_tail": log.read_text().strip().splitlines()[-3:]}
    return status


class Report:
    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.start, self.budget_s = out, time.monotonic(), budget_s
        self.data: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "rows": [], "skipped": [], "notes": {}}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def section(self, name: str, need_s: float, fn: Any, *args: Any) -> Any:
        if self.left() < need_s:
            self.data["skipped"].append(f"{name}: {self.left():.0f} s left of the budget, needs ~{need_s:.0f} s")
            return None
        t0 = time.monotonic()
        print(f"[{time.monotonic() - self.start:6.1f} s] {name} ...", flush=True)
        # Sessions of earlier sections are freed now, after their work, not in the middle of this section.
        torch.cuda.synchronize()
        gc.collect()
        try:
            result = fn(*args)
        except Exception as err:  # report and go on: one broken section must not lose the others
            result = None
            self.data["skipped"].append(f"{name}: {type(err).__name__}: {' '.join(str(err).split())[:400]}")
        self.data["notes"][f"{name} seconds"] = round(time.monotonic() - t0, 1)
        self.save()
        return result

    def add(self, rows: list[dict[str, Any]] | dict[str, Any] | None) -> None:
        if rows:
            self.data["rows"].extend(rows if isinstance(rows, list) else [rows])
            self.save()  # a run cut off at its time limit keeps every row measured so far

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_bench.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")

    def table(self) -> str:
        lines = [f"{'case':<68} {'median ms':>10} {'min ms':>8} {'GPU GiB':>8}  notes"]
        for row in self.data["rows"]:
            if "median_ms" not in row:
                lines.append(f"{row['case']:<68} {row.get('error', '')}")
                continue
            notes = []
            if "gpu_parity" in row:
                worst = max(row["gpu_parity"]["max_abs"].values())
                notes.append(f"parity {'ok' if row['gpu_parity']['passed'] else 'FAIL'} (max {worst:.1e})")
            if "worst_error_vs_fp32" in row:
                notes.append(f"worst error vs FP32 {row['worst_error_vs_fp32']:.1e}")
            if "compile_s" in row:
                notes.append(f"compiled in {row['compile_s']:.0f} s")
            for key in ("identical_to_reference", "matches", "encoder_one_image_ms"):
                if key in row:
                    value = row[key]
                    notes.append(f"{key}={value:.2f}" if isinstance(value, float) else f"{key}={value}")
            mem = f"{row['gpu_mem_gib']:.2f}" if "gpu_mem_gib" in row else ""
            lines.append(
                f"{row['case']:<68} {row['median_ms']:>10.2f} {row['min_ms']:>8.2f} {mem:>8}  {', '.join(notes)}"
            )
        return "\n".join(lines)


STUDY = (  # (label, lowerings, tf32): the default first, then the steps that build it (each adds one rewrite)
    ("all rewrites, TF32 mode on (default)", DEFAULT_LOWERINGS, True),
    ("all but attention_bsh, TF32 mode on", ("patch_conv", "rotary", "norm_casts", "skip_layernorm", "bias_gelu"),
     True),
    ("patch convs as MatMul, TF32 mode off (previous default)", ("patch_conv",), False),
    ("patch convs, TF32 mode on", ("patch_conv",), True),
    ("patch convs + rotary, TF32 on", ("patch_conv", "rotary"), True),
    ("patch convs + rotary + norm casts folded, TF32 on", ("patch_conv", "rotary", "norm_casts"), True),
    ("patch convs + rotary + norm casts + skip layernorm, TF32 on",
     ("patch_conv", "rotary", "norm_casts", "skip_layernorm"), True),
    ("as exported (no rewrite), TF32 mode off", (), False),
)  # fmt: skip


GQA_LOWERINGS = tuple("attention_gqa" if n in ATTENTION_LOWERINGS else n for n in DEFAULT_LOWERINGS)
STOCK_LOWERINGS = tuple(
    stand_in for n in DEFAULT_LOWERINGS if (stand_in := OWN_OP_LOWERINGS.get(n, n))
)  # ONNX Runtime's own operators only: what the runner uses where export-engine's cannot be built


def _without(*names: str) -> tuple[str, ...]:
    return tuple(n for n in DEFAULT_LOWERINGS if n not in names)


RUNTIME_OPTIONS = (  # (label, CudaSessionConfig fields, extras: "profile"): each against the default session
    ("ONNX Runtime's operators only (attention_bsh; no own operators, no nhwc_conv)",
     {"lowerings": STOCK_LOWERINGS}, {"profile"}),
    ("without matmul_gelu, resize_bilinear, nhwc_conv (the previous default)",
     {"lowerings": _without("matmul_gelu", "resize_bilinear", "nhwc_conv")}, set()),
    ("without nhwc_conv", {"lowerings": _without("nhwc_conv")}, set()),
    ("without matmul_gelu", {"lowerings": _without("matmul_gelu")}, set()),
)  # fmt: skip


def fastsam3d_section(report: Report, work: Path, warm: int, reps: int) -> None:
    """The ONNX Runtime rewrites on the hybrid artifact (CUDA graphs), FP32, and a profile."""
    hybrid, fp32 = work / "fastsam3d-hybrid", work / "fastsam3d-fp32"

    def measure(label: str, artifact: Path, config: CudaSessionConfig) -> None:
        rows = report.section(f"ORT FastSAM3D {label}", 10, cases.ort_fastsam3d, artifact, config, warm, reps, label)
        report.add(rows)

    for label, lowerings, tf32 in (STUDY[0], STUDY[2], STUDY[3]):
        measure(f"hybrid, {label}, decomposed attention, CUDA graph", hybrid,
                CudaSessionConfig("decomposed", cuda_graph=True, lowerings=lowerings, tf32=tf32))  # fmt: skip
    measure("hybrid, default rewrites, fused attention, CUDA graph", hybrid, CudaSessionConfig(cuda_graph=True))
    measure("fp32, default rewrites (TF32 stays off), decomposed attention, CUDA graph", fp32,
            CudaSessionConfig("decomposed", cuda_graph=True))  # fmt: skip
    report.data["profile FastSAM3D hybrid encoder"] = report.section(
        "profile FastSAM3D hybrid encoder", 10, cases.profile_fastsam3d, hybrid, CudaSessionConfig("decomposed")
    )


def sparse_section(report: Report, work: Path, warm: int, reps: int) -> None:
    """FastSAM3D's encoder with sparse attention next to the dense one: ORT CUDA (default rewrites, CUDA graph)
    and torch.compile reduce-overhead, same weights."""
    for name in ("fastsam3d-hybrid", "fastsam3d-sparse-hybrid"):
        label = "dense" if name == "fastsam3d-hybrid" else "sparse"
        rows = report.section(f"ORT FastSAM3D {label}", 10, cases.ort_fastsam3d, work / name,
                              CudaSessionConfig("decomposed", cuda_graph=True), warm, reps,
                              f"hybrid {label} attention, default rewrites, CUDA graph")  # fmt: skip
        report.add(rows)
    config = CudaSessionConfig("decomposed", cuda_graph=True, lowerings=_without("channel_norm"))
    rows = report.section("ORT FastSAM3D sparse, without channel_norm", 10, cases.ort_fastsam3d,
                          work / "fastsam3d-sparse-hybrid", config, warm, reps,
                          "hybrid sparse attention, default rewrites without channel_norm, CUDA graph")  # fmt: skip
    report.add(rows)
    per_graph = {"encoder": CudaSessionConfig("decomposed", cuda_graph=True),
                 "prompt_decoder": CudaSessionConfig("fused", cuda_graph=True)}  # fmt: skip
    rows = report.section("ORT FastSAM3D sparse, fused attention in the prompt decoder", 10, cases.ort_fastsam3d,
                          work / "fastsam3d-sparse-hybrid", per_graph, warm, reps,
                          "hybrid sparse attention, prompt decoder's attention fused, CUDA graph")  # fmt: skip
    report.add(rows)
    for own_stream in (False, True, False):  # alternated: the first rows of a section run on a colder GPU
        how = "own stream" if own_stream else "host-synchronised runs"
        rows = report.section(f"ORT FastSAM3D sparse, {how}", 10, cases.ort_fastsam3d, work / "fastsam3d-sparse-hybrid",
                              CudaSessionConfig("decomposed", cuda_graph=True, own_stream=own_stream), warm, reps,
                              f"hybrid sparse attention, default rewrites, {how}, CUDA graph")  # fmt: skip
        report.add(rows)
    report.add(report.section("torch.compile FastSAM3D sparse", 40, cases.compiled_fastsam3d, warm, reps,
                              ("reduce-overhead",), "sparse"))  # fmt: skip


def mast3r_section(report: Report, work: Path, images: torch.Tensor, warm: int, reps: int, full: bool) -> None:
    """The rewrite study on the hybrid artifact (each step adds one rewrite), end to end and a profile with the
    default; with `full` also the FP32 artifact (TF32 stays off there) and decomposed attention."""
    hybrid, fp32 = work / "mast3r-hybrid", work / "mast3r-fp32"
    default: dict[str, Any] = {}

    def measure(label: str, artifact: Path, config: CudaSessionConfig, keep: bool = False) -> None:
        result = report.section(f"ORT MASt3R {label}", 25, cases.ort_mast3r, artifact, config, images, warm, reps,
                                label)  # fmt: skip
        if result is None:
            return
        row, runners = result
        report.add(row)
        if keep:
            default.update(runners=runners, label=label, config=config)  # kept for end to end

    label, lowerings, tf32 = STUDY[0]
    measure(f"hybrid, {label}, CUDA graph", hybrid, CudaSessionConfig(cuda_graph=True), keep=True)
    if default:
        report.add(report.section("MASt3R end to end", 10, cases.end_to_end, default["runners"], images, warm, reps,
                                  default["label"]))  # fmt: skip
        config = dataclasses.replace(default["config"], cuda_graph=False)
        default.pop("runners")
        result = report.section("profile MASt3R hybrid", 25, cases.profile_mast3r, hybrid, config, images)
        report.data["profile MASt3R hybrid"] = result
    for label, options, extras in RUNTIME_OPTIONS:
        config = CudaSessionConfig(cuda_graph=True, **options)
        measure(f"hybrid, default rewrites, {label}, CUDA graph", hybrid, config)
        if "profile" in extras:
            key = f"profile MASt3R hybrid, {label}"
            report.data[key] = report.section(key, 25, cases.profile_mast3r, hybrid,
                                              dataclasses.replace(config, cuda_graph=False), images)  # fmt: skip
    if not full:
        return
    measure("fp32, default rewrites (TF32 stays off), CUDA graph", fp32, CudaSessionConfig(cuda_graph=True))
    for label, lowerings, tf32 in STUDY[1:]:
        measure(f"hybrid, {label}, CUDA graph", hybrid, CudaSessionConfig(cuda_graph=True, lowerings=lowerings,
                tf32=tf32))  # fmt: skip
    measure("hybrid, default rewrites, decomposed attention, CUDA graph", hybrid,
            CudaSessionConfig("decomposed", cuda_graph=True))  # fmt: skip
    default.clear()


def _tiles_label(tiles: dict[str, Any]) -> str:
    if tiles.get("stationary"):
        return (f"query-stationary {tiles['stationary']} rows/thread {tiles['stationary_warps']}w/"
                f"{tiles['stationary_programs']}")  # fmt: skip
    text = (f"{tiles['block_m']}x{tiles['block_n']}/{tiles['warps']}w/{tiles['target_programs']}"
            f"{'' if tiles['tail_fma'] else '/pad32'}")  # fmt: skip
    if tiles.get("prune_block", (0, 0))[0]:
        bh, bw = tiles["prune_block"]
        text += (f" pruned {bh}x{bw}/{tiles['prune_pairs']}p/{tiles['prune_rows']}r/"
                 f"{tiles['prune_programs']}x{tiles['prune_warps']}w"
                 f"{'' if tiles.get('prune_tf32', False) else ' fp32-scores'}"
                 f"/bound {tiles.get('prune_bound_programs', 528)}x{tiles.get('prune_bound_warps', 4)}w "
                 f"cb{tiles.get('prune_cb', 64)}")  # fmt: skip
    return text


def _pruned_note(entry: dict[str, Any]) -> str:
    if "pairs_kept" not in entry:
        return ""
    fallback = ", ran unpruned (pairs overflowed)" if entry["unpruned_fallback"] else ""
    return f", {100 * entry['pairs_share']:.1f} % of (row, block) pairs computed{fallback}"


def print_details(data: dict[str, Any]) -> None:
    fastnn = data.get("fastnn breakdown")
    if fastnn:
        done = [r for r in fastnn["sweep"] if "median_ms" in r]
        sweep = ", ".join(f"{_tiles_label(r['tiles'])}: "
                          f"{r['median_ms']:.3f} ms ({r['tflops_fp32_equivalent']:.1f} TFLOP/s equivalent"
                          f"{_pruned_note(r)}){'' if r['identical'] else ' NOT EXACT'}" for r in done)  # fmt: skip
        print(f"FastNN-Lite kernel, 3072 x 196608 rows x keys: {sweep}")
        print(f"FastNN-Lite pair: rows per step {fastnn['rows_per_call']} ({fastnn['useful_gflop']:.1f} GFLOP), "
              f"kernel time on them {fastnn['kernel_ms_sum']:.2f} ms (best tiles {fastnn['best_tiles']})")  # fmt: skip
        for key, prof in (fastnn.get("kernel_profiles") or {}).items():
            if "gpu_kernel_ms_per_run" in prof:
                top = ", ".join(f"{k['kernel'][:40]} {k['ms']:.3f}" for k in prof.get("top_kernels_ms", [])[:8])
                print(f"FastNN-Lite kernels, {key}: {prof['gpu_kernel_ms_per_run']:.3f} ms ({top})")
        if fastnn.get("second_graph_replays"):
            print(f"FastNN-Lite calls that replayed the second graph: {fastnn['second_graph_replays']}")
        ceiling = fastnn.get("fp32_ceiling") or {}
        if ceiling:
            print(f"FP32 ceiling here: cuBLAS SGEMM 8192^3 {ceiling['sgemm_8192_tflops']:.1f} TFLOP/s; "
                  f"3072 x 24 x 196608 (whole score matrix) {ceiling['sgemm_k24_ms']:.2f} ms = "
                  f"{ceiling['sgemm_k24_tflops']:.1f} TFLOP/s")  # fmt: skip
    profiles = {k: v for k, v in data.items() if k.startswith("profile ")}
    for row in data["rows"]:
        if row.get("profile"):
            profiles[f"profile of {row['case']}"] = row["profile"]
    for key, prof in profiles.items():
        if prof:
            cats = ", ".join(f"{c} {ms:.2f}" for c, ms in prof["by_category_ms"].items())
            print(f"{key}: GPU kernels {prof['gpu_kernel_ms_per_run']:.2f} ms per run; by category (ms): {cats}")
            for k in prof["top_kernels_ms"][:6]:
                print(f"    {k['ms']:7.3f} ms  {k['kernel'][:110]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="where the artifacts are (or are exported to)")
    parser.add_argument("--plans", type=Path, help="folder with <model>-hybrid.json precision plans to reuse")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip sections that would not fit")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument(
        "--exports",
        default=",".join(f"{m}-{p}" for m, p in EXPORTS),
        help="artifacts to export (model-precision, comma-separated)",
    )
    parser.add_argument(
        "--sections",
        default="eager,fastnn,fastsam3d,mast3r-full",
        help="eager, compile, fastnn, fastsam3d, sparse, mast3r (hybrid rewrite study only) or mast3r-full",
    )
    parser.add_argument("--compile-modes", default="reduce-overhead,max-autotune",
                        help="torch.compile modes (max-autotune: FastSAM3D only, MASt3R takes too long)")  # fmt: skip
    parser.add_argument("--doctor", action="store_true", help="also write export-engine doctor's report to OUT")
    parser.add_argument("--detach-exports", action="store_true",
                        help="start the exports in their own process session and return without waiting")  # fmt: skip
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU visible; run it on the device machine", file=sys.stderr)
        return 8
    report = Report(args.out, args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.doctor:
        from export_engine.runtime.doctor import diagnose

        (args.out / "doctor.txt").write_text(diagnose().text() + "\n")
    cores = sorted(os.sched_getaffinity(0))
    mine, theirs = set(cores[:2]), set(cores[2:]) or set(cores)
    args.work.mkdir(parents=True, exist_ok=True)
    wait_detached(args.work, time.monotonic() + args.budget_s / 2)
    procs = start_exports(args.work, args.plans, theirs, set(args.exports.split(",")), args.detach_exports)
    os.sched_setaffinity(0, mine)
    import onnxruntime as ort

    report.data["device"] = torch.cuda.get_device_name()
    report.data["versions"] = {"torch": torch.__version__, "onnxruntime": ort.__version__, "cuda": torch.version.cuda,
                               "providers": ort.get_available_providers()}  # fmt: skip
    reps, warm = args.repeats, 10
    images = (torch.rand(2, 3, 384, 512, generator=torch.Generator().manual_seed(0)) * 2 - 1).cuda()

    if "eager" in sections:
        report.add(report.section("torch MASt3R", 60, cases.torch_mast3r, images, warm, reps))
        report.add(report.section("torch FastSAM3D", 30, cases.torch_fastsam3d, warm, 4 * reps))
    if "compile" in sections:
        modes = tuple(args.compile_modes.split(","))
        report.add(report.section("torch.compile MASt3R", 120, cases.compiled_mast3r, images, warm, reps,
                                  tuple(m for m in modes if m != "max-autotune") or modes))  # fmt: skip
        report.add(report.section("torch.compile FastSAM3D", 60, cases.compiled_fastsam3d, warm, 4 * reps, modes))
    if "fastnn" in sections:
        fastnn = report.section("FastNN-Lite", 40, cases.fastnn, warm, 4 * reps, 10)
        if fastnn:
            report.add(fastnn[0])
            report.data["fastnn breakdown"] = fastnn[1]
    if args.detach_exports:  # the MASt3R exports run on after this process; the next run waits for them
        procs = {k: v for k, v in procs.items() if not k.startswith("mast3r")}
    small = {k: v for k, v in procs.items() if k.startswith("fastsam3d")}
    reserve = 300 if sections & {"mast3r", "mast3r-full"} else 30  # what the MASt3R sections need afterwards
    report.data["exports"] = wait_exports(small, args.work, time.monotonic() + max(report.left() - reserve, 30), theirs)
    if "fastsam3d" in sections:
        fastsam3d_section(report, args.work, warm, 4 * reps)
    large = {k: v for k, v in procs.items() if k not in small}
    report.data["exports"].update(wait_exports(large, args.work, time.monotonic() + max(report.left() - 100, 30),
                                               theirs))  # fmt: skip
    report.save()
    if "sparse" in sections:
        sparse_section(report, args.work, warm, 4 * reps)
    if sections & {"mast3r", "mast3r-full"}:
        mast3r_section(report, args.work, images, warm, reps, full="mast3r-full" in sections)
    report.save()
    print("\n" + report.data["device"] + "  " + json.dumps(report.data["versions"]))
    print(report.table())
    print_details(report.data)
    for line in report.data["skipped"]:
        print("skipped:", line)
    print(f"written: {args.out / 'gpu_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
