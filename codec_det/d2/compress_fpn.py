"""Compression of the FPN convs of a Detectron2 R50-FPN model, and the bundled FPN presets.

The FPN is rebuilt alone on a ``FeatureShapes`` stand-in for its ResNet,
with plain ``nn.Conv2d`` lateral and output convs. The core's
``compress_model`` then plans ranks with the budget allocator, decomposes
each conv and counts MACs with fvcore on the FPN by itself. MACs targets are
the FPN's own at ``FPN_INPUT_SIZE``. Each compressed conv keeps one filter group
(G = 1): its output feeds an add or the FPN's output, where a filter
permutation cannot be folded into a following norm or conv.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn

from codec_det.checkpoint import load_weights_strict
from codec_det.complexity import count_model
from codec_det.compress import CompressionResult, compress_model
from codec_det.d2.fpn import FPN_ARCHITECTURE, CoDeCFPN, FeatureShapes, fpn_conv_names
from codec_det.decompose import ALSSettings
from codec_det.spec import CompressionSpec, SpecError
from codec_det.surgery import set_submodule

__all__ = [
    "FPN_INPUT_SIZE",
    "FPN_PRESET_CUTS",
    "dense_fpn",
    "fpn_target_macs",
    "compress_fpn",
    "compress_d2_fpn_state",
    "make_fpn_preset_spec",
]

logger = logging.getLogger(__name__)

# Input size at which FPN MACs targets are counted: Detectron2's R50-FPN
# test size (short side 800) at the aspect ratio the benchmarks use.
FPN_INPUT_SIZE = (800, 1216)

# Fraction of the FPN's MACs each preset removes: the fractions by which the
# codec-45 and codec-66 ResNet-50 specs cut the ResNet's MACs.
FPN_PRESET_CUTS = {"codec-45": 0.45, "codec-66": 0.66}


def _bottom_up_shapes(cfg: CfgNode) -> dict[str, ShapeSpec]:
    """Return channels and stride of the ResNet-50 maps the FPN of ``cfg`` reads (``MODEL.FPN.IN_FEATURES``)."""
    res2_channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS
    shapes = {}
    for name in cfg.MODEL.FPN.IN_FEATURES:
        if name not in ("res2", "res3", "res4", "res5"):
            raise ValueError(
                f"MODEL.FPN.IN_FEATURES has {name!r}; the CoDeC FPN reads ResNet-50 maps res2 to res5"
            )
        stage = int(name[3:])
        shapes[name] = ShapeSpec(channels=res2_channels * 2 ** (stage - 2), stride=2**stage)
    return shapes


def dense_fpn(cfg: CfgNode) -> CoDeCFPN:
    """Build the FPN of ``cfg`` on a ``FeatureShapes`` stand-in, with plain ``nn.Conv2d`` convs and no norms.

    The convs have Detectron2's names, geometry and bias (none when
    ``MODEL.FPN.NORM`` is set), so ``compress_model`` finds them and their
    specs fit the detector's FPN. The norms stay out: they follow the convs
    and do not change what a conv's decomposition approximates.
    """
    fpn = CoDeCFPN(
        FeatureShapes(_bottom_up_shapes(cfg)),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
    for name in fpn_conv_names(fpn):
        conv = getattr(fpn, name)
        plain = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
        )
        with torch.no_grad():
            plain.weight.copy_(conv.weight)
            if conv.bias is not None:
                plain.bias.copy_(conv.bias)
        set_submodule(fpn, name, plain)
    return fpn.eval()


def fpn_target_macs(fpn: CoDeCFPN, cut: float, input_size: tuple[int, int] = FPN_INPUT_SIZE) -> float:
    """Return the MACs target that removes the fraction ``cut`` of the dense FPN's MACs at ``input_size``."""
    if not 0 < cut < 1:
        raise ValueError(f"the fraction of FPN MACs to remove must be between 0 and 1, got {cut}")
    macs, _ = count_model(fpn, input_size)
    return (1 - cut) * macs


def compress_fpn(
    fpn: CoDeCFPN,
    *,
    target_macs: float,
    input_size: tuple[int, int] = FPN_INPUT_SIZE,
    rank_multiple: int = 8,
    settings: ALSSettings = ALSSettings(),
    progress: bool = True,
) -> CompressionResult:
    """Compress the convs of a ``dense_fpn`` in place with one filter group each, to ``target_macs`` at ``input_size``.

    Returns:
        The core's ``CompressionResult``; its spec has architecture ``"d2-fpn"``
        and Detectron2's FPN module names.
    """
    groups = {name: 1 for name in fpn_conv_names(fpn)}
    result = compress_model(
        fpn,
        target_macs=target_macs,
        input_size=input_size,
        groups=groups,
        rank_multiple=rank_multiple,
        settings=settings,
        architecture=FPN_ARCHITECTURE,
        fold=False,
        progress=progress,
    )
    return result


