"""Run the method comparison on a list of models and write its page.

For each model and reduction, every variant compresses a copy of the model
at the same per-layer MAC budgets (``compress_uniform``); classifiers are
scored right after compression and, at one reduction, after the same short
fine-tune for every variant.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from codec_det.baselines.methods import BaselineSettings
from codec_det.comparison.report import (
    plot_error_curves,
    plot_layer_errors,
    render_markdown,
    write_text_atomic,
)
from codec_det.comparison.study import VARIANTS, RunResult, compress_uniform, finetune_classifier, top1
from codec_det.comparison.subjects import SUBJECTS, Subject, build_subject
from codec_det.decompose import ALSSettings
from codec_det.surgery import compressible_convs

__all__ = [
    "ANALYSIS_BEGIN",
    "ANALYSIS_END",
    "ComparisonConfig",
    "load_results",
    "output_error",
    "run_comparison",
    "write_comparison",
]

logger = logging.getLogger(__name__)

ABLATIONS = ("codec-1g", "codec-random")

# The page's hand-written analysis sits between these markers and survives a re-run.
ANALYSIS_BEGIN = "<!-- analysis: kept when the page is regenerated -->"
ANALYSIS_END = "<!-- end of analysis -->"


@dataclass
class ComparisonConfig:
    """What to compare and how hard to work.

    Attributes:
        models: subject names (``SUBJECTS``).
        reductions: fractions of each compressible conv's MACs to remove.
        variants: methods (``VARIANTS``); ``cp`` and ``tucker2`` are dropped
            for a model without ``kh x kw`` compressible convs, where both are
            the truncated SVD.
        groups: G of the CoDeC variants (groups of at least 16 filters).
        als_iterations: CoDeC ALS iterations per layer.
        cp_iterations: CP-ALS iterations per layer.
        tucker_iterations: HOOI iterations per layer.
        train_epochs: epochs of the models trained here.
        finetune_epochs, finetune_lr: the fine-tune given to every variant.
        finetune_reduction: the reduction at which classifiers are fine-tuned.
        ablation_reductions: reductions at which the CoDeC ablations
            (``codec-1g``, ``codec-random``) run; None runs them at every reduction.
        feature_images: photos used for the trunk-output error of models
            without labels (0: none).
        cache_dir: where downloaded wheels and extracted files go.
        seed: seed of training, clustering and random groups.
    """

    models: list[str] = field(default_factory=lambda: ["vgg16_bn", "mobilenet_v2", "mnist_resnet"])
    reductions: list[float] = field(default_factory=lambda: [0.30, 0.45, 0.66])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    groups: int = 4
    als_iterations: int = 10
    cp_iterations: int = 10
    tucker_iterations: int = 10
    train_epochs: int = 4
    finetune_epochs: int = 2
    finetune_lr: float = 0.01
    finetune_reduction: float = 0.45
    ablation_reductions: list[float] | None = None
    feature_images: int = 8
    cache_dir: str | None = None
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field and its fix."""
        for model in self.models:
            if model not in SUBJECTS:
                raise ValueError(f"unknown model {model!r}; choose from {', '.join(SUBJECTS)}")
        for variant in self.variants:
            if variant not in VARIANTS:
                raise ValueError(f"unknown method {variant!r}; choose from {', '.join(VARIANTS)}")
        for reduction in self.reductions:
            if not 0.0 < reduction < 1.0:
                raise ValueError(f"reduction {reduction!r} is not a fraction in (0, 1); e.g. 0.45 removes 45% of MACs")
        for name in ("groups", "als_iterations", "cp_iterations", "tucker_iterations", "train_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.finetune_epochs < 0 or self.feature_images < 0:
            raise ValueError("finetune_epochs and feature_images must be non-negative")


@torch.no_grad()
def output_error(dense: torch.nn.Module, compressed: torch.nn.Module, images: torch.Tensor) -> float:
    """Return ``||f(x) - f_hat(x)|| / ||f(x)||`` of two models' outputs on ``images``."""
    dense.eval()
    compressed.eval()
    reference = dense(images)
    return float((compressed(images) - reference).norm() / reference.norm().clamp_min(1e-30))


def _has_spatial_convs(subject: Subject) -> bool:
    convs, _ = compressible_convs(subject.model, log=False)
    return any(tuple(conv.kernel_size) != (1, 1) for conv in convs.values())


def _feature_images(config: ComparisonConfig) -> torch.Tensor | None:
    if config.feature_images == 0:
        return None
    from codec_det.comparison.sources import SOURCES, fetch_wheel_member
    from codec_det.comparison.subjects import load_imagenet_samples

    images, _ = load_imagenet_samples(fetch_wheel_member(SOURCES["imagenet_samples"], config.cache_dir))
    return images[: config.feature_images]


def run_comparison(config: ComparisonConfig, progress: bool = True) -> tuple[list[RunResult], dict[str, dict]]:
    """Run every (model, reduction, variant) and return the runs and per-model facts for the report."""
    config.validate()
    codec_settings = ALSSettings(n_iter_max=config.als_iterations, seed=config.seed)
    baseline_settings = BaselineSettings(
        cp_iterations=config.cp_iterations, tucker_iterations=config.tucker_iterations, seed=config.seed
    )
    runs: list[RunResult] = []
    subjects: dict[str, dict] = {}
    for name in config.models:
        subject = build_subject(name, cache_dir=config.cache_dir, train_epochs=config.train_epochs, seed=config.seed)
        variants = list(config.variants)
        info: dict = {"description": subject.description, "notes": []}
        if not _has_spatial_convs(subject):
            dropped = [variant for variant in variants if variant in ("cp", "tucker2")]
            variants = [variant for variant in variants if variant not in ("cp", "tucker2")]
            if dropped:
                info["notes"].append(
                    "Every compressible conv of this model is 1x1, where CP and Tucker-2 reduce to the truncated "
                    "SVD, so only the SVD baseline is listed."
                )
        features = None
        if subject.eval_data is None and config.feature_images:
            features = _feature_images(config)
            info["notes"].append(
                f"`output error` is the relative error of the trunk's output on {len(features)} ImageNet photos "
                "(foolbox 3.3.4), each compressed layer applied in place of its dense conv."
            )
        if subject.eval_data is not None:
            info["top1"] = top1(subject.model, subject.eval_data)
            info["eval_count"] = len(subject.eval_data[1])
        tuning = subject.train_data is not None and config.finetune_epochs > 0
        if tuning:
            info["finetune"] = (
                f"{config.finetune_epochs} epochs of SGD, lr {config.finetune_lr:g} with cosine decay, "
                f"batch 64, on the {len(subject.train_data[1])} training images"
            )
            dense = copy.deepcopy(subject.model)
            info["top1_dense_finetuned"] = finetune_classifier(
                dense, subject.train_data, subject.eval_data, epochs=config.finetune_epochs, lr=config.finetune_lr,
                seed=config.seed,
            )

        for reduction in config.reductions:
            for variant in variants:
                if variant in ABLATIONS and config.ablation_reductions is not None and not any(
                    abs(reduction - kept) < 1e-9 for kept in config.ablation_reductions
                ):
                    continue
                compressed, run = compress_uniform(
                    subject.model,
                    variant,
                    reduction,
                    model_name=name,
                    input_size=subject.input_size,
                    groups=config.groups,
                    codec_settings=codec_settings,
                    baseline_settings=baseline_settings,
                    seed=config.seed,
                    progress=progress,
                )
                if features is not None:
                    run.output_error = output_error(subject.model, compressed, features)
                if subject.eval_data is not None:
                    run.top1 = top1(compressed, subject.eval_data)
                if tuning and abs(reduction - config.finetune_reduction) < 1e-9:
                    run.top1_finetuned = finetune_classifier(
                        compressed, subject.train_data, subject.eval_data, epochs=config.finetune_epochs,
                        lr=config.finetune_lr, seed=config.seed,
                    )
                runs.append(run)
        subjects[name] = info
    return runs, subjects


def _preserved_analysis(doc_path: Path) -> str:
    if not doc_path.is_file():
        return ""
    match = re.search(re.escape(ANALYSIS_BEGIN) + r".*?" + re.escape(ANALYSIS_END), doc_path.read_text(), re.DOTALL)
    return match.group(0) if match else ""


def write_comparison(
    runs: list[RunResult],
    subjects: dict[str, dict],
    config: ComparisonConfig,
    *,
    doc_path: str | Path,
    figures_dir: str | Path,
    header: str,
    meta: dict | None = None,
) -> list[Path]:
    """Write the page, its PNG figures and the raw results (``<page stem>.json``); return the files written.

    The text between ``ANALYSIS_BEGIN`` and ``ANALYSIS_END`` of an existing
    page is carried over to the new one. ``meta`` (command, machine, timing)
    is stored in the JSON so that ``load_results`` can render the page again.
    """
    doc_path = Path(doc_path)
    figures_dir = Path(figures_dir)
    written = []
    figures: dict[str, list[str]] = {}
    for model in subjects:
        model_runs = [run for run in runs if run.model == model]
        curves = figures_dir / f"{doc_path.stem}-{model}-error.png"
        plot_error_curves(model_runs, curves, title=f"{model}: error at equal MACs per layer")
        middle = sorted({run.reduction for run in model_runs})[len({run.reduction for run in model_runs}) // 2]
        per_layer = figures_dir / f"{doc_path.stem}-{model}-layers.png"
        plot_layer_errors([run for run in model_runs if run.reduction == middle], per_layer,
                          title=f"{model}: per-layer error at -{100 * middle:.0f}% MACs")
        figures[model] = [Path(_relative(path, doc_path.parent)).as_posix() for path in (curves, per_layer)]
        written += [curves, per_layer]

    analysis = _preserved_analysis(doc_path) or f"{ANALYSIS_BEGIN}\n{ANALYSIS_END}"
    text = render_markdown(runs, subjects=subjects, figures=figures, header=header, analysis=analysis,
                           finetune_reduction=config.finetune_reduction)
    write_text_atomic(doc_path, text)
    written.append(doc_path)

    raw = doc_path.with_suffix(".json")
    payload = {"config": asdict(config), "meta": meta or {}, "subjects": subjects,
               "runs": [run.to_dict() for run in runs]}
    write_text_atomic(raw, json.dumps(payload, indent=1) + "\n")
    written.append(raw)
    return written


def load_results(path: str | Path) -> tuple[list[RunResult], dict[str, dict], ComparisonConfig, dict]:
    """Read the JSON that ``write_comparison`` wrote: runs, per-model facts, config and meta."""
    payload = json.loads(Path(path).read_text())
    runs = [RunResult.from_dict(run) for run in payload["runs"]]
    return runs, payload["subjects"], ComparisonConfig(**payload["config"]), payload.get("meta", {})


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)
