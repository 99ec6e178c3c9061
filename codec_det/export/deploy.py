"""The deployment form of a model: compressed layers in the form that runs fastest for inference.

``to_deploy_form`` rewrites a model in place so that it computes the same
function (in eval mode) with less work per call:

- each ``CoDeCConv2d`` becomes a ``FusedCoDeCConv2d``: its stage-2 kernels
  ``B_n[:, r] C_n[:, r]^T`` are materialised once as the constant weight of a
  grouped conv instead of at every call;
- each batch norm that directly follows a conv (a separate ``BatchNorm2d``
  module found by ``torch.fx``, or the ``norm`` inside a Detectron2 ``Conv2d``
  or ``CoDeCNormConv2d``) is folded into that conv's weight and bias;
- the output permutation of a single-group layer is folded into its stage-2
  weight. A multi-group layer whose permutation could not be folded into the
  next layers keeps its ``index_select``.

The result is for inference only: its weights are plain tensors, not the
CoDeC factors, so fine-tuning it would lose the low-rank structure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import fx, nn

from codec_det.layers.codec_conv import CoDeCConv2d
from codec_det.surgery import set_submodule

__all__ = ["FusedCoDeCConv2d", "DeployReport", "fold_norm_into_conv", "to_deploy_form"]

logger = logging.getLogger(__name__)


class FusedCoDeCConv2d(nn.Module):
    """A CoDeC layer for inference: a dense 1x1 conv, then a grouped conv with constant kernels.

    Stage 1 (``pointwise``) maps ``C -> G*R`` channels. Stage 2 (``spatial``)
    is the grouped ``kh x kw`` conv (``groups = G``) that holds the
    materialised rank-1 kernels, with any folded batch norm in its weight and bias.

    Args:
        pointwise: the 1x1 conv, weight (G*R, C, 1, 1).
        spatial: the grouped conv, weight (N, R, kh, kw).
        output_index: shape (N,), channel ``c`` of the output is channel
            ``output_index[c]`` of ``spatial``'s output; None when ``spatial``
            already emits the order the next layers expect.
        norm: a norm that could not be folded (e.g. GroupNorm), or None.
        activation: callable applied last, or None.
    """

    def __init__(
        self,
        pointwise: nn.Conv2d,
        spatial: nn.Conv2d,
        *,
        output_index: torch.Tensor | None = None,
        norm: nn.Module | None = None,
        activation: Callable | None = None,
    ):
        super().__init__()
        self.in_channels = pointwise.in_channels
        self.out_channels = spatial.out_channels
        self.pointwise = pointwise
        self.spatial = spatial
        if output_index is None:
            self.output_index = None
        else:
            self.register_buffer("output_index", output_index.clone())
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer: (B, C, H, W) -> (B, N, H_out, W_out)."""
        x = self.pointwise(x)
        x = self.spatial(x)
        if self.output_index is not None:
            x = x.index_select(1, self.output_index)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


@dataclass
class DeployReport:
    """Changes made by ``to_deploy_form``, as lists of module names."""

    fused: list[str] = field(default_factory=list)
    densified: list[str] = field(default_factory=list)
    folded_norms: list[str] = field(default_factory=list)
    kept_index_select: list[str] = field(default_factory=list)
    kept_norms: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.fused)} CoDeC layers fused, {len(self.densified)} made dense, "
            f"{len(self.folded_norms)} norms folded, {len(self.kept_norms)} norms kept, "
            f"{len(self.kept_index_select)} output permutations kept as index_select"
        )


def _is_foldable_norm(module: nn.Module | None) -> bool:
    """Tell whether ``module`` is a per-channel affine norm with running statistics (eval-mode batch norm)."""
    if module is None:
        return False
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.track_running_stats and module.running_mean is not None
    # Detectron2's FrozenBatchNorm2d stores weight, bias and running statistics as buffers.
    return all(hasattr(module, name) for name in ("running_mean", "running_var", "weight", "bias", "eps"))


