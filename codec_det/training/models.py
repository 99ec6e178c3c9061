"""Classifiers for fine-tuning: a compressed torchvision model from its directory, a new head, the teacher."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torchvision
from safetensors import safe_open
from torch import nn

from codec_det.checkpoint import MODEL_FILE, SPEC_FILE, load_compressed, load_state_dict_file, load_weights_strict
from codec_det.spec import CompressionSpec

__all__ = [
    "build_architecture",
    "classifier_head",
    "replace_classifier_head",
    "load_compressed_classifier",
    "load_teacher",
]

logger = logging.getLogger(__name__)


def build_architecture(arch: str, num_classes: int = 1000) -> nn.Module:
    """Build a randomly initialised torchvision classification model, e.g. ``"resnet50"``."""
    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        close = [name for name in available if name.startswith(arch[:6])][:8]
        raise ValueError(
            f"--arch {arch!r} is not a torchvision classification model; choose one of "
            f"torchvision.models.list_models(module=torchvision.models){', e.g. ' + str(close) if close else ''}"
        )
    if num_classes <= 0:
        raise ValueError(f"number of classes must be positive, got {num_classes}")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """Return the name and module of the classifier head: the last ``nn.Linear`` of the model.

    That is ``fc`` in ResNets, ``classifier.<i>`` in VGG, MobileNet and
    EfficientNet, ``heads.head`` in ViT.
    """
    head = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            head = (name, module)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier head to replace")
    return head


def replace_classifier_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the classifier head by a new, randomly initialised ``nn.Linear`` with ``num_classes`` outputs."""
    name, head = classifier_head(model)
    new_head = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    new_head.to(device=head.weight.device, dtype=head.weight.dtype)
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new_head)
    logger.info("replaced the classifier head %s: %d -> %d classes", name, head.out_features, num_classes)
    return model


def _head_name(arch: str) -> str:
    # Built on the meta device: only the module names are needed, not weights.
    with torch.device("meta"):
        name, _ = classifier_head(build_architecture(arch))
    return name


def _saved_num_classes(weights: Path, head_name: str) -> int:
    key = f"{head_name}.weight"
    with safe_open(str(weights), framework="pt") as stream:
        if key not in stream.keys():
            raise ValueError(f"{weights} has no classifier head {key}; is it a model of another architecture?")
        return int(stream.get_slice(key).get_shape()[0])


def load_compressed_classifier(directory: str | os.PathLike, arch: str = "resnet50",
                               num_classes: int | None = None) -> tuple[nn.Module, CompressionSpec]:
    """Rebuild a compressed classifier from a directory written by ``tools/compress_backbone.py``.

    The number of classes of the saved head is read from ``model.safetensors``,
    so a directory written after fine-tuning on another dataset loads too.
    With ``num_classes`` different from it, the head is replaced.

    Returns:
        ``(model, spec)``.
    """
    directory = Path(directory)
    hint = "--compressed needs a directory written by tools/compress_backbone.py (spec.json + model.safetensors)"
    if not directory.is_dir():
        raise FileNotFoundError(f"compressed model directory {directory} not found; {hint}")
    for name in (SPEC_FILE, MODEL_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name}; {hint}")

    spec = CompressionSpec.load(directory / SPEC_FILE)
    if spec.architecture not in ("unknown", arch):
        raise ValueError(
            f"{directory / SPEC_FILE} describes a compressed {spec.architecture}, but --arch is {arch}; "
            f"pass --arch {spec.architecture}"
        )
    head_name = _head_name(arch)
    saved_classes = _saved_num_classes(directory / MODEL_FILE, head_name)

    model = load_compressed(directory, build_architecture(arch, num_classes=saved_classes))
    if num_classes is not None and num_classes != saved_classes:
        replace_classifier_head(model, num_classes)
    return model, spec


def load_teacher(weights: str | os.PathLike, arch: str = "resnet50", *, num_classes: int,
                 allow_pickle: bool = False) -> nn.Module:
    """Load the uncompressed teacher from a torchvision state dict (``.pth`` or ``.safetensors``).

    Raises:
        ValueError: the file does not match ``arch``, or its head has another
            number of classes than the student's ``num_classes``.
    """
    state = load_state_dict_file(weights, allow_pickle=allow_pickle)
    head_name = _head_name(arch)
    head_weight = state.get(f"{head_name}.weight")
    if not isinstance(head_weight, torch.Tensor) or head_weight.ndim != 2:
        raise ValueError(f"teacher weights {weights} have no {head_name}.weight; is it a torchvision {arch} state dict?")
    teacher_classes = int(head_weight.shape[0])
    if teacher_classes != num_classes:
        raise ValueError(
            f"teacher weights {weights} have {teacher_classes} classes but the student has {num_classes}; "
            "distillation needs a teacher trained on the same classes (fine-tune the uncompressed model on "
            "this dataset first, or drop --teacher-weights)"
        )
    teacher = build_architecture(arch, num_classes=teacher_classes)
    load_weights_strict(teacher, state, str(weights))
    logger.info("loaded teacher %s from %s", arch, weights)
    return teacher.eval()
