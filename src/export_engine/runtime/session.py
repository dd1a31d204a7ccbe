"""Load an artifact and run it (ONNX Runtime on the artifact's ONNX graphs)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export_engine.artifacts.store import read_manifest, verify_files
from export_engine.core.types import GraphRunner
from export_engine.errors import BackendError, ModelInputError, ParityError, UsageError
from export_engine.families import RuntimeFamily, runtime_family
from export_engine.runners.ort_lowering import lowered_graph, pruned_entry, register_own_ops, with_own_ops

log = logging.getLogger(__name__)


@dataclass
class ArtifactSession:
    """A loaded artifact: ``session.run({"view1_img": ..., ...})`` returns the outputs by name.

    Threads: ``run`` may be called from several threads at once; each graph's runner serialises its own calls
    (ONNX Runtime CUDA and engine runners hold a lock while queueing work; a CPU session runs concurrent calls
    itself), and every call gets outputs of its own. ``close()`` (or leaving a ``with`` block) finishes queued
    GPU work and releases the sessions; a closed session refuses to run."""

    path: Path
    manifest: dict[str, Any]
    family: RuntimeFamily
    runners: dict[str, GraphRunner]
    provider: str
    graphs: dict[str, Any] = field(default_factory=dict)
    engine_graphs: frozenset[str] = frozenset()  # graphs that run their engine (the others: ONNX Runtime)
    outputs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # graphs that compute only these outputs

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.outputs:
            raise UsageError(f"{self.path.name} was loaded to compute only {dict(self.outputs)}; the whole "
                             "model needs every output: load it without outputs=")  # fmt: skip
        return self.family.run(self.runners, inputs, self.graphs)

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.family.run_input_names

    def close(self) -> None:
        """Release every graph's session and device memory (after its queued work); idempotent."""
        for runner in self.runners.values():
            close = getattr(runner, "close", None) or getattr(runner, "deactivate", None)
            if close is not None and getattr(runner, "is_active", True):
                close()

    def __enter__(self) -> ArtifactSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ort_cpu_runner(path: Path, graph_meta: Mapping[str, Any], lowerings: tuple[str, ...] = (), check: bool = True,
                   strict: bool = False, outputs: tuple[str, ...] = ()) -> GraphRunner:  # fmt: skip
    """ONNX Runtime on the CPU, numpy in and out (the CUDA path is ort_cuda.CudaGraphRunner). ``lowerings``
    rewrite the graph in memory first, checked against the artifact's reference as on CUDA; ``outputs``: compute
    only these (the graph pruned of the others, as on CUDA)."""
    from export_engine.runners.self_check import open_checked

    kept, graph_meta = pruned_entry(graph_meta, outputs, path.name)

    def open_fn(names: tuple[str, ...], tf32: bool) -> GraphRunner:
        return _cpu_session(path, lowered_graph(path, names, kept))

    names = with_own_ops(lowerings, cuda=False, strict=strict)
    runner, _ = open_checked(open_fn, path, graph_meta, names, False, check, strict, context=kept)
    return runner


def _cpu_session(path: Path, source: Path) -> GraphRunner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    register_own_ops(options, source, cuda=False)
    try:
        session = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own untyped exceptions
        raise BackendError(f"ONNX Runtime cannot load {path.name}: {' '.join(str(err).split())[:300]}") from err
    return CpuRunner(path, session)


