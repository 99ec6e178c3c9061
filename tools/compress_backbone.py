#!/usr/bin/env python
"""Compress a torchvision ResNet-50 with CoDeC to a MACs / parameter budget.

Writes ``DIR/model.safetensors``, ``DIR/spec.json``, ``DIR/report.csv`` and
``DIR/report.png``. The directory appears only when all four are complete.

With ``--from-d2 CHECKPOINT --config CONFIG`` the ResNet-50 bottom-up of a
trained Detectron2 R50 / R50-FPN model is compressed instead (its config
decides the stride placement and norm), and ``DIR/model.pth`` is a Detectron2
checkpoint with the compressed backbone, the original FPN and heads, and the
spec; ``DIR/config.yaml`` is CONFIG with the CoDeC backbone and these weights,
ready to fine-tune with tools/train_net.py. Both modes count MACs and
parameters on the classifier-shaped trunk (ResNet-50 with its 1000-way fc)
at 224x224, so the presets mean the same in both.

With --from-d2, ``--fpn-preset`` or ``--fpn-target-macs`` also compresses the
FPN's lateral and output convs (off by default). Their budget is counted on
the FPN alone at 800x1216: ``codec-45`` and ``codec-66`` remove 45% and 66% of
its MACs. ``DIR/model.pth`` then stores the FPN spec too, and the output
adds ``DIR/fpn_spec.json`` and ``DIR/fpn_report.csv``.

Examples:
    python tools/compress_backbone.py --weights resnet50.pth --preset codec-45 --output out/codec45
    python tools/compress_backbone.py --init random --target-macs 2.0 --output out/trial
    python tools/compress_backbone.py --weights resnet50.pth --method tucker2 --preset codec-45 --output out/tk45
    python tools/compress_backbone.py --from-d2 model_final.pth --config mask_rcnn_R_50_FPN_3x.yaml \\
        --preset codec-45 --output out/mask_rcnn_codec45
    python tools/compress_backbone.py --from-d2 model_final.pth --config mask_rcnn_R_50_FPN_3x.yaml \\
        --preset codec-45 --fpn-preset codec-45 --output out/mask_rcnn_codec45_fpn45
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import torch
import torchvision

from codec_det.baselines import METHODS, BaselineSettings, compress_model_baseline
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
    source.add_argument("--from-d2", type=Path, metavar="CHECKPOINT",
                        help="trained Detectron2 R50 / R50-FPN checkpoint whose bottom-up to compress (needs --config)")
    parser.add_argument("--config", type=Path, metavar="CONFIG",
                        help="Detectron2 config the --from-d2 model was trained with")

    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--preset", choices=sorted(PRESETS), help="operating point of the CoDeC paper")
    budget.add_argument("--target-macs", type=float, metavar="G",
                        help="total MACs of the compressed ResNet-50 classifier at 224x224, in G "
                        "(with --from-d2: its bottom-up plus a 1000-way fc, not the detector)")
    parser.add_argument("--target-params", type=float, metavar="M",
                        help="total parameters of the compressed ResNet-50 classifier, in millions (with --target-macs)")

    fpn_budget = parser.add_mutually_exclusive_group()
    fpn_budget.add_argument("--fpn-preset", choices=["codec-45", "codec-66"],
                            help="with --from-d2, also compress the FPN convs: 45%% or 66%% fewer FPN MACs at 800x1216")
    fpn_budget.add_argument("--fpn-target-macs", type=float, metavar="G",
                            help="with --from-d2, also compress the FPN convs to this many MACs of the FPN alone "
                            "at 800x1216, in G (the dense FPN has 55.12 G)")

    parser.add_argument("--output", type=Path, required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--method", choices=METHODS, default="codec",
                        help="codec (default), or a per-layer baseline at the same budget: cp (CP of kxk kernels), "
                        "tucker2 (Tucker-2 of kxk kernels), svd (truncated SVD); cp and tucker2 use svd for 1x1 convs")
    parser.add_argument("--groups", type=int, help="filter groups G for every conv (default: per-layer rule)")
    parser.add_argument("--rank-multiple", type=int, default=8, help="ranks are multiples of this (default 8)")
    parser.add_argument("--als-iterations", type=int, default=ALSSettings.n_iter_max,
                        help=f"maximum ALS iterations per layer (default {ALSSettings.n_iter_max})")
    parser.add_argument("--device", default="cpu", help="device for the decomposition, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights and clustering")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's own choice, one per core); on a machine "
                        "that other jobs load, 1 can be much faster for the many small batched solves of ALS")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow unpickling a trusted .pth file that tensor-only loading rejects, "
                        "or a Detectron2 .pkl model with --from-d2")
    return parser.parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """Reject bad values before any work starts, naming the option and the fix."""
    if args.target_macs is not None and not (math.isfinite(args.target_macs) and args.target_macs > 0):
        raise SystemExit(f"error: --target-macs must be a positive finite number (in G), got {args.target_macs}")
    if args.target_params is not None and not (math.isfinite(args.target_params) and args.target_params > 0):
        raise SystemExit(f"error: --target-params must be a positive finite number (in millions), got {args.target_params}")
    if args.fpn_target_macs is not None and not (math.isfinite(args.fpn_target_macs) and args.fpn_target_macs > 0):
        raise SystemExit(f"error: --fpn-target-macs must be a positive finite number (in G), got {args.fpn_target_macs}")
    if (args.fpn_preset is not None or args.fpn_target_macs is not None) and args.from_d2 is None:
        raise SystemExit(
            "error: --fpn-preset and --fpn-target-macs go with --from-d2; the other modes compress a ResNet-50 "
            "without FPN"
        )
    if args.target_params is not None and args.preset is not None:
        raise SystemExit("error: --target-params goes with --target-macs; a --preset sets both")
    if args.groups is not None and args.groups <= 0:
        raise SystemExit(f"error: --groups must be a positive integer, got {args.groups}")
    if args.threads is not None and args.threads <= 0:
        raise SystemExit(f"error: --threads must be a positive integer, got {args.threads}")
    if args.rank_multiple <= 0:
        raise SystemExit(f"error: --rank-multiple must be a positive integer, got {args.rank_multiple}")
    if args.method != "codec" and args.groups is not None:
        raise SystemExit(f"error: --groups applies to --method codec only; the {args.method} layers have no groups")
    if args.method != "codec" and args.from_d2 is not None:
        raise SystemExit(f"error: --from-d2 compresses with --method codec only, got --method {args.method}")
    if args.weights is not None and not args.weights.is_file():
        raise SystemExit(f"error: --weights file {args.weights} not found")
    if args.from_d2 is not None:
        if args.config is None:
            raise SystemExit("error: --from-d2 needs --config, the Detectron2 config the model was trained with")
        if not args.from_d2.is_file():
            raise SystemExit(f"error: --from-d2 checkpoint {args.from_d2} not found")
        if not args.config.is_file():
            raise SystemExit(f"error: --config file {args.config} not found")
    elif args.config is not None:
        raise SystemExit("error: --config goes with --from-d2; the other modes compress a torchvision ResNet-50")
    output = args.output
    if output.exists() and not output.is_dir():
        # --overwrite replaces directories only, so a file here would fail after the whole compression.
        raise SystemExit(f"error: output {output} exists and is not a directory; choose another --output")
    if output.exists() and any(output.iterdir()) and not args.overwrite:
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
    if args.threads is not None:
        torch.set_num_threads(args.threads)
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

    settings = ALSSettings(n_iter_max=args.als_iterations, seed=args.seed)
    if args.from_d2 is not None:
        return run_from_d2(args, target_macs, target_params, label, settings)

    model = build_model(args)
    if args.method != "codec":
        result = compress_model_baseline(
            model,
            args.method,
            target_macs=target_macs,
            target_params=target_params,
            rank_multiple=args.rank_multiple,
            settings=BaselineSettings(cp_iterations=args.als_iterations, seed=args.seed),
            architecture="resnet50",
        )
        label = f"{label} ({args.method})"
    else:
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


def run_from_d2(
    args: argparse.Namespace, target_macs: float, target_params: float | None, label: str, settings: ALSSettings
) -> int:
    """Compress the bottom-up of a Detectron2 checkpoint and write the checkpoint, spec, report and config."""
    # Detectron2 is needed only in this mode; the other modes run without it.
    from detectron2.config import get_cfg

    from codec_det.checkpoint import SPEC_FILE
    from codec_det.d2.checkpoint import save_d2_checkpoint, weights_fpn_spec
    from codec_det.d2.compress import CODEC_BACKBONE_NAMES, compress_d2_state, read_source_checkpoint
    from codec_det.d2.config import FPN_SPEC_FILE, add_codec_config
    from codec_det.d2.convert import D2_MODEL_FILE

    cfg = get_cfg()
    add_codec_config(cfg)
    try:
        cfg.merge_from_file(str(args.config))
    except KeyError as error:
        raise ValueError(f"--config {args.config}: {error.args[0]}; fix or remove that key") from None

    torch.manual_seed(args.seed)
    state = read_source_checkpoint(args.from_d2, allow_pickle=args.allow_pickle)
    new_state, result = compress_d2_state(
        state,
        cfg,
        source=str(args.from_d2),
        device=args.device,
        target_macs=target_macs,
        target_params=target_params,
        groups=args.groups,
        rank_multiple=args.rank_multiple,
        settings=settings,
    )
    result.spec.metadata["target"] = label
    fpn_result = compress_fpn_of_state(args, new_state, cfg, settings) if _compresses_fpn(args) else None

    output_cfg = cfg.clone()
    output_cfg.MODEL.BACKBONE.NAME = CODEC_BACKBONE_NAMES.get(cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.NAME)
    output_cfg.MODEL.WEIGHTS = str((args.output / D2_MODEL_FILE).resolve())
    output_cfg.MODEL.CODEC.SPEC = ""
    output_cfg.MODEL.CODEC.FPN_SPEC = ""

    with atomic_output_dir(args.output, overwrite=args.overwrite) as staging:
        if fpn_result is None:
            # A source whose FPN is already compressed keeps it, so its FPN spec goes along.
            carries_fpn_spec, source_fpn_spec = weights_fpn_spec(str(args.from_d2))
            if carries_fpn_spec:
                save_d2_checkpoint(staging / D2_MODEL_FILE, new_state, result.spec, fpn_spec=source_fpn_spec)
            else:
                save_d2_checkpoint(staging / D2_MODEL_FILE, new_state, result.spec)
        else:
            new_state, fpn = fpn_result
            save_d2_checkpoint(staging / D2_MODEL_FILE, new_state, result.spec, fpn_spec=fpn.spec)
            fpn.spec.save(staging / FPN_SPEC_FILE)
            write_report_csv(fpn.layers, fpn.totals, staging / "fpn_report.csv")
        result.spec.save(staging / SPEC_FILE)
        write_report_csv(result.layers, result.totals, staging / "report.csv")
        plot_mac_reduction(result.layers, result.totals, staging / "report.png", title=label)
        (staging / "config.yaml").write_text(output_cfg.dump())

    totals = result.totals
    print(
        f"{label}: bottom-up as a 224x224 classifier {totals['macs_before'] / 1e9:.3f} -> "
        f"{totals['macs_after'] / 1e9:.3f} GMACs, {totals['params_before'] / 1e6:.2f} -> "
        f"{totals['params_after'] / 1e6:.2f} M params; wrote {args.output / D2_MODEL_FILE} and "
        f"{args.output / 'config.yaml'}"
    )
    if fpn_result is not None:
        fpn_totals = fpn_result[1].totals
        print(
            f"FPN {fpn_result[1].spec.metadata['target']}: {fpn_totals['macs_before'] / 1e9:.3f} -> "
            f"{fpn_totals['macs_after'] / 1e9:.3f} GMACs at 800x1216, {fpn_totals['params_before'] / 1e6:.2f} -> "
            f"{fpn_totals['params_after'] / 1e6:.2f} M params; wrote {args.output / FPN_SPEC_FILE}"
        )
    return 0


def _compresses_fpn(args: argparse.Namespace) -> bool:
    return args.fpn_preset is not None or args.fpn_target_macs is not None


def compress_fpn_of_state(args: argparse.Namespace, state: dict, cfg, settings: ALSSettings):
    """Compress the FPN convs in a Detectron2 state dict; returns the new state dict and the compression result."""
    from codec_det.d2.compress_fpn import FPN_PRESET_CUTS, compress_d2_fpn_state

    if args.fpn_preset is not None:
        budget = {"cut": FPN_PRESET_CUTS[args.fpn_preset]}
        label = args.fpn_preset
    else:
        budget = {"target_macs": args.fpn_target_macs * 1e9}
        label = f"{args.fpn_target_macs:g} GMACs"
    new_state, fpn = compress_d2_fpn_state(
        state,
        cfg,
        source=str(args.from_d2),
        device=args.device,
        rank_multiple=args.rank_multiple,
        settings=settings,
        **budget,
    )
    fpn.spec.metadata["target"] = label
    return new_state, fpn


if __name__ == "__main__":
    sys.exit(main())
