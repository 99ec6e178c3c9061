#!/usr/bin/env python
"""Convert torchvision ResNet-50 weights, CoDeC-compressed or not, to a Detectron2 checkpoint.

INPUT is a directory written by tools/compress_backbone.py (spec.json and
model.safetensors) or an uncompressed torchvision ResNet-50 state dict (.pth,
read without unpickling objects, or .safetensors). OUTPUT.pth contains the
backbone weights under exact Detectron2 keys (backbone.bottom_up.stem.conv1.weight,
backbone.bottom_up.res2.0.conv1.norm.weight, ...) and the spec, so a config with
MODEL.CODEC.SPEC "" and MODEL.WEIGHTS OUTPUT.pth rebuilds the compressed backbone.

Examples:
    python tools/convert_to_d2.py out/codec45 out/codec45_d2.pth
    python tools/convert_to_d2.py resnet50.pth out/resnet50_d2.pth
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from codec_det.d2.convert import DEFAULT_PREFIX, convert_to_d2

logger = logging.getLogger("codec_det.convert_to_d2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("input", type=Path, help="compress-tool output directory, or a ResNet-50 state-dict file")
    parser.add_argument("output", type=Path, help="Detectron2 checkpoint to write (.pth)")
    parser.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help=f"key prefix of the ResNet in the detector (default {DEFAULT_PREFIX!r}, the FPN layout; "
        "'backbone.' for a model built by build_codec_resnet_backbone)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.prefix and not args.prefix.endswith("."):
        logger.error("--prefix %r must end with '.', e.g. 'backbone.bottom_up.'", args.prefix)
        return 2
    try:
        spec = convert_to_d2(args.input, args.output, prefix=args.prefix, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        logger.error("%s", error)
        return 2

    kind = "uncompressed ResNet-50" if spec is None else f"CoDeC ResNet-50 with {len(spec.layers)} compressed convs"
    print(f"wrote {args.output}: {kind}; use it as MODEL.WEIGHTS with MODEL.CODEC.SPEC \"\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
