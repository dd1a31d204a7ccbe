"""Match two photos with a MASt3R artifact: encoder once per image (cached), decoder per pair, FastNN-Lite.

    matcher = Matcher(load("mast3r-fp32-512x384"))
    result = matcher.match("a.jpg", "b.jpg")        # result.xy1, result.xy2 (network pixels), .conf, ...
    result = matcher.match("a.jpg", "c.jpg")        # a.jpg is not encoded again

Matching follows the MASt3R README: reciprocal nearest neighbours of the two descriptor maps on a subsample
grid (FastNN-Lite, identical matches to upstream's fast_reciprocal_NNs), then matches within 3 pixels of any
border are dropped. Optionally, matches whose descriptor confidence is below a threshold are dropped too.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export_engine.core.types import LoadedArtifact
from export_engine.errors import UsageError
from export_engine.families.mast3r.images import LoadedImage, load_image

log = logging.getLogger(__name__)

BORDER = 3  # pixels, as in the MASt3R README's post-filter


@dataclass(frozen=True)
class MatchConfig:
    subsample: int = 8
    border: int = BORDER
    min_desc_conf: float = 0.0  # 0 keeps every reciprocal match
    cache_size: int = 32  # encoded images kept for matching one image against many
    device: str = "cpu"


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


class Matcher:
    """Matches image pairs with an artifact. Where the artifact's graphs run on ONNX Runtime CUDA, tokens,
    decoder outputs and FastNN-Lite stay in GPU memory (:func:`pair_matches`); otherwise on the CPU."""

    def __init__(self, artifact: LoadedArtifact, config: MatchConfig | None = None):
        if artifact.manifest["model"] != "mast3r":
            raise UsageError(f"{artifact.path} is a {artifact.manifest['model']} artifact, not mast3r")
        self.artifact = artifact
        self.config = config or MatchConfig()
        _, _, self.height, self.width = artifact.graphs["encoder"]["inputs"][0]["shape"]
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self.encoded = 0  # encoder runs so far (tests and logs)
        encoder, decoder = artifact.runners["encoder"], artifact.runners["decoder"]
        self.on_device = all(callable(getattr(r, "run", None)) for r in (encoder, decoder))

    def _tokens(self, image: LoadedImage) -> Any:
        import torch

        key = hashlib.sha256(image.tensor.tobytes()).hexdigest()
        if key not in self._cache:
            encoder = self.artifact.runners["encoder"]
            if self.on_device:  # torch CUDA tensors in and out (ort_cuda.CudaGraphRunner)
                tokens = encoder.run({"images": torch.from_numpy(image.tensor).cuda()})["tokens"]  # type: ignore[attr-defined]
            else:
                tokens = torch.from_numpy(encoder({"images": image.tensor})["tokens"])
            self._cache[key] = tokens
            self.encoded += 1
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def load(self, path: str | Path) -> LoadedImage:
        return load_image(path, self.width, self.height)

    def match(self, image1: str | Path | LoadedImage, image2: str | Path | LoadedImage) -> MatchResult:
        import torch

        img1 = image1 if isinstance(image1, LoadedImage) else self.load(image1)
        img2 = image2 if isinstance(image2, LoadedImage) else self.load(image2)
        feeds = {"feat1": self._tokens(img1), "feat2": self._tokens(img2)}
        decoder = self.artifact.runners["decoder"]
        if self.on_device:
            out = decoder.run(feeds, copy=False)  # type: ignore[attr-defined]
        else:
            numpy_out = decoder({k: v.numpy() for k, v in feeds.items()})
            out = {k: torch.from_numpy(v).to(self.config.device) for k, v in numpy_out.items()}
        found = {k: v.cpu().numpy() for k, v in pair_matches(out, self.config).items()}
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


def pair_matches(outputs: Mapping[str, Any], config: MatchConfig) -> dict[str, Any]:
    """FastNN-Lite matches of one decoded pair (batch item 0), filtered, on the outputs' device.

    `outputs` are the decoder's tensors (torch, CPU or CUDA). Returns xy1, xy2 (M, 2) int64 (x, y) network
    pixels, conf (M,) = sqrt(desc_conf1 * desc_conf2), and the matched pts3d1 / pts3d2 (M, 3).
    """

    from export_engine.families.mast3r.fastnn import fast_reciprocal_nn, sqrt_rounded

    desc1, desc2 = outputs["view1_desc"][0], outputs["view2_desc"][0]
    height, width = int(desc1.shape[0]), int(desc1.shape[1])
    xy1, xy2 = fast_reciprocal_nn(desc1, desc2, subsample=config.subsample)
    keep = _inside(xy1, width, height, config.border) & _inside(xy2, width, height, config.border)
    c1 = outputs["view1_desc_conf"][0][xy1[:, 1], xy1[:, 0]]
    c2 = outputs["view2_desc_conf"][0][xy2[:, 1], xy2[:, 0]]
    keep &= (c1 >= config.min_desc_conf) & (c2 >= config.min_desc_conf)
    xy1, xy2, c1, c2 = xy1[keep], xy2[keep], c1[keep], c2[keep]
    return {
        "xy1": xy1,
        "xy2": xy2,
        "conf": sqrt_rounded(c1 * c2),  # correctly rounded, as numpy's (and upstream's) sqrt
        "pts3d1": outputs["view1_pts3d"][0][xy1[:, 1], xy1[:, 0]],
        "pts3d2": outputs["view2_pts3d_in_other_view"][0][xy2[:, 1], xy2[:, 0]],
    }


def _inside(xy: Any, width: int, height: int, border: int) -> Any:
    x, y = xy[:, 0], xy[:, 1]
    return (x >= border) & (x < width - border) & (y >= border) & (y < height - border)