def _norm_scale_shift(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (scale, shift) with ``norm(y) == y * scale + shift`` per channel, in float64."""
    mean = norm.running_mean.detach().double()
    variance = norm.running_var.detach().double()
    scale = torch.rsqrt(variance + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.detach().double()
    shift = -mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach().double()
    return scale, shift


def fold_norm_into_conv(conv: nn.Conv2d, norm: nn.Module) -> None:
    """Fold an eval-mode batch norm that follows ``conv`` into its weight and bias, in place.

    ``conv`` gets a bias when it had none. The norm itself is left untouched;
    the caller removes it from the graph.
    """
    scale, shift = _norm_scale_shift(norm)
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    new_weight = weight * scale.reshape(-1, 1, 1, 1)
    new_bias = bias * scale + shift
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter(new_weight.to(dtype), requires_grad=False)
    conv.bias = nn.Parameter(new_bias.to(dtype), requires_grad=False)


def _fuse_codec(layer: CoDeCConv2d, norm: nn.Module | None) -> tuple[FusedCoDeCConv2d, bool, bool]:
    """Build the fused form of ``layer`` with ``norm`` (applied to its output) folded in when possible.

    Returns:
        ``(fused layer, norm was folded, index_select kept)``.
    """
    device, dtype = layer.input_factors.device, layer.input_factors.dtype
    rank, groups = layer.rank, layer.groups

    pointwise = nn.Conv2d(
        layer.in_channels,
        groups * rank,
        1,
        stride=layer.stride if layer.stride_in_pointwise_stage else 1,
        bias=False,
    ).to(device=device, dtype=dtype)
    spatial = nn.Conv2d(
        groups * rank,
        layer.out_channels,
        layer.kernel_size,
        stride=1 if layer.stride_in_pointwise_stage else layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=groups,
        bias=True,
    ).to(device=device, dtype=dtype)

    with torch.no_grad():
        pointwise_weight = layer.input_factors.detach().reshape(groups * rank, layer.in_channels, 1, 1)
        # Rows of the stage-2 weight are in group order, so raw output row p is filter permutation[p].
        spatial_weight = layer.spatial_kernels().detach().double()
        spatial_bias = (
            layer.bias.detach().double() if layer.bias is not None else torch.zeros(layer.out_channels, device=device)
        ).double()

        emits_group_order = layer.permutation_folded or layer._permutation_is_identity
        folded = _is_foldable_norm(norm)
        if folded:
            scale, shift = _norm_scale_shift(norm)
            if not emits_group_order:
                # Output channel c is raw row inverse_permutation[c], so raw row p takes the scale of channel permutation[p].
                scale = scale.index_select(0, layer.permutation)
                shift = shift.index_select(0, layer.permutation)
            spatial_weight = spatial_weight * scale.reshape(-1, 1, 1, 1)
            spatial_bias = spatial_bias * scale + shift

        output_index = None
        if not emits_group_order:
            if groups == 1:
                # One group: any row order is valid, so put the rows in the original filter order.
                spatial_weight = spatial_weight.index_select(0, layer.inverse_permutation)
                spatial_bias = spatial_bias.index_select(0, layer.inverse_permutation)
            else:
                output_index = layer.inverse_permutation

        pointwise.weight.copy_(pointwise_weight)
        spatial.weight.copy_(spatial_weight.to(dtype))
        spatial.bias.copy_(spatial_bias.to(dtype))
    for parameter in (*pointwise.parameters(), *spatial.parameters()):
        parameter.requires_grad_(False)

    fused = FusedCoDeCConv2d(
        pointwise,
        spatial,
        output_index=output_index,
        norm=None if folded else norm,
        activation=getattr(layer, "activation", None),
    )
    return fused, folded, output_index is not None


def _densify_codec(layer: CoDeCConv2d, norm: nn.Module | None) -> tuple[nn.Module, bool]:
    """Replace ``layer`` (and ``norm``) by one dense conv; returns (module, norm was folded)."""
    dense = CoDeCConv2d.to_dense(layer)
    folded = _is_foldable_norm(norm)
    if folded:
        fold_norm_into_conv(dense, norm)
    else:
        dense.weight.requires_grad_(False)
    steps: list[nn.Module] = [dense]
    if norm is not None and not folded:
        steps.append(norm)
    activation = getattr(layer, "activation", None)
    if activation is not None:
        steps.append(_Activation(activation))
    if len(steps) == 1:
        return dense, folded
    return nn.Sequential(*steps), folded


class _Activation(nn.Module):
    """An activation function as a module (Detectron2 convs store functions, not modules)."""

    def __init__(self, function: Callable):
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)


class _LeafTracer(fx.Tracer):
    """An fx tracer that keeps compressed layers as single nodes."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, CoDeCConv2d) or super().is_leaf_module(module, qualified_name)


def _separate_norms(model: nn.Module) -> dict[str, str]:
    """Map each conv whose only consumer is a batch-norm module to that module's name, using ``torch.fx``.

    Returns an empty mapping when the model cannot be traced (Detectron2's
    backbones keep their norms inside the convs, so they need no tracing).
    """
    try:
        graph = _LeafTracer().trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure means no separate norms are folded
        logger.debug("no separate batch norms folded: torch.fx cannot trace %s (%s)", type(model).__name__, error)
        return {}

    modules = dict(model.named_modules())
    pairs: dict[str, str] = {}
    norm_users: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module" and _is_foldable_norm(modules.get(node.target)):
            norm_users[node.target] = norm_users.get(node.target, 0) + 1
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], (nn.Conv2d, CoDeCConv2d)):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        norm_name = users[0].target
        # A norm module called at more than one place cannot be removed for one of them.
        if _is_foldable_norm(modules[norm_name]) and norm_users.get(norm_name) == 1:
            pairs[node.target] = norm_name
    return pairs


