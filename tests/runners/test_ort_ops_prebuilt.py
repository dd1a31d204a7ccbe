"""The operator library taken prebuilt, bundled or from the cache, and every way one can be refused: each refusal
is one log line and the fallback to ONNX Runtime's own operators (a BackendError under strict), a damaged cached
build is rebuilt, and processes that start together build once."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from export_engine.errors import BackendError
from export_engine.runners import ort_lowering, ort_ops
from export_engine.runners.ort_ops import build, faults, fit

pytestmark = pytest.mark.skipif(ort_ops.cxx() is None, reason="builds the CPU operators: no C++ compiler here")
ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"


@pytest.fixture(scope="module")
def cpu_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real CPU build with its build.json, laid out as the prebuilt wheel lays it out (``cpu/``)."""
    folder = tmp_path_factory.mktemp("built") / "cpu"
    folder.mkdir()
    return build.compile_into(folder, cuda=False)


def _cuda_build() -> Path | None:
    """The prebuilt CUDA library (CI builds it with scripts/build_ort_ops.py before the tests), if there is one."""
    found = [p for f in ort_ops.prebuilt_folders() for p in sorted(f.glob(f"cuda*/{ort_ops.LIBRARY_NAME}"))]
    return found[0] if found else None


CUDA_BUILD = _cuda_build()  # looked for before any test hides the prebuilt folders


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache, no compiler, no prebuilt library: each test lays out what it needs under ``here``."""
    monkeypatch.setenv("EXPORT_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "nvcc", lambda: None)
    monkeypatch.setattr(build, "cxx", lambda: None)
    monkeypatch.setattr(ort_ops, "prebuilt_folders", lambda: [tmp_path / "prebuilt"])
    ort_ops.use_bundled(None)
    ort_ops.forget()
    yield tmp_path
    ort_ops.use_bundled(None)
    ort_ops.forget()


def _install(library: Path, folder: Path) -> Path:
    """Copy a library with its build.json into ``folder`` (a fresh path: never one this process has loaded)."""
    folder.mkdir(parents=True)
    shutil.copy2(library, folder / library.name)
    shutil.copy2(library.parent / fit.RECORD_NAME, folder / fit.RECORD_NAME)
    return folder / library.name


def _bias_relu_matches_numpy() -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    bias = np.arange(3, dtype=np.float32) - 1
    node = helper.make_node("BiasActivation", ["X", "bias"], ["Y"], domain=ort_ops.DOMAIN, relu=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x.shape),
                                            helper.make_tensor_value_info("bias", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, x.shape)])  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(ort_ops.DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    options = ort.SessionOptions()
    ort_ops.register(options, cuda=False)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    want = np.maximum(x + bias.reshape(3, 1, 1), 0)
    np.testing.assert_array_equal(session.run(None, {"X": x, "bias": bias})[0], want)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("export_")]


def test_a_prebuilt_library_serves_with_no_compiler_and_builds_nothing(here: Path, cpu_build: Path) -> None:
    _install(cpu_build, here / "prebuilt" / "cpu")
    choice = ort_ops.choose(cuda=False)
    assert choice.source == "prebuilt" and choice.path.is_relative_to(here / "prebuilt")
    assert ort_ops.status(cuda=False).startswith("prebuilt (cpu): ")
    _bias_relu_matches_numpy()
    assert not (here / "cache").exists()  # nothing compiled, nothing cached


REFUSALS = [("truncated", "truncated: "), ("zero-length", "empty"), ("corrupt", "sha256"),
            ("old-ort", "needs ONNX Runtime API 99")]  # fmt: skip


@pytest.mark.parametrize(("kind", "says"), REFUSALS)
def test_a_prebuilt_library_that_does_not_fit_is_refused_with_one_line(
    here: Path, cpu_build: Path, kind: str, says: str, caplog: pytest.LogCaptureFixture
) -> None:
    faults.provoke(kind, _install(cpu_build, here / "prebuilt" / "cpu"))
    with caplog.at_level(logging.INFO, logger="export_engine"):
        names = ort_lowering.with_own_ops(("conv_epilogue", "rotary"), cuda=False, strict=False)
    assert names == ("rotary",)  # conv_epilogue has no stock form: dropped
    (line,) = _warnings(caplog)
    assert "conv_epilogue: using none instead" in line and says in line and "C++ compiler" in line
    with pytest.raises(BackendError, match=says) as refused:
        ort_lowering.with_own_ops(("conv_epilogue",), cuda=False, strict=True)
    assert refused.value.exit_code == 8


def test_an_unfitting_prebuilt_library_is_built_on_first_use_where_a_compiler_is(
    here: Path, cpu_build: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    faults.provoke("old-ort", _install(cpu_build, here / "prebuilt" / "cpu"))
    monkeypatch.setattr(build, "cxx", lambda: shutil.which("c++") or shutil.which("g++"))
    with caplog.at_level(logging.INFO, logger="export_engine"):
        choice = ort_ops.choose(cuda=False)
    assert choice.source == "built now" and choice.path.is_relative_to(here / "cache")
    assert any("needs ONNX Runtime API 99" in r.getMessage() and "using the built now" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert not _warnings(caplog)
    _bias_relu_matches_numpy()


def test_another_cuda_major_is_refused_and_its_own_is_taken(here: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    cuda = CUDA_BUILD
    if cuda is None:
        pytest.skip("needs the prebuilt CUDA library: python3 scripts/build_ort_ops.py (CI builds it)")
    major = int(json.loads((cuda.parent / fit.RECORD_NAME).read_text())["cuda_runtime"]) // 1000
    # the machine as a GPU deployment describes itself: ONNX Runtime's CUDA provider of this major, a Hopper GPU
    monkeypatch.setattr(fit, "this_machine", lambda cuda: fit.Machine(fit._ort_api(), major, major * 1000, ("90",)))
    library = _install(cuda, here / "prebuilt" / f"cuda{major}")
    assert ort_ops.choose(cuda=True).path == library  # whole and fitting
    shutil.rmtree(library.parent)
    faults.provoke("other-cuda", _install(cuda, here / "prebuilt" / f"cuda{major}-other"))  # a path not loaded yet
    ort_ops.forget()
    with caplog.at_level(logging.INFO, logger="export_engine"):
        assert ort_lowering.with_own_ops(("attention_fused",), cuda=True, strict=False) == ("attention_bsh",)
    (line,) = _warnings(caplog)
    assert f"built for CUDA {major - 1}, ONNX Runtime's CUDA provider uses CUDA {major}" in line and "nvcc" in line
    with pytest.raises(BackendError, match=f"built for CUDA {major - 1}"):
        ort_lowering.with_own_ops(("attention_fused",), cuda=True, strict=True)


def test_an_unwritable_cache_falls_back_with_one_line(here: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    cache = faults.unwritable_cache(here / "blocked")
    monkeypatch.setenv("EXPORT_ENGINE_CACHE", str(cache))
    monkeypatch.setattr(build, "cxx", lambda: shutil.which("c++") or shutil.which("g++"))
    with caplog.at_level(logging.INFO, logger="export_engine"):
        assert ort_lowering.with_own_ops(("conv_epilogue", "rotary"), cuda=False, strict=False) == ("rotary",)
    (line,) = _warnings(caplog)
    assert f"operator cache {cache}/ort-ops is not writable (NotADirectoryError" in line
    with pytest.raises(BackendError, match="EXPORT_ENGINE_CACHE to a writable folder") as refused:
        ort_lowering.with_own_ops(("conv_epilogue",), cuda=False, strict=True)
    assert refused.value.exit_code == 8
    with pytest.raises(BackendError, match="not writable"):
        ort_ops.build_here(cuda=False)


@pytest.mark.parametrize("kind", ["truncated", "zero-length", "corrupt", "old-ort"])
def test_a_damaged_cached_library_is_rebuilt(here: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
                                             caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    monkeypatch.setattr(build, "cxx", lambda: shutil.which("c++") or shutil.which("g++"))
    first = ort_ops.choose(cuda=False)
    assert first.source == "built now" and faults.cached_library(cuda=False) == first.path
    faults.provoke(kind, first.path)
    ort_ops.forget()
    with caplog.at_level(logging.INFO, logger="export_engine"):
        again = ort_ops.choose(cuda=False)
    assert again.source == "built now" and again.path == first.path
    (line,) = _warnings(caplog)
    assert line.startswith(f"cached operator library {first.path} refused (") and line.endswith("rebuilding it")
    assert fit.whole_problem(again.path) == (None, fit.read_record(again.path))
    _bias_relu_matches_numpy()


def test_processes_that_start_together_build_once(tmp_path: Path) -> None:
    script = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s')\n"
        "from export_engine.runners import ort_ops\n"
        "ort_ops.build.nvcc = lambda: None\n"
        "print('path', ort_ops.build_here(cuda=False))\n"
    )
    env = {**os.environ, "EXPORT_ENGINE_CACHE": str(tmp_path), "PYTHONPATH": str(SRC)}
    runs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
            for _ in range(3)]  # fmt: skip
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    assert sum(out.count("building export-engine's ONNX Runtime operators") for out in outputs) == 1
    paths = {line.split(" ", 1)[1] for out in outputs for line in out.splitlines() if line.startswith("path ")}
    (path,) = paths
    assert fit.whole_problem(Path(path))[0] is None
    assert not [p for p in (tmp_path / "ort-ops").iterdir() if p.name.startswith(".")]  # no staging left


def test_an_artifacts_bundled_library_is_preferred_while_its_manifest_vouches_for_it(
    here: Path, cpu_build: Path
) -> None:
    from export_engine.artifacts.store import hash_tree

    prebuilt = _install(cpu_build, here / "prebuilt" / "cpu")
    artifact = here / "artifact"
    bundled = _install(cpu_build, artifact / "operators" / "cpu")
    (artifact / "manifest.json").write_text(json.dumps({"files": hash_tree(artifact)}))
    assert ort_ops.use_bundled(artifact) == (bundled,)
    assert ort_ops.choose(cuda=False).source == "bundled" and ort_ops.library(cuda=False) == bundled
    assert ort_ops.status(cuda=False).startswith("bundled (cpu): ")
    faults.provoke("old-ort", bundled)  # whole and self-consistent, but not what the manifest hashed
    ort_ops.use_bundled(None)
    ort_ops.use_bundled(artifact)
    choice = ort_ops.choose(cuda=False)
    assert choice.path == prebuilt and "does not match the sha256 in its artifact's manifest" in choice.refused[0]
    assert ort_ops.use_bundled(None) == () and ort_ops.choose(cuda=False).source == "prebuilt"


def test_status_names_the_library_a_session_would_use(here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ort_ops.status(cuda=False).startswith("none: export-engine's CPU operators need a C++ compiler")
    monkeypatch.setattr(build, "cxx", lambda: shutil.which("c++") or shutil.which("g++"))
    assert ort_ops.status(cuda=False).startswith("built on first use by ")
    path = ort_ops.library(cuda=False)
    assert ort_ops.status(cuda=False).startswith(f"cached build (cpu): {path}")
    faults.provoke("truncated", path)
    assert ort_ops.status(cuda=False).startswith("rebuilt (truncated: ")


def test_faults_name_the_valid_kinds(cpu_build: Path, tmp_path: Path) -> None:
    library = _install(cpu_build, tmp_path / "cpu")
    with pytest.raises(ValueError, match="other-cuda needs a CUDA build"):
        faults.provoke("other-cuda", library)
    with pytest.raises(ValueError, match=r"unknown fault 'melted'; valid: \['truncated'"):
        faults.provoke("melted", library)


def _wheel() -> Path | None:
    folders = [Path(os.environ[ort_ops.PREBUILT_ENV]).parent] if os.environ.get(ort_ops.PREBUILT_ENV) else []
    found = [w for f in [*folders, ROOT / "build" / "ort-ops"] for w in sorted(f.glob("dist/export_engine_ops-*.whl"))]
    return found[0] if found else None


def test_the_wheel_installs_and_serves_with_no_compiler(tmp_path: Path) -> None:
    """What ``pip install 'export-engine[gpu]'`` brings: the export-engine-ops wheel, found with no compiler, no
    environment variable and an empty cache."""
    wheel = _wheel()
    if wheel is None:
        pytest.skip("no export-engine-ops wheel: python3 scripts/build_ort_ops.py (CI builds it)")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True)  # fmt: skip
    script = (
        "from export_engine.runners import ort_ops\n"
        "c = ort_ops.choose(cuda=False)\n"
        "print(c.source, c.path, ort_ops.providers(c.path), ort_ops.cxx(), ort_ops.nvcc() is None)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in (ort_ops.PREBUILT_ENV, "CXX", "CUDA_HOME", "CUDA_PATH")}
    env.update(PYTHONPATH=f"{site}{os.pathsep}{SRC}", PATH="", EXPORT_ENGINE_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    source, path, providers, compiler, _ = done.stdout.split(" ", 4)
    assert source == "prebuilt" and Path(path).is_relative_to(site / "export_engine_ops" / "cpu")
    assert providers == "('cpu',)" and compiler == "None"
    assert not (tmp_path / "cache").exists()


def test_an_older_onnx_runtime_refuses_every_library_and_builds_none(
    here: Path, cpu_build: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ONNX Runtime 1.16 (OrtApi 16) against libraries that need 17: the prebuilt one is refused, and no build is
    tried, since none of these sources could fit."""
    _install(cpu_build, here / "prebuilt" / "cpu")
    monkeypatch.setattr(fit, "this_machine", lambda cuda: fit.Machine(ort_api=16))
    monkeypatch.setattr(build, "cxx", lambda: shutil.which("c++") or shutil.which("g++"))
    with caplog.at_level(logging.INFO, logger="export_engine"):
        assert ort_lowering.with_own_ops(("conv_epilogue", "rotary"), cuda=False, strict=False) == ("rotary",)
    (line,) = _warnings(caplog)
    assert "needs ONNX Runtime API 17 (onnxruntime >= 1.17), the installed one has API 16" in line
    assert "upgrade onnxruntime" in line and not (here / "cache").exists()
    assert ort_ops.status(cuda=False).startswith("none: the operators need ONNX Runtime API 17, the installed one")
