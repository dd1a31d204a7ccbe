"""Match two photos with a MASt3R artifact: encoder once per image (cached), decoder per pair, FastNN-Lite.

    matcher = Matcher(load("mast3r-fp32-512x384", cuda_graph=True))
    result = matcher.match("a.jpg", "b.jpg")        # result.xy1, result.xy2 (network pixels), .conf, ...
    matcher.prefetch("c.jpg", "d.jpg")              # decoded by worker threads while the GPU works
    result = matcher.match("a.jpg", "c.jpg")        # a.jpg is neither decoded nor encoded again

Matching follows the MASt3R README: reciprocal nearest neighbours of the two descriptor maps on a subsample
grid (FastNN-Lite, identical matches to upstream's fast_reciprocal_NNs), then matches within 3 pixels of any
border are dropped. Optionally, matches whose descriptor confidence is below a threshold are dropped too.

On CUDA the matching runs through :class:`~export_engine.families.mast3r.fastnn.CapturedMatcher` (FastNN-Lite
recorded as CUDA graphs, one per map shape: one replay and one host sync a pair instead of some 180 kernel
launches from Python), falling back to :func:`~export_engine.families.mast3r.fastnn.fast_reciprocal_nn` where
the fused kernel cannot run (no triton).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export_engine.core.types import LoadedArtifact
from export_engine.errors import BackendError, UsageError
from export_engine.families.mast3r.images import LoadedImage, load_image
from export_engine.runners import gpu_gate

log = logging.getLogger(__name__)

BORDER = 3  # pixels, as in the MASt3R README's post-filter

Nearest = Callable[[Any, Any], tuple[Any, Any]]  # (desc1, desc2) -> (xy1, xy2), FastNN-Lite's result


@dataclass(frozen=True)
class MatchConfig:
    subsample: int = 8
    border: int = BORDER
    min_desc_conf: float = 0.0  # 0 keeps every reciprocal match
    cache_size: int = 32  # encoded images kept for matching one image against many
    device: str = "cpu"  # where matching runs when the graphs run on the CPU
    recorded: bool = True  # on CUDA, FastNN-Lite as recorded CUDA graphs (CapturedMatcher) where it can run
    workers: int = 2  # threads decoding image files (prefetch, and the second image while the first encodes)


@dataclass
class MatchResult:
    xy1: np.ndarray  # (M, 2) int (x, y) in image 1 as the network saw it
    xy2: np.ndarray
    conf: np.ndarray  # (M,) sqrt(desc_conf1 * desc_conf2)
    xy1_original: np.ndarray  # (M, 2) float, in the original image's pixels
    xy2_original: np.ndarray
    pts3d1: np.ndarray  # (M, 3) matched points of image 1 in camera-1 frame
    pts3d2: np.ndarray  # (M, 3) matched points of image 2, also in camera-1 frame
    image1: LoadedImage
    image2: LoadedImage


def nearest_for(shape: tuple[int, int, int], subsample: int, device: Any, recorded: bool = True) -> Nearest:
    """FastNN-Lite for two maps of ``shape`` (H, W, D) on ``device``: the recorded matcher on CUDA where the fused
    kernel runs (built and recorded here: call it where no other thread records or runs CUDA work), else
    :func:`fast_reciprocal_nn`. Same matches either way."""
    import torch

    from export_engine.families.mast3r.fastnn import CapturedMatcher, fast_reciprocal_nn
    from export_engine.families.mast3r.fastnn import MatchConfig as NNConfig

    device = torch.device(device)
    if recorded and device.type == "cuda":
        try:
            return CapturedMatcher(shape, shape, subsample, NNConfig(kernel="fused"), device)
        except BackendError as err:
            log.info("FastNN-Lite runs unrecorded: %s", err)
    return lambda desc1, desc2: fast_reciprocal_nn(desc1, desc2, subsample=subsample)


class Matcher:
    """Matches image pairs with an artifact. Where the artifact's graphs run on CUDA (ONNX Runtime or engines),
    tokens, decoder outputs and FastNN-Lite stay in GPU memory; otherwise on the CPU.

    Tokens are cached per image (``config.cache_size`` of them, least recently used out), keyed by the file
    (resolved path, size and modification time) for paths and by the object for :class:`LoadedImage` values
    (which the cache holds, so an identity is never reused while cached): nothing is hashed per call.

    Thread safety: one Matcher may be shared by threads. ``match``, ``load`` and ``prefetch`` may be called
    concurrently; image files are decoded by a pool of ``config.workers`` threads outside the lock, and the
    cache, the graphs and the recorded matchers are used under the Matcher's lock, so concurrent pairs run
    one after the other on the device (as the runners would serialise them anyway).
    """

    def __init__(self, artifact: LoadedArtifact, config: MatchConfig | None = None):
        if artifact.manifest["model"] != "mast3r":
            raise UsageError(f"{artifact.path} is a {artifact.manifest['model']} artifact, not mast3r")
        if getattr(artifact, "outputs", None):
            raise UsageError(f"{artifact.path} was loaded to compute only {dict(artifact.outputs)}; Matcher also "
                             "returns the 3-D points: load it without outputs=")  # fmt: skip
        self.artifact = artifact
        self.config = config or MatchConfig()
        _, _, self.height, self.width = artifact.graphs["encoder"]["inputs"][0]["shape"]
        self._cache: OrderedDict[Hashable, tuple[LoadedImage, Any]] = OrderedDict()
        self._nearest: dict[tuple[int, ...], Nearest] = {}
        self._loading: dict[Hashable, Future[LoadedImage]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.RLock()
        self.encoded = 0  # encoder runs so far (tests and logs)
        encoder, decoder = artifact.runners["encoder"], artifact.runners["decoder"]
        self.on_device = all(callable(getattr(r, "run", None)) for r in (encoder, decoder))

    # --- images -------------------------------------------------------------------------------------------

    def _file_key(self, path: str | Path) -> Hashable:
        resolved = Path(path).resolve()
        try:
            stat = resolved.stat()
        except OSError:
            return ("file", str(resolved))  # load_image says what is wrong with it
        return ("file", str(resolved), stat.st_size, stat.st_mtime_ns)

    def prefetch(self, *paths: str | Path) -> None:
        """Start decoding ``paths`` on the worker threads; ``load`` and ``match`` pick the results up."""
        for path in paths:
            key = self._file_key(path)
            with self._lock:
                if key in self._cache or key in self._loading:
                    continue
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max(1, self.config.workers), thread_name_prefix="mast3r-images")
                self._loading[key] = self._pool.submit(load_image, path, self.width, self.height)

    def load(self, path: str | Path) -> LoadedImage:
        """The image at ``path`` as the network sees it (from a prefetch when one was started)."""
        key = self._file_key(path)
        with self._lock:
            cached = self._cache.get(key)
            future = self._loading.pop(key, None)
        if cached is not None:
            return cached[0]
        return future.result() if future is not None else load_image(path, self.width, self.height)

    def close(self) -> None:
        """Stop the decoding threads (pending prefetches are dropped)."""
        with self._lock:
            pool, self._pool = self._pool, None
            self._loading.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    # --- matching -----------------------------------------------------------------------------------------

    def _tokens(self, key: Hashable, image: LoadedImage) -> Any:
        import torch

        if key not in self._cache:
            encoder = self.artifact.runners["encoder"]
            if self.on_device:  # torch CUDA tensors in and out (ort_cuda.CudaGraphRunner, EngineRunner)
                # a host tensor: the runner copies it to its own device, inside the device gate
                tokens = encoder.run({"images": torch.from_numpy(image.tensor)})["tokens"]  # type: ignore[attr-defined]
            else:
                tokens = torch.from_numpy(encoder({"images": image.tensor})["tokens"])
            self._cache[key] = (image, tokens)
            self.encoded += 1
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key][1]

    def _resolve(self, image: str | Path | LoadedImage) -> tuple[Hashable, LoadedImage | None]:
        if isinstance(image, LoadedImage):
            return ("image", id(image)), image
        key = self._file_key(image)
        with self._lock:
            cached = self._cache.get(key)
        return key, (cached[0] if cached is not None else None)

    def match(self, image1: str | Path | LoadedImage, image2: str | Path | LoadedImage) -> MatchResult:
        import torch

        (key1, img1), (key2, img2) = self._resolve(image1), self._resolve(image2)
        if img2 is None:
            self.prefetch(image2)  # type: ignore[arg-type]  # a path: decodes while image 1 is encoded
        img1 = img1 or self.load(image1)  # type: ignore[arg-type]
        with self._lock:
            tokens1 = self._tokens(key1, img1)
        img2 = img2 or self.load(image2)  # type: ignore[arg-type]
        with self._lock:
            feeds = {"feat1": tokens1, "feat2": self._tokens(key2, img2)}
            decoder = self.artifact.runners["decoder"]
            if self.on_device:
                # the decoder's own buffers (copy=False), read before another caller of the runner runs it again
                with decoder.lock:  # type: ignore[attr-defined]
                    out = decoder.run(feeds, copy=False)  # type: ignore[attr-defined]
                    with gpu_gate.shared():  # the matcher's kernels and copies stay out of other threads' captures
                        found = pair_matches(out, self.config, self._nearest_for(out))
                        found = {k: v.cpu().numpy() for k, v in found.items()}
            else:
                numpy_out = decoder({k: v.numpy() for k, v in feeds.items()})
                out = {k: torch.from_numpy(v).to(self.config.device) for k, v in numpy_out.items()}
                found = {k: v.cpu().numpy() for k, v in pair_matches(out, self.config, self._nearest_for(out)).items()}
        xy1, xy2 = found["xy1"], found["xy2"]
        log.info("%s <-> %s: %d matches", img1.source.name, img2.source.name, len(xy1))
        return MatchResult(
            xy1=xy1,
            xy2=xy2,
            conf=found["conf"],
            xy1_original=img1.to_original(xy1),
            xy2_original=img2.to_original(xy2),
            pts3d1=found["pts3d1"],
            pts3d2=found["pts3d2"],
            image1=img1,
            image2=img2,
        )

    def _nearest_for(self, outputs: Mapping[str, Any]) -> Nearest:
        desc1, desc2 = outputs["view1_desc"][0], outputs["view2_desc"][0]
        key = (*desc1.shape, *desc2.shape)
        if key not in self._nearest:
            if desc1.shape != desc2.shape:  # the recorded matcher holds one shape pair; both views share one
                return nearest_for(tuple(desc1.shape), self.config.subsample, desc1.device, recorded=False)
            recorded = self.config.recorded and self.on_device
            self._nearest[key] = nearest_for(tuple(desc1.shape), self.config.subsample, desc1.device, recorded)
        return self._nearest[key]


def pair_matches(outputs: Mapping[str, Any], config: MatchConfig, nearest: Nearest | None = None) -> dict[str, Any]:
    """FastNN-Lite matches of one decoded pair (batch item 0), filtered, on the outputs' device.

    `outputs` are the decoder's tensors (torch, CPU or CUDA); `nearest` the FastNN-Lite to use (default
    :func:`fast_reciprocal_nn`). Returns xy1, xy2 (M, 2) int64 (x, y) network pixels, conf (M,) =
    sqrt(desc_conf1 * desc_conf2), and the matched pts3d1 / pts3d2 (M, 3).
    """
    found = filtered_matches(
        outputs["view1_desc"][0], outputs["view2_desc"][0], outputs["view1_desc_conf"][0],
        outputs["view2_desc_conf"][0], config, nearest,
    )  # fmt: skip
    xy1, xy2 = found["xy1"], found["xy2"]
    found["pts3d1"] = outputs["view1_pts3d"][0][xy1[:, 1], xy1[:, 0]]
    found["pts3d2"] = outputs["view2_pts3d_in_other_view"][0][xy2[:, 1], xy2[:, 0]]
    return found


def filtered_matches(desc1: Any, desc2: Any, conf1: Any, conf2: Any, config: MatchConfig,
                     nearest: Nearest | None = None) -> dict[str, Any]:  # fmt: skip
    """Reciprocal matches of two (H, W, D) descriptor maps with their (H, W) confidences, border- and
    confidence-filtered: xy1, xy2 (M, 2) int64 (x, y) and conf (M,), on the maps' device."""
    found = unfiltered_matches(desc1, desc2, conf1, conf2, config, nearest)
    kept = found.pop("keep").nonzero().squeeze(1)  # one host sync for the count, not one per masked tensor
    return {name: value[kept] for name, value in found.items()}


