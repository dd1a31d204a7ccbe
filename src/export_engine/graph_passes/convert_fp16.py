"""convert_fp16: the naive FP16 graph (``--precision fp16``): every node that can compute in FP16 does.

Kept to show why ``--precision hybrid`` exists: LayerNorm, exp heads, norms and massive activations all run in
FP16 here. Only what FP16 cannot express at all stays as it was: graph inputs and outputs (FP32, with Casts at
the boundaries), tensors computed from shapes and constants (RoPE tables, masks from ConstantOfShape: TensorRT
folds them), Resize scales, Range, control flow and integer arithmetic. Existing ``Cast(to=FLOAT)`` nodes on
data become ``Cast(to=FLOAT16)`` (onnxconverter-common 1.16 leaves them while typing their outputs FP16, and
ONNX Runtime then refuses the graph: "Type (tensor(float16)) of output arg ... does not match expected type
(tensor(float))"). Initializers are converted without clamping: values beyond FP16's range
become inf, and the report counts them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from export_engine.graph_passes.apply_precision_plan import retype_graph
from export_engine.graph_passes.base import PassReport, timed
from export_engine.graph_passes.graph_facts import FP16, GraphFacts, fill_missing_dtypes

log = logging.getLogger(__name__)

PASS_NAME = "convert_fp16"


@dataclass(frozen=True)
class ConvertFp16Config:
    # Op types left in their current precision (e.g. ("LayerNormalization",) for an experiment).
    keep_ops: tuple[str, ...] = ()


def convert_fp16(graph: gs.Graph, config: ConvertFp16Config) -> PassReport:
    """Retype every eligible node to FP16; graph I/O keeps its dtypes through boundary Casts."""
    report = PassReport(PASS_NAME)
    with timed(report):
        fill_missing_dtypes(graph)
        facts = GraphFacts.of(graph)
        targets = {id(node): FP16 for node in facts.eligible if node.op not in config.keep_ops}
        report.matched = len(targets)
        retype_graph(graph, facts, targets, PASS_NAME, report)
        if report.details.get("initializer_overflow"):
            log.warning("%s: %s", PASS_NAME, report.warnings[-1])
        graph.cleanup().toposort()
    return report
