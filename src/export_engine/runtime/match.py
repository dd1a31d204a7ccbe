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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export_engine.errors import UsageError
from export_engine.runtime.images import LoadedImage, load_image
from export_engine.runtime.session import ArtifactSession

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
    def __init__(self, artifact: ArtifactSession, config: MatchConfig | None = None):
        if artifact.manifest["model"] != "mast3r":
            raise UsageError(f"{artifact.path} is a {artifact.manifest['model']} artifact, not mast3r")
        self.artifact = artifact
        self.config = config or MatchConfig()
        _, _, self.height, self.width = artifact.graphs["encoder"]["inputs"][0]["shape"]
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.encoded = 0  # encoder runs so far (tests and logs)

    def _tokens(self, image: LoadedImage) -> np.ndarray:
        key = hashlib.sha256(image.tensor.tobytes()).hexdigest()
        if key not in self._cache:
            self._cache[key] = self.artifact.runners["encoder"]({"images": image.tensor})["tokens"]
            self.encoded += 1
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def load(self, path: str | Path) -> LoadedImage:
        return load_image(path, self.width, self.height)

    def match(self, image1: str | Path | LoadedImage, image2: str | Path | LoadedImage) -> MatchResult:
        import torch

        from export_engine.runtime.fastnn import fast_reciprocal_nn

        img1 = image1 if isinstance(image1, LoadedImage) else self.load(image1)
        img2 = image2 if isinstance(image2, LoadedImage) else self.load(image2)
        out = self.artifact.runners["decoder"]({"feat1": self._tokens(img1), "feat2": self._tokens(img2)})
        device = torch.device(self.config.device)
        desc1 = torch.from_numpy(out["view1_desc"][0]).to(device)
        desc2 = torch.from_numpy(out["view2_desc"][0]).to(device)
        xy1_t, xy2_t = fast_reciprocal_nn(desc1, desc2, subsample=self.config.subsample)
        xy1, xy2 = xy1_t.cpu().numpy(), xy2_t.cpu().numpy()
        keep = _inside(xy1, self.width, self.height, self.config.border) & _inside(
            xy2, self.width, self.height, self.config.border
        )
        c1 = out["view1_desc_conf"][0][xy1[:, 1], xy1[:, 0]]
        c2 = out["view2_desc_conf"][0][xy2[:, 1], xy2[:, 0]]
        keep &= (c1 >= self.config.min_desc_conf) & (c2 >= self.config.min_desc_conf)
        xy1, xy2, c1, c2 = xy1[keep], xy2[keep], c1[keep], c2[keep]
        log.info("%s <-> %s: %d matches", img1.source.name, img2.source.name, len(xy1))
        return MatchResult(
            xy1=xy1,
            xy2=xy2,
            conf=np.sqrt(c1 * c2).astype(np.float32),
            xy1_original=img1.to_original(xy1),
            xy2_original=img2.to_original(xy2),
            pts3d1=out["view1_pts3d"][0][xy1[:, 1], xy1[:, 0]],
            pts3d2=out["view2_pts3d_in_other_view"][0][xy2[:, 1], xy2[:, 0]],
            image1=img1,
            image2=img2,
        )


def _inside(xy: np.ndarray, width: int, height: int, border: int) -> np.ndarray:
    x, y = xy[:, 0], xy[:, 1]
    return (x >= border) & (x < width - border) & (y >= border) & (y < height - border)
