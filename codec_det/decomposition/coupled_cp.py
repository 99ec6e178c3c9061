"""Coupled canonical polyadic decomposition (coupled CPD) of groups of conv filters.

Each group ``g`` contains ``M`` filters ``W_m`` of shape ``(C, kh, kw)``. The model
fitted to the group is

    W_m ~= [[A_g, B_m, C_m]] = sum_r A_g[:, r] o B_m[:, r] o C_m[:, r]

with one input-channel factor matrix ``A_g`` (C, R) shared by every filter of
the group and spatial factor matrices ``B_m`` (kh, R) and ``C_m`` (kw, R) of
each filter (Pham, Zniyed, Nguyen, "Coupled Tensor Decomposition for Compact
Network Representation", IEEE TNNLS 2025). The factors are found by
alternating least squares (ALS, Kolda and Bader, "Tensor Decompositions and
Applications", SIAM Review 2009), every group of a layer at once in batched
tensor ops.

A spatial mode of size 1 carries no factor matrix: its entries are absorbed by
the other factors, so a ``3x1`` kernel has ``B_m`` only and a ``1x1`` kernel
neither, in which case the coupled CPD is a rank-``R`` matrix factorisation
whose optimum is the truncated SVD (``grouped_truncated_svd``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

__all__ = ["CoupledCPResult", "coupled_cp_als", "grouped_truncated_svd", "reconstruct_filters"]

logger = logging.getLogger(__name__)


@dataclass
class CoupledCPResult:
    """Factors of a coupled CPD of ``G`` groups of ``M`` filters each.

    Attributes:
        input_factors: ``A``, shape (G, C, R), one shared factor matrix per group.
        height_factors: ``B``, shape (G, M, kh, R); all ones when ``kh == 1``.
        width_factors: ``C``, shape (G, M, kw, R); all ones when ``kw == 1``.
        relative_error: ``||W - W_hat||_F / ||W||_F`` over all groups, a float.
        group_errors: relative error of each group, shape (G,).
        errors: relative error after each ALS iteration (empty for the SVD).
        n_iter: number of ALS iterations run.
    """

    input_factors: torch.Tensor
    height_factors: torch.Tensor
    width_factors: torch.Tensor
    relative_error: float
    group_errors: torch.Tensor
    errors: list[float] = field(default_factory=list)
    n_iter: int = 0


def reconstruct_filters(
    input_factors: torch.Tensor, height_factors: torch.Tensor, width_factors: torch.Tensor
) -> torch.Tensor:
    """Rebuild the filters ``[[A_g, B_m, C_m]]``: shape (G, M, C, kh, kw)."""
    return torch.einsum("gcr,gmhr,gmwr->gmchw", input_factors, height_factors, width_factors)


def _check_filters(filters: torch.Tensor, rank: int) -> None:
    if filters.dim() != 5:
        raise ValueError(
            f"filters must have shape (groups, filters_per_group, C, kh, kw), got {tuple(filters.shape)}"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if not torch.isfinite(filters).all():
        raise ValueError("filters contain NaN or Inf values; clean the weights before decomposing them")


def _relative_errors(filters: torch.Tensor, approximation: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Compute the exact relative error overall and per group (G,)."""
    residual = (filters - approximation).flatten(1).norm(dim=1)
    norms = filters.flatten(1).norm(dim=1)
    group_errors = residual / norms.clamp_min(torch.finfo(filters.dtype).tiny)
    total = residual.norm() / norms.norm().clamp_min(torch.finfo(filters.dtype).tiny)
    return float(total), group_errors


