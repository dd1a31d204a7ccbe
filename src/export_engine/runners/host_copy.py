"""Copies of large host tensors to a GPU through pinned staging buffers.

A copy from ordinary (pageable) host memory makes the CUDA driver stage the bytes itself, one thread copying
them into its own small pinned buffers: 14.3-14.7 GB/s on an H100 machine (16 and 32 MiB volumes), where the same
bytes go up at 52-54 GB/s from pinned memory. :func:`to_device` does the staging here instead: the bytes are split
into chunks; each chunk is copied into one of two pinned buffers by torch's multi-threaded CPU copy while the
previous chunk's DMA runs; a buffer is reused only after its DMA has finished (a CUDA event). Measured there with
4 CPU threads: 20.9-25.5 GB/s with chunks of 8 MiB (the default), 18.5-23.6 with 4 MiB, 14.6-19.9 with 1-2 MiB.
The result is the same bytes in the same layout as ``tensor.to(device)`` (a Fortran-ordered array stays so).

Small tensors, tensors already pinned, CPU targets and layouts that are not dense go the plain way. The staging
buffers are made once per device (two chunks, 16 MiB of pinned memory by default) and kept; one copy at a time
uses them (a lock per device), which costs nothing: two copies at once would share the same link anyway.
A caller that shares the GPU with CUDA-graph captures holds the device gate's shared hold around the call, as
for any other GPU work (see :mod:`export_engine.runners.gpu_gate`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20  # a staging buffer; two of them a device
MIN_BYTES = 1 << 20  # smaller copies go the plain way (the staging's own overhead would dominate)


class _Stager:
    """Two pinned buffers of ``chunk`` bytes and the events of their last DMA, for one device."""

    def __init__(self, chunk: int) -> None:
        import torch

        self.chunk = chunk
        self.buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.events = [torch.cuda.Event(), torch.cuda.Event()]
        self.lock = threading.Lock()


_STAGERS: dict[tuple[int, int], _Stager | None] = {}  # (device index, chunk) -> stager; None: pinning failed
_STAGERS_LOCK = threading.Lock()


def to_device(tensor: Any, device: Any, chunk_bytes: int = CHUNK_BYTES) -> Any:
    """``tensor.to(device, non_blocking=True)``, staged through pinned memory when that is faster (see the module
    docstring). The copy is queued on the device's current stream; the call returns once the last chunk is queued
    (the source may then be changed: every byte has been copied out of it)."""
    import torch

    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    nbytes = tensor.numel() * tensor.element_size()
    if target.type != "cuda" or tensor.device.type != "cpu" or nbytes < MIN_BYTES or tensor.is_pinned():
        return tensor.to(target, non_blocking=True)
    order = _dense_order(tensor)
    if order is None:  # overlapping or gapped strides: torch makes it contiguous on the way
        return tensor.to(target, non_blocking=True)
    stager = _stager(target, max(1 << 16, int(chunk_bytes)))
    if stager is None:
        return tensor.to(target, non_blocking=True)
    source = tensor.permute(order)  # contiguous: the bytes as they lie in memory
    out = torch.empty(source.shape, dtype=tensor.dtype, device=target)
    src, dst = _bytes(source), _bytes(out)
    stream = torch.cuda.current_stream(target)
    with stager.lock:
        for i, start in enumerate(range(0, nbytes, stager.chunk)):
            k = i % 2
            stager.events[k].synchronize()  # the buffer's previous DMA has finished (at once if none was made)
            n = min(stager.chunk, nbytes - start)
            staged = stager.buffers[k][:n]
            staged.copy_(src[start : start + n])
            with torch.cuda.stream(stream):
                dst[start : start + n].copy_(staged, non_blocking=True)
            stager.events[k].record(stream)
    inverse = [0] * len(order)
    for position, axis in enumerate(order):
        inverse[axis] = position
    return out.permute(inverse)


def _dense_order(tensor: Any) -> list[int] | None:
    """The axes from the slowest to the fastest in memory when ``tensor`` covers its storage span without gaps or
    overlaps (C order: 0, 1, 2; Fortran order: 2, 1, 0), else None."""
    order = sorted(range(tensor.dim()), key=lambda axis: (-tensor.stride(axis), -tensor.size(axis)))
    return order if tensor.permute(order).is_contiguous() else None


def _bytes(contiguous: Any) -> Any:
    """A flat uint8 view of a contiguous tensor's bytes."""
    import torch

    flat = contiguous.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _stager(device: Any, chunk: int) -> _Stager | None:
    key = (int(device.index), chunk)
    with _STAGERS_LOCK:
        if key not in _STAGERS:
            try:
                _STAGERS[key] = _Stager(chunk)
            except RuntimeError as err:  # pinned memory refused (limits of the container, of the driver)
                log.warning("pinned staging buffers unavailable on %s (%s); host copies go the plain way", device, err)
                _STAGERS[key] = None
        return _STAGERS[key]
