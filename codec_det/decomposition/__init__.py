"""The maths of CoDeC: coupled CP-ALS and filter clustering, on torch tensors only."""

from codec_det.decomposition.clustering import balanced_filter_groups, group_permutation, projection_distances
from codec_det.decomposition.coupled_cp import CoupledCPResult, coupled_cp_als, grouped_truncated_svd

__all__ = [
    "CoupledCPResult",
    "balanced_filter_groups",
    "coupled_cp_als",
    "group_permutation",
    "grouped_truncated_svd",
    "projection_distances",
]