def grouped_truncated_svd(filters: torch.Tensor, rank: int) -> CoupledCPResult:
    """Factorise each group of 1x1 filters by its rank-``R`` truncated SVD.

    For 1x1 filters the coupled CPD of a group is the rank-``R`` factorisation of
    its ``(M, C)`` weight matrix, and the truncated SVD is its exact optimum
    (Eckart-Young). ``A_g`` contains the top right singular vectors and ``B_m`` the
    scaled left singular vectors.

    Args:
        filters: shape (G, M, C, 1, 1).
        rank: number of singular triplets kept per group, at most ``min(M, C)``.
    """
    _check_filters(filters, rank)
    groups, per_group, channels, kh, kw = filters.shape
    if (kh, kw) != (1, 1):
        raise ValueError(f"grouped_truncated_svd takes 1x1 filters, got kernel {kh}x{kw}")
    if rank > min(per_group, channels):
        raise ValueError(
            f"rank {rank} exceeds min(filters per group, input channels) = {min(per_group, channels)}; "
            "use a smaller rank or fewer groups"
        )

    matrices = filters.reshape(groups, per_group, channels)
    left, singular_values, right_h = torch.linalg.svd(matrices, full_matrices=False)

    input_factors = right_h[:, :rank, :].transpose(1, 2)
    height_factors = (left[:, :, :rank] * singular_values[:, None, :rank]).unsqueeze(2)
    width_factors = torch.ones_like(height_factors)

    approximation = reconstruct_filters(input_factors, height_factors, width_factors)
    total, group_errors = _relative_errors(filters, approximation)
    return CoupledCPResult(input_factors, height_factors, width_factors, total, group_errors)


