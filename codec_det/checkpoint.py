"""Saving and loading compressed models: spec JSON plus safetensors weights, written atomically.

safetensors stores raw tensors only, so loading a file never runs code, unlike
``torch.load`` of a pickle. Where a ``.pth`` or ``.pkl`` checkpoint must be
read, ``load_state_dict_file`` uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from codec_det.spec import CompressionSpec, SpecError
from codec_det.surgery import apply_spec

__all__ = [
    "MODEL_FILE",
    "SPEC_FILE",
    "atomic_output_dir",
    "save_compressed",
    "load_state_dict_file",
    "load_weights_strict",
    "load_compressed",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
SPEC_FILE = "spec.json"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output_dir(output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``output`` only when the block succeeds.

    A run killed inside the block leaves ``output`` untouched (a hidden
    ``.name.tmp-*`` directory may remain beside it). An existing non-empty
    ``output`` is an error unless ``overwrite`` is set, in which case it is
    replaced after the new content is complete.
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output {output} exists and is not a directory; choose another --output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output directory {output} is not empty; pass --overwrite to replace it or choose another --output"
        )

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    # mkdtemp creates mode 0700; the finished directory gets the usual umask mode.
    staging.chmod(0o777 & ~_current_umask())
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    if output.exists():
        retired = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.old-"))
        os.replace(output, retired / "content")
        os.replace(staging, output)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, output)


def save_compressed(model: nn.Module, spec: CompressionSpec, directory: str | os.PathLike) -> None:
    """Write ``model.safetensors`` and ``spec.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / MODEL_FILE), metadata={"format": "pt", "architecture": spec.architecture})
    (directory / MODEL_FILE).chmod(0o666 & ~_current_umask())
    spec.save(directory / SPEC_FILE)


def load_state_dict_file(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, or from a torch file without running pickled code.

    ``allow_pickle`` permits full unpickling of a trusted file whose objects
    ``weights_only`` loading rejects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"weights file {path} is not a readable safetensors file: {error}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as error:
        # weights_only loading raises UnpicklingError for objects it rejects, and for
        # damaged pickles too, which allow_pickle cannot read either.
        hint = "" if allow_pickle else (
            ". If you trust the file, pass allow_pickle=True (--allow-pickle on the command line)"
        )
        raise ValueError(
            f"weights file {path} could not be read as a tensor-only torch checkpoint ({error}){hint}"
        ) from None
    except Exception as error:  # a damaged zip archive raises RuntimeError, a short pickle EOFError
        raise ValueError(
            f"weights file {path} could not be read: it is truncated, corrupt or not a torch checkpoint ({error}). "
            "Save or download it again"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path} contains a {type(state).__name__}, not a state dict")
    return state


def load_weights_strict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, target: str = "the model built from the spec"
) -> None:
    """Load ``state`` into ``model``, raising ``SpecError`` that names every mismatched key.

    ``target`` names ``model`` in that message.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        name for name in set(expected) & set(state) if tuple(expected[name].shape) != tuple(state[name].shape)
    )
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            details.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if wrong_shape:
            shapes = [f"{name}: model {tuple(expected[name].shape)} vs file {tuple(state[name].shape)}"
                      for name in wrong_shape[:8]]
            details.append(f"shape mismatches {shapes}")
        raise SpecError(f"weights in {source} do not match {target}: " + "; ".join(details))

    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"weights in {source}: tensor {name} contains NaN or Inf values")
    model.load_state_dict(state, strict=True)


def load_compressed(directory: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Rebuild the compressed structure of ``spec.json`` in ``model`` and load ``model.safetensors``.

    Args:
        directory: output of ``tools/compress_backbone.py``.
        model: the uncompressed architecture, e.g. ``torchvision.models.resnet50()``;
            modified in place and returned.
    """
    directory = Path(directory)
    spec = CompressionSpec.load(directory / SPEC_FILE)
    weights = directory / MODEL_FILE
    apply_spec(model, spec)
    load_weights_strict(model, load_state_dict_file(weights), str(weights))
    logger.info("loaded compressed %s from %s (%d compressed layers)", spec.architecture, directory, len(spec.layers))
    return model
