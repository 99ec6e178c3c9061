"""Training checkpoints: atomic writes, tensor-only loading, and the RNG state needed for exact resumption.

A checkpoint is a dict of tensors and plain Python values (numbers, strings,
lists, tuples, dicts, None), so ``torch.load(weights_only=True)`` reads it
without running pickled code. It is written to a temporary file in the same
directory and renamed over the previous one, so a crash during the write
leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from codec_det.checkpoint import MODEL_FILE, SPEC_FILE
from codec_det.spec import CompressionSpec

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "LAST_CHECKPOINT",
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "save_final_model",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "codec-det-finetune"
CHECKPOINT_VERSION = 1
LAST_CHECKPOINT = "last.pth"


def capture_rng_state() -> dict[str, Any]:
    """Return the state of torch's CPU and CUDA generators, NumPy's global generator and Python's ``random``.

    NumPy's state array is stored as an int64 tensor, because tensor-only
    loading rejects NumPy arrays.
    """
    numpy_state = np.random.get_state()
    python_version, python_internal, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "algorithm": numpy_state[0],
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "position": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": [python_version, list(python_internal), python_gauss],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set every generator from a :func:`capture_rng_state` result.

    CUDA states are restored only when the number of visible devices matches.
    """
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "checkpoint contains CUDA RNG states of %d devices but %d are visible; CUDA RNG state not restored",
                len(cuda_states), torch.cuda.device_count(),
            )
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["algorithm"],
        numpy_state["keys"].numpy().astype(np.uint32),
        numpy_state["position"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    python_version, python_internal, python_gauss = state["python"]
    random.setstate((python_version, tuple(python_internal), python_gauss))


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` with ``torch.save`` to a temporary file, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates mode 0600; the checkpoint gets the usual umask mode.
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"checkpoint {path} could not be read as a tensor-only torch file: {error}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a codec-det fine-tuning checkpoint (no format {CHECKPOINT_FORMAT!r})")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint {path} has version {state.get('version')!r}; this codec-det reads version "
            f"{CHECKPOINT_VERSION}"
        )
    return state


def save_final_model(model: nn.Module, spec: CompressionSpec, directory: str | os.PathLike) -> None:
    """Write ``model.safetensors`` and ``spec.json`` into ``directory``, each by temporary file and rename.

    The directory can then be read by ``codec_det.checkpoint.load_compressed``
    like the output of ``tools/compress_backbone.py``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{MODEL_FILE}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(state, temporary, metadata={"format": "pt", "architecture": spec.architecture})
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, directory / MODEL_FILE)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    spec.save(directory / SPEC_FILE)
