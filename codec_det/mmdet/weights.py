"""Loading compress-tool weights into the MMDetection CoDeC backbone, with exact keys."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from codec_det.checkpoint import MODEL_FILE, SPEC_FILE, load_state_dict_file, load_weights_strict
from codec_det.spec import SpecError

__all__ = ["resolve_weights_file", "backbone_state", "load_backbone_weights"]

logger = logging.getLogger(__name__)


def resolve_weights_file(weights: str | os.PathLike) -> Path:
    """Return the weights file of ``weights``: the path itself, or ``model.safetensors`` inside a directory.

    Raises:
        FileNotFoundError: the path or the directory's weights file does not exist.
    """
    path = Path(weights)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise FileNotFoundError(
                f"weights directory {path} has no {MODEL_FILE}; give a directory written by "
                "tools/compress_backbone.py or a ResNet-50 state-dict file"
            )
        return path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"weights {path} not found; give a directory written by tools/compress_backbone.py "
            f"(with {MODEL_FILE} and {SPEC_FILE}) or a ResNet-50 state-dict file"
        )
    return path


def backbone_state(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Drop the ImageNet classifier (``fc.*``) from a torchvision ResNet-50 state dict.

    Raises:
        SpecError: ``state`` is a Detectron2 or detector checkpoint, not a ResNet-50 state dict.
    """
    if state.get("__author__") == "codec-det" or isinstance(state.get("model"), dict):
        raise SpecError(
            f"{source} is a Detectron2 checkpoint (tools/convert_to_d2.py writes these); the MMDetection "
            "backbone reads torchvision names: give the tools/compress_backbone.py directory it was converted from"
        )
    if state and all(key.startswith("backbone.") for key in state):
        raise SpecError(
            f"{source} contains a whole detector (keys start with 'backbone.'), not a ResNet-50; "
            "load it with MMDetection's load_from instead of the backbone's weights argument"
        )
    dropped = sorted(key for key in state if key.startswith("fc."))
    if dropped:
        logger.info("dropped the ImageNet classifier weights %s: a detector backbone has no use for them", ", ".join(dropped))
    return {key: tensor for key, tensor in state.items() if not key.startswith("fc.")}


def load_backbone_weights(model: nn.Module, weights: str | os.PathLike) -> None:
    """Load a torchvision-named ResNet-50 state dict into ``model`` with exact keys.

    Every key of ``model`` must be in the file and every key of the file
    except ``fc.*`` must be in ``model``, with equal shapes. A ``.pth`` file
    is read without unpickling objects.

    Raises:
        FileNotFoundError: ``weights`` does not exist.
        SpecError: keys or shapes differ; the message lists them.
        ValueError: the file is unreadable or contains NaN or Inf values.
    """
    path = resolve_weights_file(weights)
    state = backbone_state(load_state_dict_file(path), str(path))
    load_weights_strict(model, state, str(path))
    logger.info("loaded the CoDeC ResNet-50 weights from %s (%d tensors)", path, len(state))
