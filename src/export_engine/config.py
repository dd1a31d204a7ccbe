"""Precision enum and ExportConfig: the only home of defaults."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from export_engine.errors import UsageError


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    HYBRID = "hybrid"

    @classmethod
    def parse(cls, value: str) -> Precision:
        try:
            return cls(value.lower())
        except ValueError:
            choices = ", ".join(p.value for p in cls)
            raise UsageError(f"unknown precision {value!r}; choose one of: {choices}") from None


class Backend(str, enum.Enum):
    AUTO = "auto"  # full TensorRT with a GPU, else TensorRT-RTX when installed, else ONNX only
    TENSORRT = "tensorrt"
    TENSORRT_RTX = "tensorrt-rtx"
    ONNX = "onnx"

    @classmethod
    def parse(cls, value: str) -> Backend:
        try:
            return cls(value.lower())
        except ValueError:
            choices = ", ".join(b.value for b in cls)
            raise UsageError(f"unknown backend {value!r}; choose one of: {choices}") from None


@dataclass(frozen=True)
class Resolution:
    """Image size in pixels, written ``WxH`` on the command line (width first, as upstream names them)."""

    width: int
    height: int

    @classmethod
    def parse(cls, text: str, multiple_of: int = 16) -> Resolution:
        parts = text.lower().replace(" ", "").split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise UsageError(f"resolution {text!r} is not of the form WxH (e.g. 512x384)")
        width, height = int(parts[0]), int(parts[1])
        if width <= 0 or height <= 0 or width % multiple_of or height % multiple_of:
            raise UsageError(
                f"resolution {text!r}: width and height must be positive multiples of {multiple_of} "
                f"(e.g. 512x384 or 384x512)"
            )
        return cls(width, height)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class ExportConfig:
    """Everything one export run needs; CLI flags are these field names in kebab-case."""

    model: str
    precision: Precision = Precision.FP32
    checkpoint: str | None = None
    random_weights: bool = False
    seed: int = 0
    config_file: Path | None = None
    resolution: str | None = None  # model default when None (MASt3R: 512x384)
    backend: Backend = Backend.AUTO
    opt_level: int = 3  # TensorRT builder optimisation level, 0..5
    compute_capabilities: tuple[str, ...] = ()  # TensorRT-RTX targets, e.g. ("8.9",); () = the builder's default set
    hardware_compatibility: str = "none"  # full TensorRT: none | ampere_plus | same_cc
    version_compatible: bool = False  # full TensorRT only
    out: Path = Path("artifacts/out")
    force: bool = False
    strict: bool = False
    parity_samples: int = 1
    calibration_samples: int = 2
    skip_passes: tuple[str, ...] = ()
    precision_plan: Path | None = None  # reuse a precision_plan.json instead of calibrating
    calibration_data: Path | None = None  # folder of the user's images / volumes for calibration
    attention: str = "dense"  # FastSAM3D encoder: "dense" (released) or "sparse" (3D sparse flash attention)
    bundle_operators: bool = False  # the artifact carries the ONNX Runtime operator libraries (operators/)
    extra: dict[str, str] = field(default_factory=dict)


# Graphs with more weights than this keep them in one external ``<graph>.onnx.data`` file (mandatory above
# 2 GB). Below 2 GB it is still worth it: the .onnx itself stays small, so graph passes and shape stamping
# rewrite megabytes instead of re-serialising gigabytes (full MASt3R peaked at 7.9 GiB when the 1.5 GB decoder
# was re-saved inline), and ONNX Runtime / TensorRT read the weights straight from the data file.
EXTERNAL_DATA_BYTES = 256_000_000
