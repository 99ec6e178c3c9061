"""CP-decomposed convolution (Lebedev et al., "Speeding-up Convolutional Neural
Networks Using Fine-tuned CP-Decomposition", ICLR 2015).

The kernel ``W`` (N, C, kh, kw) is approximated by a rank-``R`` canonical
polyadic decomposition of the whole 4-way tensor,

    W[n, c, i, j] ~= sum_r O[n, r] I[c, r] H[i, r] V[j, r],

which runs as four convs: a 1x1 conv ``C -> R`` (``I``), a ``kh x 1``
depthwise conv (``H``), a ``1 x kw`` depthwise conv (``V``) and a 1x1 conv
``R -> N`` (``O``). Unlike CoDeC, every filter shares the same ``R`` spatial
kernels ``H[:, r] V[:, r]^T``; only the output factor ``O`` is per filter.

The factors are fitted by alternating least squares (Kolda and Bader,
"Tensor Decompositions and Applications", SIAM Review 2009) from a
deterministic start built from orthogonal rank-1 terms (``cp_initial_terms``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from codec_det.decomposition.coupled_cp import _solve_normal_equations

__all__ = ["CPConv2d", "CPResult", "cp_initial_terms", "cp_als", "cp_prefix_errors"]

logger = logging.getLogger(__name__)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return tuple(value)


class CPConv2d(nn.Module):
    """A conv layer stored as the rank-R CP factors of its kernel (Lebedev et al. 2015).

    Parameters:

    - ``input_factors``: ``I^T``, shape (R, C), the 1x1 conv ``C -> R``.
    - ``height_factors``: ``H^T``, shape (R, kh), the ``kh x 1`` depthwise conv.
    - ``width_factors``: ``V^T``, shape (R, kw), the ``1 x kw`` depthwise conv.
    - ``output_factors``: ``O``, shape (N, R), the 1x1 conv ``R -> N``.
    - ``bias``: shape (N,), or None; added by the last stage.

    The height stage takes the vertical stride, padding and dilation, the width
    stage the horizontal ones, so the output has the shape of the dense conv's.

    Args:
        in_channels: C.
        out_channels: N.
        kernel_size: (kh, kw) or an int.
        rank: R.
        stride, padding, dilation: as in ``nn.Conv2d``; padding may be
            ``'same'`` or ``'valid'``.
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
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.rank = rank
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)

        kh, kw = self.kernel_size
        self.input_factors = nn.Parameter(torch.empty(rank, in_channels))
        self.height_factors = nn.Parameter(torch.empty(rank, kh))
        self.width_factors = nn.Parameter(torch.empty(rank, kw))
        self.output_factors = nn.Parameter(torch.empty(out_channels, rank))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.reset_parameters()

    def factors(self) -> list[nn.Parameter]:
        """List the factor parameters: input, height, width, output."""
        return [self.input_factors, self.height_factors, self.width_factors, self.output_factors]

    def reset_parameters(self) -> None:
        """Draw random factors whose product has the variance of a Kaiming-uniform conv."""
        kh, kw = self.kernel_size
        target_std = 1.0 / math.sqrt(3 * self.in_channels * kh * kw)
        # Each weight entry is a sum of R products of four unit-variance entries.
        scale = (target_std / math.sqrt(self.rank)) ** 0.25
        with torch.no_grad():
            for parameter in self.factors():
                parameter.normal_().mul_(scale)

    def _stage_padding(self) -> tuple[tuple[int, int] | str, tuple[int, int] | str]:
        if self.padding == "valid":
            return (0, 0), (0, 0)
        if self.padding == "same":
            return "same", "same"
        return (self.padding[0], 0), (0, self.padding[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer: (B, C, H, W) -> (B, N, H_out, W_out)."""
        kh, kw = self.kernel_size
        height_padding, width_padding = self._stage_padding()

        x = F.conv2d(x, self.input_factors[:, :, None, None])

        x = F.conv2d(
            x,
            self.height_factors.reshape(self.rank, 1, kh, 1),
            stride=(self.stride[0], 1),
            padding=height_padding,
            dilation=(self.dilation[0], 1),
            groups=self.rank,
        )

        x = F.conv2d(
            x,
            self.width_factors.reshape(self.rank, 1, 1, kw),
            stride=(1, self.stride[1]),
            padding=width_padding,
            dilation=(1, self.dilation[1]),
            groups=self.rank,
        )

        return F.conv2d(x, self.output_factors[:, :, None, None], self.bias)

    def reconstruct_weight(self) -> torch.Tensor:
        """Rebuild the dense kernel ``sum_r O[:, r] o I[:, r] o H[:, r] o V[:, r]``, shape (N, C, kh, kw)."""
        return _rebuild(self.output_factors, self.input_factors.T, self.height_factors.T, self.width_factors.T)

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


@dataclass
class CPResult:
    """Factors of a rank-R CPD of a kernel (N, C, kh, kw).

    Attributes:
        output_factors: ``O``, shape (N, R).
        input_factors: ``I``, shape (C, R).
        height_factors: ``H``, shape (kh, R).
        width_factors: ``V``, shape (kw, R).
        relative_error: ``||W - W_hat||_F / ||W||_F``.
        errors: relative error at the start and after each ALS iteration.
        n_iter: number of ALS iterations run.
    """

    output_factors: torch.Tensor
    input_factors: torch.Tensor
    height_factors: torch.Tensor
    width_factors: torch.Tensor
    relative_error: float
    errors: list[float] = field(default_factory=list)
    n_iter: int = 0


def cp_initial_terms(weight: torch.Tensor, max_terms: int) -> tuple[torch.Tensor, ...]:
    """Build up to ``max_terms`` rank-1 terms of the kernel, largest first, from nested SVDs.

    The SVD of the kernel's (N*C, kh*kw) matricization splits it into at most
    ``kh*kw`` terms ``U_j (x) S_j``, with ``U_j`` an (N, C) matrix and ``S_j`` a
    unit-norm (kh, kw) kernel. The SVDs of ``U_j`` and ``S_j`` then split each
    term into rank-1 pieces ``sigma * o (x) i (x) h (x) v``, ordered by ``sigma``. Summing all of them rebuilds the kernel exactly, so the
    leading ``R`` are a rank-R CP starting point whose error shrinks as R grows.

    Args:
        weight: (N, C, kh, kw); the terms come in its dtype.
        max_terms: how many terms to return at most.

    Returns:
        ``(output (N, T), input (C, T), height (kh, T), width (kw, T))`` with
        ``T = min(max_terms, number of nonzero pieces)``; the scale is in ``output``.
    """
    out_channels, in_channels, kh, kw = weight.shape
    spatial_left, spatial_values, spatial_right = torch.linalg.svd(
        weight.reshape(out_channels * in_channels, kh * kw), full_matrices=False
    )
    # channel_parts[j] = U_j (N, C) with the singular value folded in.
    channel_parts = (spatial_left * spatial_values).T.reshape(-1, out_channels, in_channels)
    spatial_parts = spatial_right.reshape(-1, kh, kw)

    channel_left, channel_values, channel_right = torch.linalg.svd(channel_parts, full_matrices=False)
    height, kernel_values, width = torch.linalg.svd(spatial_parts, full_matrices=False)

    # Piece (j, a, b): weight channel_values[j, b] * kernel_values[j, a].
    scales = kernel_values[:, :, None] * channel_values[:, None, :]
    flat = scales.reshape(-1)
    count = min(max_terms, int((flat > flat.max() * 1e-12).sum()) if flat.numel() else 0)
    order = torch.argsort(flat, descending=True)[:count]
    spatial_rank, channel_rank = scales.shape[1], scales.shape[2]
    part = order // (spatial_rank * channel_rank)
    spatial_index = (order // channel_rank) % spatial_rank
    channel_index = order % channel_rank

    output = channel_left[part, :, channel_index].T * flat[order]
    inputs = channel_right[part, channel_index, :].T
    height_terms = height[part, :, spatial_index].T
    width_terms = width[part, spatial_index, :].T
    return output, inputs, height_terms, width_terms


def _rebuild(output: torch.Tensor, inputs: torch.Tensor, height: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Rebuild ``sum_r O[:, r] o I[:, r] o H[:, r] o V[:, r]`` (N, C, kh, kw) from factors (size, R).

    Uses one GEMM with the (C*kh*kw, R) Khatri-Rao product. A four-operand
    einsum would materialise an (N, C, R) intermediate, which is gigabytes for a
    512x512 conv at rank 1000.
    """
    khatri_rao = (inputs[:, None, None, :] * height[None, :, None, :] * width[None, None, :, :]).reshape(-1, inputs.shape[1])
    return (output @ khatri_rao.T).reshape(output.shape[0], inputs.shape[0], height.shape[0], width.shape[0])


def _grams(*factors: torch.Tensor) -> list[torch.Tensor]:
    return [factor.T @ factor for factor in factors]


def cp_prefix_errors(weight: torch.Tensor, terms: tuple[torch.Tensor, ...], ranks: list[int]) -> list[float]:
    """Return the relative error of the sum of the first R ``terms`` for each R in ``ranks``.

    Uses ``||W - W_R||^2 = ||W||^2 - 2 <W, W_R> + ||W_R||^2`` with the Gram
    matrices of the factors, so no kernel is rebuilt.
    """
    output, inputs, height, width = terms
    out_channels, in_channels, kh, kw = weight.shape
    total = weight.pow(2).sum()
    khatri_rao = (inputs[:, None, None, :] * height[None, :, None, :] * width[None, None, :, :]).reshape(
        in_channels * kh * kw, -1
    )
    inner = ((weight.reshape(out_channels, -1) @ khatri_rao) * output).sum(dim=0)
    output_gram, input_gram, height_gram, width_gram = _grams(output, inputs, height, width)
    gram = output_gram * input_gram * height_gram * width_gram

    # ||W_R||^2 = sum of the leading R x R block of the term Gram matrix.
    upper = torch.triu(gram, diagonal=1).sum(dim=0)
    block_norms = torch.cumsum(torch.diagonal(gram) + 2 * upper, dim=0)
    inner_cumulative = torch.cumsum(inner, dim=0)
    errors = []
    for rank in ranks:
        index = min(rank, gram.shape[0]) - 1
        squared = total - 2 * inner_cumulative[index] + block_norms[index]
        errors.append(float(squared.clamp_min(0).sqrt() / total.sqrt().clamp_min(1e-300)))
    return errors


def cp_als(
    weight: torch.Tensor,
    rank: int,
    *,
    n_iter_max: int = 25,
    tol: float = 1e-4,
    ridge: float = 1e-6,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> CPResult:
    """Fit a rank-``R`` CPD to a conv kernel by alternating least squares.

    Starts from the leading terms of ``cp_initial_terms`` (random unit columns
    fill the rank when the kernel has fewer terms), then updates the output,
    input, height and width factors in turn by their closed-form least-squares
    solution. Stops when the relative error changes by less than ``tol``
    relative to its previous value, or after ``n_iter_max`` iterations.

    Args:
        weight: (N, C, kh, kw).
        rank: R, a positive integer.
        n_iter_max: maximum number of ALS iterations; 0 returns the start.
        tol: stopping threshold on the relative change of the error.
        ridge: Tikhonov term relative to the mean diagonal of each Gram matrix.
        seed: seed of the random columns used when R exceeds the number of terms.
        dtype: dtype of the computation.

    Returns:
        A ``CPResult`` in ``dtype`` on the weight's device.
    """
    if weight.dim() != 4:
        raise ValueError(f"weight must have shape (N, C, kh, kw), got {tuple(weight.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf values; the kernel cannot be decomposed")

    tensor = weight.detach().to(dtype)
    out_channels, in_channels, kh, kw = tensor.shape
    factors = list(cp_initial_terms(tensor, rank))
    missing = rank - factors[0].shape[1]
    if missing > 0:
        generator = torch.Generator().manual_seed(seed)
        for index, size in enumerate((out_channels, in_channels, kh, kw)):
            extra = torch.randn(size, missing, generator=generator, dtype=torch.float64).to(tensor)
            extra = extra / extra.norm(dim=0, keepdim=True)
            if index == 0:
                # Small output columns: the extra terms start close to zero.
                smallest = factors[0].norm(dim=0).min() if factors[0].shape[1] else tensor.new_tensor(1.0)
                extra = extra * 1e-3 * smallest.clamp_min(1e-12)
            factors[index] = torch.cat([factors[index], extra], dim=1)
    output, inputs, height, width = factors

    total = tensor.pow(2).sum()
    by_output = tensor.reshape(out_channels, -1)
    by_input = tensor.transpose(0, 1).reshape(in_channels, -1)

    def relative_error(spatial: torch.Tensor) -> float:
        # <W, W_hat> from the contraction W x_O O x_I I (kh, kw, R) that the
        # spatial updates already computed, ||W_hat||^2 from the Gram matrices:
        # no kernel is rebuilt inside the loop.
        inner = torch.einsum("hwr,hr,wr->", spatial, height, width)
        norm = torch.prod(torch.stack(_grams(output, inputs, height, width)), dim=0).sum()
        return float((total - 2 * inner + norm).clamp_min(0).sqrt() / total.sqrt().clamp_min(1e-300))

    def spatial_product(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return (first[:, None, :] * second[None, :, :]).reshape(-1, rank)

    errors = []
    n_iter = 0
    for n_iter in range(1, n_iter_max + 1):
        height_width = spatial_product(height, width)
        gram_height_width = (height.T @ height) * (width.T @ width)

        mttkrp = by_output @ spatial_product(inputs, height_width)
        output = _solve_normal_equations(gram_height_width * (inputs.T @ inputs), mttkrp, ridge)

        mttkrp = by_input @ spatial_product(output, height_width)
        inputs = _solve_normal_equations(gram_height_width * (output.T @ output), mttkrp, ridge)

        # (C*kh*kw, R) contraction with O, then with I: shared by both spatial modes.
        channel_mttkrp = (by_output.T @ output).reshape(in_channels, kh, kw, rank)
        spatial = torch.einsum("chwr,cr->hwr", channel_mttkrp, inputs)
        gram_channels = (output.T @ output) * (inputs.T @ inputs)
        height = _solve_normal_equations(
            gram_channels * (width.T @ width), torch.einsum("hwr,wr->hr", spatial, width), ridge
        )
        width = _solve_normal_equations(
            gram_channels * (height.T @ height), torch.einsum("hwr,hr->wr", spatial, height), ridge
        )

        errors.append(relative_error(spatial))

        # Unit-norm columns for I, H and V; the scale goes to O.
        for index, factor in enumerate((inputs, height, width)):
            norms = factor.norm(dim=0).clamp_min(1e-30)
            output = output * norms
            if index == 0:
                inputs = inputs / norms
            elif index == 1:
                height = height / norms
            else:
                width = width / norms
        if not all(torch.isfinite(factor).all() for factor in (output, inputs, height, width)):
            raise FloatingPointError(
                f"CP-ALS diverged at iteration {n_iter} (NaN or Inf in the factors); raise the ridge or lower the rank"
            )

        if n_iter > 1 and abs(errors[-2] - errors[-1]) <= tol * max(errors[-2], 1e-300):
            break

    approximation = _rebuild(output, inputs, height, width)
    error = float((tensor - approximation).norm() / tensor.norm().clamp_min(1e-300))
    logger.debug("CP-ALS: R=%d, %d iterations, error %.4f", rank, n_iter, error)
    return CPResult(output, inputs, height, width, error, errors, n_iter)
