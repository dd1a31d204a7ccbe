"""Which image pairs to match: a strategy over the collection in name order, or a pairs file.

``complete``          every pair
``swin:K``            each image with its K successors in name order (``swin:K:cyclic`` wraps around)
``logwin:K``          each image with the ones 1, 2, 4, ..., 2**(K-1) places later (``logwin:K:cyclic``)
``retrieval:K``       each image with its K nearest by a global descriptor (pooled encoder tokens, cosine)
``FILE``              a pairs text as hloc and COLMAP write it: two image names a line (``#`` comments)

A pair is (i, j) with i < j, indices into the name-sorted collection: (a, b) and (b, a) are one pair, and a
pair of an image with itself is dropped. Pairs come back sorted, so one strategy gives one order everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export_engine.errors import UsageError

Pair = tuple[int, int]
KINDS = ("complete", "swin:K", "swin:K:cyclic", "logwin:K", "logwin:K:cyclic", "retrieval:K", "FILE")


@dataclass(frozen=True)
class PairStrategy:
    kind: str  # complete | swin | logwin | retrieval | file
    k: int = 0
    cyclic: bool = False
    path: Path | None = None

    @property
    def needs_descriptors(self) -> bool:
        return self.kind == "retrieval"

    def __str__(self) -> str:
        if self.kind == "file":
            return str(self.path)
        return ":".join([self.kind, *([str(self.k)] if self.k else []), *(["cyclic"] if self.cyclic else [])])


def parse_strategy(text: str) -> PairStrategy:
    """``--pairs`` text -> strategy; an unknown one lists the valid forms."""
    parts = text.split(":")
    if parts[0] == "complete" and len(parts) == 1:
        return PairStrategy("complete")
    if parts[0] in ("swin", "logwin", "retrieval") and len(parts) in (2, 3):
        cyclic = len(parts) == 3
        if cyclic and (parts[2] != "cyclic" or parts[0] == "retrieval"):
            raise UsageError(f"--pairs {text!r}: the optional third part is 'cyclic' (swin and logwin only)")
        if not parts[1].isdigit() or int(parts[1]) < 1:
            raise UsageError(f"--pairs {text!r}: K must be a positive integer, e.g. {parts[0]}:10")
        return PairStrategy(parts[0], int(parts[1]), cyclic)
    if Path(text).is_file():
        return PairStrategy("file", path=Path(text))
    raise UsageError(f"--pairs {text!r}: not a strategy nor a pairs file; choose one of {', '.join(KINDS)}")


def select_pairs(strategy: PairStrategy, names: Sequence[str], descriptors: np.ndarray | None = None) -> list[Pair]:
    """The sorted, de-duplicated pairs of ``strategy`` over ``names`` (name-sorted). ``descriptors``: (n, D)
    global descriptors, for ``retrieval`` only."""
    n = len(names)
    if strategy.kind == "complete":
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    if strategy.kind in ("swin", "logwin"):
        offsets = range(1, strategy.k + 1) if strategy.kind == "swin" else [2**e for e in range(strategy.k)]
        return _window(n, offsets, strategy.cyclic)
    if strategy.kind == "retrieval":
        if descriptors is None or len(descriptors) != n:
            raise UsageError("retrieval pairs need one global descriptor per image")
        return nearest_pairs(descriptors, strategy.k)
    assert strategy.path is not None
    return read_pairs_file(strategy.path, names)


def canonical(pairs: Iterable[Pair]) -> list[Pair]:
    """(i, j) with i < j, self pairs dropped, duplicates removed, sorted."""
    return sorted({(min(i, j), max(i, j)) for i, j in pairs if i != j})


def _window(n: int, offsets: Iterable[int], cyclic: bool) -> list[Pair]:
    pairs = []
    for i in range(n):
        for d in offsets:
            if d >= n:
                continue
            if i + d < n:
                pairs.append((i, i + d))
            elif cyclic:
                pairs.append((i, (i + d) % n))
    return canonical(pairs)


def nearest_pairs(descriptors: np.ndarray, k: int) -> list[Pair]:
    """Each image with its ``k`` most similar others (cosine of the descriptors; ties to the lower index)."""
    desc = np.asarray(descriptors, dtype=np.float64)
    desc = desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
    similarity = desc @ desc.T
    np.fill_diagonal(similarity, -np.inf)
    k = min(k, len(desc) - 1)
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return canonical((i, int(j)) for i in range(len(desc)) for j in order[i])


def read_pairs_file(path: Path, names: Sequence[str]) -> list[Pair]:
    """Pairs of a text file, two names a line; every name must be in the collection (checked before any work)."""
    index = {name: i for i, name in enumerate(names)}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"pairs file {path} could not be read ({err})") from err
    pairs, missing = [], []
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2:
            raise UsageError(f"pairs file {path}:{number}: expected two image names, got {len(words)} field(s)")
        unknown = [w for w in words if w not in index]
        missing += [f"{w} (line {number})" for w in unknown]
        if not unknown:
            pairs.append((index[words[0]], index[words[1]]))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UsageError(f"pairs file {path} names images that are not in the collection: {shown}")
    if not canonical(pairs):
        raise UsageError(f"pairs file {path} holds no pair of two different images")
    return canonical(pairs)
