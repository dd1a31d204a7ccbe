#!/usr/bin/env python3
"""Build export-engine's ONNX Runtime operator libraries ahead of time, and the export-engine-ops wheel.

Needs no GPU and no CUDA toolkit on the machine: nvcc, its CUDA runtime, headers and NVVM come from their PyPI
wheels (nvidia-cuda-nvcc, nvidia-cuda-runtime, nvidia-cuda-crt, nvidia-nvvm), installed once into a toolkit
cache; the host compiler is the machine's g++. Writes

    <out>/export_engine_ops/cpu/      libexport_engine_ort_ops.so + build.json   (CPU kernels, g++)
    <out>/export_engine_ops/cuda13/   libexport_engine_ort_ops.so + build.json   (CPU and CUDA kernels: SASS for
                                      sm_80/86/89/90/100/120, PTX for newer GPUs, the CUDA runtime linked in)
    <out>/dist/export_engine_ops-<version>-py3-none-manylinux_2_<glibc>_x86_64.whl

Builds are cached by the operators' source hash under $EXPORT_ENGINE_CACHE/prebuilt/ (default
~/.cache/export-engine): a second run with unchanged sources copies them in a second. Point
$EXPORT_ENGINE_OPS_PREBUILT at <out>/export_engine_ops, or pip install the wheel, for the runtime to use them.

    python3 scripts/build_ort_ops.py [--out build/ort-ops] [--cpu-only] [--nvcc PATH]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from export_engine import __version__  # noqa: E402
from export_engine.runners.ort_ops import build, fit  # noqa: E402
from export_engine.runners.ort_ops.bundle import build_name  # noqa: E402

# CUDA 13.0: the oldest 13.x, so the library needs only a CUDA 13.0 driver (R580) and runs under any CUDA 13
# ONNX Runtime (the CUDA runtime is linked statically; cuBLASLt is the one ONNX Runtime has loaded).
TOOLKIT = {"nvidia-cuda-nvcc": "13.0.88", "nvidia-cuda-runtime": "13.0.96", "nvidia-cuda-crt": "13.0.88",
           "nvidia-nvvm": "13.0.88", "nvidia-cuda-cccl": "13.0.85"}  # fmt: skip
PACKAGE = "export_engine_ops"


def toolkit_nvcc(cache: Path) -> Path:
    """nvcc from the PyPI wheels, installed once into ``cache/cuda-<version>`` (a rename makes it appear whole)."""
    home = cache / f"cuda-{TOOLKIT['nvidia-cuda-nvcc']}"
    nvcc = home / "nvidia" / "cu13" / "bin" / "nvcc"
    if nvcc.is_file():
        return nvcc
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".toolkit-", dir=cache))
    pins = [f"{name}=={version}" for name, version in TOOLKIT.items()]
    print(f"installing nvcc from PyPI: {' '.join(pins)}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(staging), *pins],
                   check=True)  # fmt: skip
    if home.exists():
        shutil.rmtree(home)
    os.replace(staging, home)
    return nvcc


def build_all(cache: Path, cuda_nvcc: Path | None) -> Path:
    """The libraries of these sources, built once per source hash (and toolkit) into ``cache``."""
    compiler = hashlib.sha256(str(cuda_nvcc.resolve()).encode()).hexdigest()[:8] if cuda_nvcc else ""
    key = f"{fit.source_hash()}-cpu" + (f"-cuda-{compiler}" if cuda_nvcc else "")
    done = cache / key / PACKAGE
    if done.is_dir() and all(fit.whole_problem(p)[0] is None for p in done.glob(f"*/{build.LIBRARY_NAME}")):
        print(f"up to date: {done} (sources {fit.source_hash()})", flush=True)
        return done
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    folder = staging / PACKAGE
    for cuda in [False, True] if cuda_nvcc else [False]:
        scratch = folder / f"scratch-{int(cuda)}"  # a path of its own: dlopen reuses a loaded library by its path
        scratch.mkdir(parents=True)
        start = time.perf_counter()
        if cuda:
            os.environ["CUDA_HOME"] = str(Path(cuda_nvcc or "").parent.parent)
        library = build.compile_into(scratch, cuda, build.DEFAULT_ARCHS if cuda else None)
        size, name = library.stat().st_size, build_name(fit.read_record(library) or {})
        os.replace(scratch, folder / name)
        print(f"built {name:7s} in {time.perf_counter() - start:5.1f} s: {size / 1e6:.2f} MB", flush=True)
    (folder / "__init__.py").write_text(
        '"""export-engine\'s ONNX Runtime operator libraries, prebuilt (one folder per build: cpu, cuda<major>);\n'
        'found by export_engine.runners.ort_ops, which checks each one before use."""\n\n'
        f'__version__ = "{__version__}"\nSOURCE_HASH = "{fit.source_hash()}"\n'
    )
    if done.parent.exists():
        shutil.rmtree(done.parent)
    os.replace(staging, done.parent)
    return done


