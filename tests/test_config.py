from __future__ import annotations

import pytest

from export_engine.config import Precision, Resolution
from export_engine.errors import UsageError


def test_precision_parse_lists_choices() -> None:
    assert Precision.parse("FP32") is Precision.FP32
    with pytest.raises(UsageError, match="fp32, fp16, hybrid"):
        Precision.parse("int4")


@pytest.mark.parametrize("text", ["512x384", "384x512", "80X48", "16x16"])
def test_resolution_accepts_multiples_of_16(text: str) -> None:
    res = Resolution.parse(text)
    w, h = text.lower().split("x")
    assert (res.width, res.height) == (int(w), int(h))


@pytest.mark.parametrize("text", ["500x384", "512x380", "512", "axb", "0x16", "512x384x3", "-16x16"])
def test_resolution_rejects_bad_values(text: str) -> None:
    with pytest.raises(UsageError, match="resolution"):
        Resolution.parse(text)
