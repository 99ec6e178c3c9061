"""Classic low-rank baselines for CoDeC: per-layer CP, Tucker-2 and truncated SVD.

Each method has a layer (``CPConv2d``, ``Tucker2Conv2d``, ``SVDConv2d``) whose
factors are its parameters, a decomposition of a dense conv, a cost model that
matches fvcore, and a spec entry, so a baseline-compressed model saves, loads
and fine-tunes like a CoDeC one.
"""

from codec_det.baselines.compress import build_baseline_ladder, compress_model_baseline, plan_baseline_compression
from codec_det.baselines.cp import CPConv2d, cp_als
from codec_det.baselines.methods import (
    BASELINE_METHODS,
    LAYOUTS,
    METHODS,
    BaselineSettings,
    baseline_cost,
    baseline_layer_spec,
    baseline_max_rank,
    baseline_rank_errors,
    build_baseline_layer,
    check_method,
    decompose_baseline,
    layer_method,
    rank_for_macs,
)
from codec_det.baselines.svd import SVDConv2d
from codec_det.baselines.tucker2 import Tucker2Conv2d, tucker2_hooi

__all__ = [
    "BASELINE_METHODS",
    "LAYOUTS",
    "METHODS",
    "BaselineSettings",
    "CPConv2d",
    "SVDConv2d",
    "Tucker2Conv2d",
    "baseline_cost",
    "baseline_layer_spec",
    "baseline_max_rank",
    "baseline_rank_errors",
    "build_baseline_ladder",
    "build_baseline_layer",
    "check_method",
    "compress_model_baseline",
    "cp_als",
    "decompose_baseline",
    "layer_method",
    "plan_baseline_compression",
    "rank_for_macs",
    "tucker2_hooi",
]
