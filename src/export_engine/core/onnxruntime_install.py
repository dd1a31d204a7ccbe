"""Which ONNX Runtime distribution is installed: exactly one of the CPU and GPU builds should be.

``onnxruntime`` and ``onnxruntime-gpu`` install the same module (``onnxruntime``) and overwrite each other's
files, so having both is a broken install whichever was installed last; having none leaves export-engine
unable to run any graph.
"""

from __future__ import annotations

from importlib import metadata

DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
INSTALL = "pip install 'export-engine[cpu]' (or 'export-engine[gpu]' on an NVIDIA GPU machine)"


def installed() -> dict[str, str]:
    """``{distribution: version}`` of the ONNX Runtime builds pip has installed."""
    found = {}
    for name in DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def problem() -> str | None:
    """One line saying what is wrong with the ONNX Runtime install and how to fix it, or None."""
    found = installed()
    if not found:
        return f"ONNX Runtime is not installed: {INSTALL}"
    if len(found) > 1:
        both = " and ".join(f"{k} {v}" for k, v in found.items())
        return (f"both {both} are installed; they share the module 'onnxruntime' and overwrite each other's "
                "files: pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'export-engine[cpu]' or "
                "'export-engine[gpu]'")  # fmt: skip
    return None
