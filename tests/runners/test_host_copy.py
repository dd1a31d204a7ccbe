"""Staged copies to the GPU: the same bytes and layout as ``tensor.to(device)`` for every dense layout, chunk
boundary and dtype; the plain way where staging does not apply; several threads at once."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from export_engine.runners import host_copy
from export_engine.runners.host_copy import _dense_order, to_device

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (torch built with CUDA)")


@pytest.mark.parametrize(
    ("make", "order"),
    [
        (lambda: torch.zeros(4, 5, 6), [0, 1, 2]),
        (lambda: torch.from_numpy(np.asfortranarray(np.zeros((4, 5, 6), np.float32))), [2, 1, 0]),
        (lambda: torch.zeros(4, 5, 6).permute(1, 2, 0), [2, 0, 1]),
        (lambda: torch.zeros(4, 5, 6)[:, :, :3], None),  # gaps between rows
        (lambda: torch.zeros(4, 1).expand(4, 6), None),  # overlapping (stride 0)
    ],
)
def test_dense_order_finds_the_memory_order_or_refuses(make: object, order: list[int] | None) -> None:
    assert _dense_order(make()) == order  # type: ignore[operator]


def test_a_cpu_target_is_a_plain_copy() -> None:
    volume = torch.arange(2 << 20, dtype=torch.float32).reshape(128, 128, 128)
    out = to_device(volume, "cpu")
    assert out.device.type == "cpu" and torch.equal(out, volume)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("what", "make"),
    [
        (
            "float32 C order, 16 MiB",
            lambda: torch.from_numpy(np.random.default_rng(0).random((160, 160, 160), np.float32)),
        ),
        (
            "int16 Fortran order",
            lambda: torch.from_numpy(
                np.asfortranarray(np.random.default_rng(1).integers(-1024, 3000, (131, 257, 67), dtype=np.int16))
            ),
        ),
        ("uint8, a last chunk of odd size", lambda: torch.randint(0, 255, (3 * (1 << 20) + 7,), dtype=torch.uint8)),
        ("bool", lambda: torch.rand(128, 128, 129) > 0.5),
        ("float64 permuted", lambda: torch.rand(64, 80, 96, dtype=torch.float64).permute(2, 0, 1)),
        ("float32 with gaps (plain way)", lambda: torch.rand(160, 160, 200)[:, :, :160]),
    ],
)
def test_staged_copy_gives_the_same_tensor_as_a_plain_one(what: str, make: object) -> None:
    source = make()  # type: ignore[operator]
    out = to_device(source, "cuda", chunk_bytes=1 << 20)
    torch.cuda.synchronize()
    assert out.device.type == "cuda" and out.dtype == source.dtype and out.shape == source.shape, what
    assert out.stride() == source.to("cuda").stride(), what
    assert torch.equal(out.cpu(), source), what


@needs_gpu
@pytest.mark.gpu
def test_the_source_may_change_once_the_call_returns_and_threads_may_share_the_buffers() -> None:
    results: dict[int, bool] = {}

    def worker(seed: int) -> None:
        ok = True
        for round_ in range(5):
            source = torch.full((96, 96, 96), float(seed * 10 + round_))
            out = to_device(source, "cuda:0", chunk_bytes=1 << 20)
            source.fill_(-1.0)  # every byte was copied out before the call returned
            ok &= bool((out == seed * 10 + round_).all().item())
        results[seed] = ok

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == {0: True, 1: True, 2: True, 3: True}
    assert (0, 1 << 20) in host_copy._STAGERS