def _initial_input_factors(unfolding: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
    """Take the top-R left singular vectors of each group's mode-1 unfolding (G, C, M*kh*kw).

    When R exceeds the number of singular vectors, the missing columns are
    random unit vectors drawn from ``generator``.
    """
    left, _, _ = torch.linalg.svd(unfolding, full_matrices=False)
    available = left.shape[2]
    if rank <= available:
        return left[:, :, :rank].clone()

    groups, channels, _ = unfolding.shape
    extra = torch.randn(groups, channels, rank - available, generator=generator, dtype=torch.float64)
    extra = extra.to(device=unfolding.device, dtype=unfolding.dtype)
    extra = extra / extra.norm(dim=1, keepdim=True)
    return torch.cat([left, extra], dim=2)


def _solve_normal_equations(gram: torch.Tensor, mttkrp: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve ``X @ (gram + lambda I) = mttkrp`` for X, batched over leading dims.

    ``gram``: (..., R, R) symmetric; ``mttkrp``: (..., I, R). The ridge
    ``lambda`` is relative to the mean diagonal of ``gram``, so it has the same
    effect whatever the scale of the weights. It keeps the system solvable when
    components become collinear, which is how CP degeneracy starts.
    """
    rank = gram.shape[-1]
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1, keepdim=True).clamp_min(1e-300)
    eye = torch.eye(rank, dtype=gram.dtype, device=gram.device)
    regularised = gram + (ridge * scale)[..., None] * eye
    cholesky, info = torch.linalg.cholesky_ex(regularised)
    if bool((info == 0).all()):
        return torch.cholesky_solve(mttkrp.transpose(-1, -2), cholesky).transpose(-1, -2)

    # A Gram matrix that lost positive definiteness to rounding still has an
    # LU solution; this path is rare and slower.
    return torch.linalg.solve(regularised, mttkrp.transpose(-1, -2)).transpose(-1, -2)


def coupled_cp_als(
    filters: torch.Tensor,
    rank: int,
    *,
    n_iter_max: int = 100,
    tol: float = 1e-7,
    ridge: float = 1e-10,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    init: str | tuple[torch.Tensor, torch.Tensor, torch.Tensor] = "svd",
    n_init: int = 1,
) -> CoupledCPResult:
    """Fit a rank-``R`` coupled CPD to every group of a layer by ALS.

    Each iteration updates every filter's ``B_m``, then every ``C_m``, then each
    group's shared ``A_g``, by the closed-form least-squares solution with the
    other factors fixed, and normalises the columns of ``A_g`` and ``B_m`` into
    ``C_m``. The fit never worsens between iterations, up to the ridge term.
    The loop stops when the relative error changes by less than ``tol``
    (relative to its previous value) or after ``n_iter_max`` iterations.

    Args:
        filters: shape (G, M, C, kh, kw): G groups of M filters.
        rank: number of rank-1 terms ``R`` per group.
        n_iter_max: maximum number of ALS iterations.
        tol: stopping threshold on the relative change of the error.
        ridge: Tikhonov term added to each normal equation, relative to the
            mean diagonal of its Gram matrix.
        seed: seeds the random starts and the random columns used when ``R``
            exceeds the rank of the mode-1 unfolding. The result is
            deterministic for a seed.
        dtype: precision of the computation (float64 by default, since the
            cheap error formula loses digits in float32).
        init: ``"svd"`` (``A_g`` from the top-R left singular vectors of the
            group's mode-1 unfolding, each projected kernel's best rank-1
            approximation for ``B_m`` and ``C_m``), ``"random"`` (Gaussian
            factors), or a tuple of factors ``(A, B, C)`` shaped as in
            ``CoupledCPResult`` to start from.
        n_init: number of starts: the first from ``init``, the others random.
            ALS finds a local optimum, so more starts can only lower the
            error returned, at ``n_init`` times the cost.

    Returns:
        A ``CoupledCPResult`` with factors on ``filters.device`` in ``dtype``.

    Raises:
        ValueError: on a bad shape or rank, non-finite filters, or factors that
            diverge to NaN or Inf.
    """
    _check_filters(filters, rank)
    if isinstance(n_init, bool) or not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"n_init must be a positive integer, got {n_init!r}")
    if filters.shape[3:] == (1, 1):
        return grouped_truncated_svd(filters.to(dtype), rank)

    generator = torch.Generator().manual_seed(seed)
    tensor = filters.to(dtype)
    best = None
    for start in range(n_init):
        start_init = init if start == 0 else "random"
        result = _als(tensor, rank, start_init, generator, n_iter_max=n_iter_max, tol=tol, ridge=ridge)
        if best is None or result.relative_error < best.relative_error:
            best = result
    return best


def _als(
    tensor: torch.Tensor,
    rank: int,
    init,
    generator: torch.Generator,
    *,
    n_iter_max: int,
    tol: float,
    ridge: float,
) -> CoupledCPResult:
    """Run ALS from one starting point; ``tensor`` is (G, M, C, kh, kw) in the working dtype."""
    groups, per_group, channels, kh, kw = tensor.shape
    free_height, free_width = kh > 1, kw > 1

    # The mode-1 unfolding of a group, (G, C, M*kh*kw), serves both the
    # initialisation and the A-update (one batched GEMM per iteration).
    unfolding = tensor.permute(0, 2, 1, 3, 4).reshape(groups, channels, per_group * kh * kw)
    norm_squared = unfolding.pow(2).sum(dim=(1, 2))

    input_factors, height_factors, width_factors = _initial_factors(
        tensor, unfolding, rank, init, generator, free_height, free_width
    )

    errors: list[float] = []
    n_iter = 0
    for n_iter in range(1, n_iter_max + 1):
        gram_input = input_factors.transpose(1, 2) @ input_factors
        projected = torch.einsum("gcr,gmchw->gmrhw", input_factors, tensor)

        if free_height:
            gram_width = width_factors.transpose(2, 3) @ width_factors
            mttkrp = torch.einsum("gmrhw,gmwr->gmhr", projected, width_factors)
            height_factors = _solve_normal_equations(gram_input[:, None] * gram_width, mttkrp, ridge)

        if free_width:
            gram_height = height_factors.transpose(2, 3) @ height_factors
            mttkrp = torch.einsum("gmrhw,gmhr->gmwr", projected, height_factors)
            width_factors = _solve_normal_equations(gram_input[:, None] * gram_height, mttkrp, ridge)

        # Shared factor: the Khatri-Rao products of all filters of a group are
        # stacked, so the A_g update uses every filter at once.
        khatri_rao = torch.einsum("gmhr,gmwr->gmhwr", height_factors, width_factors)
        khatri_rao = khatri_rao.reshape(groups, per_group * kh * kw, rank)
        gram_spatial = (
            (height_factors.transpose(2, 3) @ height_factors) * (width_factors.transpose(2, 3) @ width_factors)
        ).sum(dim=1)
        mttkrp_input = unfolding @ khatri_rao
        input_factors = _solve_normal_equations(gram_spatial, mttkrp_input, ridge)

        # Cheap error, ||W||^2 - 2 <W, W_hat> + ||W_hat||^2, instead of
        # rebuilding the tensor: both terms reuse the A-update's products.
        inner = (mttkrp_input * input_factors).sum(dim=(1, 2))
        approx_norm_squared = ((input_factors.transpose(1, 2) @ input_factors) * gram_spatial).sum(dim=(1, 2))
        residual_squared = (norm_squared - 2 * inner + approx_norm_squared).clamp_min(0)
        errors.append(float((residual_squared.sum() / norm_squared.sum()).sqrt()))

        input_factors, height_factors, width_factors = _normalise_columns(
            input_factors, height_factors, width_factors, free_height, free_width
        )
        _check_finite(input_factors, height_factors, width_factors, n_iter=n_iter)

        if n_iter > 1 and abs(errors[-2] - errors[-1]) <= tol * max(errors[-2], 1e-300):
            break
        if errors[-1] < 1e-12:
            break

    approximation = reconstruct_filters(input_factors, height_factors, width_factors)
    total, group_errors = _relative_errors(tensor, approximation)
    logger.debug("coupled CP-ALS: G=%d M=%d R=%d, %d iterations, error %.3e", groups, per_group, rank, n_iter, total)
    return CoupledCPResult(input_factors, height_factors, width_factors, total, group_errors, errors, n_iter)


def _initial_factors(tensor, unfolding, rank, init, generator, free_height, free_width):
    """Return starting ``(A, B, C)`` for ALS, following ``init`` (see ``coupled_cp_als``)."""
    groups, per_group, channels, kh, kw = tensor.shape
    if isinstance(init, tuple):
        expected = [(groups, channels, rank), (groups, per_group, kh, rank), (groups, per_group, kw, rank)]
        found = [tuple(factor.shape) for factor in init]
        if found != expected:
            raise ValueError(f"init factors have shapes {found}, expected {expected}")
        return tuple(factor.to(device=tensor.device, dtype=tensor.dtype).clone() for factor in init)

    if init == "random":
        shapes = [(groups, channels, rank), (groups, per_group, kh, rank), (groups, per_group, kw, rank)]
        factors = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
        factors = [factor.to(device=tensor.device, dtype=tensor.dtype) for factor in factors]
        if not free_height:
            factors[1] = torch.ones_like(factors[1])
        if not free_width:
            factors[2] = torch.ones_like(factors[2])
        return tuple(factors)

    if init != "svd":
        raise ValueError(f"init must be 'svd', 'random' or a tuple of factors, got {init!r}")
    input_factors = _initial_input_factors(unfolding, rank, generator)

    # Project every filter on the shared subspace and take the best rank-1
    # spatial kernel of each component as the initial B_m and C_m.
    projected = torch.einsum("gcr,gmchw->gmrhw", input_factors, tensor)
    height_factors, width_factors = _initial_spatial_factors(projected, free_height, free_width)
    return input_factors, height_factors, width_factors


def _initial_spatial_factors(
    projected: torch.Tensor, free_height: bool, free_width: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-1 approximation of each projected kernel (G, M, R, kh, kw).

    Returns ``B`` (G, M, kh, R) and ``C`` (G, M, kw, R).
    """
    groups, per_group, rank, kh, kw = projected.shape
    if free_height and free_width:
        left, singular_values, right_h = torch.linalg.svd(projected, full_matrices=False)
        height = (left[..., 0] * singular_values[..., :1]).transpose(2, 3)
        width = right_h[..., 0, :].transpose(2, 3)
        return height.contiguous(), width.contiguous()

    ones_shape = (groups, per_group, 1, rank)
    ones = torch.ones(ones_shape, dtype=projected.dtype, device=projected.device)
    if free_height:
        return projected[..., 0].transpose(2, 3).contiguous(), ones
    return ones, projected[..., 0, :].transpose(2, 3).contiguous()


def _normalise_columns(
    input_factors: torch.Tensor,
    height_factors: torch.Tensor,
    width_factors: torch.Tensor,
    free_height: bool,
    free_width: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give ``A_g`` and ``B_m`` unit columns and move their norms into the last free factor.

    Keeping two factors at unit scale stops the third from growing without
    bound while the others shrink, one symptom of CP degeneracy.
    """
    input_norms = input_factors.norm(dim=1).clamp_min(1e-300)
    input_factors = input_factors / input_norms[:, None, :]
    scale = input_norms[:, None, None, :]

    if free_height and free_width:
        height_norms = height_factors.norm(dim=2, keepdim=True).clamp_min(1e-300)
        height_factors = height_factors / height_norms
        width_factors = width_factors * height_norms * scale
    elif free_height:
        height_factors = height_factors * scale
    else:
        width_factors = width_factors * scale
    return input_factors, height_factors, width_factors


def _check_finite(*factors: torch.Tensor, n_iter: int) -> None:
    for factor in factors:
        if not torch.isfinite(factor).all():
            raise ValueError(
                f"coupled CP-ALS diverged at iteration {n_iter} (NaN or Inf in the factors); "
                "raise the ridge term or lower the rank"
            )
