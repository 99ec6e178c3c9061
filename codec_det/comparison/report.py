"""The comparison's report: markdown tables and PNG curves of error against MACs."""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from pathlib import Path

from codec_det.comparison.study import RunResult

__all__ = ["VARIANT_LABELS", "mean_error", "layer_errors", "plot_error_curves", "plot_layer_errors", "render_markdown",
           "write_text_atomic"]

VARIANT_LABELS = {
    "codec": "CoDeC (clustered groups)",
    "codec-1g": "CoDeC, one group",
    "codec-random": "CoDeC, random groups",
    "cp": "CP (Lebedev 2015)",
    "tucker2": "Tucker-2 (Kim 2016)",
    "svd": "truncated SVD",
}


def mean_error(run: RunResult, kernel: str | None = None) -> float:
    """Mean relative error over the run's layers, optionally only ``"3x3"``-style kernels or ``"1x1"``."""
    errors = [layer.rel_error for layer in run.layers if kernel is None or layer.shape.endswith(kernel)]
    return sum(errors) / len(errors) if errors else float("nan")


def layer_errors(runs: list[RunResult]) -> dict[str, dict[str, float]]:
    """Return ``{layer: {variant: rel_error}}`` for runs of one model at one reduction."""
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for run in runs:
        for layer in run.layers:
            table[layer.layer][run.variant] = layer.rel_error
    return dict(table)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_error_curves(runs: list[RunResult], path: str | os.PathLike, title: str) -> None:
    """Plot the mean per-layer error of each variant against the fraction of MACs kept."""
    plt = _pyplot()
    by_variant: dict[str, list[RunResult]] = defaultdict(list)
    for run in runs:
        by_variant[run.variant].append(run)
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    for variant, variant_runs in by_variant.items():
        variant_runs.sort(key=lambda run: run.reduction)
        kept = [sum(layer.macs for layer in run.layers) / sum(layer.dense_macs for layer in run.layers)
                for run in variant_runs]
        axis.plot(kept, [mean_error(run) for run in variant_runs], "o-", label=VARIANT_LABELS.get(variant, variant))
    axis.set_xlabel("MACs of the compressible convs, fraction of dense")
    axis.set_ylabel("mean relative reconstruction error")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)


def plot_layer_errors(runs: list[RunResult], path: str | os.PathLike, title: str) -> None:
    """Plot each variant's relative error per layer for runs at one reduction."""
    plt = _pyplot()
    table = layer_errors(runs)
    names = list(table)
    figure, axis = plt.subplots(figsize=(max(6.4, 0.32 * len(names) + 2), 4.4))
    for run in runs:
        axis.plot(range(len(names)), [table[name].get(run.variant, float("nan")) for name in names], "o-",
                  markersize=3, label=VARIANT_LABELS.get(run.variant, run.variant))
    axis.set_xticks(range(len(names)))
    axis.set_xticklabels(names, rotation=90, fontsize=7)
    axis.set_ylabel("relative reconstruction error")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)


