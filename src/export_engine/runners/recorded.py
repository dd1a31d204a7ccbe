"""Outputs recorded earlier, replayed as a Polygraphy runner: a later gate whose reference is a graph that an
earlier gate already ran on the same feeds (the exported FP32 ONNX) reuses those outputs instead of building
the session and running it again."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from polygraphy.backend.base import BaseRunner

from export_engine.core.types import Feed


class RecordedRunner(BaseRunner):
    """Answers the i-th feed it is given with ``outputs[i]``; a feed that differs from ``feeds[i]`` is an error
    (the recording belongs to other inputs), never a silently wrong reference."""

    def __init__(self, feeds: Sequence[Feed], outputs: Sequence[Mapping[str, np.ndarray]], name: str):
        super().__init__(name=name, prefix="recorded-runner")
        if len(feeds) != len(outputs):
            raise ValueError(f"{name}: {len(outputs)} recorded outputs for {len(feeds)} feeds")
        self._feeds, self._outputs = list(feeds), list(outputs)
        self._next = 0

    def activate_impl(self) -> None:
        self._next = 0

    def get_input_metadata_impl(self) -> Any:
        from polygraphy.common import TensorMetadata
        from polygraphy.datatype import DataType

        meta = TensorMetadata()
        for name, value in self._feeds[0].items():
            # every dimension dynamic: feeds may differ in shape (e.g. the number of clicks per sample)
            meta.add(name, DataType.from_dtype(np.asarray(value).dtype), tuple(-1 for _ in np.asarray(value).shape))
        return meta

    def infer_impl(self, feed_dict: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        index = self._next
        if index >= len(self._feeds):
            raise ValueError(f"{self.name}: only {len(self._feeds)} feeds were recorded")
        expected = self._feeds[index]
        if expected.keys() != feed_dict.keys() or not all(np.array_equal(expected[k], feed_dict[k]) for k in expected):
            raise ValueError(f"{self.name}: feed {index} is not the one these outputs were recorded for")
        self._next += 1
        self.inference_time = 0.0
        return OrderedDict((k, np.array(v)) for k, v in self._outputs[index].items())

    def deactivate_impl(self) -> None:
        self._next = 0
