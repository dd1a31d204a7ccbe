"""RecordedRunner: replays outputs recorded for the same feeds, refuses other feeds."""

from __future__ import annotations

import numpy as np
import pytest

from export_engine.runners.recorded import RecordedRunner


def test_replays_the_recorded_outputs_in_order_and_refuses_other_feeds() -> None:
    feeds = [{"x": np.full((2, 3), float(i), np.float32)} for i in range(2)]
    outputs = [{"y": feed["x"] * 2} for feed in feeds]
    runner = RecordedRunner(feeds, outputs, name="recorded")
    with runner:
        for feed, out in zip(feeds, outputs, strict=True):
            np.testing.assert_array_equal(runner.infer(feed)["y"], out["y"])
        with pytest.raises(ValueError, match="only 2 feeds"):
            runner.infer(feeds[0])
    with runner, pytest.raises(ValueError, match="not the one"):
        runner.infer({"x": np.full((2, 3), 7.0, np.float32)})
    with pytest.raises(ValueError, match="1 recorded outputs for 2 feeds"):
        RecordedRunner(feeds, outputs[:1], name="short")


def test_feeds_of_different_shapes() -> None:
    feeds = [{"points": np.zeros((1, n, 3), np.float32)} for n in (2, 3)]
    runner = RecordedRunner(feeds, [{"n": np.array(n)} for n in (2, 3)], name="clicks")
    with runner:
        assert [int(runner.infer(feed)["n"]) for feed in feeds] == [2, 3]
