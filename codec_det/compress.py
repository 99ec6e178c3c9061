"""Compress a whole CNN with CoDeC: plan groups and ranks, decompose each conv, fold permutations."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from codec_det.budget import allocate_ranks, build_ladder, check_targets_below_model, estimate_rank_errors
from codec_det.complexity import codec_conv_cost, count_model, dense_conv_cost, record_conv_geometry
from codec_det.decompose import ALSSettings, decompose_conv, max_rank
from codec_det.decomposition.clustering import balanced_filter_groups
from codec_det.spec import CompressionSpec
from codec_det.surgery import compressible_convs, fold_permutations, foldable_convs, layer_spec, set_submodule

__all__ = ["LayerReport", "CompressionResult", "default_groups", "plan_compression", "compress_model"]

logger = logging.getLogger(__name__)


@dataclass
class LayerReport:
    """One row of the compression report; ``rank`` and ``groups`` are None for a dense layer."""

    layer: str
    shape: str
    groups: int | None
    rank: int | None
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    rel_error: float


@dataclass
class CompressionResult:
    """The compressed model, its spec, a report row per compressible conv and fvcore totals."""

    model: nn.Module
    spec: CompressionSpec
    layers: list[LayerReport]
    totals: dict[str, float] = field(default_factory=dict)


def default_groups(name: str, conv: nn.Conv2d, foldable: bool) -> int:
    """Pick the number of filter groups G for a conv.

    Convs whose filter order cannot be folded into the next layers (the last
    1x1 of a bottleneck, downsampling shortcuts) use G = 1, since their output
    would need an ``index_select`` before the residual add, which costs more
    than the layer saves on a CPU. Other convs get groups of at least 64
    filters, at most 4 groups: on a 2-core AVX-512 CPU, groups of fewer than
    about 32 filters ran 1.5x to 2.7x slower in oneDNN than one group.
    """
    if not foldable:
        return 1
    groups = 1
    while groups < 4 and conv.out_channels % (groups * 2) == 0 and conv.out_channels // (groups * 2) >= 64:
        groups *= 2
    return groups


def plan_compression(
    model: nn.Module,
    *,
    target_macs: float | None = None,
    target_params: float | None = None,
    input_size: tuple[int, int] = (224, 224),
    groups: int | dict[str, int] | None = None,
    rank_multiple: int = 8,
    keep_dense: tuple[str, ...] = (),
    seed: int = 0,
) -> dict[str, tuple[int, int | None, torch.Tensor]]:
    """Choose G, R and the filter grouping of every compressible conv to meet the targets.

    Targets count the whole model as fvcore does at ``input_size``.

    Returns:
        ``{name: (groups, rank or None for dense, labels)}``.
    """
    convs, _ = compressible_convs(model, log=False)
    convs = {name: conv for name, conv in convs.items() if name not in keep_dense}
    foldable = foldable_convs(model)
    geometry = record_conv_geometry(model, list(convs), input_size)
    total_macs, total_params = count_model(model, input_size)
    check_targets_below_model(total_macs, total_params, target_macs, target_params)

    ladders = []
    labels_by_layer = {}
    fixed_macs, fixed_params = float(total_macs), float(total_params)
    for name, conv in tqdm(convs.items(), desc="planning ranks", unit="layer", leave=False):
        layer_groups = _groups_for(name, conv, groups, name in foldable)
        labels = balanced_filter_groups(conv.weight.detach().cpu(), layer_groups, seed=seed)
        labels_by_layer[name] = (layer_groups, labels)

        dense_macs, dense_params = dense_conv_cost(geometry[name])
        fixed_macs -= dense_macs
        fixed_params -= dense_params

        weight = conv.weight.detach()

        def errors_for(ranks, weight=weight, labels=labels, layer_groups=layer_groups):
            return estimate_rank_errors(weight, labels, layer_groups, ranks)

        limit = max_rank(conv, layer_groups)
        ladders.append(build_ladder(name, geometry[name], layer_groups, limit, errors_for, rank_multiple))

    allocation = allocate_ranks(
        ladders,
        fixed_macs=fixed_macs,
        fixed_params=fixed_params,
        target_macs=target_macs,
        target_params=target_params,
    )
    return {
        name: (labels_by_layer[name][0], allocation.ranks[name], labels_by_layer[name][1]) for name in convs
    }


def _groups_for(name: str, conv: nn.Conv2d, groups: int | dict[str, int] | None, foldable: bool) -> int:
    if groups is None:
        return default_groups(name, conv, foldable)
    if isinstance(groups, int):
        value = groups
    else:
        value = groups.get(name, default_groups(name, conv, foldable))
    if conv.out_channels % value != 0:
        raise ValueError(
            f"{name}: groups={value} does not divide its {conv.out_channels} filters; choose a divisor"
        )
    return value


def compress_model(
    model: nn.Module,
    *,
    plan: dict[str, tuple[int, int | None, torch.Tensor | None]] | None = None,
    target_macs: float | None = None,
    target_params: float | None = None,
    input_size: tuple[int, int] = (224, 224),
    groups: int | dict[str, int] | None = None,
    rank_multiple: int = 8,
    keep_dense: tuple[str, ...] = (),
    settings: ALSSettings = ALSSettings(),
    architecture: str = "unknown",
    fold: bool = True,
    progress: bool = True,
    labels_fn: Callable[[str, nn.Conv2d, int], torch.Tensor] | None = None,
) -> CompressionResult:
    """Compress ``model`` in place with CoDeC and return it with its spec and report.

    Either pass an explicit ``plan`` (``{name: (groups, rank, labels or None)}``;
    rank None keeps a conv dense) or targets, from which ``plan_compression``
    derives one. ``labels_fn(name, conv, groups)`` overrides the subspace
    clustering (random or single-group baselines).
    """
    convs, skipped = compressible_convs(model)
    if plan is None:
        plan = plan_compression(
            model,
            target_macs=target_macs,
            target_params=target_params,
            input_size=input_size,
            groups=groups,
            rank_multiple=rank_multiple,
            keep_dense=keep_dense,
            seed=settings.seed,
        )
    unknown = sorted(set(plan) - set(convs))
    if unknown:
        raise ValueError(f"plan names layers that are not compressible convs of this model: {unknown}")

    geometry = record_conv_geometry(model, list(convs), input_size)
    macs_before, params_before = count_model(model, input_size)

    reports = []
    spec = CompressionSpec(architecture=architecture, skipped=dict(skipped))
    for name in tqdm(list(convs), desc="decomposing", unit="layer", disable=not progress):
        conv = convs[name]
        dense_macs, dense_params = dense_conv_cost(geometry[name])
        layer_groups, rank, labels = plan.get(name, (1, None, None))
        shape = "x".join(str(size) for size in conv.weight.shape)

        if rank is None:
            if name not in spec.skipped:
                spec.skipped[name] = "kept dense by the rank allocation"
            reports.append(LayerReport(name, shape, None, None, dense_macs, dense_macs, dense_params, dense_params, 0.0))
            continue

        if labels is None and labels_fn is not None:
            labels = labels_fn(name, conv, layer_groups)
        layer, error = decompose_conv(conv, groups=layer_groups, rank=rank, settings=settings, labels=labels, name=name)
        set_submodule(model, name, layer)
        macs, params = codec_conv_cost(geometry[name], layer_groups, rank)
        reports.append(LayerReport(name, shape, layer_groups, rank, dense_macs, macs, dense_params, params, error))

    if fold:
        folded = fold_permutations(model)
        logger.info("folded the filter permutation of %d layers into the layers after them", len(folded))

    modules = dict(model.named_modules())
    for report in reports:
        if report.rank is not None:
            spec.layers[report.layer] = layer_spec(modules[report.layer])

    macs_after, params_after = count_model(model, input_size)
    totals = {
        "macs_before": macs_before,
        "macs_after": macs_after,
        "params_before": params_before,
        "params_after": params_after,
        "input_size": list(input_size),
    }
    spec.metadata.update(totals)
    logger.info(
        "compressed %s: %.3f -> %.3f GMACs (%.1f%% fewer), %.2f -> %.2f M params (%.1f%% fewer)",
        architecture,
        macs_before / 1e9,
        macs_after / 1e9,
        100 * (1 - macs_after / macs_before),
        params_before / 1e6,
        params_after / 1e6,
        100 * (1 - params_after / params_before),
    )
    return CompressionResult(model=model, spec=spec, layers=reports, totals=totals)

