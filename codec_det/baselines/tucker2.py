"""Tucker-2-decomposed convolution (Kim et al., "Compression of Deep
Convolutional Neural Networks for Fast and Low Power Mobile Applications",
ICLR 2016).

The kernel ``W`` (N, C, kh, kw) is approximated by a Tucker decomposition of
its two channel modes,

    W ~= K x_1 U_out x_2 U_in,

with an output factor ``U_out`` (N, R4), an input factor ``U_in`` (C, R3) and
a core ``K`` (R4, R3, kh, kw). It runs as three convs: a 1x1 conv ``C -> R3``,
the ``kh x kw`` core conv ``R3 -> R4`` (stride, padding and dilation of the
original) and a 1x1 conv ``R4 -> N`` with the bias.

The factors come from the truncated HOSVD (De Lathauwer et al. 2000) refined
by higher-order orthogonal iteration (HOOI).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Tucker2Conv2d", "Tucker2Result", "tucker2_hooi", "hosvd_rank_errors", "tied_input_rank"]

logger = logging.getLogger(__name__)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return tuple(value)


def tied_input_rank(output_rank: int, in_channels: int, out_channels: int) -> int:
    """Return the input rank R3 that goes with output rank R4: ``R4 * C / N``, rounded, in [1, C].

    Tying the two ranks by the channel ratio keeps the same fraction of each
    channel mode, which turns the rank search into a search over one number.
    """
    return min(in_channels, max(1, round(output_rank * in_channels / out_channels)))


class Tucker2Conv2d(nn.Module):
    """A conv layer stored as its Tucker-2 factors (Kim et al. 2016).

    Parameters:

    - ``input_factors``: ``U_in^T``, shape (R3, C), the 1x1 conv ``C -> R3``.
    - ``core``: shape (R4, R3, kh, kw), the core conv.
    - ``output_factors``: ``U_out``, shape (N, R4), the 1x1 conv ``R4 -> N``.
    - ``bias``: shape (N,), or None; added by the last stage.

    Args:
        in_channels: C.
        out_channels: N.
        kernel_size: (kh, kw) or an int.
        input_rank: R3.
        output_rank: R4.
        stride, padding, dilation: as in ``nn.Conv2d``, applied by the core conv.
        bias: whether the layer has a bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        input_rank: int,
        output_rank: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
    ):
        super().__init__()
        for label, value in (("input_rank", input_rank), ("output_rank", output_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.input_rank = input_rank
        self.output_rank = output_rank
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)

        self.input_factors = nn.Parameter(torch.empty(input_rank, in_channels))
        self.core = nn.Parameter(torch.empty(output_rank, input_rank, *self.kernel_size))
        self.output_factors = nn.Parameter(torch.empty(out_channels, output_rank))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.reset_parameters()

    @property
    def rank(self) -> int:
        """The output rank R4, the rank recorded in the spec and searched by the budget."""
        return self.output_rank

    def factors(self) -> list[nn.Parameter]:
        """List the factor parameters: input factors, core, output factors."""
        return [self.input_factors, self.core, self.output_factors]

    def reset_parameters(self) -> None:
        """Draw random factors whose product has the variance of a Kaiming-uniform conv."""
        kh, kw = self.kernel_size
        with torch.no_grad():
            self.input_factors.normal_().mul_(1 / math.sqrt(self.in_channels))
            self.output_factors.normal_().mul_(1 / math.sqrt(self.output_rank))
            # Var(W) = (R3 / C) Var(core) with these factor variances, and the
            # target Var(W) is 1 / (3 C kh kw).
            self.core.normal_().mul_(1 / math.sqrt(3 * self.input_rank * kh * kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer: (B, C, H, W) -> (B, N, H_out, W_out)."""
        x = F.conv2d(x, self.input_factors[:, :, None, None])

        x = F.conv2d(x, self.core, stride=self.stride, padding=self.padding, dilation=self.dilation)

        return F.conv2d(x, self.output_factors[:, :, None, None], self.bias)

    def reconstruct_weight(self) -> torch.Tensor:
        """Rebuild the dense kernel ``K x_1 U_out x_2 U_in``, shape (N, C, kh, kw)."""
        return torch.einsum("nq,qrhw,rc->nchw", self.output_factors, self.core, self.input_factors)

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
        ).to(device=self.core.device, dtype=self.core.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.reconstruct_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"ranks=(in {self.input_rank}, out {self.output_rank}), stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        return text


@dataclass
class Tucker2Result:
    """Factors of a Tucker-2 decomposition of a kernel (N, C, kh, kw).

    Attributes:
        output_factors: ``U_out``, shape (N, R4), orthonormal columns.
        input_factors: ``U_in``, shape (C, R3), orthonormal columns.
        core: shape (R4, R3, kh, kw).
        relative_error: ``||W - W_hat||_F / ||W||_F``.
        errors: relative error of the HOSVD start and after each HOOI iteration.
        n_iter: number of HOOI iterations run.
    """

    output_factors: torch.Tensor
    input_factors: torch.Tensor
    core: torch.Tensor
    relative_error: float
    errors: list[float] = field(default_factory=list)
    n_iter: int = 0


def _leading_left_singular_vectors(matrix: torch.Tensor, count: int) -> torch.Tensor:
    # The eigenvectors of M M^T are cheaper than an SVD of the wide matrix M.
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix @ matrix.T)
    return eigenvectors.flip(-1)[:, :count]


def tucker2_hooi(
    weight: torch.Tensor,
    input_rank: int,
    output_rank: int,
    *,
    n_iter_max: int = 10,
    tol: float = 1e-5,
    dtype: torch.dtype = torch.float64,
) -> Tucker2Result:
    """Fit a Tucker-2 decomposition of the channel modes by HOSVD then HOOI.

    HOSVD takes the leading left singular vectors of the mode-N and mode-C
    unfoldings; each HOOI iteration replaces one factor by the leading left
    singular vectors of the kernel projected on the other factor, which never
    increases the error. Stops when the error changes by less than ``tol``
    relative to its previous value, or after ``n_iter_max`` iterations.

    Args:
        weight: (N, C, kh, kw).
        input_rank: R3, in [1, C].
        output_rank: R4, in [1, N].
    """
    if weight.dim() != 4:
        raise ValueError(f"weight must have shape (N, C, kh, kw), got {tuple(weight.shape)}")
    out_channels, in_channels, kh, kw = weight.shape
    for label, value, limit in (("input_rank", input_rank, in_channels), ("output_rank", output_rank, out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"{label} must be an integer in [1, {limit}] for weight {tuple(weight.shape)}, got {value!r}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf values; the kernel cannot be decomposed")

    tensor = weight.detach().to(dtype)
    total = tensor.pow(2).sum().clamp_min(1e-300)
    by_output = tensor.reshape(out_channels, -1)
    by_input = tensor.transpose(0, 1).reshape(in_channels, -1)

    output_factors = _leading_left_singular_vectors(by_output, output_rank)
    input_factors = _leading_left_singular_vectors(by_input, input_rank)

    def core_of(output_factors, input_factors):
        return torch.einsum("nchw,nq,cr->qrhw", tensor, output_factors, input_factors)

    def relative_error(core):
        # Orthonormal factors: ||W - W_hat||^2 = ||W||^2 - ||core||^2.
        return float((total - core.pow(2).sum()).clamp_min(0).sqrt() / total.sqrt())

    errors = [relative_error(core_of(output_factors, input_factors))]
    n_iter = 0
    for n_iter in range(1, n_iter_max + 1):
        projected = torch.einsum("nchw,cr->nrhw", tensor, input_factors).reshape(out_channels, -1)
        output_factors = _leading_left_singular_vectors(projected, output_rank)
        projected = torch.einsum("nchw,nq->cqhw", tensor, output_factors).reshape(in_channels, -1)
        input_factors = _leading_left_singular_vectors(projected, input_rank)
        errors.append(relative_error(core_of(output_factors, input_factors)))
        if abs(errors[-2] - errors[-1]) <= tol * max(errors[-2], 1e-300):
            break

    core = core_of(output_factors, input_factors)
    logger.debug("Tucker-2 HOOI: ranks (%d, %d), %d iterations, error %.4f", input_rank, output_rank, n_iter, errors[-1])
    return Tucker2Result(output_factors, input_factors, core, errors[-1], errors, n_iter)


def hosvd_rank_errors(weight: torch.Tensor, rank_pairs: list[tuple[int, int]]) -> list[float]:
    """Return the relative error of the truncated HOSVD for each (input rank, output rank) pair.

    Rotating the kernel by the full singular bases of both channel modes puts
    its energy on an (N, C) grid ordered by singular value; the truncated
    HOSVD keeps the leading (R4, R3) block, so one 2-D cumulative sum gives the
    error of every pair. HOOI lowers these errors further, so they are upper
    bounds on the fitted decomposition's.
    """
    tensor = weight.detach().to(torch.float64)
    out_channels, in_channels = tensor.shape[:2]
    output_basis = _leading_left_singular_vectors(tensor.reshape(out_channels, -1), out_channels)
    input_basis = _leading_left_singular_vectors(tensor.transpose(0, 1).reshape(in_channels, -1), in_channels)
    rotated = torch.einsum("nchw,nq,cr->qrhw", tensor, output_basis, input_basis)
    energy = rotated.pow(2).sum(dim=(2, 3)).cumsum(0).cumsum(1)
    total = float(tensor.pow(2).sum().clamp_min(1e-300))
    errors = []
    for input_rank, output_rank in rank_pairs:
        kept = float(energy[min(output_rank, out_channels) - 1, min(input_rank, in_channels) - 1])
        errors.append(math.sqrt(max(total - kept, 0.0) / total))
    return errors
