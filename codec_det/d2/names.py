"""Module and weight names of ResNet-50 in torchvision and in Detectron2.

Specs and compress-tool weights use torchvision's names; Detectron2's ResNet
keeps each norm inside its conv. The mapping is explicit, one rule per kind
of module, so that a name that fits no rule is an error instead of a guess:

==========================  ==============================
torchvision                 Detectron2
==========================  ==============================
``conv1``                   ``stem.conv1``
``bn1``                     ``stem.conv1.norm``
``layer1.0.conv2``          ``res2.0.conv2``
``layer1.0.bn2``            ``res2.0.conv2.norm``
``layer1.0.downsample.0``   ``res2.0.shortcut``
``layer1.0.downsample.1``   ``res2.0.shortcut.norm``
==========================  ==============================

``layerK`` is ``res(K+1)``. The classifier ``fc`` has no Detectron2 name.
"""

from __future__ import annotations

import re

from codec_det.spec import SpecError

__all__ = ["torchvision_to_d2_module", "d2_to_torchvision_module", "torchvision_to_d2_key", "d2_to_torchvision_key"]

_TORCHVISION_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|downsample\.0|downsample\.1)$")
_D2_BLOCK = re.compile(r"^res([2-5])\.(\d+)\.(conv[1-3]|shortcut)(\.norm)?$")


def torchvision_to_d2_module(name: str) -> str:
    """Map a torchvision ResNet module name (``layer1.0.conv1``) to Detectron2's (``res2.0.conv1``).

    Raises:
        SpecError: ``name`` is no conv or norm of a ResNet trunk (``fc``, a typo).
    """
    if name == "conv1":
        return "stem.conv1"
    if name == "bn1":
        return "stem.conv1.norm"
    match = _TORCHVISION_BLOCK.match(name)
    if match is None:
        raise SpecError(
            f"{name} is not a conv or norm of a torchvision ResNet trunk "
            "(expected conv1, bn1, layerK.i.convJ, layerK.i.bnJ or layerK.i.downsample.0/1)"
        )
    stage, block, part = match.groups()
    prefix = f"res{int(stage) + 1}.{block}"
    if part.startswith("conv"):
        return f"{prefix}.{part}"
    if part.startswith("bn"):
        return f"{prefix}.conv{part[2:]}.norm"
    if part == "downsample.0":
        return f"{prefix}.shortcut"
    return f"{prefix}.shortcut.norm"


def d2_to_torchvision_module(name: str) -> str:
    """Map a Detectron2 ResNet module name (``res2.0.shortcut``) to torchvision's (``layer1.0.downsample.0``).

    Raises:
        SpecError: ``name`` is no conv or norm of a Detectron2 ResNet.
    """
    if name == "stem.conv1":
        return "conv1"
    if name == "stem.conv1.norm":
        return "bn1"
    match = _D2_BLOCK.match(name)
    if match is None:
        raise SpecError(
            f"{name} is not a conv or norm of a Detectron2 ResNet "
            "(expected stem.conv1[.norm], resK.i.convJ[.norm] or resK.i.shortcut[.norm])"
        )
    stage, block, part, norm = match.groups()
    prefix = f"layer{int(stage) - 1}.{block}"
    if part == "shortcut":
        return f"{prefix}.downsample.{1 if norm else 0}"
    if norm:
        return f"{prefix}.bn{part[4:]}"
    return f"{prefix}.{part}"


def torchvision_to_d2_key(key: str) -> str:
    """Map a state-dict key (``layer1.0.bn1.weight``) to Detectron2's (``res2.0.conv1.norm.weight``)."""
    module, _, leaf = key.rpartition(".")
    return f"{torchvision_to_d2_module(module)}.{leaf}"


def d2_to_torchvision_key(key: str) -> str:
    """Map a Detectron2 ResNet state-dict key (``stem.conv1.norm.bias``) to torchvision's (``bn1.bias``)."""
    module, _, leaf = key.rpartition(".")
    return f"{d2_to_torchvision_module(module)}.{leaf}"
