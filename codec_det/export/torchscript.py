"""TorchScript export by tracing.

Tracing records the operations run on one example input. The backbones here
have no data-dependent control flow, so the traced graph is valid at other
batch sizes and image sizes: for Detectron2 backbones, sizes divisible by the
backbone's ``size_divisibility``. The export checks this at a second size. ``torch.jit`` is deprecated in torch 2.14 (it warns with a
``FutureWarning``) but still the format that C++ ``torch::jit::load`` reads.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["quiet_jit_deprecation", "trace_module", "save_torchscript", "load_torchscript"]

logger = logging.getLogger(__name__)


@contextmanager
def quiet_jit_deprecation() -> Iterator[None]:
    """Silence torch's ``FutureWarning`` that ``torch.jit`` is deprecated; other warnings still show."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
        yield


def trace_module(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace ``model`` (in eval mode) on ``example``; dict and tuple outputs are kept as they are.

    ``strict=False`` lets a Detectron2 backbone return its dict of feature
    maps. The built-in trace check is skipped because the caller verifies the
    result at two input sizes.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), quiet_jit_deprecation():
            traced = torch.jit.trace(model, (example,), strict=False, check_trace=False)
    finally:
        model.train(was_training)
    return traced


def save_torchscript(module: torch.jit.ScriptModule, path: str | os.PathLike) -> None:
    """Write a traced module to ``path`` (the caller provides atomicity, e.g. ``atomic_output_dir``)."""
    with quiet_jit_deprecation():
        torch.jit.save(module, os.fspath(path))


def load_torchscript(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Load a TorchScript file onto ``device``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TorchScript file {path} not found")
    with quiet_jit_deprecation():
        module = torch.jit.load(os.fspath(path), map_location=device)
    module.eval()
    return module
