"""Helpers of the graph-pass tests: run a graph on ONNX Runtime CPU, count its ops."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

from export_engine.runners import ort_ops


def run_graph(graph: gs.Graph, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """ONNX Runtime CPU outputs of `graph` for one feed (inputs the graph does not take are ignored)."""
    model = gs.export_onnx(graph, do_type_check=True)
    options = ort.SessionOptions()
    if any(node.domain == ort_ops.DOMAIN for node in graph.nodes):
        ort_ops.register(options, cuda=False)  # export-engine's own operators, CPU build
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})]


def op_counts(graph: gs.Graph) -> Counter[str]:
    return Counter(n.op for n in graph.nodes)
