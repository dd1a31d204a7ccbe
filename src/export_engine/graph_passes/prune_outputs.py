"""Keep only the named graph outputs, and drop every node that no kept output needs.

A caller that reads a few of a graph's outputs pays for all of them: MASt3R's decoder computes both views' DPT
heads (3-D points and their confidence) beside the local descriptors, and a collection matcher reads only the
descriptors. This pass runs on the copy of a graph that a runner opens (the artifact's files never change);
the outputs kept stay in the graph's order, and nodes that only the dropped outputs needed go with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from export_engine.errors import GraphPassError
from export_engine.graph_passes.base import PassReport, timed

PASS = "prune_outputs"


@dataclass(frozen=True)
class PruneOutputsConfig:
    keep: tuple[str, ...] = ()  # output names to keep; empty keeps every output


def prune_outputs(graph: gs.Graph, config: PruneOutputsConfig) -> PassReport:
    report = PassReport(PASS)
    with timed(report):
        if not config.keep:
            return report
        names = [t.name for t in graph.outputs]
        unknown = [n for n in config.keep if n not in names]
        if unknown:
            raise GraphPassError(f"graph {graph.name!r} has no output(s) {unknown}; its outputs: {names}")
        dropped = [n for n in names if n not in config.keep]
        before = len(graph.nodes)
        graph.outputs = [t for t in graph.outputs if t.name in config.keep]
        graph.cleanup().toposort()
        report.matched = len(dropped)
        report.rewritten = before - len(graph.nodes)
        report.details = {"dropped_outputs": dropped, "nodes_removed": before - len(graph.nodes)}
    return report
