"""Fine-tuning of compressed classifiers: data, distillation, the training loop and its checkpoints.

- :mod:`codec_det.training.data`: ImageFolder splits, ImageNet transforms and
  the resumable, sharded sampler.
- :mod:`codec_det.training.distillation`: Hinton knowledge distillation loss.
- :mod:`codec_det.training.loop`: :func:`finetune` and :func:`evaluate`.
- :mod:`codec_det.training.checkpointing`: atomic, tensor-only checkpoints
  with the RNG state for exact resumption.
- :mod:`codec_det.training.distributed`: ``torchrun`` process-group set-up.
- :mod:`codec_det.training.models`: compressed classifier and teacher loading.
"""

from codec_det.training.data import (
    build_image_folder_loaders,
    build_train_loader,
    build_val_loader,
    load_image_folder,
    train_transform,
    val_transform,
)
from codec_det.training.distillation import DistillationLoss, distillation_kl
from codec_det.training.distributed import DistributedContext, cleanup_distributed, init_distributed
from codec_det.training.loop import evaluate, finetune
from codec_det.training.models import load_compressed_classifier, load_teacher, replace_classifier_head

__all__ = [
    "DistillationLoss",
    "DistributedContext",
    "build_image_folder_loaders",
    "build_train_loader",
    "build_val_loader",
    "cleanup_distributed",
    "distillation_kl",
    "evaluate",
    "finetune",
    "init_distributed",
    "load_compressed_classifier",
    "load_image_folder",
    "load_teacher",
    "replace_classifier_head",
    "train_transform",
    "val_transform",
]
