"""Conversion of torchvision ResNet-50 weights, compressed or not, to Detectron2 checkpoints.

Every key is renamed by the explicit rules of ``codec_det.d2.names``, so the
checkpoint loads with Detectron2's ``matching_heuristics`` off and with no
missing or unexpected backbone key. The input is first loaded strictly into
a torchvision ResNet-50 (rebuilt from its spec when compressed), so a spec
that does not fit its weights fails here, not in a detector.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from codec_det.checkpoint import MODEL_FILE, SPEC_FILE, load_state_dict_file, load_weights_strict
from codec_det.d2.checkpoint import save_d2_checkpoint
from codec_det.d2.names import torchvision_to_d2_key
from codec_det.spec import CompressionSpec
from codec_det.surgery import apply_spec

__all__ = [
    "DEFAULT_PREFIX",
    "D2_MODEL_FILE",
    "torchvision_state_to_d2",
    "load_torchvision_resnet50",
    "convert_to_d2",
]

logger = logging.getLogger(__name__)

# Key prefix of the bottom-up ResNet in an R-CNN with an FPN backbone.
DEFAULT_PREFIX = "backbone.bottom_up."

# The Detectron2 checkpoint that tools/compress_backbone.py --from-d2 writes into its output directory.
D2_MODEL_FILE = "model.pth"


def torchvision_state_to_d2(state: dict[str, torch.Tensor], prefix: str = DEFAULT_PREFIX) -> dict[str, torch.Tensor]:
    """Rename a torchvision ResNet-50 state dict to Detectron2's keys under ``prefix``.

    The classifier (``fc.*``) is dropped with a log line, and so are
    BatchNorm's ``num_batches_tracked`` counters, which no Detectron2 norm
    needs (``BatchNorm2d`` fills them in when it loads).

    Raises:
        SpecError: a key is no weight of a ResNet trunk.
    """
    converted = {}
    dropped = []
    for key, tensor in state.items():
        if key.startswith("fc."):
            dropped.append(key)
            continue
        if key.endswith(".num_batches_tracked"):
            continue
        converted[prefix + torchvision_to_d2_key(key)] = tensor
    if dropped:
        logger.info("dropped the ImageNet classifier weights %s: a detector has no use for them", ", ".join(dropped))
    return converted


def load_torchvision_resnet50(source: str | os.PathLike) -> tuple[nn.Module, CompressionSpec | None]:
    """Load a torchvision ResNet-50 from a compress-tool directory or from a state-dict file.

    Args:
        source: a directory with ``spec.json`` and ``model.safetensors``
            (``tools/compress_backbone.py``), or an uncompressed ResNet-50
            state dict (``.safetensors``, or ``.pth`` read without unpickling objects).

    Returns:
        The model with every weight loaded, and its spec (None when uncompressed).

    Raises:
        FileNotFoundError: a file is missing.
        SpecError: the spec is invalid or does not match the weights.
        ValueError: a weights file is truncated or unreadable.
    """
    source = Path(source)
    model = torchvision.models.resnet50()
    if not source.is_dir():
        load_weights_strict(model, load_state_dict_file(source), str(source))
        return model, None

    spec_file = source / SPEC_FILE
    weights = source / MODEL_FILE
    if not spec_file.is_file():
        raise FileNotFoundError(
            f"{source} has no {SPEC_FILE}: give a directory written by tools/compress_backbone.py "
            "or an uncompressed ResNet-50 state-dict file"
        )
    if not weights.is_file():
        if (source / D2_MODEL_FILE).is_file():
            raise ValueError(
                f"{source} contains a Detectron2 checkpoint ({D2_MODEL_FILE}) written by tools/compress_backbone.py "
                f"--from-d2; it needs no conversion: set MODEL.WEIGHTS {source / D2_MODEL_FILE}"
            )
        raise FileNotFoundError(f"{source} has {SPEC_FILE} but no {MODEL_FILE}; re-run tools/compress_backbone.py")

    spec = CompressionSpec.load(spec_file)
    apply_spec(model, spec)
    load_weights_strict(model, load_state_dict_file(weights), str(weights))
    return model, spec


def convert_to_d2(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    prefix: str = DEFAULT_PREFIX,
    overwrite: bool = False,
) -> CompressionSpec | None:
    """Write the Detectron2 checkpoint of a torchvision ResNet-50 (see ``load_torchvision_resnet50``).

    Returns:
        The spec stored in the checkpoint, None for an uncompressed backbone.
    """
    output = Path(output)
    if output.suffix != ".pth":
        raise ValueError(
            f"output {output} must end in .pth: Detectron2 reads .pkl files as pickles of another format"
        )
    if output.exists() and not overwrite:
        raise FileExistsError(f"output {output} exists; pass --overwrite to replace it or choose another output")

    model, spec = load_torchvision_resnet50(source)
    state = torchvision_state_to_d2(model.state_dict(), prefix)
    save_d2_checkpoint(output, state, spec, overwrite=overwrite)

    compressed = 0 if spec is None else len(spec.layers)
    logger.info(
        "wrote %s: %d backbone tensors under %r, %d compressed convs. The weights expect torchvision's input "
        "(RGB, ImageNet mean and std) and MODEL.RESNETS.STRIDE_IN_1X1 False",
        output,
        len(state),
        prefix,
        compressed,
    )
    return spec
