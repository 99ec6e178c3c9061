"""One interface over the baseline methods: cost, rank limits, decomposition, spec and rebuild.

Method names:

- ``"cp"``: CP decomposition of ``kh x kw`` kernels (``CPConv2d``).
- ``"tucker2"``: Tucker-2 decomposition of ``kh x kw`` kernels
  (``Tucker2Conv2d``), input rank tied to the output rank by the channel
  ratio (``tied_input_rank``).
- ``"svd"``: truncated SVD of the mode-N unfolding (``SVDConv2d``) for any kernel.

A 1x1 kernel is a matrix, whose best rank-R CP and Tucker-2 approximations
are both the truncated SVD, so under ``"cp"`` and ``"tucker2"`` the 1x1 convs
become ``SVDConv2d`` layers (``layer_method``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from codec_det.baselines.cp import CPConv2d, cp_als, cp_initial_terms, cp_prefix_errors
from codec_det.baselines.svd import SVDConv2d, svd_rank_errors, truncated_svd_factors
from codec_det.baselines.tucker2 import Tucker2Conv2d, hosvd_rank_errors, tied_input_rank, tucker2_hooi
from codec_det.complexity import ConvGeometry
from codec_det.spec import LayerSpec, SpecError

__all__ = [
    "METHODS",
    "BASELINE_METHODS",
    "LAYOUTS",
    "BaselineSettings",
    "check_method",
    "layer_method",
    "baseline_cost",
    "baseline_max_rank",
    "rank_for_macs",
    "baseline_rank_errors",
    "decompose_baseline",
    "baseline_layer_spec",
    "build_baseline_layer",
]

METHODS = ("codec", "cp", "tucker2", "svd")
BASELINE_METHODS = ("cp", "tucker2", "svd")

# Stage layout written to the spec for each baseline layer type.
LAYOUTS = {
    "cp": "pointwise+vertical+horizontal+pointwise",
    "tucker2": "pointwise+core+pointwise",
    "svd": "conv+pointwise",
}

BaselineLayer = CPConv2d | Tucker2Conv2d | SVDConv2d


@dataclass(frozen=True)
class BaselineSettings:
    """Solver settings of the baseline decompositions.

    Attributes:
        cp_iterations: maximum CP-ALS iterations per layer.
        tucker_iterations: maximum HOOI iterations per layer.
        tol: stopping threshold on the relative change of the error.
        ridge: CP-ALS Tikhonov term relative to the Gram matrices' mean diagonal.
        dtype: dtype of CP-ALS (HOOI and the SVD run in float64).
        seed: seed of CP-ALS's random columns, used only when R exceeds the
            number of nonzero starting terms.
    """

    cp_iterations: int = 25
    tucker_iterations: int = 10
    tol: float = 1e-4
    ridge: float = 1e-6
    dtype: torch.dtype = torch.float32
    seed: int = 0


def check_method(method: str) -> str:
    """Return ``method`` when it is a known method name, else raise ``ValueError`` listing them."""
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def layer_method(method: str, kernel_size: tuple[int, int]) -> str:
    """Return the layer type a baseline method uses for a kernel size: ``"svd"`` for 1x1 kernels."""
    if method not in BASELINE_METHODS:
        raise ValueError(f"unknown baseline method {method!r}; choose one of {', '.join(BASELINE_METHODS)}")
    if tuple(kernel_size) == (1, 1):
        return "svd"
    return method


def baseline_cost(method: str, geometry: ConvGeometry, rank: int) -> tuple[int, int]:
    """Return (MACs, parameters) of the baseline layer, as fvcore counts the convs it runs.

    ``method`` is a layer type (see ``layer_method``); for ``"tucker2"``,
    ``rank`` is the output rank R4 and the input rank follows from
    ``tied_input_rank``. Bias additions are not counted, as in fvcore.
    """
    kh, kw = geometry.kernel_size
    in_h, in_w = geometry.input_hw
    out_h, out_w = geometry.output_hw
    channels, filters = geometry.in_channels, geometry.out_channels
    bias = filters if geometry.bias else 0

    if method == "cp":
        macs = rank * (channels * in_h * in_w + kh * out_h * in_w + kw * out_h * out_w + filters * out_h * out_w)
        params = rank * (channels + kh + kw + filters)
    elif method == "tucker2":
        input_rank = tied_input_rank(rank, channels, filters)
        macs = input_rank * channels * in_h * in_w + (rank * input_rank * kh * kw + filters * rank) * out_h * out_w
        params = input_rank * channels + rank * input_rank * kh * kw + filters * rank
    elif method == "svd":
        macs = rank * (channels * kh * kw + filters) * out_h * out_w
        params = rank * (channels * kh * kw + filters)
    else:
        raise ValueError(f"unknown baseline layer type {method!r}; choose one of {', '.join(BASELINE_METHODS)}")
    return macs, params + bias


def baseline_max_rank(method: str, geometry: ConvGeometry) -> int:
    """Return the largest rank whose layer has fewer MACs than the dense conv (0 when none has).

    Also capped by the structure: ``min(N, C*kh*kw)`` for the SVD, ``N`` (and
    an input rank of at most C) for Tucker-2.
    """
    kh, kw = geometry.kernel_size
    out_h, out_w = geometry.output_hw
    dense = geometry.out_channels * geometry.in_channels * kh * kw * out_h * out_w
    if method == "svd":
        upper = min(geometry.out_channels, geometry.in_channels * kh * kw)
    elif method == "tucker2":
        upper = geometry.out_channels
    elif method == "cp":
        upper = dense
    else:
        raise ValueError(f"unknown baseline layer type {method!r}; choose one of {', '.join(BASELINE_METHODS)}")
    return rank_for_macs(method, geometry, dense - 1, upper=upper) or 0


def rank_for_macs(method: str, geometry: ConvGeometry, budget: float, *, upper: int | None = None) -> int | None:
    """Return the largest rank whose layer costs at most ``budget`` MACs, or None when rank 1 exceeds it.

    The cost grows with the rank, so a binary search over [1, upper] finds it;
    ``upper`` defaults to ``baseline_max_rank``.
    """
    if upper is None:
        upper = baseline_max_rank(method, geometry)
    if upper < 1 or baseline_cost(method, geometry, 1)[0] > budget:
        return None
    low, high = 1, upper
    while low < high:
        middle = (low + high + 1) // 2
        if baseline_cost(method, geometry, middle)[0] <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def baseline_rank_errors(method: str, weight: torch.Tensor, ranks: list[int]) -> np.ndarray:
    """Estimate the relative error of the layer at each rank, for the budget allocation.

    Exact for ``"svd"``. For ``"tucker2"`` the truncated-HOSVD error and for
    ``"cp"`` the error of the ALS starting point (``cp_initial_terms``): both
    upper bounds on what the fitted decomposition reaches.
    """
    if not ranks:
        return np.zeros(0)
    weight = weight.detach().to(torch.float64).cpu()
    if method == "svd":
        return np.asarray(svd_rank_errors(weight, ranks))
    if method == "tucker2":
        out_channels, in_channels = weight.shape[:2]
        pairs = [(tied_input_rank(rank, in_channels, out_channels), rank) for rank in ranks]
        return np.asarray(hosvd_rank_errors(weight, pairs))
    if method == "cp":
        # float32 halves the time of the SVDs and Gram matrices; the estimate
        # only ranks options, so its rounding error does not matter.
        weight = weight.to(torch.float32)
        terms = cp_initial_terms(weight, max(ranks))
        return np.asarray(cp_prefix_errors(weight, terms, ranks))
    raise ValueError(f"unknown baseline layer type {method!r}; choose one of {', '.join(BASELINE_METHODS)}")


def _check_conv(conv: nn.Conv2d, name: str) -> None:
    if type(conv) is not nn.Conv2d or conv.groups != 1:
        raise ValueError(f"{name}: only nn.Conv2d layers with groups=1 can be decomposed, got {conv}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"{name}: padding_mode={conv.padding_mode!r} is not supported; only zero padding is")


def decompose_baseline(
    conv: nn.Conv2d,
    method: str,
    rank: int,
    *,
    settings: BaselineSettings = BaselineSettings(),
    name: str = "conv",
) -> tuple[BaselineLayer, float]:
    """Decompose ``conv`` with a baseline layer type at ``rank``.

    Args:
        conv: a dense ``nn.Conv2d`` with ``groups == 1`` and zero padding mode.
        method: layer type, ``"cp"``, ``"tucker2"`` or ``"svd"`` (see ``layer_method``).
        rank: R (R4, the output rank, for Tucker-2), a positive integer; the
            SVD takes at most ``min(N, C*kh*kw)`` and Tucker-2 at most N.
        name: layer name used in error messages.

    Returns:
        The layer, on the device and in the dtype of ``conv``, and the relative
        reconstruction error of its kernel.
    """
    _check_conv(conv, name)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{name}: rank must be a positive integer, got {rank!r}")
    weight = conv.weight.detach()
    out_channels, in_channels, kh, kw = weight.shape
    common = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None)

    if method == "svd":
        limit = min(out_channels, in_channels * kh * kw)
        if rank > limit:
            raise ValueError(f"{name}: SVD rank {rank} exceeds min(N, C*kh*kw) = {limit} for weight {tuple(weight.shape)}")
        input_factors, output_factors, error = truncated_svd_factors(weight, rank)
        layer = SVDConv2d(in_channels, out_channels, (kh, kw), rank=rank, **common)
        values = {"input_factors": input_factors, "output_factors": output_factors}
    elif method == "tucker2":
        if rank > out_channels:
            raise ValueError(f"{name}: Tucker-2 output rank {rank} exceeds the {out_channels} filters")
        input_rank = tied_input_rank(rank, in_channels, out_channels)
        result = tucker2_hooi(weight, input_rank, rank, n_iter_max=settings.tucker_iterations, tol=settings.tol)
        layer = Tucker2Conv2d(in_channels, out_channels, (kh, kw), input_rank=input_rank, output_rank=rank, **common)
        values = {
            "input_factors": result.input_factors.T,
            "core": result.core,
            "output_factors": result.output_factors,
        }
        error = result.relative_error
    elif method == "cp":
        result = cp_als(
            weight,
            rank,
            n_iter_max=settings.cp_iterations,
            tol=settings.tol,
            ridge=settings.ridge,
            seed=settings.seed,
            dtype=settings.dtype,
        )
        layer = CPConv2d(in_channels, out_channels, (kh, kw), rank=rank, **common)
        values = {
            "input_factors": result.input_factors.T,
            "height_factors": result.height_factors.T,
            "width_factors": result.width_factors.T,
            "output_factors": result.output_factors,
        }
        error = result.relative_error
    else:
        raise ValueError(f"{name}: unknown baseline layer type {method!r}; choose one of {', '.join(BASELINE_METHODS)}")

    with torch.no_grad():
        for key, value in values.items():
            getattr(layer, key).copy_(value)
        if conv.bias is not None:
            layer.bias.copy_(conv.bias.detach())
    layer.to(device=weight.device, dtype=weight.dtype)
    return layer, float(error)


def baseline_layer_spec(layer: BaselineLayer) -> LayerSpec:
    """Describe a baseline layer's structure for the spec (one group, identity permutation)."""
    if isinstance(layer, CPConv2d):
        method, rank, extra = "cp", layer.rank, {}
    elif isinstance(layer, Tucker2Conv2d):
        method, rank, extra = "tucker2", layer.output_rank, {"input_rank": layer.input_rank}
    elif isinstance(layer, SVDConv2d):
        method, rank, extra = "svd", layer.rank, {}
    else:
        raise TypeError(f"not a baseline layer: {type(layer).__name__}")
    return LayerSpec(
        method=method,
        in_channels=layer.in_channels,
        out_channels=layer.out_channels,
        kernel_size=list(layer.kernel_size),
        stride=list(layer.stride),
        padding=layer.padding if isinstance(layer.padding, str) else list(layer.padding),
        dilation=list(layer.dilation),
        bias=layer.bias is not None,
        groups=1,
        rank=rank,
        permutation=list(range(layer.out_channels)),
        layout=LAYOUTS[method],
        extra=extra,
    )


