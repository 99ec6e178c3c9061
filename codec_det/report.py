"""The per-layer compression report: CSV table and a PNG chart of MAC reduction."""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, fields
from pathlib import Path

from codec_det.compress import LayerReport

__all__ = ["REPORT_COLUMNS", "write_report_csv", "plot_mac_reduction"]

REPORT_COLUMNS = [field.name for field in fields(LayerReport)]


def write_report_csv(layers: list[LayerReport], totals: dict, path: str | os.PathLike) -> None:
    """Write one row per conv and a last ``total`` row with the fvcore totals of the whole model.

    ``groups`` and ``rank`` are empty for convs kept dense; the ``total`` row's
    ``rel_error`` is the root mean square of the per-layer errors.
    """
    rows = [asdict(layer) for layer in layers]
    mean_square = sum(layer.rel_error**2 for layer in layers) / max(len(layers), 1)
    rows.append(
        {
            "layer": "total",
            "shape": "",
            "groups": "",
            "rank": "",
            "macs_before": totals["macs_before"],
            "macs_after": totals["macs_after"],
            "params_before": totals["params_before"],
            "params_after": totals["params_after"],
            "rel_error": mean_square**0.5,
        }
    )
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=REPORT_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if value is None else value for key, value in row.items()})


def plot_mac_reduction(layers: list[LayerReport], totals: dict, path: str | os.PathLike, title: str = "") -> None:
    """Save a bar chart of MACs before and after per layer, with the relative error on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [layer.layer for layer in layers]
    positions = range(len(layers))
    figure, axis = plt.subplots(figsize=(max(8, 0.28 * len(layers)), 5))
    axis.bar(positions, [layer.macs_before / 1e6 for layer in layers], color="#c9c9c9", label="dense")
    axis.bar(positions, [layer.macs_after / 1e6 for layer in layers], color="#2c7fb8", label="compressed")
    axis.set_ylabel("MMACs")
    axis.set_xticks(list(positions))
    axis.set_xticklabels(names, rotation=90, fontsize=7)

    error_axis = axis.twinx()
    error_axis.plot(list(positions), [layer.rel_error for layer in layers], "o", color="#d95f0e", markersize=3,
                    label="relative error")
    error_axis.set_ylabel("relative reconstruction error")
    error_axis.set_ylim(0, 1.05)

    reduction = 100 * (1 - totals["macs_after"] / totals["macs_before"])
    axis.set_title(
        f"{title} {totals['macs_before'] / 1e9:.2f} -> {totals['macs_after'] / 1e9:.2f} GMACs "
        f"({reduction:.1f}% fewer), {totals['params_after'] / 1e6:.2f} M params".strip()
    )
    handles = axis.get_legend_handles_labels()[0] + error_axis.get_legend_handles_labels()[0]
    axis.legend(handles=handles, loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
