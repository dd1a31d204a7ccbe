"""Interactive FastSAM3D segmentation on an artifact: encode a volume once, then click.

    session = SegmentSession(load("fastsam3d-fp32-128"))
    session.set_volume(volume, around=[(40, 60, 60)])    # crop/pad + z-normalise, encoder runs once
    result = session.click((40, 60, 60), positive=True)   # the previous low-res logits are fed back
    result.mask                                           # (D, H, W) bool in the volume's own geometry
    result = session.click((42, 70, 61), positive=False)
    session.undo()                                        # back to the state after the first click

As the released evaluation does it, each click sends only the newest point together with the previous
low-resolution logits (``accumulate=True`` sends every click so far instead, as the Slicer plug-in does).

Where the artifact's runners are device runners (``runner.run(feeds, copy=...)`` taking and returning torch
CUDA tensors: ONNX Runtime CUDA, TensorRT engines), everything stays on the GPU: the volume is copied once in
its own dtype, cropped/padded and z-normalised there, the clicks' masks are thresholded and pasted back into
the volume's geometry there, and nothing waits for the GPU until a caller reads a result
(:attr:`ClickResult.mask`, :meth:`ClickResult.packed`, :attr:`ClickResult.iou_prediction`). Plain numpy runners
(ONNX Runtime CPU) pre-process in numpy (the torch code gives the same values, but numpy is faster on a CPU)
and run the rest in torch on CPU tensors.

Threads: a session holds one volume's state (embedding, clicks, history) behind its own lock, so its methods
may be called from several threads; each call runs whole, in arrival order. Different sessions may share an
artifact's runners from several threads as the runtime's thread contract allows (each runner serialises its
own calls); a :class:`ClickResult` is immutable and may be read from any thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from export_engine.core.types import LoadedArtifact
from export_engine.errors import ModelInputError, UsageError
from export_engine.families.fastsam3d.preprocess import (
    CropWindow,
    check_preprocessed,
    preprocess_tensor,
    preprocess_volume,
)
from export_engine.runners import gpu_gate
from export_engine.runners.host_copy import to_device

log = logging.getLogger(__name__)

_BIT_WEIGHTS: dict[str, Any] = {}  # device -> np.packbits' bit weights as a uint8 tensor there
HISTORY = 32  # clicks a session can undo; each holds the low-res logits and the crop's mask on the device


class ClickResult:
    """One click's outcome. ``crop_mask`` (S^3 bool) and the logits stay where they were computed until read.

    ``mask`` is the (D, H, W) bool mask in the volume's own geometry. What leaves the device is compact: the
    crop window's mask bit-packed (``np.packbits`` of its C-order flattening, S^3 / 8 bytes; outside the window
    the mask is always empty) and its voxel count inside the volume, in one copy, made once per result.
    """

    def __init__(self, crop_mask: Any, iou: Any, low_res: Any, window: CropWindow) -> None:
        self.crop_mask = crop_mask  # torch bool (S, S, S), on the runners' device
        self.window = window
        self._iou = iou  # torch scalar tensor
        self._low_res = low_res  # torch (1, 1, m, m, m) float32
        self._lock = threading.Lock()
        self._packed: np.ndarray | None = None
        self._voxels = 0
        self._iou_value = 0.0

    @property
    def iou_prediction(self) -> float:
        self.fetch()
        return self._iou_value

    @property
    def low_res_logits(self) -> np.ndarray:
        """(1, 1, m, m, m) float32 on the host (the device tensor is :attr:`device_low_res`)."""
        with _gated(self._low_res):
            return np.asarray(self._low_res.cpu().numpy())

    @property
    def device_low_res(self) -> Any:
        return self._low_res

    def device_mask(self) -> Any:
        """The (D, H, W) bool mask as a torch tensor on the runners' device (pasted there, not copied out)."""
        with _gated(self.crop_mask):
            return self.window.paste_back_tensor(self.crop_mask, fill=False)

    def fetch(self) -> None:
        """Copy the packed crop mask and the voxel count to the host (once; later calls return at once)."""
        with self._lock:
            if self._packed is None:
                self._packed, self._voxels, self._iou_value = _fetch(self.crop_mask, self.window, self._iou)

    def packed_crop(self) -> bytes:
        """``np.packbits`` of the crop window's (S, S, S) mask, C order: S^3 / 8 bytes."""
        self.fetch()
        assert self._packed is not None
        return self._packed.tobytes()

    def crop_on_host(self) -> np.ndarray:
        """The crop window's (S, S, S) bool mask on the host."""
        self.fetch()
        size = int(np.prod(self.window.size))
        return np.unpackbits(self._packed, count=size).astype(bool).reshape(self.window.size)  # type: ignore[arg-type]

    @property
    def mask(self) -> np.ndarray:
        """(D, H, W) bool on the host, in the volume's own geometry."""
        return self.window.paste_back(self.crop_on_host(), fill=False)

    @property
    def voxels(self) -> int:
        """Voxels in the mask, inside the volume (the crop's padding does not count)."""
        self.fetch()
        return self._voxels

    def packed(self) -> bytes:
        """``np.packbits(mask.ravel())`` of :attr:`mask`: (D*H*W + 7) // 8 bytes, C order, first voxel in the
        high bit."""
        return np.packbits(self.mask.reshape(-1)).tobytes()