def to_deploy_form(model: nn.Module, *, dense_layers: Iterable[str] = ()) -> DeployReport:
    """Rewrite ``model`` in place into its inference deployment form and set it to eval mode.

    Args:
        model: any model made of ``nn.Conv2d`` / ``CoDeCConv2d`` layers and batch
            norms (torchvision ResNets, Detectron2 backbones and detectors).
        dense_layers: names of ``CoDeCConv2d`` layers to materialise as one
            dense conv instead of the fused two-stage form, for layers where
            the dense conv runs faster.

    Returns:
        A ``DeployReport`` of what changed.
    """
    model.eval()
    dense_layers = set(dense_layers)
    modules = dict(model.named_modules())
    unknown = sorted(name for name in dense_layers if not isinstance(modules.get(name), CoDeCConv2d))
    if unknown:
        raise ValueError(f"dense_layers names modules that are not CoDeC layers of this model: {unknown}")

    report = DeployReport()
    separate = _separate_norms(model)

    for name, module in list(modules.items()):
        inner_norm = getattr(module, "norm", None)
        if name in separate:
            norm, norm_name = modules[separate[name]], separate[name]
        elif isinstance(inner_norm, nn.Module) and isinstance(module, (nn.Conv2d, CoDeCConv2d)):
            norm, norm_name = inner_norm, f"{name}.norm"
        else:
            norm, norm_name = None, None

        if isinstance(module, CoDeCConv2d):
            if name in dense_layers:
                replacement, folded = _densify_codec(module, norm)
                report.densified.append(name)
            else:
                replacement, folded, kept_index = _fuse_codec(module, norm)
                report.fused.append(name)
                if kept_index:
                    report.kept_index_select.append(name)
            set_submodule(model, name, replacement)
        elif isinstance(module, nn.Conv2d) and _is_foldable_norm(norm):
            fold_norm_into_conv(module, norm)
            folded = True
            if norm_name == f"{name}.norm":
                module.norm = None
        else:
            continue

        if norm is None:
            continue
        if folded:
            report.folded_norms.append(norm_name)
            if name in separate:
                set_submodule(model, norm_name, nn.Identity())
        else:
            report.kept_norms.append(norm_name)

    logger.info("deployment form: %s", report.summary())
    return report
