"""Equal-MACs comparison of CoDeC and the classic low-rank baselines, layer by layer.

For a reduction ``f`` every compressible conv gets the MAC budget
``(1 - f) * dense MACs``, and each method takes, in every layer, the largest
rank whose layer fits that budget. All methods therefore spend the same MACs
per layer (up to one rank step), the compressible convs as a whole lose a
fraction ``f`` of their MACs, and per-layer reconstruction errors compare
like for like.

Variants:

- ``codec``: CoDeC with subspace clustering into G groups (``study_groups``).
- ``codec-1g``: CoDeC with one group (G = 1).
- ``codec-random``: CoDeC with G random balanced groups.
- ``cp``, ``tucker2``: per-layer CP and Tucker-2 of ``kh x kw`` kernels; a
  1x1 conv takes the truncated SVD (its exact optimum for both).
- ``svd``: truncated SVD of every conv's mode-N unfolding.
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from codec_det.baselines.compress import compress_model_baseline
from codec_det.baselines.methods import BaselineSettings, baseline_max_rank, layer_method, rank_for_macs
from codec_det.complexity import ConvGeometry, codec_conv_cost, count_model, dense_conv_cost, record_conv_geometry
from codec_det.compress import compress_model
from codec_det.decompose import ALSSettings, max_rank
from codec_det.surgery import compressible_convs

__all__ = [
    "VARIANTS",
    "LayerResult",
    "RunResult",
    "single_thread",
    "study_groups",
    "codec_rank_for_macs",
    "random_balanced_labels",
    "compress_uniform",
    "top1",
    "finetune_classifier",
]

logger = logging.getLogger(__name__)

VARIANTS = ("codec", "codec-1g", "codec-random", "cp", "tucker2", "svd")


@dataclass
class LayerResult:
    """One layer of one compressed model.

    Attributes:
        layer: module name.
        shape: kernel shape ``NxCxkhxkw``.
        layer_type: ``codec``, ``cp``, ``tucker2``, ``svd`` or ``dense`` (no rank fits the budget).
        groups: CoDeC's G (1 for the baselines).
        rank: rank (R4 for Tucker-2), or None when dense.
        budget_macs: the layer's MAC budget.
        dense_macs, macs: MACs of the dense conv and of the compressed layer.
        rel_error: relative reconstruction error of the kernel.
    """

    layer: str
    shape: str
    layer_type: str
    groups: int
    rank: int | None
    budget_macs: float
    dense_macs: int
    macs: int
    rel_error: float


@dataclass
class RunResult:
    """One (model, variant, reduction) run: per-layer results, totals, accuracies and output error."""

    model: str
    variant: str
    reduction: float
    layers: list[LayerResult]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    seconds: float
    top1: float | None = None
    top1_finetuned: float | None = None
    output_error: float | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers"] = [asdict(layer) for layer in self.layers]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RunResult":
        values = dict(data)
        values["layers"] = [LayerResult(**layer) for layer in data["layers"]]
        return cls(**values)


@contextmanager
def single_thread():
    """Run the block with one intra-op thread.

    Measured on a shared 2-core VM (torch 2.14.1, MKL): a batch of 64
    Cholesky factorisations of 157x157 matrices, as in the CoDeC ALS, took
    0.02 s with one thread and 0.82 s with two while other processes used
    the cores, so the decompositions run on one thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def study_groups(out_channels: int, groups: int, min_group_size: int = 16) -> int:
    """Return the largest G <= ``groups`` that divides N with groups of at least ``min_group_size`` filters (>= 1)."""
    best = 1
    for candidate in range(1, groups + 1):
        if out_channels % candidate == 0 and out_channels // candidate >= min_group_size:
            best = candidate
    return best


