#!/usr/bin/env python
"""Export a CoDeC-compressed (or original) ResNet-50 backbone to safetensors, TorchScript and ONNX, verified.

Two inputs:

- a Detectron2 model: --config-file CFG --weights CKPT [KEY VALUE ...]. The
  exported model is the R50-FPN backbone (bottom-up ResNet and FPN): images
  (B, 3, H, W), normalised as the model's PIXEL_MEAN / PIXEL_STD do, with H
  and W divisible by 32, to the feature maps p2..p6. --full-detector also
  traces the whole Faster / Mask / Keypoint R-CNN (detector.ts: one image
  (3, H, W) in 0-255 to the flattened predicted instances).
- a classifier: --compressed DIR, a directory written by
  tools/compress_backbone.py, or the state-dict file of an uncompressed
  torchvision ResNet-50. The exported model is the whole classifier:
  normalised images (B, 3, H, W) to logits (B, 1000).

DIR receives backbone.safetensors + spec.json (training form, rebuildable
with the spec; fpn_spec.json too when MODEL.CODEC.FPN_SPEC or the checkpoint
gives the FPN CoDeC convs), backbone.ts, backbone.onnx (opset 18 by default, symbolic
batch, height and width), optionally detector.ts, and export_report.json.
Each artifact is read back and compared with the PyTorch model at the traced
input size (batch 1) and at --second-size (batch 2; one image for the
detector); every check must reach max_rel_error <= --tolerance, where
max_rel_error = max|artifact - pytorch| / max|pytorch| per output. DIR
appears only when every check passed. Runs on the CPU.

Examples:
    python tools/export_backbone.py --compressed out/codec45 --output out/codec45_export --deploy-form fast
    python tools/export_backbone.py --config-file configs/codec_mask_rcnn.yaml \\
        --weights output/codec_mask_rcnn/model_final.pth --output out/mask_export --full-detector
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

import codec_det  # noqa: F401 - registers the CoDeC backbones with Detectron2 when it is installed
from codec_det.export.onnx import DEFAULT_OPSET
from codec_det.export.pipeline import DEPLOY_FORMS, ExportSettings, ExportVerificationError, export_subject
from codec_det.export.verify import DEFAULT_TOLERANCE
from codec_det.spec import SpecError

logger = logging.getLogger("codec_det.export_backbone")

DEFAULT_SIZES = {
    "classifier": ((224, 224), (192, 256)),
    "detectron2": ((800, 1216), (512, 768)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config-file", type=Path, metavar="CFG", help="Detectron2 config of the model (needs --weights)")
    source.add_argument("--compressed", type=Path, metavar="PATH",
                        help="tools/compress_backbone.py output directory, or an uncompressed ResNet-50 state dict")
    parser.add_argument("--weights", type=Path, metavar="CKPT", help="Detectron2 checkpoint (.pth) for --config-file")
    parser.add_argument("--output", type=Path, required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--deploy-form", choices=DEPLOY_FORMS, default="training",
                        help="training: layers as trained; fast: stage-2 kernels materialised once and batch "
                        "norms folded into the convs, 1.1x to 1.4x faster in eager PyTorch with one thread on a 2-core CPU "
                        "(docs/benchmarks.md) (default training)")
    parser.add_argument("--full-detector", action="store_true",
                        help="also trace the whole R-CNN to detector.ts (Detectron2 models only)")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                        help="traced input size (default 224 224 for the classifier, 800 1216 for Detectron2)")
    parser.add_argument("--second-size", type=int, nargs=2, metavar=("H", "W"),
                        help="input size of the second check (default 192 256 / 512 768)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, 17 or newer (default {DEFAULT_OPSET})")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest accepted max_rel_error of an artifact (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="Detectron2 config overrides as trailing KEY VALUE pairs")
    return parser.parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """Reject option combinations that cannot work, naming the option and the fix."""
    if args.config_file is not None and args.weights is None:
        raise ValueError("--config-file needs --weights CKPT, the Detectron2 checkpoint to export")
    if args.compressed is not None:
        if args.weights is not None:
            raise ValueError("--weights goes with --config-file; --compressed already names the classifier's weights")
        if args.full_detector:
            raise ValueError(
                "--full-detector needs a Detectron2 model (--config-file and --weights); "
                "--compressed gives a classifier, which has no detector to trace"
            )
        if args.opts:
            raise ValueError(f"trailing config options {args.opts} apply to --config-file only")
    if args.opset < 17:
        raise ValueError(f"--opset {args.opset} is too old; use 17 or newer")
    if not args.tolerance > 0:
        raise ValueError(f"--tolerance must be positive, got {args.tolerance}")


def load_subject(args: argparse.Namespace):
    from codec_det.export.sources import load_classifier

    if args.compressed is not None:
        return load_classifier(args.compressed)
    try:
        import detectron2  # noqa: F401
    except ImportError:
        raise ValueError("--config-file needs Detectron2; install it with bash tools/setup_env.sh") from None
    from codec_det.export.sources import load_detectron2

    return load_detectron2(args.config_file, args.weights, args.opts, full_detector=args.full_detector)


def print_report(report: dict) -> None:
    print(f"\n{report['model']}")
    print(f"deploy form: {report['deploy_form']}; tolerance {report['tolerance']:g} on {report['error_metric']}")
    print(f"{'artifact':<22} {'input':<16} {'max_rel_error':>14}  result")
    for name, entry in report["artifacts"].items():
        for check in entry["checks"]:
            error = check["max_rel_error"]
            error_text = "n/a" if error is None else f"{error:.3g}"
            result = "pass" if check["passed"] else f"FAIL: {check['detail']}"
            print(f"{name:<22} {'x'.join(map(str, check['input_shape'])):<16} {error_text:>14}  {result}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The ONNX exporter's optimiser logs every pass at INFO.
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    args = parse_args(argv)
    try:
        validate_args(args)
    except ValueError as error:
        logger.error("%s", error)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    kind = "classifier" if args.compressed is not None else "detectron2"
    input_size, second_size = DEFAULT_SIZES[kind]
    settings = ExportSettings(
        input_size=tuple(args.input_size or input_size),
        second_size=tuple(args.second_size or second_size),
        deploy_form=args.deploy_form,
        full_detector=args.full_detector,
        opset=args.opset,
        tolerance=args.tolerance,
    )
    try:
        subject = load_subject(args)
        report = export_subject(subject, args.output, settings, overwrite=args.overwrite)
    except ExportVerificationError as error:
        print_report(error.report)
        logger.error("%s", error)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError, SpecError) as error:
        logger.error("%s", error)
        return 2

    print_report(report)
    print(f"\nwrote {args.output}: {', '.join(report['artifacts'])}, export_report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
