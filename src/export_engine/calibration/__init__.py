"""Representative inputs (built-in structured synthetic sets) and, later, activation statistics."""

from typing import Any


def lean_session_options() -> Any:
    """ONNX Runtime options for calibration sessions, which expose thousands of intermediate tensors.

    The CPU arena keeps every freed block for reuse; with a statistic attached to every tensor of the full
    MASt3R encoder that grew the process to 16 GiB. Without the arena (and the memory-pattern pre-allocation)
    memory is returned as soon as a tensor dies.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    options.log_severity_level = 3
    return options
