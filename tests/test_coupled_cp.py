import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.decomposition import parafac

from codec_det.decomposition.coupled_cp import coupled_cp_als, grouped_truncated_svd, reconstruct_filters


def planted_filters(groups, per_group, channels, kh, kw, rank, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(groups, channels, rank), (groups, per_group, kh, rank), (groups, per_group, kw, rank)]
    factors = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    return reconstruct_filters(*factors)


@pytest.mark.parametrize(
    "groups, per_group, channels, kh, kw, rank",
    [(2, 16, 32, 3, 3, 8), (1, 1, 16, 5, 5, 4), (3, 8, 24, 3, 1, 6), (2, 4, 12, 7, 7, 3)],
)
def test_planted_exact_rank_recovered(groups, per_group, channels, kh, kw, rank):
    filters = planted_filters(groups, per_group, channels, kh, kw, rank)

    result = coupled_cp_als(filters, rank, n_iter_max=2000, tol=1e-14)

    assert result.relative_error <= 1e-6
    assert result.input_factors.shape == (groups, channels, rank)
    assert result.height_factors.shape == (groups, per_group, kh, rank)
    assert result.width_factors.shape == (groups, per_group, kw, rank)


def test_planted_with_noise_within_noise_level():
    filters = planted_filters(2, 16, 32, 3, 3, 8, seed=1)
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(filters.shape, generator=generator, dtype=torch.float64)
    noise *= 1e-2 * filters.norm() / noise.norm()
    noise_level = float(noise.norm() / (filters + noise).norm())

    result = coupled_cp_als(filters + noise, 8, n_iter_max=1000, tol=1e-12)

    # The planted factors themselves fit with error equal to the noise level;
    # ALS must do at least as well (it may fit a little of the noise).
    assert result.relative_error <= noise_level * 1.001
    assert result.relative_error >= noise_level * 0.8


def test_als_error_never_increases():
    filters = planted_filters(4, 8, 16, 3, 3, 5, seed=3)
    noisy = filters + 0.05 * filters.std() * torch.randn(filters.shape, dtype=torch.float64)

    result = coupled_cp_als(noisy, 5, n_iter_max=200, tol=0.0, ridge=0.0)

    steps = np.diff(result.errors)
    assert len(result.errors) > 10
    assert steps.max() <= 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("channels, kernel, rank", [(32, 3, 2), (32, 3, 3), (32, 3, 4)])
def test_single_filter_no_worse_than_tensorly(seed, channels, kernel, rank):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(1, 1, channels, kernel, kernel, generator=generator, dtype=torch.float64)
    dense = weight[0, 0].numpy()

    # Both solvers find local optima; four starts make ours at least as good
    # as TensorLy's single SVD-initialised run.
    ours = coupled_cp_als(weight, rank, n_iter_max=500, tol=1e-12, n_init=4)
    reference = parafac(tl.tensor(dense), rank, n_iter_max=500, tol=1e-12, init="svd")
    reference_error = np.linalg.norm(tl.cp_to_tensor(reference) - dense) / np.linalg.norm(dense)

    assert ours.relative_error <= reference_error * (1 + 1e-3)


def test_deterministic_for_seed():
    weight = torch.randn(2, 8, 16, 3, 3, dtype=torch.float64)

    first = coupled_cp_als(weight, 20, n_iter_max=10, seed=5)
    second = coupled_cp_als(weight, 20, n_iter_max=10, seed=5)

    assert torch.equal(first.input_factors, second.input_factors)
    assert torch.equal(first.width_factors, second.width_factors)
    assert first.errors == second.errors


def test_grouped_svd_is_optimal_for_pointwise_filters():
    weight = torch.randn(4, 16, 24, 1, 1, dtype=torch.float64)
    rank = 5

    result = grouped_truncated_svd(weight, rank)

    singular_values = torch.linalg.svdvals(weight.reshape(4, 16, 24))
    optimal = (singular_values[:, rank:].pow(2).sum() / singular_values.pow(2).sum()).sqrt()
    assert result.relative_error == pytest.approx(float(optimal), rel=1e-9)


def test_cuda_matches_cpu_when_available():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine")
    filters = planted_filters(2, 16, 32, 3, 3, 8)

    result = coupled_cp_als(filters.cuda(), 8, n_iter_max=2000, tol=1e-14)

    assert result.input_factors.is_cuda
    assert result.relative_error <= 1e-6


@pytest.mark.parametrize("rank", [0, -3, 2.5])
def test_invalid_rank_rejected(rank):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        coupled_cp_als(torch.randn(1, 2, 4, 3, 3), rank)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_filters_rejected(bad_value):
    filters = torch.randn(1, 2, 4, 3, 3)
    filters[0, 1, 2, 0, 0] = bad_value

    with pytest.raises(ValueError, match="NaN or Inf"):
        coupled_cp_als(filters, 2)


def test_svd_rank_above_limit_rejected():
    with pytest.raises(ValueError, match="exceeds min"):
        grouped_truncated_svd(torch.randn(2, 4, 8, 1, 1), 5)