def unfiltered_matches(desc1: Any, desc2: Any, conf1: Any, conf2: Any, config: MatchConfig,
                       nearest: Nearest | None = None) -> dict[str, Any]:  # fmt: skip
    """The reciprocal matches before filtering, with ``keep`` (M,) bool saying which pass the border and confidence
    filters: xy1, xy2, conf, keep. No host synchronisation beyond the matcher's own (a caller that copies the
    matches to the host anyway filters there, and saves one)."""
    from export_engine.families.mast3r.fastnn import fast_reciprocal_nn, sqrt_rounded

    height, width = int(desc1.shape[0]), int(desc1.shape[1])
    if nearest is None:
        xy1, xy2 = fast_reciprocal_nn(desc1, desc2, subsample=config.subsample)
    else:
        xy1, xy2 = nearest(desc1, desc2)
    keep = _inside(xy1, width, height, config.border) & _inside(xy2, width, height, config.border)
    c1 = conf1[xy1[:, 1], xy1[:, 0]]
    c2 = conf2[xy2[:, 1], xy2[:, 0]]
    keep &= (c1 >= config.min_desc_conf) & (c2 >= config.min_desc_conf)
    return {"xy1": xy1, "xy2": xy2, "conf": sqrt_rounded(c1 * c2), "keep": keep}  # correctly rounded, as numpy's sqrt


def _inside(xy: Any, width: int, height: int, border: int) -> Any:
    x, y = xy[:, 0], xy[:, 1]
    return (x >= border) & (x < width - border) & (y >= border) & (y < height - border)