def build_baseline_layer(spec: LayerSpec, name: str = "layer") -> BaselineLayer:
    """Build an uninitialised baseline layer with the structure ``spec`` describes.

    Raises:
        SpecError: naming the layer, for an unknown method, a layout that does
            not match it, or a missing or invalid Tucker-2 input rank.
    """
    if spec.method not in BASELINE_METHODS:
        raise SpecError(
            f"layer {name}: method {spec.method!r} is not a baseline method ({', '.join(BASELINE_METHODS)})"
        )
    if spec.layout != LAYOUTS[spec.method]:
        raise SpecError(
            f"layer {name}: layout {spec.layout!r} does not match method {spec.method!r} "
            f"(expected {LAYOUTS[spec.method]!r})"
        )
    spec.validate(name)
    common = dict(
        stride=tuple(spec.stride),
        padding=spec.padding if isinstance(spec.padding, str) else tuple(spec.padding),
        dilation=tuple(spec.dilation),
        bias=spec.bias,
    )
    shape = (spec.in_channels, spec.out_channels, tuple(spec.kernel_size))
    if spec.method == "cp":
        return CPConv2d(*shape, rank=spec.rank, **common)
    if spec.method == "svd":
        return SVDConv2d(*shape, rank=spec.rank, **common)

    input_rank = spec.extra.get("input_rank")
    if isinstance(input_rank, bool) or not isinstance(input_rank, int) or input_rank <= 0:
        raise SpecError(
            f"layer {name}: a tucker2 layer needs a positive integer extra.input_rank, got {input_rank!r}"
        )
    return Tucker2Conv2d(*shape, input_rank=input_rank, output_rank=spec.rank, **common)