def codec_rank_for_macs(conv: nn.Conv2d, geometry: ConvGeometry, groups: int, budget: float) -> int | None:
    """Return the largest CoDeC rank with G groups whose layer costs at most ``budget`` MACs, or None."""
    upper = max_rank(conv, groups)
    if upper < 1 or codec_conv_cost(geometry, groups, 1)[0] > budget:
        return None
    low, high = 1, upper
    while low < high:
        middle = (low + high + 1) // 2
        if codec_conv_cost(geometry, groups, middle)[0] <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def random_balanced_labels(out_channels: int, groups: int, seed: int) -> torch.Tensor:
    """Assign N filters to G groups of N / G filters uniformly at random, shape (N,)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(out_channels, generator=generator) % groups


def compress_uniform(
    model: nn.Module,
    variant: str,
    reduction: float,
    *,
    model_name: str = "model",
    input_size: tuple[int, int] = (224, 224),
    groups: int = 4,
    codec_settings: ALSSettings = ALSSettings(),
    baseline_settings: BaselineSettings = BaselineSettings(),
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, RunResult]:
    """Compress a copy of ``model`` with ``variant``, every compressible conv at ``(1 - reduction)`` of its MACs.

    Args:
        model: left unchanged.
        variant: one of ``VARIANTS``.
        reduction: fraction of each layer's MACs to remove, in (0, 1).
        groups: G of the CoDeC variants (capped per layer by ``study_groups``).

    Returns:
        The compressed copy and its ``RunResult`` (no accuracy yet).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if not 0.0 < reduction < 1.0:
        raise ValueError(f"reduction must be a fraction in (0, 1), got {reduction!r}")
    model = copy.deepcopy(model).eval()
    convs, _ = compressible_convs(model, log=False)
    geometry = record_conv_geometry(model, list(convs), input_size)
    start = time.perf_counter()

    budgets = {name: (1.0 - reduction) * dense_conv_cost(geometry[name])[0] for name in convs}
    if variant.startswith("codec"):
        plan = {}
        for name, conv in convs.items():
            layer_groups = 1 if variant == "codec-1g" else study_groups(conv.out_channels, groups)
            plan[name] = (layer_groups, codec_rank_for_macs(conv, geometry[name], layer_groups, budgets[name]), None)

        def labels_fn(name, conv, layer_groups):
            return random_balanced_labels(conv.out_channels, layer_groups, seed + len(name))

        with single_thread():
            result = compress_model(
                model,
                plan=plan,
                input_size=input_size,
                settings=codec_settings,
                fold=False,
                progress=progress,
                labels_fn=labels_fn if variant == "codec-random" else None,
            )
        types = {name: "codec" for name in convs}
    else:
        plan = {}
        types = {}
        for name, conv in convs.items():
            layer_type = layer_method(variant, conv.kernel_size)
            upper = baseline_max_rank(layer_type, geometry[name])
            plan[name] = (layer_type, rank_for_macs(layer_type, geometry[name], budgets[name], upper=upper))
            types[name] = layer_type
        with single_thread():
            result = compress_model_baseline(
                model, variant, plan=plan, input_size=input_size, settings=baseline_settings, progress=progress
            )

    layers = []
    for report in result.layers:
        layers.append(
            LayerResult(
                layer=report.layer,
                shape=report.shape,
                layer_type=types[report.layer] if report.rank is not None else "dense",
                groups=report.groups or 1,
                rank=report.rank,
                budget_macs=budgets[report.layer],
                dense_macs=report.macs_before,
                macs=report.macs_after,
                rel_error=float(report.rel_error),
            )
        )
    totals = result.totals
    run = RunResult(
        model=model_name,
        variant=variant,
        reduction=reduction,
        layers=layers,
        macs_before=int(totals["macs_before"]),
        macs_after=int(totals["macs_after"]),
        params_before=int(totals["params_before"]),
        params_after=int(totals["params_after"]),
        seconds=time.perf_counter() - start,
    )
    logger.info(
        "%s %s -%.0f%%: mean layer error %.4f, %.3f -> %.3f GMACs, %.1f s",
        model_name,
        variant,
        100 * reduction,
        sum(layer.rel_error for layer in layers) / max(len(layers), 1),
        run.macs_before / 1e9,
        run.macs_after / 1e9,
        run.seconds,
    )
    return result.model, run


@torch.no_grad()
def top1(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], batch_size: int = 100) -> float:
    """Return the top-1 accuracy of ``model`` on ``(images, labels)``, in percent."""
    model.eval()
    images, labels = data
    correct = 0
    for begin in range(0, len(labels), batch_size):
        logits = model(images[begin : begin + batch_size])
        correct += int((logits.argmax(dim=1) == labels[begin : begin + batch_size]).sum())
    return 100.0 * correct / len(labels)


def finetune_classifier(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
) -> float:
    """Fine-tune ``model`` in place with ``codec_det.training.finetune`` and return its test top-1 (percent).

    SGD with momentum 0.9, weight decay 1e-4 and a cosine schedule from
    ``lr``; the factors of the compressed layers are the trained parameters.
    """
    from codec_det.training import finetune

    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(TensorDataset(*train), batch_size=batch_size, shuffle=True, generator=generator)
    test_loader = DataLoader(TensorDataset(*test), batch_size=256)
    finetune(model, train_loader, test_loader, epochs=epochs, lr=lr, device="cpu", progress=False)
    return top1(model, test)
