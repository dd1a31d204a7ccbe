"""ONNX Runtime on the CPU as a Polygraphy runner: the export gates' ONNX side and the CPU runtime."""

from __future__ import annotations

from pathlib import Path

from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx


def onnxrt_runner(path: Path, name: str = "onnxruntime") -> OnnxrtRunner:
    return OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"]), name=name)