class CpuRunner:
    """ONNX Runtime on the CPU, numpy in and out. ONNX Runtime runs concurrent calls of one session itself, so
    threads may share it; ``close()`` releases the session, after which a call raises BackendError."""

    def __init__(self, path: Path, session: Any):
        self.path, self.session = path, session
        self._declared = [i.name for i in session.get_inputs()]
        self._outputs = [o.name for o in session.get_outputs()]

    def __call__(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.session
        if session is None:
            raise BackendError(f"{self.path.name}: the runner is closed; load the artifact again")
        missing = [n for n in self._declared if n not in feed]
        if missing:
            raise ModelInputError(f"graph {self.path.stem} needs inputs {missing}")
        try:
            outputs = session.run(None, {n: feed[n] for n in self._declared})
        except Exception as err:  # invalid shapes and types surface here as onnxruntime errors
            raise ModelInputError(
                f"graph {self.path.stem} rejected its inputs: {' '.join(str(err).split())[:300]}"
            ) from err
        return dict(zip(self._outputs, outputs, strict=True))

    def close(self) -> None:
        self.session = None


def _engine_runner(path: Path, backend: str, cuda_graph: bool = False) -> GraphRunner:
    """The active engine runner: numpy in and out when called, torch CUDA tensors through ``run`` (so matching
    and segmentation keep their data on the GPU, as with ONNX Runtime CUDA)."""
    from export_engine.runners.engine import EngineRunner

    runner = EngineRunner(path, backend, cuda_graph=cuda_graph)
    runner.activate()
    return runner


def _checked_engine(artifact: Path, graph: Mapping[str, Any], engine: Mapping[str, Any], self_check: bool,
                    cuda_graph: bool) -> GraphRunner:  # fmt: skip
    """The engine's runner once its parity is known to hold here: passed at export, passed in a verification
    record for this GPU, driver and runtime, or passed now on the stored reference (one inference). A failed
    engine is refused with the parity table (ParityError, exit 7 from the CLI)."""
    from export_engine.artifacts import status as st
    from export_engine.runners.self_check import check_runner
    from export_engine.validation.compare import format_table

    name, backend = graph["name"], engine["backend"]
    recorded = engine.get("parity", {}).get("status", st.PENDING)
    if recorded == st.FAILED:
        raise ParityError(
            f"{artifact}: the {backend} engine of {name} failed its parity check at export; it is never run: "
            "export the artifact again, or load with use_engines=False for ONNX Runtime"
        )
    runner = _engine_runner(artifact / engine["file"], backend, cuda_graph)
    if recorded == st.PASSED:
        return runner
    settled = st.verification_for(st.read_verification(artifact), name,
                                  st.machine_fingerprint(engine.get("backend_version")))  # fmt: skip
    if settled == st.PASSED:
        log.info("%s: engine parity passed on this GPU earlier (%s)", name, st.VERIFICATION)
        return runner
    if settled == st.FAILED:
        raise ParityError(f"{artifact}: the {backend} engine of {name} failed its parity check on this GPU "
                          f"({st.VERIFICATION}); load with use_engines=False to run ONNX Runtime instead")  # fmt: skip
    if not self_check:
        log.warning("%s: engine parity is pending and the load-time check is off: running it unchecked", name)
        return runner
    report = check_runner(runner, artifact, graph, f"{backend} engine")
    if not report.passed:
        raise ParityError(f"{artifact}: the {backend} engine of {name} fails parity on this machine against the "
                          f"artifact's FP32 reference; it is not run\n" + format_table([report]))  # fmt: skip
    log.info("%s: engine parity passed here on the stored reference input (one inference)", name)
    return runner


def _ort_on_cuda() -> bool:
    from export_engine.runners.ort_cuda import cuda_available

    runnable, why = cuda_available()
    if not runnable:
        log.debug("ONNX Runtime runs on the CPU: %s", why)
    return runnable


def load(
    artifact: str | Path,
    verify: bool = True,
    use_engines: bool = True,
    cuda_graph: bool = False,
    self_check: bool = True,
    strict: bool = False,
    outputs: Mapping[str, Sequence[str]] | None = None,
) -> ArtifactSession:
    """Open ``artifact`` (verifying every file's sha256 unless ``verify=False``) and prepare its graphs.

    Each graph runs its engine when this machine can run it, else ONNX Runtime on the artifact's ONNX: on CUDA
    when onnxruntime-gpu and a GPU are there (:class:`~export_engine.runners.ort_cuda.CudaGraphRunner`, I/O in
    device memory), else on the CPU; ``cuda_graph`` captures CUDA graphs (engines' and ONNX Runtime's), for
    callers whose shapes repeat. The log says which and why. An engine runs only when its parity is known to
    hold here: passed at export, in a verification record for this GPU, or on the stored reference input now
    (``self_check``, one inference); a failed engine raises ParityError. On CUDA the graphs are rewritten in
    memory for ONNX Runtime's fused kernels, and each rewritten graph first runs the artifact's stored reference
    input (``self_check``, one inference per graph): a rewrite that fails falls back to the graph as stored, or
    with ``strict`` raises ParityError.

    ``outputs`` (graph name -> output names): a caller that reads only some outputs of a graph names them, and
    ONNX Runtime computes only those, on a copy of the graph pruned of the others (an engine computes all of
    its outputs). Such a session serves its runners to that caller; ``run`` of the whole model and ``Matcher``
    refuse it (UsageError).
    """
    from export_engine.runners.engine import can_run_engine

    path = Path(artifact)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    from export_engine.runners import ort_ops

    ort_ops.use_bundled(path)  # operator libraries the artifact carries (and its manifest vouches for) come first
    family = runtime_family(manifest["model"])
    graphs = {g["name"]: g for g in manifest["graphs"]}
    wanted = _wanted_outputs(path, graphs, outputs or {})
    engines = {e["graph"]: e for e in manifest.get("engines", [])}
    on_cuda = _ort_on_cuda()
    runners: dict[str, GraphRunner] = {}
    used = set()
    engine_graphs: set[str] = set()
    for name, graph in graphs.items():
        engine = engines.get(name)
        if engine and use_engines:
            runnable, why = can_run_engine(path / engine["file"], engine["backend"])
            if runnable:
                runners[name] = _checked_engine(path, graph, engine, self_check, cuda_graph)
                engine_graphs.add(name)
                used.add(f"{engine['backend']} engine")
                log.info("%s: running the %s engine (%s)", name, engine["backend"], why)
                continue
            log.info("%s: the %s engine cannot run here (%s); using ONNX Runtime", name, engine["backend"], why)
        if on_cuda:
            from export_engine.runners.ort_cuda import CudaGraphRunner, CudaSessionConfig

            config = CudaSessionConfig(family.ort_attention, cuda_graph=cuda_graph, check=self_check, strict=strict,
                                       outputs=wanted.get(name, ()))  # fmt: skip
            runners[name] = CudaGraphRunner(path / graph["file"], graph, config)
            used.add("onnxruntime CUDAExecutionProvider")
        else:
            runners[name] = ort_cpu_runner(path / graph["file"], graph, outputs=wanted.get(name, ()))
            used.add("onnxruntime CPUExecutionProvider")
    log.info("running %s with %s", path.name, ", ".join(sorted(used)))
    for name in sorted(engine_graphs & set(wanted)):
        log.info("%s: its engine computes every output (outputs= prunes ONNX Runtime's graphs only)", name)
    pruned = {name: kept for name, kept in wanted.items() if name not in engine_graphs}
    return ArtifactSession(
        path, manifest, family, runners, ", ".join(sorted(used)), graphs, frozenset(engine_graphs), pruned
    )


def _wanted_outputs(path: Path, graphs: Mapping[str, Any], outputs: Mapping[str, Sequence[str]]
                    ) -> dict[str, tuple[str, ...]]:  # fmt: skip
    """``outputs`` checked against the manifest: known graphs and outputs, at least one output a graph."""
    wanted = {}
    for name, names in outputs.items():
        if name not in graphs:
            raise ModelInputError(f"{path.name} has no graph {name!r}; its graphs: {sorted(graphs)}")
        if isinstance(names, str) or not names:
            declared = [o["name"] for o in graphs[name]["outputs"]]
            raise ModelInputError(f"graph {name} of {path.name}: outputs= takes a non-empty list of output names, "
                                  f"got {names!r}; its outputs: {declared}")  # fmt: skip
        kept, _ = pruned_entry(graphs[name], names, f"graph {name} of {path.name}")
        if kept:  # naming every output prunes nothing
            wanted[name] = kept
    return wanted
