"""Truncated-SVD convolution: a conv as two convs through R channels.

The kernel's mode-N unfolding ``W_(1)`` (N, C*kh*kw) is replaced by its best
rank-``R`` approximation ``U_R S_R V_R^T`` (Eckart-Young), which runs as a
``kh x kw`` conv ``C -> R`` (rows of ``S_R^(1/2) V_R^T``, with the original
stride, padding and dilation) followed by a 1x1 conv ``R -> N`` (``U_R
S_R^(1/2)``) with the bias. For a 1x1 conv both stages are 1x1 convs, the
classic low-rank factorisation of a fully connected layer (Denton et al.,
"Exploiting Linear Structure Within Convolutional Networks for Efficient
Evaluation", NeurIPS 2014).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SVDConv2d", "truncated_svd_factors", "svd_rank_errors"]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return tuple(value)


class SVDConv2d(nn.Module):
    """A conv layer stored as a rank-R factorisation of its mode-N unfolding.

    Parameters:

    - ``input_factors``: shape (R, C, kh, kw), the first conv ``C -> R``.
    - ``output_factors``: shape (N, R), the 1x1 conv ``R -> N``.
    - ``bias``: shape (N,), or None; added by the second stage.

    Args:
        in_channels: C.
        out_channels: N.
        kernel_size: (kh, kw) or an int.
        rank: R.
        stride, padding, dilation: as in ``nn.Conv2d``, applied by the first stage.
        bias: whether the layer has a bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        rank: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
    ):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.rank = rank
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)

        self.input_factors = nn.Parameter(torch.empty(rank, in_channels, *self.kernel_size))
        self.output_factors = nn.Parameter(torch.empty(out_channels, rank))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.reset_parameters()

    def factors(self) -> list[nn.Parameter]:
        """List the factor parameters: input factors, output factors."""
        return [self.input_factors, self.output_factors]

    def reset_parameters(self) -> None:
        """Draw random factors whose product has the variance of a Kaiming-uniform conv."""
        kh, kw = self.kernel_size
        with torch.no_grad():
            self.input_factors.normal_().mul_(1 / math.sqrt(3 * self.in_channels * kh * kw))
            self.output_factors.normal_().mul_(1 / math.sqrt(self.rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer: (B, C, H, W) -> (B, N, H_out, W_out)."""
        x = F.conv2d(x, self.input_factors, stride=self.stride, padding=self.padding, dilation=self.dilation)

        return F.conv2d(x, self.output_factors[:, :, None, None], self.bias)

    def reconstruct_weight(self) -> torch.Tensor:
        """Rebuild the dense kernel, shape (N, C, kh, kw)."""
        return torch.einsum("nr,rchw->nchw", self.output_factors, self.input_factors)

    def to_dense(self) -> nn.Conv2d:
        """Return the ``nn.Conv2d`` that computes the same output as this layer."""
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
            conv.weight.copy_(self.reconstruct_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        return text


def truncated_svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factorise a kernel's mode-N unfolding at rank R.

    Args:
        weight: (N, C, kh, kw).
        rank: R, in [1, min(N, C*kh*kw)].

    Returns:
        ``(input_factors (R, C, kh, kw), output_factors (N, R), relative error)``,
        in float64; the singular values are split evenly between the two.
    """
    out_channels, in_channels, kh, kw = weight.shape
    limit = min(out_channels, in_channels * kh * kw)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(f"rank must be an integer in [1, {limit}] for weight {tuple(weight.shape)}, got {rank!r}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf values; the kernel cannot be decomposed")

    matrix = weight.detach().to(torch.float64).reshape(out_channels, -1)
    left, singular_values, right_h = torch.linalg.svd(matrix, full_matrices=False)
    root = singular_values[:rank].sqrt()
    input_factors = (root[:, None] * right_h[:rank]).reshape(rank, in_channels, kh, kw)
    output_factors = left[:, :rank] * root
    energy = singular_values.pow(2)
    error = float((energy[rank:].sum() / energy.sum().clamp_min(1e-300)).sqrt())
    return input_factors, output_factors, error


def svd_rank_errors(weight: torch.Tensor, ranks: list[int]) -> list[float]:
    """Return the relative error of the rank-R truncated SVD for each R in ``ranks`` (exact)."""
    out_channels = weight.shape[0]
    singular_values = torch.linalg.svdvals(weight.detach().to(torch.float64).reshape(out_channels, -1))
    energy = singular_values.pow(2)
    total = float(energy.sum().clamp_min(1e-300))
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0]).tolist() + [0.0]
    return [math.sqrt(max(tail[min(rank, len(energy))], 0.0) / total) for rank in ranks]
