#!/usr/bin/env python
"""Fine-tune a CoDeC-compressed torchvision classifier, optionally distilling from the uncompressed model.

Reads the output directory of ``tools/compress_backbone.py`` (``spec.json``
and ``model.safetensors``) and writes the same two files for the fine-tuned
model into ``--output``, so the result loads like a compressed model. Beside
them: ``last.pth`` (resumable training state), ``metrics.json`` (per-epoch
metrics and class names) and ``log.txt``.

Data: ``--data DIR`` in ImageNet layout (``DIR/train/<class>/*.jpg``,
``DIR/val/<class>/*.jpg``), or ``--data bundled``. The bundled set has 144
training and 20 validation crops of bus, car and person instances, cut from
the demo photos by ``python -m codec_det.data.demo_crops`` on first use.

Examples:
    python tools/finetune_classifier.py --compressed out/codec45 --data /data/imagenet \\
        --teacher-weights resnet50.pth --epochs 15 --lr 0.01 --amp --output out/codec45-ft
    torchrun --nproc_per_node 8 tools/finetune_classifier.py --compressed out/codec45 \\
        --data /data/imagenet --batch-size 32 --amp --output out/codec45-ft --resume
    python tools/finetune_classifier.py --compressed out/codec45 --data bundled --num-classes 3 \\
        --image-size 96 --epochs 3 --batch-size 16 --output out/demo-ft
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from codec_det.checkpoint import SPEC_FILE
from codec_det.training.checkpointing import LAST_CHECKPOINT, save_final_model
from codec_det.training.data import (
    DataLayoutError,
    build_image_folder_loaders,
    build_val_loader,
    check_image_folder,
    load_image_folder,
    val_transform,
)
from codec_det.training.distributed import DistributedContext, barrier, cleanup_distributed, init_distributed
from codec_det.training.loop import evaluate, finetune
from codec_det.training.models import classifier_head, load_compressed_classifier, load_teacher

logger = logging.getLogger("codec_det.finetune_classifier")

BUNDLED_DATA = "bundled"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--compressed", type=Path, required=True, metavar="DIR",
                       help="directory written by tools/compress_backbone.py (spec.json + model.safetensors)")
    model.add_argument("--arch", default="resnet50", help="torchvision architecture the spec was made for")
    model.add_argument("--num-classes", type=int, metavar="N",
                       help="replace the classifier head by one with this many classes (a new dataset); "
                            "must equal the number of class folders")

    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="DIR",
                      help=f"ImageFolder root with train/ and val/, or '{BUNDLED_DATA}' for the demo crops")
    data.add_argument("--image-size", type=int, default=224, help="training and evaluation crop size, in pixels")
    data.add_argument("--batch-size", type=int, default=64, help="images per step and per process")
    data.add_argument("--workers", type=int, default=4, help="data loading processes per training process")

    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--epochs", type=int, default=10, help="total epochs, including resumed ones")
    optimisation.add_argument("--lr", type=float, default=0.01, help="peak learning rate of SGD")
    optimisation.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    optimisation.add_argument("--nesterov", action="store_true", help="use Nesterov momentum")
    optimisation.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay of SGD")
    optimisation.add_argument("--warmup-epochs", type=float, default=0.0,
                              help="linear warm-up length in epochs (fractions allowed) before the cosine decay")
    optimisation.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the CE term")

    distillation = parser.add_argument_group("knowledge distillation")
    distillation.add_argument("--teacher-weights", type=Path, metavar="FILE",
                              help="uncompressed torchvision state dict (.pth or .safetensors) to distil from")
    distillation.add_argument("--kd-alpha", type=float, default=0.5,
                              help="weight of the distillation term; the CE term gets 1 - alpha")
    distillation.add_argument("--kd-temperature", type=float, default=4.0, help="softmax temperature T")
    distillation.add_argument("--allow-pickle", action="store_true",
                              help="allow unpickling a trusted teacher .pth that tensor-only loading rejects")

    run = parser.add_argument_group("run")
    run.add_argument("--output", type=Path, metavar="DIR", help="output directory (required unless --eval-only)")
    run.add_argument("--resume", action="store_true",
                     help="continue from OUTPUT/last.pth (starts from the first epoch when there is none)")
    run.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                     help="also write last.pth every this many steps within an epoch (0: at epoch ends only)")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda; under torchrun, cuda:LOCAL_RANK")
    run.add_argument("--amp", action="store_true", help="float16 autocast and gradient scaling (CUDA only)")
    run.add_argument("--channels-last", action="store_true", help="train in channels_last memory format")
    run.add_argument("--seed", type=int, default=0, help="seed of the new head, the data order and augmentation")
    run.add_argument("--eval-only", action="store_true",
                     help="only evaluate the compressed model on the validation split")
    run.add_argument("--no-progress", action="store_true", help="hide the per-epoch progress bar")
    return parser.parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """Reject bad values before any work starts, naming the option and the fix."""
    positive = {"--image-size": args.image_size, "--batch-size": args.batch_size, "--epochs": args.epochs,
                "--lr": args.lr, "--kd-temperature": args.kd_temperature}
    for option, value in positive.items():
        if value <= 0:
            raise SystemExit(f"error: {option} must be positive, got {value}")
    non_negative = {"--workers": args.workers, "--weight-decay": args.weight_decay,
                    "--warmup-epochs": args.warmup_epochs, "--checkpoint-every": args.checkpoint_every}
    for option, value in non_negative.items():
        if value < 0:
            raise SystemExit(f"error: {option} must be non-negative, got {value}")
    if args.warmup_epochs > args.epochs:
        raise SystemExit(f"error: --warmup-epochs {args.warmup_epochs} exceeds --epochs {args.epochs}")
    if not 0.0 <= args.kd_alpha <= 1.0:
        raise SystemExit(f"error: --kd-alpha must be in [0, 1], got {args.kd_alpha}")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise SystemExit(f"error: --label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.num_classes is not None and args.num_classes <= 0:
        raise SystemExit(f"error: --num-classes must be positive, got {args.num_classes}")
    if not (args.compressed / SPEC_FILE).is_file():
        raise SystemExit(
            f"error: --compressed {args.compressed} has no {SPEC_FILE}; give a directory written by "
            "tools/compress_backbone.py"
        )
    if args.data != BUNDLED_DATA and not Path(args.data).is_dir():
        raise SystemExit(f"error: --data directory {args.data} not found; give an ImageFolder root or '{BUNDLED_DATA}'")
    if args.teacher_weights is not None and not args.teacher_weights.is_file():
        raise SystemExit(f"error: --teacher-weights file {args.teacher_weights} not found")

    if args.eval_only:
        return
    if args.output is None:
        raise SystemExit("error: --output is required for training (only --eval-only runs without it)")
    output = args.output
    if output.exists() and not output.is_dir():
        raise SystemExit(f"error: --output {output} exists and is not a directory")
    if output.resolve() == args.compressed.resolve():
        raise SystemExit("error: --output must differ from --compressed, which would be overwritten")
    if output.is_dir() and any(output.iterdir()) and not args.resume:
        what = "a fine-tuning checkpoint" if (output / LAST_CHECKPOINT).is_file() else "files"
        raise SystemExit(
            f"error: --output {output} already contains {what}; pass --resume to continue that run, "
            "or choose another --output"
        )


def setup_logging(context: DistributedContext, output: Path | None) -> list[logging.Handler]:
    """Log INFO on rank 0 (to stderr and OUTPUT/log.txt), only warnings and errors on other ranks.

    Returns the handlers added to the root logger, for :func:`close_logging`.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if context.is_main and output is not None:
        output.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(output / "log.txt"))
    prefix = f"[rank {context.rank}] " if context.distributed else ""
    formatter = logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO if context.is_main else logging.WARNING)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    return handlers


