"""What an engine build needs: the backend, optimisation knobs, shape profiles and the timing cache.

Everything here is plain data (no TensorRT import), so it can be built and validated on any machine and
sent to the build child process as JSON.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from export_engine.errors import UsageError

if TYPE_CHECKING:  # spec.py imports torch; the build child must stay light
    from export_engine.core.types import ModelSpec

BuilderBackend = Literal["tensorrt", "tensorrt-rtx"]
BUILDER_BACKENDS: tuple[str, ...] = ("tensorrt", "tensorrt-rtx")

HardwareCompatibility = Literal["none", "ampere_plus", "same_cc"]
HARDWARE_COMPATIBILITY: tuple[str, ...] = ("none", "ampere_plus", "same_cc")

AttentionDecomposable = Literal["fp32", "all", "none"]
ATTENTION_DECOMPOSABLE: tuple[str, ...] = ("fp32", "all", "none")

# Compute capabilities TensorRT-RTX 1.7 can target, as `trt.ComputeCapability` member names. Its enum has
# SM75, SM80, SM86, SM89, SM120, SM121 and CURRENT, and no SM90 (toolchain_facts.md A6, observed on 1.7.1).
RTX_COMPUTE_CAPABILITIES: Mapping[str, str] = {
    "7.5": "SM75",
    "8.0": "SM80",
    "8.6": "SM86",
    "8.9": "SM89",
    "12.0": "SM120",
    "12.1": "SM121",
    "current": "CURRENT",
}
HOPPER = ("9.0", "9.0a")


@dataclass(frozen=True)
class InputShapes:
    """min / opt / max shape of one network input inside an optimisation profile."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise UsageError(
                f"profile for input {self.name!r}: min/opt/max ranks differ ({self.min}, {self.opt}, {self.max})"
            )
        for lo, mid, hi in zip(self.min, self.opt, self.max, strict=True):
            if not 0 <= lo <= mid <= hi:
                raise UsageError(
                    f"profile for input {self.name!r}: need 0 <= min <= opt <= max in every dim, "
                    f"got min={self.min} opt={self.opt} max={self.max}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputShapes:
        return cls(data["name"], tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))


# One optimisation profile: shapes for every dynamic input of the network.
Profile = tuple[InputShapes, ...]


def profiles_from_spec(spec: ModelSpec, dims: Mapping[str, tuple[int, int, int]]) -> Profile:
    """One profile for ``spec``'s dynamic inputs: each named dim takes its (min, opt, max) from ``dims``.

    Static inputs are left out (the network already knows their shapes). Every named dim of the spec must be in
    ``dims`` and every key of ``dims`` must be a named dim of the spec, so a typo cannot go unnoticed.
    """
    named = sorted({d for t in spec.inputs for d in t.shape if isinstance(d, str)})
    missing = [d for d in named if d not in dims]
    unknown = [d for d in dims if d not in named]
    if missing or unknown:
        raise UsageError(
            f"graph {spec.name!r}: profile dims must cover exactly the named dims {named}; "
            f"missing {missing}, unknown {unknown}"
        )
    shapes = []
    for tensor in spec.inputs:
        if not any(isinstance(d, str) for d in tensor.shape):
            continue
        lo, mid, hi = ([dims[d][i] if isinstance(d, str) else d for d in tensor.shape] for i in range(3))
        shapes.append(InputShapes(tensor.name, tuple(lo), tuple(mid), tuple(hi)))
    return tuple(shapes)


