"""Compression of the ResNet-50 bottom-up of a trained Detectron2 model.

The bottom-up weights are renamed to torchvision's names
(``codec_det.d2.names``) and loaded into a torchvision ResNet-50 built with the
config's layout. With ``MODEL.RESNETS.STRIDE_IN_1X1`` True (Detectron2's MSRA
weights) the stride of each stage's first block moves to its 1x1 conv, and
``NORM: GN`` gives GroupNorm layers. The core's ``compress_model`` then plans ranks,
decomposes and folds permutations on that model as on any torchvision
ResNet-50, and the compressed trunk is renamed back into the checkpoint in
place of the old bottom-up weights. FPN and head weights stay as they are.

The trunk keeps torchvision's 1000-way ``fc`` (randomly initialised, dropped
from the output), so MACs and parameter targets mean what they mean for a
compressed ImageNet classifier at 224x224, which is how the presets are stated.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from detectron2.config import CfgNode
from torch import nn

from codec_det.checkpoint import load_weights_strict
from codec_det.compress import CompressionResult, compress_model
from codec_det.d2.backbone import check_resnet_config
from codec_det.d2.checkpoint import RejectedCheckpointError, read_d2_checkpoint
from codec_det.d2.convert import torchvision_state_to_d2
from codec_det.d2.names import d2_to_torchvision_key, torchvision_to_d2_key
from codec_det.spec import SpecError

__all__ = [
    "CODEC_BACKBONE_NAMES",
    "read_source_checkpoint",
    "bottom_up_prefix",
    "torchvision_trunk",
    "load_bottom_up",
    "check_config",
    "compress_d2_state",
]

logger = logging.getLogger(__name__)

# Detectron2's ResNet backbone builders and their CoDeC counterparts.
CODEC_BACKBONE_NAMES = {
    "build_resnet_backbone": "build_codec_resnet_backbone",
    "build_resnet_fpn_backbone": "build_codec_resnet_fpn_backbone",
}

# Detectron2 norms (MODEL.RESNETS.NORM) whose weights a torchvision BatchNorm2d holds.
_BATCH_NORMS = {"FrozenBN", "BN", "SyncBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N"}


def read_source_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read the model state dict of a Detectron2 checkpoint (``.pth``, or a ``.pkl`` model-zoo file).

    ``.pth`` files are read with ``torch.load(weights_only=True)``. A ``.pkl``
    file is a pickle, which can run code when loaded, so it is read only with
    ``allow_pickle``. The same goes for a ``.pth`` file that tensor-only
    loading rejects. Numpy arrays become tensors.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is unreadable, needs ``allow_pickle``, or has no ``"model"`` dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--from-d2 checkpoint {path} not found")
    if path.suffix == ".pkl":
        if not allow_pickle:
            raise ValueError(
                f"--from-d2 checkpoint {path} is a pickle, and unpickling can run code; "
                "pass --allow-pickle if you trust the file"
            )
        checkpoint = _load_pickled(path)
    else:
        try:
            checkpoint = read_d2_checkpoint(path)
        except RejectedCheckpointError as error:
            if not allow_pickle:
                raise ValueError(f"{error}. Pass --allow-pickle if you trust the file") from None
            checkpoint = _load_pickled(path)

    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(
            f"--from-d2 checkpoint {path} has no \"model\" state dict; Caffe2-format .pkl files "
            "(ImageNet R-50.pkl) are not Detectron2 models"
        )
    return {key: torch.as_tensor(value) if isinstance(value, np.ndarray) else value for key, value in state.items()}


def _load_pickled(path: Path) -> Any:
    try:
        if path.suffix == ".pkl":
            with open(path, "rb") as stream:
                return pickle.load(stream, encoding="latin1")
        return torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
        raise ValueError(f"--from-d2 checkpoint {path} is truncated or not a checkpoint: {error}") from None


def bottom_up_prefix(state: dict[str, torch.Tensor]) -> str:
    """Return where the ResNet sits in a Detectron2 state dict: ``"backbone.bottom_up."`` (FPN) or ``"backbone."``."""
    for prefix in ("backbone.bottom_up.", "backbone."):
        if f"{prefix}stem.conv1.weight" in state:
            return prefix
    raise ValueError(
        "the checkpoint has no ResNet bottom-up weights (no backbone.bottom_up.stem.conv1.weight "
        "or backbone.stem.conv1.weight); --from-d2 needs an R50 or R50-FPN Detectron2 model"
    )


def torchvision_trunk(*, stride_in_1x1: bool, norm: str) -> nn.Module:
    """Build a torchvision ResNet-50 with the stride placement and norm of a Detectron2 config.

    Args:
        stride_in_1x1: put the stride of each stage's first block in its 1x1
            conv, as Detectron2 does for ``STRIDE_IN_1X1: True``.
        norm: ``MODEL.RESNETS.NORM``; batch norms map to ``BatchNorm2d``, ``GN`` to ``GroupNorm(32, C)``.
    """
    if norm in _BATCH_NORMS:
        norm_layer = nn.BatchNorm2d
    elif norm == "GN":
        def norm_layer(channels: int) -> nn.Module:
            return nn.GroupNorm(32, channels)
    else:
        raise ValueError(
            f"MODEL.RESNETS.NORM {norm!r} is not supported by --from-d2; use one of "
            f"{', '.join(sorted(_BATCH_NORMS | {'GN'}))}"
        )
    model = torchvision.models.resnet50(norm_layer=norm_layer)
    if stride_in_1x1:
        for stage in (model.layer2, model.layer3, model.layer4):
            stage[0].conv1.stride = (2, 2)
            stage[0].conv2.stride = (1, 1)
    return model


def load_bottom_up(trunk: nn.Module, state: dict[str, torch.Tensor], prefix: str, source: str) -> None:
    """Load the Detectron2 bottom-up weights under ``prefix`` into a torchvision trunk, strictly.

    The trunk keeps its own ``fc`` and any BatchNorm counter the checkpoint
    lacks (``FrozenBatchNorm2d`` stores none). Raises ``SpecError`` naming the
    Detectron2 keys that are missing, extra or of another shape.
    """
    expected = trunk.state_dict()
    renamed = {}
    for key, tensor in state.items():
        if not key.startswith(prefix):
            continue
        try:
            renamed[d2_to_torchvision_key(key[len(prefix):])] = tensor
        except SpecError:
            raise SpecError(f"{source}: unexpected key {key}, which is not a weight of a Detectron2 ResNet-50") from None

    required = {key for key in expected if not key.startswith("fc.") and not key.endswith("num_batches_tracked")}
    missing = sorted(required - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    wrong_shape = sorted(key for key in required & set(renamed) if renamed[key].shape != expected[key].shape)
    if missing or unexpected or wrong_shape:
        def d2(keys: list[str]) -> list[str]:
            return [prefix + _to_d2(key) for key in keys[:8]] + (["..."] if len(keys) > 8 else [])

        raise SpecError(
            f"{source}: the bottom-up weights are not those of a ResNet-50 with this config's NORM and channels "
            f"(missing {d2(missing)}, unexpected {d2(unexpected)}, other shapes {d2(wrong_shape)})"
        )

    for key, tensor in expected.items():
        renamed.setdefault(key, tensor)
    load_weights_strict(trunk, renamed, source)


def _to_d2(torchvision_key: str) -> str:
    try:
        return torchvision_to_d2_key(torchvision_key)
    except SpecError:
        return torchvision_key


def check_config(cfg: CfgNode) -> None:
    """Reject configs whose bottom-up ``--from-d2`` cannot rebuild as a torchvision ResNet-50."""
    check_resnet_config(cfg, None)
    resnets = cfg.MODEL.RESNETS
    if resnets.STEM_OUT_CHANNELS != 64 or resnets.RES2_OUT_CHANNELS != 256:
        raise ValueError(
            f"MODEL.RESNETS.STEM_OUT_CHANNELS {resnets.STEM_OUT_CHANNELS} and RES2_OUT_CHANNELS "
            f"{resnets.RES2_OUT_CHANNELS}: --from-d2 compresses the standard ResNet-50 (64 and 256)"
        )
    name = cfg.MODEL.BACKBONE.NAME
    if name not in CODEC_BACKBONE_NAMES and name not in CODEC_BACKBONE_NAMES.values():
        raise ValueError(
            f"MODEL.BACKBONE.NAME {name!r}: --from-d2 compresses models built by "
            f"{' or '.join(CODEC_BACKBONE_NAMES)}"
        )


def compress_d2_state(
    state: dict[str, torch.Tensor],
    cfg: CfgNode,
    *,
    source: str = "checkpoint",
    device: str | torch.device = "cpu",
    **compress_kwargs: Any,
) -> tuple[dict[str, torch.Tensor], CompressionResult]:
    """Compress the ResNet-50 bottom-up in a Detectron2 model state dict.

    Args:
        state: the ``"model"`` dict of a Detectron2 checkpoint.
        cfg: the config the model was trained with (``MODEL.RESNETS`` decides the layout).
        source: name of the checkpoint in error messages.
        device: where the decomposition runs, e.g. ``"cuda"``; the returned tensors are on it.
        compress_kwargs: passed to ``compress_model`` (``target_macs``,
            ``target_params``, ``plan``, ``groups``, ``settings``, ...).

    Returns:
        The new state dict (compressed bottom-up, every other weight as it
        was) and the compression result; its spec uses torchvision names and
        stores ``metadata["stride_in_1x1"]``.
    """
    check_config(cfg)
    prefix = bottom_up_prefix(state)
    if any(key.startswith(prefix) and key.endswith(".input_factors") for key in state):
        raise ValueError(
            f"{source} already has a CoDeC-compressed backbone; --from-d2 compresses an uncompressed ResNet-50"
        )
    stride_in_1x1 = bool(cfg.MODEL.RESNETS.STRIDE_IN_1X1)
    trunk = torchvision_trunk(stride_in_1x1=stride_in_1x1, norm=cfg.MODEL.RESNETS.NORM)
    load_bottom_up(trunk, state, prefix, source)
    trunk.to(device).eval()

    result = compress_model(trunk, architecture="resnet50", **compress_kwargs)
    result.spec.metadata["stride_in_1x1"] = stride_in_1x1
    result.spec.metadata["source"] = "detectron2"

    trunk_state = {key: value for key, value in result.model.state_dict().items() if not key.startswith("fc.")}
    new_state = {key: value for key, value in state.items() if not key.startswith(prefix)}
    new_state.update(torchvision_state_to_d2(trunk_state, prefix))
    return new_state, result
