"""The CoDeC convolution: a conv layer stored as coupled CP factors.

Filter ``n`` of group ``g`` is ``W_n = [[A_g, B_n, C_n]]``, so its output is

    y_n = sum_r (B_n[:, r] C_n[:, r]^T) * (A_g[:, r]^T x),

which the layer runs in two stages: one dense 1x1 conv ``C -> G*R`` computes
``A_g^T x`` for every group in a single GEMM (the shared part of similar
filters, computed once), then one grouped ``kh x kw`` conv with ``G`` groups
applies each filter's rank-1 spatial kernels to the ``R`` channels of its
group. The stage-2 kernels are materialised from the factors at each call, so
the factors are the trainable parameters and fine-tuning keeps the low-rank
structure. Measured on a 2-core AVX-512 CPU with torch 2.14.1, this layout was
the only competitive one: separable ``kh x 1`` / ``1 x kw`` stages ran 6x to
50x slower than the dense conv.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CoDeCConv2d"]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return tuple(value)


class CoDeCConv2d(nn.Module):
    """A conv layer in coupled-CP form (Pham, Zniyed, Nguyen, IEEE TNNLS 2025).

    Parameters (only spatial modes of size > 1 have a factor):

    - ``input_factors``: ``A_g^T`` of every group, shape (G, R, C).
    - ``height_factors``: ``B_n^T``, shape (N, R, kh), when ``kh > 1``.
    - ``width_factors``: ``C_n^T``, shape (N, R, kw), when ``kw > 1``.
    - ``filter_factors``: shape (N, R), for 1x1 kernels only.
    - ``bias``: shape (N,), in group order, or None.

    Filters are stored in group order (group ``g`` holds positions
    ``g*N/G .. (g+1)*N/G - 1``); ``permutation[p]`` is the original index of the
    filter at position ``p``. ``forward`` returns channels in the original order
    unless ``permutation_folded`` is set, in which case the caller has permuted
    the next layers' weights to expect group order and ``forward`` skips the
    ``index_select``.

    Args:
        in_channels: C.
        out_channels: N.
        kernel_size: (kh, kw) or an int.
        groups: G, the number of filter groups; must divide N.
        rank: R, the number of rank-1 terms per group.
        stride, padding, dilation: as in ``nn.Conv2d``; padding may be
            ``'same'`` or ``'valid'``.
        bias: whether the layer has a bias.
        permutation: shape (N,), defaults to the identity.
        permutation_folded: see above.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        groups: int,
        rank: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        permutation: torch.Tensor | None = None,
        permutation_folded: bool = False,
    ):
        super().__init__()
        if out_channels % groups != 0:
            raise ValueError(
                f"groups={groups} does not divide out_channels={out_channels}; choose a divisor of {out_channels}"
            )
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.groups = groups
        self.rank = rank
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.permutation_folded = permutation_folded

        kh, kw = self.kernel_size
        self.input_factors = nn.Parameter(torch.empty(groups, rank, in_channels))
        if (kh, kw) == (1, 1):
            self.filter_factors = nn.Parameter(torch.empty(out_channels, rank))
        if kh > 1:
            self.height_factors = nn.Parameter(torch.empty(out_channels, rank, kh))
        if kw > 1:
            self.width_factors = nn.Parameter(torch.empty(out_channels, rank, kw))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

        if permutation is None:
            permutation = torch.arange(out_channels)
        self.register_buffer("permutation", torch.as_tensor(permutation, dtype=torch.long).clone())
        self.register_buffer("inverse_permutation", torch.argsort(self.permutation))
        self._update_permutation_flag()
        self.reset_parameters()

    def _update_permutation_flag(self) -> None:
        # Cached so that forward skips index_select for the identity without a per-call check.
        identity = torch.arange(self.out_channels, device=self.permutation.device)
        self._permutation_is_identity = bool((self.permutation == identity).all())

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # A state dict may carry another permutation than the one given at construction.
        super()._load_from_state_dict(*args, **kwargs)
        self._update_permutation_flag()

    def reset_parameters(self) -> None:
        """Draw random factors whose product has the variance of a Kaiming-uniform conv."""
        for parameter in self.factors():
            nn.init.normal_(parameter)
        kh, kw = self.kernel_size
        fan_in = self.in_channels * kh * kw
        # Each weight entry is a sum of R products of unit-variance entries.
        target_std = 1.0 / math.sqrt(3 * fan_in)
        scale = (target_std / math.sqrt(self.rank)) ** (1.0 / len(self.factors()))
        with torch.no_grad():
            for parameter in self.factors():
                parameter.mul_(scale)

    def factors(self) -> list[nn.Parameter]:
        """List the factor parameters in the order A, then the spatial factors."""
        names = ("input_factors", "filter_factors", "height_factors", "width_factors")
        return [getattr(self, name) for name in names if hasattr(self, name)]

    @property
    def stride_in_pointwise_stage(self) -> bool:
        """True when stage 1 applies the stride (1x1 kernels without padding): fewer MACs."""
        return self.kernel_size == (1, 1) and self.padding in ((0, 0), "valid")

    def spatial_kernels(self) -> torch.Tensor:
        """Materialise the stage-2 kernels ``B_n[:, r] C_n[:, r]^T``, shape (N, R, kh, kw)."""
        kh, kw = self.kernel_size
        if (kh, kw) == (1, 1):
            return self.filter_factors[:, :, None, None]
        if kh > 1 and kw > 1:
            return self.height_factors[:, :, :, None] * self.width_factors[:, :, None, :]
        if kh > 1:
            return self.height_factors[:, :, :, None]
        return self.width_factors[:, :, None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer: (B, C, H, W) -> (B, N, H_out, W_out)."""
        pointwise_weight = self.input_factors.reshape(self.groups * self.rank, self.in_channels, 1, 1)
        if self.stride_in_pointwise_stage:
            shared = F.conv2d(x, pointwise_weight, stride=self.stride)
            stage_two_stride = 1
        else:
            shared = F.conv2d(x, pointwise_weight)
            stage_two_stride = self.stride

        y = F.conv2d(
            shared,
            self.spatial_kernels(),
            self.bias,
            stride=stage_two_stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
        )

        if self.permutation_folded or self._permutation_is_identity:
            return y
        return y.index_select(1, self.inverse_permutation)

    def reconstruct_weight(self, original_order: bool = True) -> torch.Tensor:
        """Rebuild the dense weight, shape (N, C, kh, kw).

        With ``original_order`` the filters come in the original order, else in
        group order (the order of the raw stage-2 output).
        """
        per_group = self.out_channels // self.groups
        group_of_filter = torch.arange(self.out_channels, device=self.input_factors.device) // per_group
        input_factors = self.input_factors[group_of_filter]
        weight = torch.einsum("nrc,nrhw->nchw", input_factors, self.spatial_kernels())
        if original_order:
            return weight.index_select(0, self.inverse_permutation)
        return weight

    def to_dense(self) -> nn.Conv2d:
        """Return the ``nn.Conv2d`` that computes the same output as this layer.

        When ``permutation_folded`` is set the dense conv emits group order, as
        this layer does.
        """
        original_order = not self.permutation_folded
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
        ).to(device=self.input_factors.device, dtype=self.input_factors.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.reconstruct_weight(original_order))
            if self.bias is not None:
                bias = self.bias.index_select(0, self.inverse_permutation) if original_order else self.bias
                conv.bias.copy_(bias)
        return conv

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, groups={self.groups}, "
            f"rank={self.rank}, stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        if self.permutation_folded:
            text += ", permutation_folded=True"
        return text
