"""Compress a whole CNN with a baseline method at a MACs / parameter budget.

Planning reuses CoDeC's allocation (``codec_det.budget.allocate_ranks``): each
compressible conv offers a ladder of ranks in multiples of ``rank_multiple``
up to the break-even rank plus keeping the conv dense, each rung costed by the
method's own layer (``baseline_cost``) and scored by its error estimate
(``baseline_rank_errors``), and the greedy marginal analysis picks one rung
per layer so the whole model meets the targets.
"""

from __future__ import annotations

import logging

import numpy as np
from torch import nn
from tqdm import tqdm

from codec_det.baselines.methods import (
    BASELINE_METHODS,
    BaselineSettings,
    baseline_cost,
    baseline_layer_spec,
    baseline_max_rank,
    baseline_rank_errors,
    decompose_baseline,
    layer_method,
)
from codec_det.budget import LayerLadder, allocate_ranks, check_targets_below_model
from codec_det.complexity import ConvGeometry, count_model, dense_conv_cost, record_conv_geometry
from codec_det.compress import CompressionResult, LayerReport
from codec_det.spec import CompressionSpec
from codec_det.surgery import compressible_convs, set_submodule

__all__ = ["build_baseline_ladder", "plan_baseline_compression", "compress_model_baseline"]

logger = logging.getLogger(__name__)


def _check_baseline(method: str) -> None:
    if method not in BASELINE_METHODS:
        raise ValueError(
            f"unknown baseline method {method!r}; choose one of {', '.join(BASELINE_METHODS)} "
            "(CoDeC itself is codec_det.compress.compress_model)"
        )


def build_baseline_ladder(
    name: str, conv: nn.Conv2d, geometry: ConvGeometry, method: str, rank_multiple: int = 8
) -> LayerLadder:
    """Build the option ladder of one conv for a layer type (``"cp"``, ``"tucker2"`` or ``"svd"``).

    Ranks are multiples of ``rank_multiple`` up to the break-even rank, or
    1..max when the layer is smaller; the last option keeps the conv dense.
    """
    limit = baseline_max_rank(method, geometry)
    if limit >= rank_multiple:
        ranks = list(range(rank_multiple, limit + 1, rank_multiple))
    else:
        ranks = list(range(1, limit + 1))
    errors = baseline_rank_errors(method, conv.weight, ranks)
    costs = [baseline_cost(method, geometry, rank) for rank in ranks]
    costs.append(dense_conv_cost(geometry))
    return LayerLadder(
        name=name,
        groups=1,
        ranks=[*ranks, None],
        macs=np.array([cost[0] for cost in costs], dtype=np.float64),
        params=np.array([cost[1] for cost in costs], dtype=np.float64),
        squared_errors=np.append(np.asarray(errors, dtype=np.float64) ** 2, 0.0),
    )


def plan_baseline_compression(
    model: nn.Module,
    method: str,
    *,
    target_macs: float | None = None,
    target_params: float | None = None,
    input_size: tuple[int, int] = (224, 224),
    rank_multiple: int = 8,
    keep_dense: tuple[str, ...] = (),
) -> dict[str, tuple[str, int | None]]:
    """Choose the layer type and rank of every compressible conv so the model meets the targets.

    Targets count the whole model as fvcore does at ``input_size``.

    Returns:
        ``{name: (layer type, rank or None for dense)}``.
    """
    _check_baseline(method)
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple <= 0:
        raise ValueError(f"rank_multiple must be a positive integer, got {rank_multiple!r}")
    convs, _ = compressible_convs(model, log=False)
    convs = {name: conv for name, conv in convs.items() if name not in keep_dense}
    geometry = record_conv_geometry(model, list(convs), input_size)
    total_macs, total_params = count_model(model, input_size)
    check_targets_below_model(total_macs, total_params, target_macs, target_params)

    ladders = []
    types = {}
    fixed_macs, fixed_params = float(total_macs), float(total_params)
    for name, conv in tqdm(convs.items(), desc=f"planning {method} ranks", unit="layer", leave=False):
        types[name] = layer_method(method, conv.kernel_size)
        dense_macs, dense_params = dense_conv_cost(geometry[name])
        fixed_macs -= dense_macs
        fixed_params -= dense_params
        ladders.append(build_baseline_ladder(name, conv, geometry[name], types[name], rank_multiple))

    allocation = allocate_ranks(
        ladders,
        fixed_macs=fixed_macs,
        fixed_params=fixed_params,
        target_macs=target_macs,
        target_params=target_params,
    )
    return {name: (types[name], allocation.ranks[name]) for name in convs}


def compress_model_baseline(
    model: nn.Module,
    method: str,
    *,
    plan: dict[str, tuple[str, int | None]] | None = None,
    target_macs: float | None = None,
    target_params: float | None = None,
    input_size: tuple[int, int] = (224, 224),
    rank_multiple: int = 8,
    keep_dense: tuple[str, ...] = (),
    settings: BaselineSettings = BaselineSettings(),
    architecture: str = "unknown",
    progress: bool = True,
) -> CompressionResult:
    """Compress ``model`` in place with a baseline method and return it with its spec and report.

    Either pass an explicit ``plan`` (``{name: (layer type, rank or None)}``)
    or targets, from which ``plan_baseline_compression`` derives one.
    """
    _check_baseline(method)
    convs, skipped = compressible_convs(model)
    if plan is None:
        plan = plan_baseline_compression(
            model,
            method,
            target_macs=target_macs,
            target_params=target_params,
            input_size=input_size,
            rank_multiple=rank_multiple,
            keep_dense=keep_dense,
        )
    unknown = sorted(set(plan) - set(convs))
    if unknown:
        raise ValueError(f"plan names layers that are not compressible convs of this model: {unknown}")

    geometry = record_conv_geometry(model, list(convs), input_size)
    macs_before, params_before = count_model(model, input_size)

    reports = []
    spec = CompressionSpec(architecture=architecture, skipped=dict(skipped))
    for name in tqdm(list(convs), desc=f"decomposing ({method})", unit="layer", disable=not progress):
        conv = convs[name]
        dense_macs, dense_params = dense_conv_cost(geometry[name])
        layer_type, rank = plan.get(name, (layer_method(method, conv.kernel_size), None))
        shape = "x".join(str(size) for size in conv.weight.shape)
        if rank is None:
            spec.skipped.setdefault(name, "kept dense by the rank allocation")
            reports.append(LayerReport(name, shape, None, None, dense_macs, dense_macs, dense_params, dense_params, 0.0))
            continue

        layer, error = decompose_baseline(conv, layer_type, rank, settings=settings, name=name)
        set_submodule(model, name, layer)
        spec.layers[name] = baseline_layer_spec(layer)
        macs, params = baseline_cost(layer_type, geometry[name], rank)
        reports.append(LayerReport(name, shape, 1, rank, dense_macs, macs, dense_params, params, error))

    macs_after, params_after = count_model(model, input_size)
    totals = {
        "macs_before": macs_before,
        "macs_after": macs_after,
        "params_before": params_before,
        "params_after": params_after,
        "input_size": list(input_size),
    }
    spec.metadata.update(totals)
    spec.metadata["method"] = method
    logger.info(
        "compressed %s with %s: %.3f -> %.3f GMACs (%.1f%% fewer), %.2f -> %.2f M params (%.1f%% fewer)",
        architecture,
        method,
        macs_before / 1e9,
        macs_after / 1e9,
        100 * (1 - macs_after / macs_before),
        params_before / 1e6,
        params_after / 1e6,
        100 * (1 - params_after / params_before),
    )
    return CompressionResult(model=model, spec=spec, layers=reports, totals=totals)