def _load_fpn_weights(fpn: CoDeCFPN, state: dict[str, torch.Tensor], prefix: str, source: str) -> None:
    """Load the conv weights under ``prefix`` (``"backbone."``) into a ``dense_fpn``, strictly."""
    names = fpn_conv_names(fpn)
    compressed = sorted(key for key in state if key.startswith(prefix + "fpn_") and key.endswith(".input_factors"))
    if compressed:
        raise ValueError(
            f"{source} already has a CoDeC-compressed FPN ({compressed[0]}); the FPN option compresses a dense FPN"
        )
    expected = fpn.state_dict()
    found = {}
    for key in expected:
        if prefix + key in state:
            found[key] = state[prefix + key]
    if not found:
        raise SpecError(
            f"{source} has no FPN weights under {prefix!r} (no {prefix}{names[0]}.weight); "
            "the FPN option needs an R50-FPN Detectron2 model"
        )
    load_weights_strict(fpn, found, f"{source} (FPN weights under {prefix!r})")


def compress_d2_fpn_state(
    state: dict[str, torch.Tensor],
    cfg: CfgNode,
    *,
    target_macs: float | None = None,
    cut: float | None = None,
    source: str = "checkpoint",
    prefix: str = "backbone.",
    input_size: tuple[int, int] = FPN_INPUT_SIZE,
    device: str | torch.device = "cpu",
    **compress_kwargs: Any,
) -> tuple[dict[str, torch.Tensor], CompressionResult]:
    """Compress the FPN convs of a Detectron2 R50-FPN state dict.

    Args:
        state: the ``"model"`` dict of a Detectron2 checkpoint.
        cfg: the config the model was trained with (``MODEL.FPN`` decides the FPN).
        target_macs: MACs of the compressed FPN alone at ``input_size``.
        cut: fraction of the FPN's MACs to remove, instead of ``target_macs``.
        source: name of the checkpoint in error messages.
        prefix: where the FPN sits in ``state``.
        input_size: (H, W) of the images at which MACs are counted.
        device: where the decomposition runs; the returned tensors are on it.
        compress_kwargs: passed to ``compress_fpn`` (``rank_multiple``, ``settings``, ``progress``).

    Returns:
        The new state dict (compressed FPN convs, FPN norms and every other
        weight as they were) and the compression result.
    """
    if (target_macs is None) == (cut is None):
        raise ValueError("give either a MACs target or a fraction of FPN MACs to remove")
    fpn = dense_fpn(cfg)
    _load_fpn_weights(fpn, state, prefix, source)
    fpn.to(device)
    if target_macs is None:
        target_macs = fpn_target_macs(fpn, cut, input_size)

    result = compress_fpn(fpn, target_macs=target_macs, input_size=input_size, **compress_kwargs)
    result.spec.metadata["norm"] = cfg.MODEL.FPN.NORM

    names = fpn_conv_names(fpn)
    conv_prefixes = tuple(f"{prefix}{name}." for name in names)
    norm_prefixes = tuple(f"{prefix}{name}.norm." for name in names)
    new_state = {
        key: value for key, value in state.items() if not key.startswith(conv_prefixes) or key.startswith(norm_prefixes)
    }
    for key, value in fpn.state_dict().items():
        if key.startswith(tuple(f"{name}." for name in names)):
            new_state[prefix + key] = value
    return new_state, result


def make_fpn_preset_spec(preset: str, seed: int = 0) -> CompressionSpec:
    """Make the structure-only FPN spec of ``preset`` (``FPN_PRESET_CUTS``) from randomly initialised weights.

    This is how the bundled ``codec_det/specs/d2-fpn-codec-*.json`` files were
    made: Detectron2's default FPN (256 channels on res2..res5, no norm) with
    Detectron2's initialisation under ``torch.manual_seed(seed)``, ranks in
    multiples of 8 from the budget allocator at ``FPN_INPUT_SIZE``.
    """
    from detectron2.config import get_cfg

    if preset not in FPN_PRESET_CUTS:
        raise ValueError(f"unknown FPN preset {preset!r}; choose one of {', '.join(sorted(FPN_PRESET_CUTS))}")
    cfg = get_cfg()
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    torch.manual_seed(seed)
    fpn = dense_fpn(cfg)
    target = fpn_target_macs(fpn, FPN_PRESET_CUTS[preset])
    result = compress_fpn(fpn, target_macs=target, settings=ALSSettings(seed=seed), progress=False)
    result.spec.metadata.update(
        {
            "target": preset,
            "fpn_macs_cut": FPN_PRESET_CUTS[preset],
            "norm": "",
            "made_from": f"random weights (Detectron2's FPN initialisation, torch seed {seed})",
        }
    )
    return result.spec
