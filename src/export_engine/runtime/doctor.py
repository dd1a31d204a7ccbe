"""``export-engine doctor``: what this machine can do, before a long export or a deployment.

Versions of everything export-engine uses, the ONNX Runtime build and its providers, the GPUs and their
compute capability, which engine builders import, what ``--backend auto`` would choose and why, and (given an
artifact) how each of its graphs would run here.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from export_engine import __version__

PACKAGES = (
    "torch",
    "numpy",
    "onnx",
    "onnx-graphsurgeon",
    "polygraphy",
    "onnxruntime",
    "onnxruntime-gpu",
    "triton",
    "safetensors",
    "nibabel",
    "pillow",
)  # fmt: skip (the engine builders have their own section)


@dataclass
class DoctorReport:
    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # section -> (key, value) rows
    problems: list[str] = field(default_factory=list)

    def add(self, section: str, key: str, value: Any) -> None:
        self.sections.setdefault(section, []).append((key, str(value)))

    def to_dict(self) -> dict[str, Any]:
        return {"sections": {k: dict(v) for k, v in self.sections.items()}, "problems": self.problems}

    def text(self) -> str:
        lines = []
        for section, rows in self.sections.items():
            lines.append(section)
            lines += [f"  {key:24s} {value}" for key, value in rows]
        lines += [f"problem: {p}" for p in self.problems] or ["no problems found"]
        return "\n".join(lines)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def diagnose(artifact: Path | None = None) -> DoctorReport:
    from export_engine.core import onnxruntime_install
    from export_engine.runners.backends import INSTALL_HINTS, backend_version, choose_backend, cuda_devices

    report = DoctorReport()
    report.add("export-engine", "version", __version__)
    report.add("export-engine", "python", f"{platform.python_version()} ({sys.executable})")
    report.add("export-engine", "platform", f"{platform.system()} {platform.machine()}")
    for name in PACKAGES:
        report.add("packages", name, _version(name) or "not installed")
    problem = onnxruntime_install.problem()
    if problem:
        report.problems.append(problem)
    try:
        import onnxruntime

        report.add("onnx runtime", "providers", ", ".join(onnxruntime.get_available_providers()))
    except ImportError as err:
        report.add("onnx runtime", "providers", f"none: onnxruntime does not import ({err})")
    count, how = cuda_devices()
    report.add("gpu", "driver", how)
    for index, (name, capability) in enumerate(_gpus(count)):
        report.add("gpu", f"device {index}", f"{name}, compute capability {capability}")
    for backend in ("tensorrt", "tensorrt-rtx"):
        version = backend_version(backend)
        report.add("engine builders", backend, version or f"not installed ({INSTALL_HINTS[backend]})")
    try:
        chosen, why = choose_backend("auto")
        report.add("engine builders", "--backend auto", f"{chosen}: {why}")
    except Exception as err:
        report.problems.append(f"--backend auto cannot decide: {err}")
    from export_engine.runners import ort_ops
    from export_engine.runners.ort_cuda import cuda_available

    runnable, why = cuda_available()
    report.add("runtime", "ONNX Runtime on CUDA", "yes" if runnable else f"no: {why}")
    if artifact is not None and (Path(artifact) / "operators").is_dir():
        ort_ops.use_bundled(Path(artifact))  # what a load of this artifact would prefer
    # which library a session would use: bundled, prebuilt, cached build, built on first use, or none, and why
    report.add("runtime", "export-engine's CUDA operators", ort_ops.status(cuda=True))
    report.add("runtime", "export-engine's CPU operators", ort_ops.status(cuda=False))
    if artifact is not None:
        _artifact_rows(report, Path(artifact), runnable)
    return report


def _gpus(count: int) -> list[tuple[str, str]]:
    if not count:
        return []
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return []
    if not torch.cuda.is_available():
        return []
    capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    return [(torch.cuda.get_device_name(i), f"{major}.{minor}") for i, (major, minor) in enumerate(capabilities)]


def _artifact_rows(report: DoctorReport, artifact: Path, ort_cuda: bool) -> None:
    from export_engine.artifacts.status import artifact_status, read_verification
    from export_engine.artifacts.store import read_manifest
    from export_engine.runtime.verify import engine_compatibility

    section = f"artifact {artifact}"
    try:
        manifest = read_manifest(artifact)
    except Exception as err:
        report.problems.append(str(err))
        return
    report.add(section, "model", f"{manifest['model']} {manifest['precision']} {manifest.get('resolution', '')}")
    report.add(section, "status", artifact_status(manifest, read_verification(artifact)).status)
    engines = {e["graph"] for e in manifest.get("engines", [])}
    runs_engine = set()
    for status, line in engine_compatibility(artifact, manifest):
        report.add(section, line.split(":")[0], f"{status}: {line.split(':', 1)[1].strip()}")
        if status == "ok":
            runs_engine.add(line.split(":")[0].removeprefix("engine "))
    for graph in manifest["graphs"]:
        name = graph["name"]
        if name in runs_engine:
            how = "its engine"
        else:
            how = "ONNX Runtime on CUDA" if ort_cuda else "ONNX Runtime on the CPU"
            how += " (no engine in the artifact)" if name not in engines else ""
        report.add(section, f"graph {name}", f"runs with {how}")
