#!/usr/bin/env python
"""Train and evaluate Faster, Mask and Keypoint R-CNN with a CoDeC backbone, Detectron2's way.

Examples:

    # The demo: Mask R-CNN with the codec-45 backbone on the bundled photos, on the CPU.
    python tools/train_net.py --config demo/codec_mask_rcnn_demo.yaml

    # COCO-2017 on 8 GPUs from a checkpoint made by tools/convert_to_d2.py.
    python tools/train_net.py --config-file codec_mask_rcnn.yaml --num-gpus 8 \\
        MODEL.WEIGHTS output/codec45_d2.pth

    # Evaluation only.
    python tools/train_net.py --config codec_mask_rcnn.yaml --eval-only \\
        MODEL.WEIGHTS output/codec_mask_rcnn/model_final.pth

A config given by name (``codec_mask_rcnn.yaml``, ``demo/codec_mask_rcnn_demo.yaml``)
is looked up in the repository's ``configs/`` folder when it is not a path
relative to the working directory. Trailing ``KEY VALUE`` pairs override the
config. Without CUDA the model runs on the CPU, and ``--num-gpus N`` starts N
CPU processes that synchronise through the gloo backend.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    from detectron2.engine import default_argument_parser, default_setup, launch
    from detectron2.evaluation import print_csv_format, verify_results
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger
except ImportError as error:
    sys.exit(f"train_net.py: Detectron2 cannot be imported ({error}); install it with `bash tools/setup_env.sh`")
from tabulate import tabulate

from codec_det.d2 import CoDeCCheckpointer
from codec_det.engine import (
    CodecTrainer,
    ConfigError,
    check_codec_spec,
    check_datasets,
    fall_back_to_cpu,
    flatten_results,
    load_config,
    register_datasets,
    resolve_config_file,
)
from codec_det.spec import SpecError

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"

logger = logging.getLogger("codec_det.train_net")


def build_parser():
    """Detectron2's ``default_argument_parser`` plus ``--config`` as an alias of ``--config-file``."""
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument(
        "--config",
        dest="config_file",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="same as --config-file: a yaml path, or a name under configs/ such as demo/codec_mask_rcnn_demo.yaml",
    )
    return parser


def prepare(cfg, eval_only: bool) -> None:
    """Check the config's spec, register the demo datasets it uses and check its datasets, before any work starts."""
    check_codec_spec(cfg)
    register_datasets(cfg)
    if not eval_only:
        check_datasets(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    check_datasets(cfg.DATASETS.TEST, "DATASETS.TEST")


def setup(args):
    """Load the config, choose the device, and set up logging and the output folder of this process."""
    args.config_file = str(resolve_config_file(args.config_file, CONFIGS_DIR))
    cfg = load_config(args.config_file, args.opts)
    moved_to_cpu = fall_back_to_cpu(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="codec_det")
    if moved_to_cpu:
        logger.warning("No CUDA device is available: running on the CPU (MODEL.DEVICE cpu)")
    if not args.eval_only and not cfg.MODEL.WEIGHTS and cfg.MODEL.RESNETS.NORM == "FrozenBN":
        logger.warning(
            "MODEL.WEIGHTS is empty, so the backbone starts from random weights, but MODEL.RESNETS.NORM is "
            "FrozenBN, whose statistics and affine parameters never change. Set MODEL.WEIGHTS to a checkpoint made by "
            "tools/convert_to_d2.py, or train from scratch with GN and MODEL.BACKBONE.FREEZE_AT 0 as "
            "configs/demo/ does"
        )
    return cfg


def print_results(results) -> None:
    """Print the final AP of each dataset and task: Detectron2's csv lines, then one table."""
    flat = flatten_results(results)
    if not flat:
        print("No evaluation results (DATASETS.TEST is empty).")
        return
    print_csv_format(flat)

    columns = []
    for metrics in flat.values():
        columns.extend(name for name in metrics if "-" not in name and name not in columns)
    rows = [[task] + [_format_metric(metrics.get(name)) for name in columns] for task, metrics in flat.items()]
    print("\nFinal COCO AP (percent):")
    print(tabulate(rows, headers=["task", *columns], tablefmt="pipe", disable_numparse=True))


def _format_metric(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(args):
    cfg = setup(args)
    prepare(cfg, args.eval_only)

    if args.eval_only:
        model = CodecTrainer.build_model(cfg)
        CoDeCCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = CodecTrainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            results.update(CodecTrainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, results)
    else:
        trainer = CodecTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()

    if comm.is_main_process():
        print_results(results)
    return results


def cli(argv=None) -> None:
    """Parse the command line, check the config in this process, then start the workers."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.config_file = str(resolve_config_file(args.config_file, CONFIGS_DIR))
        # Checked here once, so that a bad key, spec or dataset path fails
        # with its message before any worker process starts.
        prepare(load_config(args.config_file, args.opts), args.eval_only)
    except (ConfigError, SpecError, ValueError, FileNotFoundError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")

    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    cli()
