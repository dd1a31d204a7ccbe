"""Pair strategies and the token-slot plan: pure functions, no model."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from export_engine.errors import UsageError
from export_engine.sfm.pairs import canonical, nearest_pairs, parse_strategy, select_pairs
from export_engine.sfm.schedule import encodes, order_for_reuse, plan

NAMES = [f"im{k:02d}.jpg" for k in range(7)]


def test_complete_and_windows() -> None:
    assert select_pairs(parse_strategy("complete"), NAMES) == list(itertools.combinations(range(7), 2))
    swin = select_pairs(parse_strategy("swin:2"), NAMES)
    assert swin == [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (2, 4), (3, 4), (3, 5), (4, 5), (4, 6), (5, 6)]
    cyclic = select_pairs(parse_strategy("swin:2:cyclic"), NAMES)
    assert set(cyclic) - set(swin) == {(0, 5), (0, 6), (1, 6)} and len(cyclic) == 14  # 7 images x 2, no repeats
    logwin = select_pairs(parse_strategy("logwin:3"), NAMES)  # offsets 1, 2, 4
    assert logwin == canonical([(i, i + d) for d in (1, 2, 4) for i in range(7) if i + d < 7])
    assert (2, 6) in logwin and (0, 3) not in logwin
    assert set(select_pairs(parse_strategy("logwin:3:cyclic"), NAMES)) > set(logwin)
    assert select_pairs(parse_strategy("swin:50"), NAMES) == list(itertools.combinations(range(7), 2))


def test_retrieval_takes_the_nearest_by_cosine() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 16))
    desc = np.concatenate([centres[0] + 0.01 * rng.normal(size=(3, 16)), centres[1] + 0.01 * rng.normal(size=(3, 16))])
    desc *= rng.uniform(0.5, 3.0, size=(6, 1))  # scale does not matter: cosine
    pairs = select_pairs(parse_strategy("retrieval:2"), NAMES[:6], desc)
    assert pairs == [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (4, 5)]  # each with the two of its own cluster
    assert nearest_pairs(desc, 10) == list(itertools.combinations(range(6), 2))


def test_pairs_file_is_checked_deduplicated_and_sorted(tmp_path: Path) -> None:
    good = tmp_path / "pairs.txt"
    good.write_text("# hloc pairs\nim03.jpg im01.jpg\nim01.jpg im03.jpg\n\nim02.jpg im02.jpg\nim00.jpg im06.jpg  # x\n")
    assert select_pairs(parse_strategy(str(good)), NAMES) == [(0, 6), (1, 3)]
    bad = tmp_path / "bad.txt"
    bad.write_text("im00.jpg im01.jpg\nim00.jpg missing.jpg\n")
    with pytest.raises(UsageError, match=r"missing\.jpg \(line 2\)"):
        select_pairs(parse_strategy(str(bad)), NAMES)
    bad.write_text("im00.jpg im01.jpg im02.jpg\n")
    with pytest.raises(UsageError, match="expected two image names"):
        select_pairs(parse_strategy(str(bad)), NAMES)


@pytest.mark.parametrize("text", ["swin", "swin:0", "swin:x", "retrieval:3:cyclic", "swin:3:ring", "nope.txt"])
def test_unknown_strategies_list_the_choices(text: str) -> None:
    with pytest.raises(UsageError, match=text.split(":")[0]):
        parse_strategy(text)


@pytest.mark.parametrize(("capacity", "batch"), [(40, 4), (8, 4), (6, 3), (4, 2)])
def test_plan_keeps_every_batch_in_the_pool(capacity: int, batch: int) -> None:
    pairs = order_for_reuse(list(itertools.combinations(range(20), 2)), 20, capacity)
    steps = plan(pairs, capacity, batch, encode_batch=3)
    holding: dict[int, int] = {}  # slot -> image, replayed from the plan
    seen = []
    for step in steps:
        for image, slot in step.encode:
            assert 0 <= slot < capacity
            holding[slot] = image
        for (i, j), (si, sj) in zip(step.pairs, step.slots, strict=True):
            assert holding[si] == i and holding[sj] == j
        seen += step.pairs
    assert sorted(seen) == sorted(pairs)
    if capacity >= 20:
        assert encodes(steps) == 20  # each image once
    else:
        assert encodes(steps) < len(pairs)  # reuse holds even when images are evicted and encoded again
    naive = plan(sorted(pairs, key=lambda p: (p[1], p[0])), capacity, batch)
    assert encodes(steps) <= encodes(naive)


def test_encodes_come_in_whole_batches_where_slots_are_free() -> None:
    pairs = [(i, i + d) for i in range(40) for d in (1, 2, 3) if i + d < 40]
    steps = plan(pairs, 40, 4, encode_batch=8)
    runs = [len(s.encode) for s in steps if s.encode]
    assert sum(runs) == 40 and all(r % 8 == 0 for r in runs)  # 5 runs of 8, not one or two images a step
    tight = plan(pairs, 10, 4, encode_batch=8)  # few free slots: whatever fits, still correct (replayed above)
    assert encodes(tight) >= 40


def test_plan_refuses_a_pool_smaller_than_a_batch() -> None:
    with pytest.raises(UsageError, match="cannot hold a batch"):
        plan([(0, 1), (2, 3), (4, 5)], 4, 3)
    resident = plan([(0, 1), (1, 2)], 3, 1, resident={0: 2, 1: 0})
    assert resident[0].encode == () and resident[1].encode == ((2, 1),)