def _save_figure(figure, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(handle)
    try:
        figure.savefig(temporary, dpi=110)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _mean_table(runs: list[RunResult], reductions: list[float], variants: list[str]) -> list[str]:
    lines = ["| method | " + " | ".join(f"-{100 * r:.0f}% MACs" for r in reductions) + " |",
             "|---|" + "---:|" * len(reductions)]
    index = {(run.variant, run.reduction): run for run in runs}
    for variant in variants:
        cells = []
        for reduction in reductions:
            run = index.get((variant, reduction))
            cells.append("" if run is None else f"{mean_error(run):.4f}")
        lines.append(f"| {VARIANT_LABELS.get(variant, variant)} | " + " | ".join(cells) + " |")
    return lines


def _layer_table(runs: list[RunResult], variants: list[str]) -> tuple[list[str], dict]:
    """Per-layer errors at one reduction, with CoDeC against the best baseline of each layer."""
    table = layer_errors(runs)
    shapes = {layer.layer: layer.shape for run in runs for layer in run.layers}
    # The SVD comes first so that it wins ties: on a 1x1 conv the CP and
    # Tucker-2 columns are the SVD itself.
    baselines = [variant for variant in ("svd", "tucker2", "cp") if variant in variants]
    header = ["layer", "kernel", *[VARIANT_LABELS.get(v, v) for v in variants]]
    if baselines and "codec" in variants:
        header += ["best baseline", "CoDeC vs best baseline"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    summary = {"layers": 0, "codec_wins": 0, "relative": []}
    for name, errors in table.items():
        cells = [name, shapes[name], *[f"{errors[v]:.4f}" if v in errors else "" for v in variants]]
        if baselines and "codec" in variants and "codec" in errors:
            best = min(baselines, key=lambda v: errors.get(v, float("inf")))
            relative = errors["codec"] / errors[best] - 1 if errors[best] > 0 else 0.0
            cells += [VARIANT_LABELS[best], f"{100 * relative:+.1f}%"]
            summary["layers"] += 1
            summary["codec_wins"] += int(errors["codec"] < errors[best])
            summary["relative"].append(relative)
        lines.append("| " + " | ".join(cells) + " |")
    return lines, summary


def _pairwise_lines(runs: list[RunResult], variants: list[str]) -> list[str]:
    """One line per other variant: on how many layers CoDeC's error is lower, and the mean relative difference."""
    table = layer_errors(runs)
    lines = []
    for other in variants:
        if other == "codec":
            continue
        pairs = [(errors["codec"], errors[other]) for errors in table.values() if "codec" in errors and other in errors]
        if not pairs:
            continue
        wins = sum(codec < value for codec, value in pairs)
        relative = sum(codec / value - 1 for codec, value in pairs if value > 0) / len(pairs)
        lines.append(f"- CoDeC against {VARIANT_LABELS.get(other, other)}: lower error on {wins} of {len(pairs)} "
                     f"layers, {100 * relative:+.1f}% on average.")
    return lines


def render_markdown(
    runs: list[RunResult],
    *,
    subjects: dict[str, dict],
    figures: dict[str, list[str]],
    header: str,
    analysis: str = "",
    finetune_reduction: float | None = None,
) -> str:
    """Render the comparison page.

    Args:
        runs: every run of every model.
        subjects: per model, ``description``, ``notes``, and for classifiers
            ``top1`` and ``eval_count`` (uncompressed), ``finetune`` (the
            schedule, in words) and ``top1_dense_finetuned``.
        figures: per model, PNG paths relative to the page.
        header: text above the results (purpose, command, machine, date, settings).
        analysis: text after the results (findings and proposals).
        finetune_reduction: the reduction at which fine-tuning ran.
    """
    lines = [header.rstrip(), ""]
    for model, info in subjects.items():
        model_runs = [run for run in runs if run.model == model]
        if not model_runs:
            continue
        reductions = sorted({run.reduction for run in model_runs})
        variants = [v for v in VARIANT_LABELS if any(run.variant == v for run in model_runs)]
        lines += [f"## {model}", "", info["description"] + ".", ""]
        for note in info.get("notes", []):
            lines += [note, ""]

        lines += ["Mean relative reconstruction error over the compressible convs, each conv at the same MAC "
                  "budget for every method:", ""]
        lines += _mean_table(model_runs, reductions, variants) + [""]

        for reduction in reductions:
            at_reduction = [run for run in model_runs if run.reduction == reduction]
            table, summary = _layer_table(at_reduction, variants)
            lines += [f"Per-layer relative error at -{100 * reduction:.0f}% MACs per layer:", ""] + table + [""]
            if summary["layers"]:
                mean_relative = sum(summary["relative"]) / len(summary["relative"])
                lines += [
                    f"At -{100 * reduction:.0f}%, CoDeC's error is below the best baseline's on "
                    f"{summary['codec_wins']} of {summary['layers']} layers; on average it is "
                    f"{100 * mean_relative:+.1f}% relative to the best baseline of each layer.",
                    "",
                ]
            comparisons = _pairwise_lines(at_reduction, variants)
            if comparisons:
                lines += comparisons + [""]

        show_output = any(run.output_error is not None for run in model_runs)
        macs_lines = ["| method | reduction | GMACs (fvcore) | MACs removed from the whole model | params (M) |"
                      + (" output error |" if show_output else "") + " seconds |",
                      "|---|---:|---:|---:|---:|" + ("---:|" if show_output else "") + "---:|"]
        for run in sorted(model_runs, key=lambda run: (run.reduction, variants.index(run.variant))):
            output = f" {run.output_error:.4f} |" if show_output and run.output_error is not None else (
                " |" if show_output else "")
            macs_lines.append(
                f"| {VARIANT_LABELS.get(run.variant, run.variant)} | -{100 * run.reduction:.0f}% | "
                f"{run.macs_after / 1e9:.4f} (dense {run.macs_before / 1e9:.4f}) | "
                f"{100 * (1 - run.macs_after / run.macs_before):.1f}% | {run.params_after / 1e6:.3f} |"
                f"{output} {run.seconds:.1f} |"
            )
        lines += ["Whole-model cost of each compressed model (fvcore count) and decomposition time:", ""]
        lines += macs_lines + [""]

        if info.get("top1") is not None:
            lines += [f"Top-1 of the uncompressed model: {info['top1']:.1f}%"
                      f" on {info.get('eval_count', '?')} images.", ""]
            accuracy = ["| method | " + " | ".join(f"-{100 * r:.0f}%" for r in reductions) + " |",
                        "|---|" + "---:|" * len(reductions)]
            index = {(run.variant, run.reduction): run for run in model_runs}
            for variant in variants:
                accuracy.append(
                    f"| {VARIANT_LABELS.get(variant, variant)} | "
                    + " | ".join(_percent(index[(variant, r)].top1) if (variant, r) in index else "" for r in reductions)
                    + " |"
                )
            lines += ["Top-1 (%) right after compression, no fine-tuning:", ""] + accuracy + [""]

            tuned = [run for run in model_runs if run.top1_finetuned is not None]
            if tuned:
                reduction = finetune_reduction if finetune_reduction is not None else tuned[0].reduction
                lines += [f"Top-1 (%) at -{100 * reduction:.0f}% MACs before and after the same fine-tune "
                          f"({info.get('finetune', '')}):", "",
                          "| method | after compression | after fine-tune | change vs uncompressed |",
                          "|---|---:|---:|---:|"]
                if info.get("top1_dense_finetuned") is not None:
                    lines.append(f"| uncompressed, same fine-tune | {info['top1']:.1f} | "
                                 f"{info['top1_dense_finetuned']:.1f} | "
                                 f"{info['top1_dense_finetuned'] - info['top1']:+.1f} |")
                for run in sorted(tuned, key=lambda run: variants.index(run.variant)):
                    lines.append(f"| {VARIANT_LABELS.get(run.variant, run.variant)} | {_percent(run.top1)} | "
                                 f"{_percent(run.top1_finetuned)} | {run.top1_finetuned - info['top1']:+.1f} |")
                lines.append("")

        for figure in figures.get(model, []):
            lines += [f"![{model}]({figure})", ""]

    if analysis:
        lines += [analysis.rstrip(), ""]
    return "\n".join(lines)
