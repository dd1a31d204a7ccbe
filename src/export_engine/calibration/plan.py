"""The first precision plan for ``--precision hybrid`` (HybridCast), from rules and measured statistics.

A plan (:class:`~export_engine.graph_passes.precision_plan.PrecisionPlan`) says which node computes in FP16,
which in FP32, and why. :func:`plan_precision` makes the first plan from rules plus measured activation statistics:

* structural FP32 islands (always): LayerNormalization (TensorRT 11 computes it in its input dtype, so its input,
  scale and bias are cast), exp heads and everything after them, norm/variance computations (squares overflow
  FP16 above |x| = 256), long reductions, values converted to integers, the post-processing after the last
  matrix op; fused ``Attention`` stays FP16 (FP16 Q/K/V for TensorRT's fused kernels; no casts around its
  softmax);
* data-driven FP32 (the search may return these to FP16): tensors whose measured magnitude exceeds
  ``data_max`` move their producer and consumers to FP32; initializers beyond FP16's range; deep accumulations.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import onnx_graphsurgeon as gs

from export_engine.calibration.statistics import TensorStats
from export_engine.graph_passes.precision_plan import PrecisionPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HybridCastConfig:
    """Thresholds of the rule-based plan. Defaults follow ModelOpt AutoCast where it has one."""

    # FP16's spacing is 0.5 at 512 and 32 at 65504: a residual stream above ~512 loses the sub-unit
    # contributions of every block added to it, and leaves < 128x headroom before overflow (a square in a
    # norm, a sum of a few such values). AutoCast's data_max default is the same 512.
    data_max: float = 512.0
    # Initializers must be representable at all: FP16's largest finite value.
    init_max: float = 65504.0
    # Terms summed per output element (GEMM K, conv C_in/group x kernel volume) above which a node stays FP32.
    # It only matters where a kernel accumulates in FP16; TensorRT's FP16 tensor-core GEMMs accumulate in FP32
    # (not verified here, no GPU), so the default is a safety net: no GEMM or conv of MASt3R (largest: the
    # local-feature MLP's fc2, K = 7168) or FastSAM3D (patch embedding, 16^3 = 4096) reaches it.
    max_reduction_depth: int | None = 8192
    # ReduceMean/ReduceSum over more input elements than this stay FP32. A sequential FP16 accumulator stops
    # growing once the running sum is 2^11 times its terms (11-bit significand); 4096 assumes kernels at least
    # sum pairwise and still catches global poolings over whole feature maps. Norms and variances are FP32
    # whatever their length (the squares overflow first).
    max_reduction_elements: int = 4096
    fp16_attention: bool = True  # fused ONNX Attention stays FP16 whatever the data says (warned)
    fp32_tail: bool = True  # post-processing after the last matrix op stays FP32 (cheap; no rounded outputs)
    fp32_ops: tuple[str, ...] = ()  # extra op types forced to FP32
    fp32_nodes: tuple[str, ...] = ()  # extra node names (plan keys) forced to FP32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_precision(
    graph: gs.Graph, stats: Mapping[str, TensorStats], config: HybridCastConfig | None = None
) -> PrecisionPlan:
    """The rule-based HybridCast plan for ``graph`` (FP32, after fuse_attention/cleanup) from measured ``stats``.

    The rules live in :mod:`export_engine.calibration.rules`. Fills in missing tensor dtypes of ``graph`` (shape
    inference) and changes nothing else.
    """
    from export_engine.calibration.rules import plan_from_rules

    plan = plan_from_rules(graph, stats, config or HybridCastConfig())
    log.info("precision plan: %s", plan.summary_line())
    for warning in plan.metadata.get("warnings", [])[:5]:
        log.warning("precision plan: %s", warning)
    return plan
