"""Command line: parse -> config -> call the API. Nothing else lives here.

export-engine --model mast3r --precision fp32 --random-weights      (export; the default command)
export-engine run ARTIFACT --inputs IN.npz --outputs OUT.npz
export-engine inspect ARTIFACT
export-engine models
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from export_engine import __version__
from export_engine.atomic import replacing
from export_engine.errors import BackendError, ExportError, ModelInputError, ParityError, UsageError

log = logging.getLogger("export_engine")

SUBCOMMANDS = ("run", "inspect", "verify", "pack", "unpack", "match", "match-many", "segment", "serve", "models",
               "doctor")  # fmt: skip
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own errors become our one-line usage errors
        raise UsageError(f"{message} (see {self.prog} --help)")


def _export_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="export-engine", description="Export a model to a validated inference artifact.")
    p.add_argument("--version", action="version", version=f"export-engine {__version__}")
    p.add_argument("--model", required=True, help="model to export (see: export-engine models)")
    p.add_argument("--precision", default="fp32", help="fp32 | fp16 | hybrid (default fp32)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", help="official checkpoint: .pth, .safetensors, model folder or HF repo id")
    weights.add_argument("--random-weights", action="store_true", help="random weights (for testing the chain)")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-weights and the parity inputs")
    p.add_argument(
        "--config",
        type=Path,
        help=(
            'JSON model configuration: {"constructor_kwargs": {...}, "dpt": {...}} or a flat object of the '
            "model's constructor keywords (unknown keys are ignored); default: from the checkpoint, else the "
            "official configuration"
        ),
    )
    p.add_argument("--resolution", help="input size, e.g. 512x384 (MASt3R: WxH, multiples of 16)")
    p.add_argument(
        "--attention",
        default="dense",
        help="FastSAM3D encoder attention: dense (the released encoder, default) or sparse (the paper's 3D sparse "
        "flash attention: attention inside strided groups of 64 tokens; the same weights load)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        help="auto (default: full TensorRT with a GPU, else TensorRT-RTX if installed, else onnx) | tensorrt | "
        "tensorrt-rtx | onnx",
    )
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimisation level 0..5 (default 3)")
    p.add_argument(
        "--compute-capability",
        action="append",
        default=[],
        metavar="X.Y",
        help="TensorRT-RTX target (repeatable; 8.0, 8.6, 8.9, 12.0; default: all it supports)",
    )
    p.add_argument("--hardware-compatibility", default="none", help="full TensorRT: none | ampere_plus | same_cc")
    p.add_argument("--version-compatible", action="store_true", help="full TensorRT: version-compatible engines")
    p.add_argument("--out", type=Path, help="artifact directory (default ./<model>-<precision>-<resolution>)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact at --out")
    p.add_argument("--strict", action="store_true", help="turn structural warnings into errors")
    p.add_argument("--parity-samples", type=int, default=1, help="representative inputs for the parity gate")
    p.add_argument("--calibration-samples", type=int, default=2, help="built-in inputs for calibration (hybrid)")
    p.add_argument("--calibration-data", type=Path, help="folder of your images (png/jpg) or volumes (.npy/.nii[.gz])")
    p.add_argument("--precision-plan", type=Path, help="reuse a precision_plan.json instead of calibrating")
    p.add_argument("--skip-pass", action="append", default=[], metavar="NAME", help="skip a graph pass (repeatable)")
    p.add_argument("--bundle-operators", action="store_true",
                   help="the artifact carries export-engine's ONNX Runtime operator libraries (CPU, and CUDA where "
                        "one is to be had), hashed in the manifest; loading prefers them")  # fmt: skip
    _common(p)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors")


def _sub_parser(name: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"export-engine {name}")
    if name == "run":
        p.description = "Run an artifact on inputs from an .npz file and write the outputs to an .npz file."
        p.add_argument("artifact", type=Path)
        p.add_argument("--inputs", type=Path, required=True, help="npz with the model's input arrays")
        p.add_argument("--outputs", type=Path, required=True, help="npz to write")
        p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact files")
    elif name == "inspect":
        p.description = "Print an artifact's manifest in a readable form."
        p.add_argument("artifact", type=Path)
        p.add_argument("--json", action="store_true", help="print the raw manifest")
    elif name == "verify":
        p.description = "Check an artifact's files, schema and compatibility; --run also re-checks parity here."
        p.add_argument("artifact", type=Path)
        p.add_argument("--run", action="store_true", help="rerun the graphs on the stored reference inputs")
    elif name == "pack":
        p.description = "Verify an artifact and pack it into one .tar.gz."
        p.add_argument("artifact", type=Path)
        p.add_argument("-o", "--output", type=Path, required=True, help="NAME.tar.gz")
    elif name == "unpack":
        p.description = "Unpack a packed artifact safely and verify it."
        p.add_argument("archive", type=Path)
        p.add_argument("-o", "--output", type=Path, required=True, help="artifact folder to create")
        p.add_argument("--force", action="store_true", help="replace an existing folder")
    elif name == "match":
        p.description = "Match two images with a MASt3R artifact (reciprocal nearest neighbours, FastNN-Lite)."
        p.add_argument("artifact", type=Path)
        p.add_argument("image1", type=Path)
        p.add_argument("image2", type=Path)
        p.add_argument("--out", type=Path, required=True, help="matches.npz")
        p.add_argument("--plot", type=Path, help="matches.png: both images with match lines")
        p.add_argument("--subsample", type=int, default=8, help="seed grid step in pixels (default 8)")
        p.add_argument("--min-desc-conf", type=float, default=0.0, help="drop matches below this confidence")
        p.add_argument("--device", default="cpu", help="torch device for matching (cpu, cuda)")
    elif name == "match-many":
        _match_many_parser(p)
    elif name == "segment":
        p.description = "Segment a volume with a FastSAM3D artifact from clicks (d,h,w[,label]; label 1 or 0)."
        p.add_argument("artifact", type=Path)
        p.add_argument("volume", type=Path, help=".npy, .nii or .nii.gz")
        p.add_argument("--click", action="append", required=True, metavar="D,H,W[,LABEL]", help="repeatable")
        p.add_argument("--out", type=Path, required=True, help="mask.nii.gz (or .nii / .npy)")
        p.add_argument("--plot", type=Path, help="slices.png: three orthogonal slices with the mask")
        p.add_argument("--accumulate", action="store_true", help="send every click so far (default: newest only)")
    elif name == "serve":
        from export_engine.serve.config import ServeConfig

        d = ServeConfig()  # the defaults' one home
        p.description = "Serve artifacts over HTTP: FastSAM3D sessions and clicks, MASt3R matching, a viewer at /."
        p.add_argument("artifacts", type=Path, nargs="+", metavar="ARTIFACT")
        p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host}: this machine only)")
        p.add_argument("--port", type=int, default=d.port, help=f"TCP port (default {d.port}; 0 picks a free one)")
        p.add_argument("--allow-root", type=Path, help="folder whose files POST /sessions may read by path")
        p.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb,
                       help="largest request body (default %(default)s)")  # fmt: skip
        p.add_argument("--gpu-budget-mb", type=float, default=d.gpu_budget_mb,
                       help="device memory for sessions (default %(default)s)")  # fmt: skip
        p.add_argument("--session-ttl-s", type=float, default=d.session_ttl_s,
                       help="idle sessions expire (default %(default)s)")  # fmt: skip
        p.add_argument("--max-sessions", type=int, default=d.max_sessions,
                       help="most sessions held at once (default %(default)s)")  # fmt: skip
        p.add_argument("--no-cuda-graph", action="store_true", help="do not capture CUDA graphs (GPU runners)")
        p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                       help="deploy on Ray Serve, one replica per GPU, sessions pinned to their replica (a local "
                            "Ray without ADDRESS; needs the [ray] extra)")  # fmt: skip
        p.add_argument("--replicas", type=int, default=d.replicas,
                       help="with --ray on a cluster without GPUs: CPU replicas (default %(default)s)")  # fmt: skip
    elif name == "doctor":
        p.description = (
            "Report versions, ONNX Runtime providers, GPUs and compute capability, engine builders, "
            "what --backend auto would choose here and, given an artifact, how each graph runs here."
        )
        p.add_argument("artifact", type=Path, nargs="?", help="an artifact folder to check against this machine")
        p.add_argument("--json", action="store_true", help="print the report as JSON")
        p.add_argument("--build-ops", action="store_true",
                       help="build export-engine's ONNX Runtime operators into the cache now (CUDA where nvcc "
                            "is found, else CPU), e.g. for a deployment image, instead of on first use")  # fmt: skip
    else:
        p.description = "List the models export-engine can export."
    _common(p)
    return p


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("export-engine: %(message)s"))
    root = logging.getLogger("export_engine")
    root.handlers[:] = [handler]
    root.setLevel(level)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the artifact writer, which removes its staging directory


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if threading_main():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _dispatch(argv)
    except ExportError as err:
        if debug:
            traceback.print_exc()
        print(f"export-engine: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("export-engine: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # last resort: one line, not a wall of traceback
        if debug:
            traceback.print_exc()
        print(
            f"export-engine: internal error: {type(err).__name__}: {err} (rerun with --debug and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


NEEDS_ONNXRUNTIME = ("run", "verify", "match", "match-many", "segment", "serve")


def _require_onnxruntime() -> None:
    """A missing ONNX Runtime is a clear error (exit 8); both the CPU and GPU builds installed is a warning."""
    from export_engine.core import onnxruntime_install

    problem = onnxruntime_install.problem()
    if problem and not onnxruntime_install.installed():
        raise BackendError(problem)
    if problem:
        log.warning("%s", problem)


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        args = _sub_parser(argv[0]).parse_args(argv[1:])
        _setup_logging(args)
        if argv[0] in NEEDS_ONNXRUNTIME:
            _require_onnxruntime()
        commands = {
            "run": _cmd_run,
            "inspect": _cmd_inspect,
            "verify": _cmd_verify,
            "pack": _cmd_pack,
            "unpack": _cmd_unpack,
            "segment": _cmd_segment,
            "serve": _cmd_serve,
            "match": _cmd_match,
            "match-many": _cmd_match_many,
            "models": _cmd_models,
            "doctor": _cmd_doctor,
        }
        return commands[argv[0]](args)
    args = _export_parser().parse_args(argv)
    _setup_logging(args)
    _require_onnxruntime()
    return _cmd_export(args)


def _cmd_export(args: argparse.Namespace) -> int:
    from export_engine.pipeline import export, export_config

    if args.parity_samples < 1:
        raise UsageError("--parity-samples must be at least 1")
    config = export_config(
        args.model,
        args.precision,
        checkpoint=args.checkpoint,
        random_weights=args.random_weights,
        seed=args.seed,
        config_file=args.config,
        resolution=args.resolution,
        attention=args.attention,
        backend=args.backend,
        out=args.out,
        force=args.force,
        strict=args.strict,
        parity_samples=args.parity_samples,
        calibration_samples=args.calibration_samples,
        calibration_data=args.calibration_data,
        precision_plan=args.precision_plan,
        skip_passes=tuple(args.skip_pass),
        opt_level=args.opt_level,
        compute_capabilities=tuple(args.compute_capability),
        hardware_compatibility=args.hardware_compatibility,
        version_compatible=args.version_compatible,
        bundle_operators=args.bundle_operators,
    )
    result = export(config)
    print(result.artifact)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from export_engine.runtime.session import load

    inputs = _read_npz(args.inputs)
    session = load(args.artifact, verify=not args.no_verify)
    outputs = session.run(inputs)
    target = Path(args.outputs)
    with replacing(target) as tmp:
        np.savez(tmp, **outputs)  # type: ignore[arg-type]  # numpy's stub types **kwds too narrowly
    log.info("wrote %s (%s)", target, ", ".join(f"{k} {tuple(v.shape)}" for k, v in outputs.items()))
    return 0


def _read_npz(path: Path) -> dict[str, Any]:
    import zipfile

    import numpy as np

    if not path.is_file():
        raise ModelInputError(f"inputs file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ModelInputError(f"inputs file {path} is not a readable .npz ({err})") from err


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from export_engine.artifacts.inspect import describe
    from export_engine.artifacts.status import read_verification
    from export_engine.artifacts.store import read_manifest

    manifest = read_manifest(args.artifact)
    print(json.dumps(manifest, indent=2) if args.json else describe(manifest, read_verification(args.artifact)))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from export_engine.runtime.verify import verify

    report = verify(args.artifact, run=args.run)
    for status, what in report.checks:
        print(f"{status:7s}  {what}")
    if report.failed:
        print(f"{report.artifact}: FAILED ({len(report.failed)} check(s))")
        return ParityError.exit_code
    if report.pending:
        print(
            f"{report.artifact}: verified, {len(report.pending)} check(s) pending (they need a machine that runs "
            "the engine: export-engine verify --run there)"
        )
        return 0
    print(f"{report.artifact}: verified")
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    from export_engine.artifacts.pack import pack

    print(pack(args.artifact, args.output))
    return 0


def _cmd_unpack(args: argparse.Namespace) -> int:
    from export_engine.artifacts.pack import unpack

    print(unpack(args.archive, args.output, force=args.force))
    return 0


def _cmd_match(args: argparse.Namespace) -> int:
    import numpy as np

    from export_engine.families.mast3r.match import MatchConfig, Matcher
    from export_engine.runtime.plots import plot_matches
    from export_engine.runtime.session import load

    if args.subsample < 1:
        raise UsageError("--subsample must be at least 1")
    config = MatchConfig(subsample=args.subsample, min_desc_conf=args.min_desc_conf, device=args.device)
    matcher = Matcher(load(args.artifact, cuda_graph=True), config)  # fixed shapes: one image, one pair
    result = matcher.match(args.image1, args.image2)
    target = Path(args.out)
    with replacing(target) as tmp:
        np.savez(
            tmp,
            xy1=result.xy1,
            xy2=result.xy2,
            conf=result.conf,
            xy1_original=result.xy1_original,
            xy2_original=result.xy2_original,
            pts3d1=result.pts3d1,
            pts3d2=result.pts3d2,
        )
    print(f"{target} ({len(result.xy1)} matches)")
    if args.plot:
        print(plot_matches(result.image1.rgb, result.image2.rgb, result.xy1, result.xy2, args.plot))
    return 0


def _match_many_parser(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Match an image collection with a MASt3R artifact into DIR/database.db (COLMAP), DIR/features.h5 + "
        "DIR/matches.h5 (hloc) and DIR/pairs.txt; rerun the same command to finish an interrupted run."
    )
    p.add_argument("artifact", type=Path)
    p.add_argument("images", type=Path, nargs="+", help="folders (searched recursively) and/or jpg/png files")
    p.add_argument("--pairs", default="swin:10",
                   help="complete | swin:K[:cyclic] | logwin:K[:cyclic] | retrieval:K | FILE (two names a line); "
                        "default swin:10")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--camera-mode", default="per-image", help="per-image (default) | single | auto")
    p.add_argument("--gpu-memory", type=float, help="GiB the run may use on the GPU (default 3/4 of the free memory)")
    p.add_argument("--batch", type=int, default=16, help="pairs per decoder run (default 16)")
    p.add_argument("--encode-batch", type=int, default=16, help="images per encoder run (default 16)")
    p.add_argument("--workers", type=int, default=8, help="image-decoding threads (default 8)")
    p.add_argument("--matchers", type=int,
                   help="matcher threads, each with its own recorded matcher and CUDA stream (default 3 on a GPU, "
                        "1 on the CPU)")  # fmt: skip
    p.add_argument("--token-slots", type=int, help="keep at most N images' tokens (default: what --gpu-memory holds)")
    p.add_argument("--subsample", type=int, default=8, help="seed grid step in pixels (default 8)")
    p.add_argument("--min-desc-conf", type=float, default=0.0, help="drop matches below this confidence")
    p.add_argument("--no-hloc", action="store_true", help="skip features.h5 / matches.h5")
    p.add_argument("--verify", action="store_true", help="COLMAP two-view geometric verification (pycolmap)")
    p.add_argument("--reconstruct", action="store_true", help="COLMAP incremental mapper into DIR/sparse (pycolmap)")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="match on Ray workers, one per GPU: a Ray started here, or ADDRESS (auto, ray://host:port) of "
                        "a cluster (pip install 'export-engine[ray]')")  # fmt: skip
    p.add_argument("--ray-workers", type=int, help="Ray workers (default: one per GPU, else 2 on the CPU)")


def _cmd_match_many(args: argparse.Namespace) -> int:
    from export_engine.families.mast3r.match import MatchConfig
    from export_engine.sfm.run import MatchManyConfig, match_many

    config = MatchManyConfig(
        pairs=args.pairs,
        match=MatchConfig(subsample=args.subsample, min_desc_conf=args.min_desc_conf),
        camera_mode=args.camera_mode,
        gpu_memory=args.gpu_memory,
        batch=args.batch,
        encode_batch=args.encode_batch,
        token_slots=args.token_slots,
        workers=args.workers,
        matchers=args.matchers,
        hloc=not args.no_hloc,
        verify=args.verify,
        reconstruct=args.reconstruct,
        ray=args.ray,
        ray_workers=args.ray_workers,
    )
    try:
        report = match_many(args.artifact, args.images, args.out, config)
    except KeyboardInterrupt:
        print(f"export-engine: interrupted; the pairs matched so far are in {args.out / 'database.db'}: run the "
              "same command again to match the rest", file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    print(report.text())
    return 0


def _parse_click(text: str) -> tuple[tuple[float, float, float], bool]:
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise UsageError(f"--click {text!r}: expected D,H,W or D,H,W,LABEL with numbers") from None
    if len(values) not in (3, 4) or (len(values) == 4 and values[3] not in (0.0, 1.0)):
        raise UsageError(f"--click {text!r}: expected D,H,W[,LABEL] with LABEL 1 (include) or 0 (exclude)")
    return (values[0], values[1], values[2]), len(values) == 3 or values[3] == 1.0


def _cmd_segment(args: argparse.Namespace) -> int:
    from export_engine.families.fastsam3d.segment import SegmentSession
    from export_engine.families.fastsam3d.volumes import load_volume, save_mask
    from export_engine.runtime.plots import plot_slices
    from export_engine.runtime.session import load

    clicks = [_parse_click(c) for c in args.click]
    volume = load_volume(args.volume)
    session = SegmentSession(load(args.artifact), accumulate=args.accumulate)
    session.set_volume(volume.data, around=[c for c, _ in clicks])
    for point, positive in clicks:
        result = session.click(point, positive)
        log.info("click %s (%s): predicted IoU %.3f, %d voxels", point, "+" if positive else "-",
                 result.iou_prediction, int(result.mask.sum()))  # fmt: skip
    print(save_mask(result.mask, args.out, volume.affine))
    if args.plot:
        print(plot_slices(volume.data, result.mask, clicks, args.plot))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from export_engine.serve.config import ServeConfig
    from export_engine.serve.server import serve

    config = ServeConfig(host=args.host, port=args.port, allow_root=args.allow_root, max_upload_mb=args.max_upload_mb,
                         gpu_budget_mb=args.gpu_budget_mb, session_ttl_s=args.session_ttl_s,
                         max_sessions=args.max_sessions, cuda_graph=not args.no_cuda_graph,
                         replicas=args.replicas)  # fmt: skip
    if args.ray is not None:
        from export_engine.serve.ray_serve import ray_serve, serve_on_ray

        ray_serve()  # without Ray, say how to install it before any work
        serve_on_ray(args.artifacts, config, args.ray or None)
        return 0
    serve(args.artifacts, config)
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from export_engine.runtime.doctor import diagnose

    if args.build_ops:
        from export_engine.runners import ort_ops

        path = ort_ops.build_here(cuda=ort_ops.nvcc() is not None)  # BackendError (exit 8) says why it failed
        log.info("export-engine's ONNX Runtime operators (%s): %s", ",".join(ort_ops.providers(path)), path)
    report = diagnose(args.artifact)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from export_engine.exporters.registry import FAMILIES

    for family in FAMILIES:
        print(f"{family.name:10s} {family.summary}; shape: {family.shape_option}, default {family.default_shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
