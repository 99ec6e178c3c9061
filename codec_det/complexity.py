"""MACs and parameter counts: fvcore's for whole models, analytic ones for layers.

fvcore's ``FlopCountAnalysis`` counts one multiply-accumulate as one "flop"
for convs and linear layers (and one per element for batch norm), so its total
is what this package calls MACs. The analytic per-layer counts below match
fvcore's count of the same modules exactly, which lets the budget plan ranks
without rebuilding the model at every step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ConvGeometry",
    "record_conv_geometry",
    "dense_conv_cost",
    "codec_conv_cost",
    "count_model",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvGeometry:
    """Shape of one conv and of the feature maps it sees, for one input size."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    input_hw: tuple[int, int]
    output_hw: tuple[int, int]
    bias: bool

    @property
    def pointwise_stride(self) -> bool:
        """True when the compressed layer applies the stride in its 1x1 stage (see CoDeCConv2d)."""
        return self.kernel_size == (1, 1) and self.padding in ((0, 0), "valid")


def record_conv_geometry(
    model: nn.Module, names: list[str], input_size: tuple[int, int]
) -> dict[str, ConvGeometry]:
    """Run one forward pass of a (1, 3, H, W) zero image and record the named convs' geometry."""
    modules = dict(model.named_modules())
    geometry: dict[str, ConvGeometry] = {}
    handles = []

    def make_hook(name: str, conv: nn.Conv2d):
        def hook(_module, inputs, output):
            geometry[name] = ConvGeometry(
                in_channels=conv.in_channels,
                out_channels=conv.out_channels,
                kernel_size=tuple(conv.kernel_size),
                stride=tuple(conv.stride),
                padding=conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
                input_hw=tuple(inputs[0].shape[-2:]),
                output_hw=tuple(output.shape[-2:]),
                bias=conv.bias is not None,
            )

        return hook

    for name in names:
        handles.append(modules[name].register_forward_hook(make_hook(name, modules[name])))
    try:
        parameter = next(model.parameters())
        image = torch.zeros(1, 3, *input_size, device=parameter.device, dtype=parameter.dtype)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(image)
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()

    missing = [name for name in names if name not in geometry]
    if missing:
        raise ValueError(f"convs {missing} did not run in a forward pass at input size {input_size}")
    return geometry


def dense_conv_cost(geometry: ConvGeometry) -> tuple[int, int]:
    """Return (MACs, parameters) of the dense conv."""
    kh, kw = geometry.kernel_size
    out_h, out_w = geometry.output_hw
    macs = geometry.out_channels * geometry.in_channels * kh * kw * out_h * out_w
    params = geometry.out_channels * geometry.in_channels * kh * kw + (geometry.out_channels if geometry.bias else 0)
    return macs, params


def codec_conv_cost(geometry: ConvGeometry, groups: int, rank: int) -> tuple[int, int]:
    """Return (MACs, parameters) of the ``CoDeCConv2d`` with G groups and rank R.

    Stage 1 (1x1, C -> G*R) runs at the input resolution, or at the output
    resolution when it takes the stride; stage 2 (grouped, G*R -> N) at the
    output resolution. Parameters are the factors: ``G*R*C`` for the input
    factors, ``N*R`` per spatial mode of size > 1 (its length times), or
    ``N*R`` for a 1x1 kernel.
    """
    kh, kw = geometry.kernel_size
    out_h, out_w = geometry.output_hw
    in_h, in_w = geometry.output_hw if geometry.pointwise_stride else geometry.input_hw
    channels, filters = geometry.in_channels, geometry.out_channels

    stage_one = groups * rank * channels * in_h * in_w
    stage_two = filters * rank * kh * kw * out_h * out_w

    spatial_lengths = [k for k in (kh, kw) if k > 1] or [1]
    params = groups * rank * channels + filters * rank * sum(spatial_lengths)
    if geometry.bias:
        params += filters
    return stage_one + stage_two, params


def count_model(model: nn.Module, input_size: tuple[int, int] = (224, 224)) -> tuple[int, int]:
    """Count (MACs, parameters) of ``model`` on a (1, 3, H, W) input with fvcore."""
    from fvcore.nn import FlopCountAnalysis, parameter_count

    parameter = next(model.parameters())
    image = torch.zeros(1, 3, *input_size, device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    try:
        analysis = FlopCountAnalysis(model, image)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        with torch.no_grad():
            macs = int(analysis.total())
    finally:
        model.train(was_training)
    params = int(parameter_count(model)[""])
    return macs, params