@dataclass
class _State:
    clicks: list[tuple[tuple[float, float, float], int]]
    result: ClickResult


@dataclass
class SegmentSession:
    """One volume's interactive segmentation (see the module docstring for devices and threads)."""

    artifact: LoadedArtifact
    accumulate: bool = False
    history: int = HISTORY
    window: CropWindow | None = field(default=None, init=False)
    embedding: Any = field(default=None, init=False)  # torch tensor on the runners' device
    clicks: list[tuple[tuple[float, float, float], int]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.artifact.manifest["model"] != "fastsam3d":
            raise UsageError(f"{self.artifact.path} is a {self.artifact.manifest['model']} artifact, not fastsam3d")
        graphs = self.artifact.graphs
        self.size = int(graphs["encoder"]["inputs"][0]["shape"][-1])
        self.mask_size = int(graphs["prompt_decoder"]["inputs"][3]["shape"][-1])
        self.encoder = self.artifact.runners["encoder"]
        self.decoder = self.artifact.runners["prompt_decoder"]
        self.on_device = all(callable(getattr(r, "run", None)) for r in (self.encoder, self.decoder))
        self.device = _runner_device(self.encoder) if self.on_device else "cpu"
        self._lock = threading.RLock()
        self._states: list[_State] = []
        self._ones: Any = None  # has_mask_input, made once on the device (set_volume)

    # --- the volume ------------------------------------------------------------------------------------

    def set_volume(self, volume: Any, around: Sequence[Sequence[float]] | None = None) -> None:
        """Crop/pad (centred on the clicks ``around`` when given, else on the volume), normalise, encode.

        ``volume`` is a numpy array or a torch tensor (D, H, W); it is copied to the device once, in its own
        dtype. Clicks and history start afresh. On an error the session keeps its previous volume.
        """
        import torch

        tensor = volume if isinstance(volume, torch.Tensor) else torch.from_numpy(_real_array(volume))
        points = None if around is None else np.asarray(around, dtype=np.float64).reshape(-1, 3)
        if points is not None:
            _check_inside(points, tuple(tensor.shape))
        with self._lock, self._device_work():
            if self.on_device:
                prepared = preprocess_tensor(to_device(tensor, self.device), self.size, points=points)
                embedding = self._run(self.encoder, {"image": prepared.image})["image_embedding"]
                check_preprocessed(prepared)  # the one host sync, while the encoder runs
                window = prepared.window
            else:  # numpy's pre-processing: the same values, and faster than torch's CPU kernels here
                on_host = preprocess_volume(tensor.cpu().numpy(), self.size, points=points)
                embedding = self._run(self.encoder, {"image": torch.from_numpy(on_host.image)})["image_embedding"]
                window = on_host.window
            self.window, self.embedding = window, embedding
            self.clicks, self._states = [], []
            if self._ones is None:
                self._ones = torch.ones((1,), dtype=torch.float32, device=self.device)
        log.info("volume %s encoded (crop start %s)", tuple(tensor.shape), window.start)

    # --- clicks ----------------------------------------------------------------------------------------

    def click(self, point: Sequence[float], positive: bool = True) -> ClickResult:
        """Add a click at voxel (d, h, w) of the volume; the mask's computation is queued, not awaited."""
        import torch

        with self._lock, self._device_work():
            if self.window is None or self.embedding is None:
                raise UsageError("call set_volume() before click()")
            _check_inside(np.asarray(point, dtype=np.float64).reshape(1, 3), self.window.original_shape)
            crop_point = self.window.points_to_crop(np.asarray(point, dtype=np.float32))
            if np.any(crop_point < 0) or np.any(crop_point > self.size - 1):
                raise ModelInputError(
                    f"click {tuple(point)} lies outside the {self.size}^3 crop starting at {self.window.start}; "
                    f"start a new session around it (set_volume(..., around=[...]))"
                )
            clicks = [*self.clicks, ((float(crop_point[0]), float(crop_point[1]), float(crop_point[2])), int(positive))]
            used = clicks if self.accumulate else clicks[-1:]
            previous = self._states[-1].result.device_low_res if self._states else None
            if previous is None:  # the first click feeds zeros, as upstream's loop does
                previous = torch.zeros((1, 1, *(self.mask_size,) * 3), dtype=torch.float32, device=self.device)
            feed = {
                "image_embedding": self.embedding,
                "point_coords": self._upload([[c for c, _ in used]], torch.float32),
                "point_labels": self._upload([[label for _, label in used]], torch.int64),
                "mask_input": previous,
                "has_mask_input": self._ones,
            }
            out = self._run(self.decoder, feed)
            result = ClickResult(out["masks_upscaled"][0, 0] > 0, out["iou_predictions"][0, 0],
                                 out["low_res_masks"], self.window)  # fmt: skip
            self.clicks = clicks
            self._states = [*self._states, _State(clicks, result)][-self.history :]
            return result

    def undo(self) -> ClickResult | None:
        """Drop the newest click: the session returns to the state after the click before (None: no clicks)."""
        with self._lock:
            if not self.clicks:
                raise UsageError("nothing to undo: the session has no clicks")
            if len(self._states) < 2 and len(self.clicks) > 1:
                raise UsageError(f"cannot undo further than {self.history} clicks back; reset() instead")
            self._states = self._states[:-1]
            self.clicks = self._states[-1].clicks if self._states else []
            return self._states[-1].result if self._states else None

    def reset(self) -> None:
        """Forget every click; the volume stays encoded."""
        with self._lock:
            self.clicks, self._states = [], []

    @property
    def last(self) -> ClickResult | None:
        with self._lock:
            return self._states[-1].result if self._states else None

    def device_bytes(self) -> int:
        """Device (or host, on the CPU) memory this session holds: embedding, logits and masks of its history."""
        with self._lock:
            held = [self.embedding] if self.embedding is not None else []
            for state in self._states:
                held += [state.result.crop_mask, state.result.device_low_res]
            return sum(int(t.numel() * t.element_size()) for t in held)

    def _device_work(self) -> AbstractContextManager[None]:
        """GPU work of this session outside the runners stays out of other threads' CUDA-graph captures."""
        if not str(self.device).startswith("cuda"):
            return nullcontext()
        return gpu_gate.shared(_device_index(self.device))

    def _upload(self, values: list, dtype: Any) -> Any:
        """A small host list as a tensor on the device; to a GPU from pinned memory without a host wait (torch's
        pinned-memory cache keeps the block until the copy is done)."""
        import torch

        host = torch.tensor(values, dtype=dtype)
        if not str(self.device).startswith("cuda"):
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def _run(self, runner: Any, feed: dict[str, Any]) -> dict[str, Any]:
        if self.on_device:
            return dict(runner.run(feed, copy=True))
        import torch

        outputs = runner({name: t.numpy() for name, t in feed.items()})
        return {name: torch.from_numpy(np.asarray(value)) for name, value in outputs.items()}


def _fetch(mask: Any, window: CropWindow, iou: Any) -> tuple[np.ndarray, int, float]:
    """np.packbits of a torch bool (S, S, S) tensor's C-order flattening, its count of voxels inside the volume
    and the IoU prediction, computed where the tensors live and copied to the host together (one transfer, one
    wait)."""
    _, inside = window.overlap()
    if mask.device.type == "cpu":  # numpy packs and counts faster than torch's CPU kernels
        host = mask.numpy()
        return np.packbits(host.reshape(-1)), int(np.count_nonzero(host[inside])), float(iou)
    with _gated(mask):  # allocations, a first upload and a host wait: never inside another thread's capture
        return _fetch_packed(mask, inside, iou)


def _fetch_packed(mask: Any, inside: tuple[slice, ...], iou: Any) -> tuple[np.ndarray, int, float]:
    """:func:`_fetch` in torch, where the tensors live (any device)."""
    import torch

    count = mask[inside].sum(dtype=torch.int64).reshape(1)
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = _BIT_WEIGHTS.get(str(flat.device))
    if weights is None:  # made once per device: no host-to-device copy per click
        weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
        _BIT_WEIGHTS[str(flat.device)] = weights
    packed = (flat.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)
    score = iou.reshape(1).to(torch.float32)
    both = torch.cat([packed, count.view(torch.uint8), score.view(torch.uint8)]).cpu().numpy()
    return both[:-12], int(both[-12:-4].view(np.int64)[0]), float(both[-4:].view(np.float32)[0])


def _gated(tensor: Any) -> AbstractContextManager[None]:
    """The device gate's shared hold for GPU work on ``tensor``'s device (nothing for a CPU tensor)."""
    device = getattr(tensor, "device", None)
    if getattr(device, "type", "cpu") != "cuda":
        return nullcontext()
    return gpu_gate.shared(_device_index(device))


def _device_index(device: Any) -> int:
    """The CUDA device number of a torch device or its name ("cuda" alone: the current device, 0 here)."""
    if isinstance(device, str):  # (a str has an .index method: read the name, never the attribute)
        return int(device.split(":", 1)[1]) if ":" in device else 0
    index = getattr(device, "index", None)
    return int(index or 0)


def _runner_device(runner: Any) -> str:
    """The torch device a device runner takes: its ``device`` if it names one, else ``cuda:<device_id>``."""
    if getattr(runner, "device", None) is not None:
        return str(runner.device)
    config = getattr(runner, "config", None)
    device_id = getattr(config, "device_id", getattr(runner, "device_id", 0))
    return f"cuda:{int(device_id)}"


def _real_array(volume: Any) -> np.ndarray:
    array = np.asarray(volume)
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ModelInputError(f"FastSAM3D volume must be real numbers, got dtype {array.dtype}")
    if array.dtype.kind == "u" and array.dtype.itemsize > 1:  # torch's wide unsigned types lack comparisons
        array = array.astype(np.int64 if array.dtype.itemsize >= 4 else np.int32)
    elif not array.dtype.isnative:  # big-endian NIfTI data: torch takes native byte order only
        array = array.astype(array.dtype.newbyteorder("="))
    if array.flags.c_contiguous or array.flags.f_contiguous:
        return array  # a Fortran-ordered NIfTI volume is copied to the device as it lies, no transposition
    return np.ascontiguousarray(array)


def _check_inside(points: np.ndarray, shape: Sequence[int]) -> None:
    upper = np.asarray(shape[-3:], dtype=np.float64) - 1
    if not np.isfinite(points).all() or np.any(points < 0) or np.any(points > upper):
        raise ModelInputError(
            f"click(s) {points.tolist()} outside the volume of shape {tuple(shape[-3:])}; give (d, h, w) voxel indices"
        )
