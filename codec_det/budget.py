"""Rank allocation: per-layer ranks that meet a global MACs and/or parameter budget.

Each compressible layer offers a ladder of options, ranks in multiples of
``rank_multiple`` up to the break-even rank, plus keeping the conv dense. Every
option has a cost (MACs, parameters) and an estimated relative reconstruction
error. A greedy search on the upper convex hull of each layer's
error-versus-cost curve spends the budget where it lowers the total squared
relative error most per unit of cost, which is the marginal-analysis solution
of the separable allocation problem.

With both a MACs and a parameter target, the cost of a step is
``alpha * dMACs / MACs_target + (1 - alpha) * dParams / params_target``;
``alpha`` is searched in [0, 2] so that both totals land as close to their
targets as the ladders allow.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass

import numpy as np
import torch

from codec_det.complexity import ConvGeometry, codec_conv_cost, dense_conv_cost

__all__ = [
    "LayerLadder",
    "estimate_rank_errors",
    "build_ladder",
    "check_targets_below_model",
    "allocate_ranks",
    "Allocation",
]

logger = logging.getLogger(__name__)


def estimate_rank_errors(weight: torch.Tensor, labels: torch.Tensor, groups: int, ranks: list[int]) -> np.ndarray:
    """Estimate the relative error of the rank-R decomposition for each R in ``ranks``.

    For 1x1 kernels this is exact: the tail energy of each group's singular
    values. For larger kernels it is the error of the ALS starting point
    (``A_g`` = top-R left singular vectors of the group's mode-1 unfolding,
    each projected kernel replaced by its best rank-1 approximation), an upper
    bound on the ALS result that costs one SVD per group for every rank at once.

    Args:
        weight: (N, C, kh, kw).
        labels: group of each filter, (N,).
        ranks: candidate ranks.

    Returns:
        Relative errors, shape (len(ranks),).
    """
    out_channels, in_channels, kh, kw = weight.shape
    order = torch.argsort(labels, stable=True)
    grouped = weight.detach().to(torch.float64).cpu()[order]
    grouped = grouped.reshape(groups, out_channels // groups, in_channels, kh, kw)
    total_energy = float(grouped.pow(2).sum())

    if (kh, kw) == (1, 1):
        singular_values = torch.linalg.svdvals(grouped.reshape(groups, out_channels // groups, in_channels))
        captured_by_rank = singular_values.pow(2).sum(dim=0)
    else:
        unfolding = grouped.permute(0, 2, 1, 3, 4).reshape(groups, in_channels, -1)
        left, _, _ = torch.linalg.svd(unfolding, full_matrices=False)
        projected = torch.einsum("gck,gmchw->gkmhw", left, grouped)
        leading = torch.linalg.svdvals(projected)[..., 0]
        captured_by_rank = leading.pow(2).sum(dim=(0, 2))

    captured = torch.cumsum(captured_by_rank, dim=0).numpy()
    errors = []
    for rank in ranks:
        kept = captured[min(rank, len(captured)) - 1]
        errors.append(np.sqrt(max(total_energy - kept, 0.0) / max(total_energy, 1e-300)))
    return np.asarray(errors)


@dataclass
class LayerLadder:
    """Options of one layer, cheapest first; the last option (rank None) keeps the conv dense.

    Attributes:
        name: module name.
        groups: G used by every compressed option.
        ranks: rank of each option, None for dense.
        macs, params: cost of each option.
        squared_errors: estimated squared relative error of each option.
    """

    name: str
    groups: int
    ranks: list[int | None]
    macs: np.ndarray
    params: np.ndarray
    squared_errors: np.ndarray


def build_ladder(
    name: str,
    geometry: ConvGeometry,
    groups: int,
    max_rank: int,
    errors_for_ranks,
    rank_multiple: int = 8,
) -> LayerLadder:
    """Build the option ladder of one layer.

    ``errors_for_ranks(ranks) -> errors`` estimates the relative error of each
    candidate rank. Ranks are multiples of ``rank_multiple`` (oneDNN runs such
    channel counts faster), or 1..max_rank when the layer is smaller.
    """
    if max_rank >= rank_multiple:
        ranks = list(range(rank_multiple, max_rank + 1, rank_multiple))
    else:
        ranks = list(range(1, max_rank + 1))
    errors = errors_for_ranks(ranks) if ranks else np.zeros(0)

    costs = [codec_conv_cost(geometry, groups, rank) for rank in ranks]
    costs.append(dense_conv_cost(geometry))
    return LayerLadder(
        name=name,
        groups=groups,
        ranks=[*ranks, None],
        macs=np.array([cost[0] for cost in costs], dtype=np.float64),
        params=np.array([cost[1] for cost in costs], dtype=np.float64),
        squared_errors=np.append(np.asarray(errors, dtype=np.float64) ** 2, 0.0),
    )


@dataclass
class Allocation:
    """Chosen option of each layer and the resulting model totals."""

    ranks: dict[str, int | None]
    macs: float
    params: float
    squared_error: float
    alpha: float


def _greedy(
    ladders: list[LayerLadder],
    fixed_macs: float,
    fixed_params: float,
    target_macs: float | None,
    target_params: float | None,
    alpha: float,
) -> tuple[list[int], float, float]:
    """Run the marginal-analysis greedy for one ``alpha``; returns option indices and totals."""
    macs_limit = target_macs if target_macs is not None else np.inf
    params_limit = target_params if target_params is not None else np.inf
    macs_scale = target_macs if target_macs is not None else 1.0
    params_scale = target_params if target_params is not None else 1.0

    chosen = [0] * len(ladders)
    macs = fixed_macs + sum(ladder.macs[0] for ladder in ladders)
    params = fixed_params + sum(ladder.params[0] for ladder in ladders)

    def best_step(index: int) -> tuple[float, int] | None:
        ladder, current = ladders[index], chosen[index]
        extra_macs = ladder.macs[current + 1 :] - ladder.macs[current]
        extra_params = ladder.params[current + 1 :] - ladder.params[current]
        gains = ladder.squared_errors[current] - ladder.squared_errors[current + 1 :]
        feasible = (macs + extra_macs <= macs_limit) & (params + extra_params <= params_limit) & (gains > 0)
        if not feasible.any():
            return None
        relative_macs, relative_params = extra_macs / macs_scale, extra_params / params_scale
        # alpha > 1 rewards parameters, which is how the search spends a
        # parameter budget that the MACs budget alone would leave unused; the
        # floor keeps every step's cost positive.
        cost = alpha * relative_macs + (1 - alpha) * relative_params
        cost = np.maximum(cost, 0.05 * (relative_macs + relative_params))
        ratio = np.where(feasible, gains / np.maximum(cost, 1e-30), -np.inf)
        step = int(np.argmax(ratio))
        return float(ratio[step]), current + 1 + step

    heap = []
    for index in range(len(ladders)):
        step = best_step(index)
        if step is not None:
            heapq.heappush(heap, (-step[0], index, step[1]))

    while heap:
        _, index, target_option = heapq.heappop(heap)
        ladder, current = ladders[index], chosen[index]
        new_macs = macs + ladder.macs[target_option] - ladder.macs[current]
        new_params = params + ladder.params[target_option] - ladder.params[current]
        if target_option <= current or new_macs > macs_limit or new_params > params_limit:
            # The budget left shrank since this step was computed: recompute it.
            step = best_step(index)
            if step is not None:
                heapq.heappush(heap, (-step[0], index, step[1]))
            continue
        chosen[index], macs, params = target_option, new_macs, new_params
        step = best_step(index)
        if step is not None:
            heapq.heappush(heap, (-step[0], index, step[1]))
    return chosen, macs, params


def _search_alpha(run, target_macs: float, target_params: float):
    """Find the alpha at which the MACs and the parameter budgets bind together.

    Small alpha weighs parameters, so MACs run out first; large alpha the
    reverse. A coarse grid brackets the switch and bisection narrows it.
    """
    grid = [run(alpha) for alpha in np.linspace(0.0, 2.0, 21)]
    best = min(grid, key=lambda result: result[0])

    def macs_bind(result) -> bool:
        return result[2] / target_macs >= result[3] / target_params

    for left, right in zip(grid, grid[1:]):
        if macs_bind(left) and not macs_bind(right):
            low, high = left[5], right[5]
            for _ in range(14):
                middle = run((low + high) / 2)
                best = min(best, middle, key=lambda result: result[0])
                if macs_bind(middle):
                    low = middle[5]
                else:
                    high = middle[5]
    return best


def check_targets_below_model(
    model_macs: float, model_params: float, target_macs: float | None, target_params: float | None
) -> None:
    """Raise ``ValueError`` when no given target is below the uncompressed model's count.

    Such targets keep every layer dense, so planning and decomposing would
    only write a copy of the original model.
    """
    if target_macs is None and target_params is None:
        return
    if target_macs is not None and target_macs < model_macs:
        return
    if target_params is not None and target_params < model_params:
        return
    targets = []
    if target_macs is not None:
        targets.append(f"MACs target {target_macs / 1e9:.3f} G (model {model_macs / 1e9:.3f} G)")
    if target_params is not None:
        targets.append(f"parameter target {target_params / 1e6:.3f} M (model {model_params / 1e6:.3f} M)")
    verb = "is" if len(targets) == 1 else "are"
    raise ValueError(
        f"{' and '.join(targets)} {verb} not below the uncompressed model, so no layer would be compressed. "
        "Choose a target below the model's count"
    )


def allocate_ranks(
    ladders: list[LayerLadder],
    *,
    fixed_macs: float,
    fixed_params: float,
    target_macs: float | None = None,
    target_params: float | None = None,
) -> Allocation:
    """Choose one option per layer so the model meets the targets with the least total error.

    Args:
        ladders: one per compressible layer.
        fixed_macs, fixed_params: cost of everything that is not a compressible
            conv (stem, batch norms, classifier, skipped convs).
        target_macs, target_params: totals to stay under; at least one.

    Raises:
        ValueError: when no target is given, or even the smallest rank of
            every layer exceeds a target.
    """
    if target_macs is None and target_params is None:
        raise ValueError("give a MACs target, a parameter target, or both")
    floor_macs = fixed_macs + sum(ladder.macs[0] for ladder in ladders)
    floor_params = fixed_params + sum(ladder.params[0] for ladder in ladders)
    if target_macs is not None and floor_macs > target_macs:
        raise ValueError(
            f"MACs target {target_macs / 1e9:.3f} G is below {floor_macs / 1e9:.3f} G, the cost with the smallest "
            "rank in every layer; raise the target"
        )
    if target_params is not None and floor_params > target_params:
        raise ValueError(
            f"parameter target {target_params / 1e6:.3f} M is below {floor_params / 1e6:.3f} M, the count with "
            "the smallest rank in every layer; raise the target"
        )

    def run(alpha: float):
        chosen, macs, params = _greedy(ladders, fixed_macs, fixed_params, target_macs, target_params, alpha)
        shortfalls = []
        if target_macs is not None:
            shortfalls.append(1 - macs / target_macs)
        if target_params is not None:
            shortfalls.append(1 - params / target_params)
        squared_error = sum(ladder.squared_errors[option] for ladder, option in zip(ladders, chosen))
        # Sort key: land closest to every target first, then the lower error.
        key = (round(max(shortfalls), 4), squared_error)
        return key, chosen, macs, params, squared_error, alpha

    if target_params is None:
        best = run(1.0)
    elif target_macs is None:
        best = run(0.0)
    else:
        best = _search_alpha(run, target_macs, target_params)
    _, chosen, macs, params, squared_error, alpha = best
    ranks = {ladder.name: ladder.ranks[option] for ladder, option in zip(ladders, chosen)}
    logger.info(
        "rank allocation: %.3f GMACs, %.3f M params, total squared error %.3f (alpha %.3f)",
        macs / 1e9,
        params / 1e6,
        squared_error,
        alpha,
    )
    return Allocation(ranks=ranks, macs=macs, params=params, squared_error=squared_error, alpha=alpha)
