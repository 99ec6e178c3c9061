#!/usr/bin/env python
"""Compress a torchvision ResNet-50 with CoDeC to a MACs / parameter budget.

Writes ``DIR/model.safetensors``, ``DIR/spec.json``, ``DIR/report.csv`` and
``DIR/report.png``. The directory appears only when all four are complete.

Examples:
    python tools/compress_backbone.py --weights resnet50.pth --preset codec-45 --output out/codec45
    python tools/compress_backbone.py --init random --target-macs 2.0 --output out/trial
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import torchvision

from codec_det.checkpoint import atomic_output_dir, load_state_dict_file, load_weights_strict, save_compressed
from codec_det.compress import compress_model
from codec_det.decompose import ALSSettings
from codec_det.presets import PRESETS, get_preset
from codec_det.report import plot_mac_reduction, write_report_csv

logger = logging.getLogger("codec_det.compress_backbone")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path, help="torchvision ResNet-50 state_dict (.pth or .safetensors)")
    source.add_argument("--init", choices=["random"], help="start from randomly initialised weights (trials)")

    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--preset", choices=sorted(PRESETS), help="operating point of the CoDeC paper")
    budget.add_argument("--target-macs", type=float, metavar="G", help="total MACs of the compressed model, in G")
    parser.add_argument("--target-params", type=float, metavar="M",
                        help="total parameters of the compressed model, in millions (with --target-macs)")

    parser.add_argument("--output", type=Path, required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--groups", type=int, help="filter groups G for every conv (default: per-layer rule)")
    parser.add_argument("--rank-multiple", type=int, default=8, help="ranks are multiples of this (default 8)")
    parser.add_argument("--als-iterations", type=int, default=ALSSettings.n_iter_max,
                        help=f"maximum ALS iterations per layer (default {ALSSettings.n_iter_max})")
    parser.add_argument("--device", default="cpu", help="device for the decomposition, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights and clustering")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow unpickling a trusted .pth file that tensor-only loading rejects")
    return parser.parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """Reject bad values before any work starts, naming the option and the fix."""
    if args.target_macs is not None and args.target_macs <= 0:
        raise SystemExit(f"error: --target-macs must be positive (in G), got {args.target_macs}")
    if args.target_params is not None and args.target_params <= 0:
        raise SystemExit(f"error: --target-params must be positive (in millions), got {args.target_params}")
    if args.target_params is not None and args.preset is not None:
        raise SystemExit("error: --target-params goes with --target-macs; a --preset sets both")
    if args.groups is not None and args.groups <= 0:
        raise SystemExit(f"error: --groups must be a positive integer, got {args.groups}")
    if args.rank_multiple <= 0:
        raise SystemExit(f"error: --rank-multiple must be a positive integer, got {args.rank_multiple}")
    if args.weights is not None and not args.weights.is_file():
        raise SystemExit(f"error: --weights file {args.weights} not found")
    output = args.output
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        raise SystemExit(f"error: output {output} exists and is not empty; pass --overwrite or choose another --output")


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet50()
    if args.weights is not None:
        state = load_state_dict_file(args.weights, allow_pickle=args.allow_pickle)
        load_weights_strict(model, state, str(args.weights))
        logger.info("loaded ResNet-50 weights from %s", args.weights)
    else:
        logger.info("using randomly initialised ResNet-50 weights (seed %d)", args.seed)
    return model.to(args.device).eval()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    validate_args(args)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        logger.error("%s", error)
        return 2


def run(args: argparse.Namespace) -> int:

    if args.preset is not None:
        preset = get_preset(args.preset)
        target_macs, target_params, label = preset.target_macs, preset.target_params, preset.name
    else:
        target_macs = args.target_macs * 1e9
        target_params = args.target_params * 1e6 if args.target_params is not None else None
        label = f"{args.target_macs:g} GMACs"

    model = build_model(args)
    settings = ALSSettings(n_iter_max=args.als_iterations, seed=args.seed)
    result = compress_model(
        model,
        target_macs=target_macs,
        target_params=target_params,
        groups=args.groups,
        rank_multiple=args.rank_multiple,
        settings=settings,
        architecture="resnet50",
    )
    result.spec.metadata["target"] = label

    with atomic_output_dir(args.output, overwrite=args.overwrite) as staging:
        save_compressed(result.model, result.spec, staging)
        write_report_csv(result.layers, result.totals, staging / "report.csv")
        plot_mac_reduction(result.layers, result.totals, staging / "report.png", title=label)

    totals = result.totals
    print(
        f"{label}: {totals['macs_before'] / 1e9:.3f} -> {totals['macs_after'] / 1e9:.3f} GMACs, "
        f"{totals['params_before'] / 1e6:.2f} -> {totals['params_after'] / 1e6:.2f} M params; wrote {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
