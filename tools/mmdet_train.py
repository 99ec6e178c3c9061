#!/usr/bin/env python
"""Train and evaluate MMDetection Faster and Mask R-CNN with the CoDeC backbone (COCO bbox and segm mAP).

Examples:

    # The demo: Mask R-CNN with the codec-45 backbone on the bundled photos, on the CPU.
    python tools/mmdet_train.py demo/mask-rcnn_codec45_demo_voc.py

    # COCO-2017 from the output of tools/compress_backbone.py (weights and spec.json).
    python tools/mmdet_train.py mask-rcnn_codec45_r50_fpn_1x_coco.py \\
        --backbone-weights output/codec45 --data-root /data/coco

    # Evaluation only, with the weights a training run wrote.
    python tools/mmdet_train.py demo/mask-rcnn_codec45_demo_voc.py --eval-only \\
        --checkpoint output/mmdet/mask-rcnn_codec45_demo_voc/model_final.safetensors

A config given by name is looked up in the repository's configs/mmdet/ folder
when it is not a path relative to the working directory. Training runs
MMEngine's Runner in one process (on the GPU when CUDA is available, else on
the CPU), validates as the config's schedule sets, and writes
model_final.safetensors and metrics.json into the work directory.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    import torch
    from mmengine.config import DictAction

    from codec_det.mmdet.runner import check_data_files, evaluate, load_config, train_and_evaluate
except (ImportError, AssertionError) as error:
    # mmdet raises AssertionError at import when its mmcv has another version.
    sys.exit(
        f"mmdet_train.py: MMDetection cannot be imported ({error}); install it with "
        "`bash tools/setup_env.sh --with-mmdet`"
    )

from codec_det.spec import SpecError

logger = logging.getLogger("codec_det.mmdet_train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("config", help="MMDetection config file, or its path under configs/mmdet/")
    parser.add_argument("--work-dir", type=Path, help="output folder (default: output/mmdet/CONFIG_NAME)")
    parser.add_argument(
        "--backbone-weights",
        type=Path,
        help="tools/compress_backbone.py output folder; the backbone loads its model.safetensors and spec.json",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        help="dataset folder; replaces data_root in every dataloader and evaluator annotation path",
    )
    parser.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the test set, no training")
    parser.add_argument("--checkpoint", type=Path, help="detector weights for --eval-only (.safetensors or .pth)")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read a trusted .pth checkpoint with full unpickling (MMEngine's training checkpoints need it)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        default={},
        help="config overrides as KEY=VALUE pairs, e.g. train_cfg.max_iters=8",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.eval_only and args.checkpoint is None:
        logger.error("--eval-only needs --checkpoint, e.g. output/mmdet/CONFIG_NAME/model_final.safetensors")
        return 2
    if args.threads is not None:
        if args.threads < 1:
            logger.error("--threads must be a positive integer, got %d", args.threads)
            return 2
        torch.set_num_threads(args.threads)

    try:
        cfg = load_config(
            args.config,
            work_dir=args.work_dir,
            backbone_weights=args.backbone_weights,
            data_root=args.data_root,
            options=args.cfg_options,
        )
        check_data_files(cfg, eval_only=args.eval_only)
        if args.eval_only:
            metrics = evaluate(cfg, args.checkpoint, allow_pickle=args.allow_pickle)
        else:
            metrics = train_and_evaluate(cfg)
    except (FileNotFoundError, PermissionError, SpecError, ValueError) as error:
        logger.error("%s", error)
        return 2

    if not metrics:
        print(
            f"no metrics: the schedule ran no validation, or the evaluator returned none (MMDetection's "
            f"CocoMetric returns none when the model detects nothing); outputs are in {cfg.work_dir}"
        )
        return 0
    width = max(len(key) for key in metrics)
    print(f"metrics ({cfg.work_dir}/metrics.json):")
    for key in sorted(metrics):
        print(f"  {key:<{width}}  {metrics[key]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
