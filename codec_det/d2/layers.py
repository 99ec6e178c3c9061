"""The CoDeC convolution with Detectron2's ``Conv2d`` contract: a ``norm`` and an ``activation`` inside the conv."""

from __future__ import annotations

from typing import Callable

import torch
from detectron2.layers import Conv2d
from torch import nn

from codec_det.layers.codec_conv import CoDeCConv2d
from codec_det.spec import CODEC_LAYOUT, LayerSpec, SpecError

__all__ = ["CoDeCNormConv2d"]


class CoDeCNormConv2d(CoDeCConv2d):
    """A ``CoDeCConv2d`` followed by an optional norm and activation, as in Detectron2's ``Conv2d``.

    The norm is a submodule called ``norm``, so its weights have the keys of
    Detectron2's ResNet (``res2.0.conv1.norm.weight``), ``ResNet.freeze``
    turns it into ``FrozenBatchNorm2d`` and ``get_norm`` builds it. When the
    permutation is folded, the layer emits its filters in group order and the
    norm's weights are stored in that order.

    Args:
        norm: normalization applied to the conv output, or None.
        activation: callable applied after the norm, or None.
        Other arguments: as for ``CoDeCConv2d``.
    """

    def __init__(self, *args, norm: nn.Module | None = None, activation: Callable | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    @classmethod
    def from_spec(
        cls, spec: LayerSpec, name: str, *, norm: nn.Module | None = None, activation: Callable | None = None
    ) -> "CoDeCNormConv2d":
        """Build an uninitialised layer with the structure ``spec`` describes; ``name`` appears in errors."""
        if spec.method != "codec" or spec.layout != CODEC_LAYOUT:
            raise SpecError(
                f"layer {name}: method {spec.method!r} with layout {spec.layout!r} is not a CoDeC layer "
                f"(expected method 'codec', layout {CODEC_LAYOUT!r})"
            )
        spec.validate(name)
        return cls(
            spec.in_channels,
            spec.out_channels,
            tuple(spec.kernel_size),
            groups=spec.groups,
            rank=spec.rank,
            stride=tuple(spec.stride),
            padding=spec.padding if isinstance(spec.padding, str) else tuple(spec.padding),
            dilation=tuple(spec.dilation),
            bias=spec.bias,
            permutation=torch.tensor(spec.permutation),
            permutation_folded=spec.permutation_folded,
            norm=norm,
            activation=activation,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply conv, norm and activation: (B, C, H, W) -> (B, N, H_out, W_out)."""
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def to_dense(self) -> Conv2d:
        """Return the Detectron2 ``Conv2d`` that computes the same output, sharing this layer's norm."""
        dense = super().to_dense()
        conv = Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            norm=self.norm,
            activation=self.activation,
        ).to(device=dense.weight.device, dtype=dense.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(dense.weight)
            if self.bias is not None:
                conv.bias.copy_(dense.bias)
        return conv
