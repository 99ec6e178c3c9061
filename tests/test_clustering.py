import pytest
import torch

from codec_det.decomposition.clustering import (
    balanced_filter_groups,
    filter_subspaces,
    group_permutation,
    projection_distances,
)


def planted_groups(groups=4, per_group=8, channels=32, seed=0):
    """Filters whose mode-1 factors lie in one of ``groups`` random 2-D subspaces."""
    generator = torch.Generator().manual_seed(seed)
    filters, labels = [], []
    for group in range(groups):
        basis = torch.linalg.qr(torch.randn(channels, 2, generator=generator, dtype=torch.float64))[0]
        for _ in range(per_group):
            spatial = torch.randn(2, 9, generator=generator, dtype=torch.float64)
            scale = torch.rand(1, generator=generator, dtype=torch.float64) * 5 + 0.1
            filters.append(scale * (basis @ spatial).reshape(channels, 3, 3))
            labels.append(group)
    order = torch.randperm(len(filters), generator=generator)
    return torch.stack(filters)[order], torch.tensor(labels)[order]


def same_partition(found, expected):
    pairs_found = found[:, None] == found[None, :]
    pairs_expected = expected[:, None] == expected[None, :]
    return bool(torch.equal(pairs_found, pairs_expected))


def test_planted_groups_recovered():
    weight, labels = planted_groups()

    found = balanced_filter_groups(weight, 4, seed=0)

    assert same_partition(found, labels)


def test_groups_have_equal_size():
    weight = torch.randn(48, 16, 3, 3)

    found = balanced_filter_groups(weight, 6, seed=1)

    assert torch.bincount(found, minlength=6).tolist() == [8] * 6


def test_distance_ignores_sign_and_scale():
    weight = torch.randn(3, 16, 3, 3)
    weight[1] = -7.5 * weight[0]

    distances = projection_distances(filter_subspaces(weight))

    assert distances[0, 1] == pytest.approx(0.0, abs=1e-10)
    assert distances[0, 2] > 0.1


def test_permutation_makes_groups_contiguous():
    labels = torch.tensor([2, 0, 1, 0, 2, 1])

    permutation = group_permutation(labels)

    assert labels[permutation].tolist() == [0, 0, 1, 1, 2, 2]
    assert permutation.tolist() == [1, 3, 2, 5, 0, 4]


def test_groups_must_divide_filters():
    with pytest.raises(ValueError, match="groups=5 does not divide the 12 filters"):
        balanced_filter_groups(torch.randn(12, 4, 3, 3), 5)
