"""The codec-det Detectron2 checkpoint file: model weights plus the compression spec they need.

A checkpoint is the dict Detectron2's ``DetectionCheckpointer`` reads::

    {"model": {"backbone.bottom_up.stem.conv1.weight": tensor, ...},
     "__author__": "codec-det",
     "matching_heuristics": False,
     "codec_spec": <CompressionSpec.to_dict()> or None,
     "codec_fpn_spec": <CompressionSpec.to_dict()> or None}

``codec_spec`` and ``codec_fpn_spec`` hold only dicts, lists, strings,
numbers and booleans, so ``torch.load(weights_only=True)`` reads the whole
file without unpickling any object. ``codec_spec`` None marks an
uncompressed ResNet. ``codec_fpn_spec`` is present only in checkpoints that
hold FPN weights, and None there marks a dense FPN; a checkpoint without
the key (a converted ResNet, or one written before the key existed) says
nothing about the FPN.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from codec_det.spec import CompressionSpec, SpecError

__all__ = [
    "CHECKPOINT_AUTHOR",
    "SPEC_KEY",
    "FPN_SPEC_KEY",
    "RejectedCheckpointError",
    "save_d2_checkpoint",
    "read_d2_checkpoint",
    "checkpoint_spec",
    "weights_codec_spec",
    "weights_fpn_spec",
]

logger = logging.getLogger(__name__)

CHECKPOINT_AUTHOR = "codec-det"
SPEC_KEY = "codec_spec"
FPN_SPEC_KEY = "codec_fpn_spec"

# Marks that a checkpoint is written without the FPN_SPEC_KEY entry.
_NO_FPN_ENTRY = object()


class RejectedCheckpointError(ValueError):
    """A file that ``torch.load(weights_only=True)`` rejects: not a torch file, or one that needs full unpickling."""


def save_d2_checkpoint(
    path: str | os.PathLike,
    model_state: dict[str, torch.Tensor],
    spec: CompressionSpec | None,
    overwrite: bool = False,
    *,
    fpn_spec: CompressionSpec | None | object = _NO_FPN_ENTRY,
) -> None:
    """Write a Detectron2 checkpoint with ``model_state`` and ``spec``, atomically (temporary file, then rename).

    ``fpn_spec`` is the FPN spec of a checkpoint with FPN weights, or None
    for a dense FPN. Leave it out for a checkpoint without FPN weights.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {path} exists; pass --overwrite to replace it or choose another output")
    checkpoint = {
        "model": {name: tensor.detach().contiguous().cpu() for name, tensor in model_state.items()},
        "__author__": CHECKPOINT_AUTHOR,
        "matching_heuristics": False,
        SPEC_KEY: None if spec is None else spec.to_dict(),
    }
    if fpn_spec is not _NO_FPN_ENTRY:
        checkpoint[FPN_SPEC_KEY] = None if fpn_spec is None else fpn_spec.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(checkpoint, stream)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(temporary, 0o666 & ~mask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _load_tensors_only(path: Path) -> Any:
    """``torch.load(weights_only=True)``; raises ValueError for a truncated file, ``UnpicklingError`` for a rejected one."""
    # Memory-mapping reads only the tensors that are used; it needs the zip format of torch.save.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"checkpoint {path} is truncated or not a torch checkpoint: {error}") from None


def read_d2_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a Detectron2 ``.pth`` checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: no file at ``path``.
        RejectedCheckpointError: the file is not a torch file, or needs
            unpickling of arbitrary objects.
        ValueError: the file is truncated or has no ``"model"`` dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        checkpoint = _load_tensors_only(path)
    except pickle.UnpicklingError as error:
        raise RejectedCheckpointError(
            f"checkpoint {path} could not be read with tensor-only loading ({error}): it is not a torch "
            "checkpoint, or it holds objects that need full unpickling, which codec-det checkpoints never do"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise ValueError(f"checkpoint {path} is not a Detectron2 checkpoint: it has no \"model\" state dict")
    return checkpoint


def checkpoint_spec(checkpoint: dict[str, Any], source: str, key: str = SPEC_KEY) -> CompressionSpec | None:
    """Parse the spec stored under ``key`` in a checkpoint dict (a dict or a JSON string); None for an uncompressed part."""
    value = checkpoint.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise SpecError(f"{source}: the stored {key} is not valid JSON: {error}") from None
    return CompressionSpec.from_dict(value, source=f"{key} of {source}")


def weights_codec_spec(weights: str) -> tuple[bool, CompressionSpec | None]:
    """Read the spec carried by the ``MODEL.WEIGHTS`` file; a zip-format file is memory-mapped, not read whole.

    Returns:
        ``(is_codec_checkpoint, spec)``. Only local torch files written by
        codec-det carry a spec. URLs, ``.pkl`` pickles (never unpickled here),
        paths that do not exist and torch files that need full unpickling
        return ``(False, None)``; Detectron2's checkpointer reports those
        itself when it loads them.

    Raises:
        ValueError: the file exists but is truncated or not a torch file.
    """
    return _weights_spec(weights, SPEC_KEY)


def weights_fpn_spec(weights: str) -> tuple[bool, CompressionSpec | None]:
    """Read the FPN spec carried by the ``MODEL.WEIGHTS`` file, as ``weights_codec_spec`` reads the ResNet's.

    Returns:
        ``(carries_fpn_spec, spec)``: ``carries_fpn_spec`` is True only for a
        codec-det checkpoint with a ``codec_fpn_spec`` entry, and ``spec`` is
        None there for a dense FPN.
    """
    return _weights_spec(weights, FPN_SPEC_KEY)


def _weights_spec(weights: str, key: str) -> tuple[bool, CompressionSpec | None]:
    if not weights or "://" in weights:
        return False, None
    path = Path(weights)
    if not path.is_file() or path.suffix == ".pkl":
        return False, None
    try:
        checkpoint = _load_tensors_only(path)
    except pickle.UnpicklingError as error:
        logger.info("MODEL.WEIGHTS %s is not a codec-det checkpoint (tensor-only loading rejects it: %s)", path, error)
        return False, None
    except ValueError as error:
        raise ValueError(f"MODEL.WEIGHTS: {error}") from None
    if not isinstance(checkpoint, dict) or key not in checkpoint:
        return False, None
    return True, checkpoint_spec(checkpoint, f"checkpoint {path}", key)