def close_logging(handlers: list[logging.Handler]) -> None:
    root = logging.getLogger()
    for handler in handlers:
        root.removeHandler(handler)
        handler.close()


def resolve_data(args: argparse.Namespace, context: DistributedContext) -> Path:
    """Return the ImageFolder root, building the bundled crops on rank 0 first when requested."""
    if args.data != BUNDLED_DATA:
        return Path(args.data)
    from codec_det.data.demo_crops import build_demo_crops, default_crops_root

    if context.is_main:
        build_demo_crops()
    barrier()
    return default_crops_root()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_json_atomic(path: Path, data: dict) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=1)
            stream.write("\n")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(temporary, 0o666 & ~mask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace, context: DistributedContext) -> int:
    data_root = resolve_data(args, context)
    classes = check_image_folder(data_root, splits=("val",) if args.eval_only else ("train", "val"))
    num_classes = args.num_classes if args.num_classes is not None else len(classes)
    if num_classes != len(classes):
        raise DataLayoutError(
            f"--num-classes {num_classes} but {data_root} has {len(classes)} class folders; "
            f"pass --num-classes {len(classes)}"
        )

    seed_everything(args.seed)
    model, spec = load_compressed_classifier(args.compressed, args.arch, num_classes=args.num_classes)
    _, head = classifier_head(model)
    if head.out_features != num_classes:
        raise DataLayoutError(
            f"the compressed model has {head.out_features} classes but {data_root} has {len(classes)}; "
            f"pass --num-classes {len(classes)} to train a new classifier head"
        )

    if args.eval_only:
        val_set = load_image_folder(data_root, "val", val_transform(args.image_size))
        val_loader = build_val_loader(val_set, batch_size=args.batch_size, workers=args.workers, context=context)
        metrics = evaluate(model.to(context.device), val_loader, amp=args.amp, channels_last=args.channels_last,
                           progress=not args.no_progress and context.is_main)
        if context.is_main:
            print(f"{args.compressed}: top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% "
                  f"on {metrics['count']} images")
        return 0

    train_loader, val_loader, _ = build_image_folder_loaders(
        data_root, image_size=args.image_size, batch_size=args.batch_size, workers=args.workers, seed=args.seed,
        context=context,
    )
    teacher = None
    if args.teacher_weights is not None:
        teacher = load_teacher(args.teacher_weights, args.arch, num_classes=num_classes,
                               allow_pickle=args.allow_pickle)
    logger.info("training on %d process(es), device %s, %d images per step and process", context.world_size,
                context.device, args.batch_size)

    metrics = finetune(
        model, train_loader, val_loader,
        epochs=args.epochs, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        nesterov=args.nesterov, warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        teacher=teacher, kd_alpha=args.kd_alpha, kd_temperature=args.kd_temperature,
        device=context.device, amp=args.amp, channels_last=args.channels_last,
        checkpoint_dir=args.output, resume=args.resume, checkpoint_every=args.checkpoint_every,
        context=context, progress=not args.no_progress,
    )

    if context.is_main:
        spec.metadata["num_classes"] = num_classes
        spec.metadata["finetune"] = {
            "data": str(data_root),
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size * context.world_size,
            "teacher": str(args.teacher_weights) if args.teacher_weights is not None else None,
            "kd_alpha": args.kd_alpha if teacher is not None else 0.0,
            "kd_temperature": args.kd_temperature,
            "image_size": args.image_size,
            "top1": metrics["top1"],
            "top5": metrics["top5"],
        }
        save_final_model(model, spec, args.output)
        write_json_atomic(args.output / "metrics.json", {"classes": classes, **metrics})
        print(f"top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% after {args.epochs} epochs "
              f"(best top-1 {metrics['best_top1']:.2f}% at epoch {metrics['best_epoch']}); wrote {args.output}")
    barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    validate_args(args)
    try:
        context = init_distributed(args.device)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    handlers = setup_logging(context, None if args.eval_only else args.output)
    try:
        torch.backends.cudnn.benchmark = True
        return run(args, context)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        logger.error("%s", error)
        return 2
    finally:
        close_logging(handlers)
        cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
