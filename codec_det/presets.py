"""Operating points of CoDeC for ResNet-50 on 224x224 ImageNet images.

Targets from Pham, Zniyed, Nguyen, "Coupled Tensor Decomposition for Compact
Network Representation", IEEE TNNLS 2025, Table 1: the original ResNet-50 has
4.12 GMACs and 25.56 M parameters; CoDeC reaches 2.25 GMACs / 14.32 M
parameters (-45% MACs) and 1.42 GMACs / 8.81 M parameters (-66% MACs). Totals
are the whole model's as fvcore counts them, which for the original
torchvision ResNet-50 gives 4.145 GMACs (4.087 G of it in convs).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Preset", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """A compression target: totals for the whole model at ``input_size``."""

    name: str
    target_macs: float
    target_params: float
    input_size: tuple[int, int] = (224, 224)
    architecture: str = "resnet50"


PRESETS = {
    "codec-45": Preset("codec-45", target_macs=2.25e9, target_params=14.32e6),
    "codec-66": Preset("codec-66", target_macs=1.42e9, target_params=8.81e6),
}


def get_preset(name: str) -> Preset:
    """Return the preset called ``name``; raises ValueError listing the valid names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