def default_cache_dir() -> Path:
    """Per-user cache directory (``$XDG_CACHE_HOME/export-engine`` or ``~/.cache/export-engine``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "export-engine"


def default_timing_cache_path(backend: str, version: str) -> Path:
    """Where builds of ``backend`` at ``version`` keep their timing cache when the config names none.

    A cache only fits the TensorRT version (and device) that wrote it, so the version is part of the name.
    """
    return default_cache_dir() / "timing" / f"{backend}-{version}.cache"


@dataclass(frozen=True)
class BuildConfig:
    """Knobs of one ONNX -> engine build. Invalid combinations raise :class:`UsageError` at construction."""

    backend: BuilderBackend = "tensorrt-rtx"
    opt_level: int = 3  # builder_optimization_level 0..5 (0: no dynamic kernels and no timing cache)
    profiles: tuple[Profile, ...] = ()  # required when the ONNX has dynamic dims; see profiles_from_spec
    use_timing_cache: bool = True
    timing_cache_path: Path | None = None  # None: default_timing_cache_path(backend, version)
    timing_cache_copy: Path | None = None  # also write the cache here (e.g. into the artifact being staged)
    # IAttention.decomposable: "fp32" sets it where Q is FP32 (no fused FP32 kernel exists, the build fails
    # without it: export_feasibility.md 5b); FP16/BF16 attention keeps its fused kernel.
    attention_decomposable: AttentionDecomposable = "fp32"
    hardware_compatibility: HardwareCompatibility = "none"  # full TensorRT only
    version_compatible: bool = False  # full TensorRT only
    compute_capabilities: tuple[str, ...] = ()  # TensorRT-RTX only, e.g. ("8.9",); () = builder default
    timeout_s: float | None = 3600.0
    progress_interval_s: float = 5.0  # at most one progress line per interval, besides top-level phases
    extra: Mapping[str, Any] = field(default_factory=dict)  # recorded in the result, not used by the build

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, BUILDER_BACKENDS)
        _check_choice("hardware_compatibility", self.hardware_compatibility, HARDWARE_COMPATIBILITY)
        _check_choice("attention_decomposable", self.attention_decomposable, ATTENTION_DECOMPOSABLE)
        if not 0 <= self.opt_level <= 5:
            raise UsageError(f"opt_level must be 0..5 (TensorRT builder_optimization_level), got {self.opt_level}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise UsageError(f"timeout_s must be positive or None, got {self.timeout_s}")
        if self.backend == "tensorrt-rtx":
            if self.hardware_compatibility != "none" or self.version_compatible:
                raise UsageError(
                    "hardware_compatibility and version_compatible apply to full TensorRT only; TensorRT-RTX "
                    "selects targets with compute_capabilities (e.g. ('8.9',)) and engines must be rebuilt "
                    "for each TensorRT-RTX release"
                )
            for cc in self.compute_capabilities:
                _check_rtx_compute_capability(cc)
        elif self.compute_capabilities:
            raise UsageError(
                "compute_capabilities apply to TensorRT-RTX only; full TensorRT builds for the GPU it runs on "
                "(use hardware_compatibility='ampere_plus' for engines that run on other Ampere+ GPUs)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "opt_level": self.opt_level,
            "profiles": [[s.to_dict() for s in p] for p in self.profiles],
            "use_timing_cache": self.use_timing_cache,
            "timing_cache_path": str(self.timing_cache_path) if self.timing_cache_path else None,
            "timing_cache_copy": str(self.timing_cache_copy) if self.timing_cache_copy else None,
            "attention_decomposable": self.attention_decomposable,
            "hardware_compatibility": self.hardware_compatibility,
            "version_compatible": self.version_compatible,
            "compute_capabilities": list(self.compute_capabilities),
            "timeout_s": self.timeout_s,
            "progress_interval_s": self.progress_interval_s,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BuildConfig:
        def path(key: str) -> Path | None:
            return Path(data[key]) if data.get(key) else None

        return cls(
            backend=data["backend"],
            opt_level=data["opt_level"],
            profiles=tuple(tuple(InputShapes.from_dict(s) for s in p) for p in data["profiles"]),
            use_timing_cache=data["use_timing_cache"],
            timing_cache_path=path("timing_cache_path"),
            timing_cache_copy=path("timing_cache_copy"),
            attention_decomposable=data["attention_decomposable"],
            hardware_compatibility=data["hardware_compatibility"],
            version_compatible=data["version_compatible"],
            compute_capabilities=tuple(data["compute_capabilities"]),
            timeout_s=data["timeout_s"],
            progress_interval_s=data["progress_interval_s"],
            extra=data.get("extra", {}),
        )


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")


def _check_rtx_compute_capability(cc: str) -> None:
    if cc in HOPPER:
        raise UsageError(
            f"compute capability {cc} (Hopper: H100/H200) cannot be targeted by TensorRT-RTX: its "
            "ComputeCapability enum has no SM90. Build Hopper engines with full TensorRT (backend 'tensorrt') "
            "on a Hopper-class machine"
        )
    if cc not in RTX_COMPUTE_CAPABILITIES:
        raise UsageError(
            f"unknown TensorRT-RTX compute capability {cc!r}; choose from: {', '.join(RTX_COMPUTE_CAPABILITIES)}"
        )
