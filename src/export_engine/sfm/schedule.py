"""The plan of a collection run: pairs in batches, and which image's tokens sit in which slot of a fixed pool.

Tokens are kept in ``capacity`` slots (what the memory budget holds). The pairs are ordered so that reuse holds:
with every image fitting, in name order; otherwise in tiles of ``capacity // 2`` images by ``capacity // 2``
images, so a tile's images fit at once. Before each batch of pairs, the images it needs that are not resident
are encoded into free slots or into the slots of the images whose next use is furthest away (Belady's rule,
optimal when the whole sequence is known, as it is here). An evicted image needed later is encoded again; the
pool never grows, so the memory it takes is fixed before the run starts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from export_engine.errors import UsageError

Pair = tuple[int, int]


@dataclass(frozen=True)
class Step:
    """Encode ``encode`` (image, slot) first, then decode ``pairs`` reading tokens from ``slots``."""

    encode: tuple[tuple[int, int], ...]
    pairs: tuple[Pair, ...]
    slots: tuple[Pair, ...]


def order_for_reuse(pairs: Sequence[Pair], n_images: int, capacity: int) -> list[Pair]:
    """``pairs`` in name order when all images fit, else in tiles whose images fit together."""
    if capacity >= n_images:
        return sorted(pairs)
    tile = max(1, capacity // 2)
    return sorted(pairs, key=lambda p: (p[0] // tile, p[1] // tile, p[0], p[1]))


def plan(pairs: Sequence[Pair], capacity: int, batch: int, resident: Mapping[int, int] | None = None,
         encode_batch: int = 1) -> list[Step]:  # fmt: skip
    """Batches of ``batch`` pairs (in the given order) with the encodes each needs first.

    ``resident``: image -> slot already holding its tokens (e.g. from the retrieval pass). ``capacity`` must hold
    the images of every batch at once (at most ``2 * batch``). Encodes come in whole ``encode_batch`` runs where
    free slots allow: a step that must encode also encodes the next images later steps need (into free slots
    only, never evicting), so the encoder does not run a padded batch for one or two new images a step.
    """
    batches = [tuple(pairs[k : k + batch]) for k in range(0, len(pairs), batch)]
    widest = max((len({i for p in chunk for i in p}) for chunk in batches), default=0)
    if capacity < widest:
        raise UsageError(f"a token pool of {capacity} images cannot hold a batch of {batch} pairs ({widest} images); "
                         "lower --batch, or raise --token-slots or --gpu-memory")  # fmt: skip
    uses: dict[int, list[int]] = defaultdict(list)
    for step, chunk in enumerate(batches):
        for image in sorted({i for p in chunk for i in p}):
            uses[image].append(step)
    cursor: dict[int, int] = defaultdict(int)  # image -> index of its next use in uses[image]
    slot_of = dict(resident or {})
    free = sorted(set(range(capacity)) - set(slot_of.values()), reverse=True)
    steps = []
    for step, chunk in enumerate(batches):
        needed = sorted({i for p in chunk for i in p})
        for image in needed:
            cursor[image] += 1  # this use is now current: the next one is further on
        encode = []
        for image in needed:
            if image in slot_of:
                continue
            if not free:
                victim = max((r for r in slot_of if r not in needed), key=lambda r: _next_use(uses, cursor, r))
                free.append(slot_of.pop(victim))
            slot_of[image] = free.pop()
            encode.append((image, slot_of[image]))
        if encode and len(encode) % encode_batch:
            for image in _upcoming(batches, step + 1, slot_of):
                if not free or len(encode) % encode_batch == 0:
                    break
                slot_of[image] = free.pop()
                encode.append((image, slot_of[image]))
        steps.append(Step(tuple(encode), chunk, tuple((slot_of[i], slot_of[j]) for i, j in chunk)))
    return steps


def _upcoming(batches: Sequence[tuple[Pair, ...]], start: int, resident: Mapping[int, int]) -> Iterator[int]:
    """Images of the batches from ``start`` on that are not resident, in order of first use."""
    seen = set()
    for chunk in batches[start:]:
        for image in sorted({i for p in chunk for i in p}):
            if image not in resident and image not in seen:
                seen.add(image)
                yield image


def _next_use(uses: Mapping[int, list[int]], cursor: Mapping[int, int], image: int) -> float:
    later = uses.get(image, [])
    k = cursor.get(image, 0)
    return later[k] if k < len(later) else float("inf")


def encodes(steps: Sequence[Step]) -> int:
    return sum(len(s.encode) for s in steps)
