"""prune_outputs: only the named outputs stay, with the nodes they need; their values do not change."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from export_engine.errors import GraphPassError
from export_engine.graph_passes.base import load_graph
from export_engine.graph_passes.prune_outputs import PruneOutputsConfig, prune_outputs

DESCRIPTORS = ("view1_desc", "view2_desc", "view1_desc_conf", "view2_desc_conf")


def run(graph: gs.Graph, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model = gs.export_onnx(graph, do_type_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {i.name: feed[i.name] for i in session.get_inputs()}), strict=True))


def test_pruning_keeps_the_named_outputs_exactly_and_drops_the_rest(tiny_graphs: dict) -> None:
    tiny = tiny_graphs["mast3r.decoder"]
    full = load_graph(tiny.path)
    graph = load_graph(tiny.path)
    report = prune_outputs(graph, PruneOutputsConfig(tuple(reversed(DESCRIPTORS))))
    kept = [t.name for t in graph.outputs]
    assert kept == [t.name for t in full.outputs if t.name in DESCRIPTORS]  # the graph's order, not the config's
    dropped = [t.name for t in full.outputs if t.name not in DESCRIPTORS]
    assert report.matched == len(dropped) > 0 and report.details["dropped_outputs"] == dropped
    assert report.rewritten == len(full.nodes) - len(graph.nodes) > 0
    ops = {n.op for n in graph.nodes}
    assert {"Conv", "Resize"} <= {n.op for n in full.nodes} and not {"Conv", "Resize"} & ops  # the DPT heads went
    assert [t.name for t in graph.inputs] == [t.name for t in full.inputs]
    for feed in tiny.feeds:
        before, after = run(full, feed), run(graph, feed)
        assert sorted(after) == sorted(DESCRIPTORS)
        for name in DESCRIPTORS:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    again = prune_outputs(graph, PruneOutputsConfig(DESCRIPTORS))
    assert again.matched == again.rewritten == 0


def test_pruning_refuses_unknown_names_and_keeps_everything_when_told_nothing(tiny_graphs: dict) -> None:
    graph = load_graph(tiny_graphs["mast3r.decoder"].path)
    count = len(graph.nodes)
    with pytest.raises(GraphPassError, match=r"no output\(s\) \['view3_desc'\]; its outputs: \["):
        prune_outputs(graph, PruneOutputsConfig(("view1_desc", "view3_desc")))
    assert prune_outputs(graph, PruneOutputsConfig()).matched == 0 and len(graph.nodes) == count
