"""Turn one dense ``nn.Conv2d`` into a ``CoDeCConv2d``: cluster, then coupled CPD."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from codec_det.decomposition.clustering import balanced_filter_groups, group_permutation
from codec_det.decomposition.coupled_cp import coupled_cp_als
from codec_det.layers.codec_conv import CoDeCConv2d

__all__ = ["ALSSettings", "decompose_conv", "max_rank"]


@dataclass(frozen=True)
class ALSSettings:
    """Solver settings shared by every layer of a compression run.

    float32 ALS is about 3x faster than float64 on a CPU; its error floor
    (about 1e-4 relative) is far below the errors a compression budget gives.
    """

    n_iter_max: int = 25
    tol: float = 1e-4
    ridge: float = 1e-6
    dtype: torch.dtype = torch.float32
    seed: int = 0


def max_rank(conv: nn.Conv2d, groups: int) -> int:
    """Return the largest rank whose compressed layer has fewer MACs per output pixel than ``conv``.

    Stage 1 costs ``G*R*C`` and stage 2 ``N*R*kh*kw`` MACs per output pixel
    (stage 1 runs at the input resolution, ``stride^2`` more pixels, unless the
    stride moves into it), against ``N*C*kh*kw`` for the dense conv. For 1x1
    kernels the rank is also capped by ``min(N/G, C)``, the rank of each
    group's weight matrix.
    """
    out_channels, in_channels, kh, kw = conv.weight.shape
    stride_h, stride_w = conv.stride
    pointwise_pixels = 1 if (kh, kw) == (1, 1) and conv.padding in ((0, 0), "valid") else stride_h * stride_w
    dense = out_channels * in_channels * kh * kw
    per_rank = groups * in_channels * pointwise_pixels + out_channels * kh * kw
    limit = (dense - 1) // per_rank
    if (kh, kw) == (1, 1):
        limit = min(limit, out_channels // groups, in_channels)
    return max(limit, 0)


def decompose_conv(
    conv: nn.Conv2d,
    *,
    groups: int,
    rank: int,
    settings: ALSSettings = ALSSettings(),
    labels: torch.Tensor | None = None,
    name: str = "conv",
) -> tuple[CoDeCConv2d, float]:
    """Compress ``conv`` into a ``CoDeCConv2d`` with ``groups`` groups of rank ``rank``.

    Args:
        conv: a dense conv with ``groups == 1`` and zero padding mode.
        groups: G, must divide the number of filters.
        rank: R, in ``[1, max_rank(conv, groups)]``.
        settings: ALS settings.
        labels: group label of each filter (N,); computed by subspace
            clustering when omitted (for random or one-group baselines).
        name: layer name used in error messages.

    Returns:
        The compressed layer, on the device and in the dtype of ``conv``, and
        the relative reconstruction error of its weight.
    """
    weight = conv.weight.detach()
    out_channels, in_channels, kh, kw = weight.shape
    if out_channels % groups != 0:
        raise ValueError(
            f"{name}: groups={groups} does not divide its {out_channels} filters; choose a divisor of {out_channels}"
        )
    limit = max_rank(conv, groups)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{name}: rank must be a positive integer, got {rank!r}")
    if rank > limit:
        raise ValueError(
            f"{name}: rank {rank} exceeds its limit {limit} for groups={groups} "
            f"(weight {tuple(weight.shape)}); above it the compressed layer costs as many MACs as the dense conv"
        )
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name}: weight contains NaN or Inf values; the layer cannot be decomposed")

    if labels is None:
        labels = balanced_filter_groups(weight.cpu(), groups, seed=settings.seed)
    permutation = group_permutation(labels.cpu())

    grouped = weight.index_select(0, permutation.to(weight.device))
    grouped = grouped.reshape(groups, out_channels // groups, in_channels, kh, kw)
    result = coupled_cp_als(
        grouped,
        rank,
        n_iter_max=settings.n_iter_max,
        tol=settings.tol,
        ridge=settings.ridge,
        seed=settings.seed,
        dtype=settings.dtype,
    )

    layer = CoDeCConv2d(
        in_channels,
        out_channels,
        (kh, kw),
        groups=groups,
        rank=rank,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        permutation=permutation,
    )
    _load_factors(layer, result, conv)
    layer.to(device=weight.device, dtype=weight.dtype)
    return layer, result.relative_error


def _load_factors(layer: CoDeCConv2d, result, conv: nn.Conv2d) -> None:
    """Copy the ALS factors into the layer's parameters, in the layer's shapes."""
    out_channels = layer.out_channels
    kh, kw = layer.kernel_size
    height = result.height_factors.reshape(out_channels, kh, -1)
    width = result.width_factors.reshape(out_channels, kw, -1)

    with torch.no_grad():
        layer.input_factors.copy_(result.input_factors.transpose(1, 2))
        if (kh, kw) == (1, 1):
            layer.filter_factors.copy_(height[:, 0, :] * width[:, 0, :])
        elif kh > 1 and kw > 1:
            layer.height_factors.copy_(height.transpose(1, 2))
            layer.width_factors.copy_(width.transpose(1, 2))
        elif kh > 1:
            layer.height_factors.copy_((height * width[:, :1, :]).transpose(1, 2))
        else:
            layer.width_factors.copy_((width * height[:, :1, :]).transpose(1, 2))
        if conv.bias is not None:
            layer.bias.copy_(conv.bias.detach().index_select(0, layer.permutation))