def glibc_tag(folder: Path) -> str:
    """manylinux tag from the newest GLIBC symbol version the libraries need."""
    need = max((int(m) for p in folder.rglob("*.so") for m in re.findall(rb"GLIBC_2\.(\d+)", p.read_bytes())),
               default=17)  # fmt: skip
    return f"manylinux_2_{need}_x86_64"


def write_wheel(folder: Path, dist: Path) -> Path:
    """A plain wheel (a zip with dist-info) of the prebuilt package: nothing to compile when it installs."""
    name = f"{PACKAGE}-{__version__}-py3-none-{glibc_tag(folder)}.whl"
    info = f"{PACKAGE}-{__version__}.dist-info"
    files = {f"{PACKAGE}/{p.relative_to(folder).as_posix()}": p.read_bytes() for p in sorted(folder.rglob("*"))
             if p.is_file() and "__pycache__" not in p.parts}  # fmt: skip
    files[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: export-engine-ops\nVersion: {__version__}\n"
        "Summary: export-engine's ONNX Runtime operators, prebuilt (CPU; CUDA 13 for sm_80 to sm_120 + PTX)\n"
        "License: Apache-2.0\nRequires-Python: >=3.10\n"
    ).encode()
    files[f"{info}/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: export-engine build_ort_ops\nRoot-Is-Purelib: false\nTag: py3-none-"
        f"{glibc_tag(folder)}\n"
    ).encode()
    records = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        records.append(f"{path},sha256={digest},{len(data)}")
    files[f"{info}/RECORD"] = ("\n".join([*records, f"{info}/RECORD,,"]) + "\n").encode()
    dist.mkdir(parents=True, exist_ok=True)
    scratch = dist / f".{name}.partial"
    with zipfile.ZipFile(scratch, "w", zipfile.ZIP_DEFLATED) as wheel:
        for path, data in files.items():
            entry = zipfile.ZipInfo(path, date_time=(2020, 1, 1, 0, 0, 0))
            entry.external_attr = (0o755 if path.endswith(".so") else 0o644) << 16
            wheel.writestr(entry, data, zipfile.ZIP_DEFLATED)
    os.replace(scratch, dist / name)
    return dist / name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "ort-ops")
    parser.add_argument("--cpu-only", action="store_true", help="only the CPU build (no nvcc needed)")
    parser.add_argument("--nvcc", type=Path, help="this nvcc instead of the one from PyPI (CUDA 13)")
    args = parser.parse_args()
    start = time.perf_counter()
    cache = Path(os.environ.get("EXPORT_ENGINE_CACHE") or Path.home() / ".cache" / "export-engine")
    cuda_nvcc = None if args.cpu_only else (args.nvcc or toolkit_nvcc(cache / "toolkits"))
    built = build_all(cache / "prebuilt", cuda_nvcc)
    target = args.out / PACKAGE
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(built, target)
    for old in (args.out / "dist").glob(f"{PACKAGE}-*.whl"):
        old.unlink()
    wheel = write_wheel(target, args.out / "dist")
    for record in sorted(target.glob(f"*/{fit.RECORD_NAME}")):
        summary = json.loads(record.read_text())
        print(f"{record.parent.name:7s} {summary['bytes'] / 1e6:6.2f} MB  archs {summary['archs']:22s} "
              f"sources {summary['source_hash']}  {summary['compiler']}")  # fmt: skip
    print(f"wheel   {wheel.stat().st_size / 1e6:6.2f} MB  {wheel}")
    print(f"done in {time.perf_counter() - start:.1f} s: EXPORT_ENGINE_OPS_PREBUILT={target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
