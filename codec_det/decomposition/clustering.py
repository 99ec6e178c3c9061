"""Clustering of conv filters by the subspace of their input-channel factor.

Filter ``W_n`` (C, kh, kw) is represented by ``U_n`` (C, s), the top ``s`` left
singular vectors of its mode-1 unfolding (C, kh*kw). Two filters are close when
their subspaces overlap, measured by the projection (chordal) distance

    d(i, j) = s - ||U_i^T U_j||_F^2,

which ignores the sign and scale of the filters. ``d(i, j)`` is half the
squared Frobenius distance between the projectors ``U_i U_i^T`` and
``U_j U_j^T``, so k-means in projector space with the kernel
``K(i, j) = ||U_i^T U_j||_F^2`` minimises the within-group distance; each
assignment step solves a linear assignment problem so that every group gets
exactly N / G filters, which lets the compressed layer run all groups as one
grouped conv.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["filter_subspaces", "projection_distances", "balanced_filter_groups", "group_permutation"]

logger = logging.getLogger(__name__)


def filter_subspaces(weight: torch.Tensor, subspace_dim: int | None = None) -> torch.Tensor:
    """Compute the mode-1 subspace basis of each filter.

    Args:
        weight: conv weight, shape (N, C, kh, kw).
        subspace_dim: ``s``; defaults to 1 for 1x1 kernels (the filter's
            direction) and 2 otherwise, capped at ``min(C, kh*kw)``.

    Returns:
        ``U``, shape (N, C, s), orthonormal columns per filter.
    """
    out_channels, in_channels, kh, kw = weight.shape
    limit = min(in_channels, kh * kw)
    if subspace_dim is None:
        subspace_dim = 1 if kh * kw == 1 else 2
    subspace_dim = min(subspace_dim, limit)

    unfoldings = weight.detach().to(torch.float64).reshape(out_channels, in_channels, kh * kw)
    left, _, _ = torch.linalg.svd(unfoldings, full_matrices=False)
    return left[:, :, :subspace_dim]


def _subspace_kernel(bases: torch.Tensor) -> torch.Tensor:
    """Return ``K(i, j) = ||U_i^T U_j||_F^2`` for bases (N, C, s), shape (N, N)."""
    cross = torch.einsum("ics,jct->ijst", bases, bases)
    return cross.pow(2).sum(dim=(2, 3))


def projection_distances(bases: torch.Tensor) -> torch.Tensor:
    """Return the chordal distances ``s - ||U_i^T U_j||_F^2``, shape (N, N)."""
    return bases.shape[2] - _subspace_kernel(bases)


def balanced_filter_groups(
    weight: torch.Tensor,
    groups: int,
    *,
    subspace_dim: int | None = None,
    n_iter_max: int = 30,
    seed: int = 0,
) -> torch.Tensor:
    """Assign the N filters of a conv to ``groups`` groups of N / G filters each.

    Balanced kernel k-means on the subspace projectors: seeds by k-means++
    (deterministic for ``seed``), then alternates an exact balanced assignment
    (Hungarian algorithm on the filter-to-slot cost) and the implicit centroid
    update, until the assignment stops changing or ``n_iter_max`` is reached.

    Args:
        weight: shape (N, C, kh, kw).
        groups: ``G``, must divide N.

    Returns:
        Group label of each filter, shape (N,), values in ``[0, G)``.
    """
    out_channels = weight.shape[0]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    if out_channels % groups != 0:
        raise ValueError(
            f"groups={groups} does not divide the {out_channels} filters; choose a divisor of {out_channels}"
        )
    if groups == 1:
        return torch.zeros(out_channels, dtype=torch.long)

    kernel = _subspace_kernel(filter_subspaces(weight, subspace_dim)).numpy()
    group_size = out_channels // groups
    rng = np.random.default_rng(seed)

    labels = _assign_balanced(_distances_to_seeds(kernel, groups, rng), group_size)
    for _ in range(n_iter_max):
        new_labels = _assign_balanced(_distances_to_centroids(kernel, labels, groups), group_size)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    return torch.from_numpy(labels).long()


def _distances_to_seeds(kernel: np.ndarray, groups: int, rng: np.random.Generator) -> np.ndarray:
    """Pick G seed filters by k-means++ and return each filter's distance to each seed (N, G)."""
    diagonal = np.diag(kernel)
    seeds = [int(rng.integers(kernel.shape[0]))]
    for _ in range(1, groups):
        # Squared projector distance to the nearest seed chosen so far.
        distances = diagonal[:, None] + diagonal[seeds][None, :] - 2 * kernel[:, seeds]
        nearest = np.clip(distances.min(axis=1), 0, None)
        total = nearest.sum()
        if total <= 0:
            candidates = np.setdiff1d(np.arange(kernel.shape[0]), seeds)
            seeds.append(int(rng.choice(candidates)))
            continue
        seeds.append(int(rng.choice(kernel.shape[0], p=nearest / total)))
    return diagonal[:, None] + diagonal[seeds][None, :] - 2 * kernel[:, seeds]


def _distances_to_centroids(kernel: np.ndarray, labels: np.ndarray, groups: int) -> np.ndarray:
    """Squared projector distance of every filter to every group centroid (N, G)."""
    membership = np.zeros((kernel.shape[0], groups))
    membership[np.arange(kernel.shape[0]), labels] = 1.0
    membership /= membership.sum(axis=0, keepdims=True)

    cross = kernel @ membership
    centroid_norms = np.einsum("ig,ij,jg->g", membership, kernel, membership)
    return np.diag(kernel)[:, None] - 2 * cross + centroid_norms[None, :]


def _assign_balanced(distances: np.ndarray, group_size: int) -> np.ndarray:
    """Assign filters to groups of exactly ``group_size`` minimising the total distance."""
    slot_costs = np.repeat(distances, group_size, axis=1)
    rows, slots = linear_sum_assignment(slot_costs)
    labels = np.empty(distances.shape[0], dtype=np.int64)
    labels[rows] = slots // group_size
    return labels


def group_permutation(labels: torch.Tensor) -> torch.Tensor:
    """Return the filter order that makes each group contiguous, shape (N,).

    ``permutation[p]`` is the original index of the filter at position ``p``;
    groups appear in label order and keep their filters' original order.
    """
    positions = torch.arange(labels.numel())
    return torch.from_numpy(np.lexsort((positions.numpy(), labels.numpy()))).long()
