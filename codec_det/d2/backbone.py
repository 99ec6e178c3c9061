"""ResNet-50 backbones for Detectron2 whose convs are CoDeC layers, and their registration.

``build_codec_resnet_backbone`` and ``build_codec_resnet_fpn_backbone`` are
Detectron2's ``build_resnet_backbone`` and ``build_resnet_fpn_backbone`` for
ResNet-50, with each conv named in the spec (``MODEL.CODEC.SPEC``, see
``add_codec_config``) replaced by a ``CoDeCNormConv2d``. The FPN builder also
compresses the FPN convs named in ``MODEL.CODEC.FPN_SPEC`` (dense by default).
Feature names, strides, channels, freezing and norms are Detectron2's.
"""

from __future__ import annotations

import logging
import re

from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, BasicStem, BottleneckBlock, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from codec_det.d2.config import resolve_codec_fpn_spec, resolve_codec_spec
from codec_det.d2.fpn import CoDeCFPN
from codec_det.d2.layers import CoDeCNormConv2d
from codec_det.d2.names import torchvision_to_d2_module
from codec_det.spec import CompressionSpec, LayerSpec, SpecError
from codec_det.surgery import set_submodule

__all__ = [
    "RESNET50_BLOCKS",
    "CoDeCResNet",
    "apply_codec_spec",
    "spec_stride_in_1x1",
    "check_resnet_config",
    "build_codec_resnet_backbone",
    "build_codec_resnet_fpn_backbone",
]

logger = logging.getLogger(__name__)

# Bottleneck blocks in res2, res3, res4 and res5 of ResNet-50.
RESNET50_BLOCKS = (3, 4, 6, 3)

_FIRST_BLOCK_CONV = re.compile(r"^layer[2-4]\.0\.conv([12])$")


class CoDeCResNet(ResNet):
    """Detectron2's ResNet with the convs named in a CoDeC spec replaced by ``CoDeCNormConv2d`` layers.

    The stem and blocks are Detectron2's own, so the state-dict keys are those
    of ``build_resnet_backbone`` except under each compressed conv, which
    holds the CoDeC factors (``res2.0.conv2.input_factors``) and keeps its norm
    (``res2.0.conv2.norm.weight``). Freezing happens after the replacement, so
    a frozen stage freezes its factors and turns the norms inside them into
    ``FrozenBatchNorm2d`` too.

    Args:
        stem, stages, num_classes, out_features, freeze_at: as for Detectron2's ``ResNet``.
        spec: structure of the compressed convs, with torchvision module names
            (``layer1.0.conv2``); None builds the uncompressed ResNet.
    """

    def __init__(self, stem, stages, *, spec=None, num_classes=None, out_features=None, freeze_at=0):
        super().__init__(stem, stages, num_classes=num_classes, out_features=out_features, freeze_at=0)
        self.codec_spec = spec
        if spec is not None:
            apply_codec_spec(self, spec)
        self.freeze(freeze_at)


def apply_codec_spec(resnet: ResNet, spec: CompressionSpec) -> ResNet:
    """Replace the convs of a Detectron2 ResNet named in ``spec`` by uninitialised ``CoDeCNormConv2d`` layers.

    Each conv's norm and activation move into its replacement. Raises
    ``SpecError`` naming the layer when a spec name is no ResNet conv, lies in
    a stage this ResNet does not build, or describes another geometry.
    """
    modules = dict(resnet.named_modules())
    for name, entry in spec.layers.items():
        d2_name = torchvision_to_d2_module(name)
        stage = d2_name.split(".")[0]
        if stage != "stem" and stage not in resnet.stage_names:
            raise SpecError(
                f"spec layer {name} (Detectron2 {d2_name}) is in {stage}, which this ResNet does not build "
                f"because MODEL.RESNETS.OUT_FEATURES {list(resnet._out_features)} stop before it; "
                f"add {stage} to OUT_FEATURES (C4 models, whose res5 is in the ROI head, are not supported)"
            )
        conv = modules.get(d2_name)
        if type(conv) is not Conv2d:
            found = "no module" if conv is None else f"a {type(conv).__name__}"
            raise SpecError(f"spec layer {name} (Detectron2 {d2_name}) is {found} in this ResNet, not a dense Conv2d")
        _check_geometry(name, d2_name, conv, entry)

        layer = CoDeCNormConv2d.from_spec(entry, name, norm=conv.norm, activation=conv.activation)
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        set_submodule(resnet, d2_name, layer)
    return resnet


def _check_geometry(name: str, d2_name: str, conv: Conv2d, entry: LayerSpec) -> None:
    mismatch = entry.geometry_mismatch(conv)
    if not mismatch:
        return
    message = (
        f"spec layer {name} (Detectron2 {d2_name}) does not match the model's conv: "
        f"{LayerSpec.describe_mismatch(mismatch)}"
    )
    if "stride" in mismatch:
        message += (
            "; the stride of a stage's first block sits in the 1x1 conv when MODEL.RESNETS.STRIDE_IN_1X1 is True "
            "and in the 3x3 conv when it is False, so set it as the spec was made"
        )
    else:
        message += "; the spec was made for another model"
    raise SpecError(message)


def spec_stride_in_1x1(spec: CompressionSpec) -> bool:
    """Tell where the spec puts the stride of each stage's first block: True for the 1x1 conv.

    The spec's ``metadata["stride_in_1x1"]`` decides when present (specs
    compressed from a Detectron2 checkpoint store it). Otherwise the strides
    of compressed ``layerK.0.conv1`` / ``conv2`` layers decide, and a spec
    with neither has torchvision's layout (stride in the 3x3 conv).
    """
    stored = spec.metadata.get("stride_in_1x1")
    if isinstance(stored, bool):
        return stored
    for name, entry in spec.layers.items():
        match = _FIRST_BLOCK_CONV.match(name)
        if match is not None and max(entry.stride) > 1:
            return match.group(1) == "1"
    return False


def check_resnet_config(cfg, spec: CompressionSpec | None) -> None:
    """Reject ``MODEL.RESNETS`` settings the CoDeC backbone does not build, naming the key and the fix."""
    resnets = cfg.MODEL.RESNETS
    supported = {"DEPTH": 50, "NUM_GROUPS": 1, "WIDTH_PER_GROUP": 64, "RES5_DILATION": 1}
    for key, value in supported.items():
        if resnets[key] != value:
            raise ValueError(
                f"MODEL.RESNETS.{key} is {resnets[key]!r}, but the CoDeC backbone is a plain ResNet-50: "
                f"set MODEL.RESNETS.{key} {value}"
            )
    if any(resnets.DEFORM_ON_PER_STAGE):
        raise ValueError(
            f"MODEL.RESNETS.DEFORM_ON_PER_STAGE is {list(resnets.DEFORM_ON_PER_STAGE)}, but the CoDeC backbone "
            "has no deformable convs: set it to [False, False, False, False]"
        )
    if spec is not None and resnets.STRIDE_IN_1X1 != spec_stride_in_1x1(spec):
        place, value = ("1x1", True) if spec_stride_in_1x1(spec) else ("3x3", False)
        raise SpecError(
            f"MODEL.RESNETS.STRIDE_IN_1X1 is {resnets.STRIDE_IN_1X1}, but the CoDeC spec puts the stride of each "
            f"stage's first block in its {place} conv (as its weights were trained): set MODEL.RESNETS.STRIDE_IN_1X1 {value}"
        )


def _register_backbone(builder):
    """Register ``builder`` in ``BACKBONE_REGISTRY``; a second import of this module keeps the first registration.

    Detectron2's registry rejects a name registered twice, which
    ``importlib.reload`` of this module would otherwise do. The first
    registration stays so that every model is built from the same classes.
    """
    name = builder.__name__
    if name in BACKBONE_REGISTRY:
        registered = BACKBONE_REGISTRY.get(name)
        if getattr(registered, "__qualname__", None) != builder.__qualname__:
            raise RuntimeError(
                f"Detectron2's BACKBONE_REGISTRY already has another {name} (from {registered.__module__}); "
                "remove the other registration"
            )
        logger.debug("%s is already registered; keeping the first registration", name)
        return builder
    BACKBONE_REGISTRY.register(builder)
    return builder


def build_codec_resnet_backbone(cfg, input_shape: ShapeSpec) -> CoDeCResNet:
    """Build the ResNet-50 of ``cfg`` with the convs of ``MODEL.CODEC.SPEC`` compressed.

    Reads Detectron2's ``MODEL.RESNETS`` keys (``NORM``, ``OUT_FEATURES``,
    ``STRIDE_IN_1X1``, ``STEM_OUT_CHANNELS``, ``RES2_OUT_CHANNELS``) and
    ``MODEL.BACKBONE.FREEZE_AT``; see ``check_resnet_config`` for the values
    that must stay at ResNet-50's.
    """
    spec = resolve_codec_spec(cfg)
    check_resnet_config(cfg, spec)
    resnets = cfg.MODEL.RESNETS

    stem = BasicStem(in_channels=input_shape.channels, out_channels=resnets.STEM_OUT_CHANNELS, norm=resnets.NORM)

    in_channels = resnets.STEM_OUT_CHANNELS
    out_channels = resnets.RES2_OUT_CHANNELS
    bottleneck_channels = resnets.NUM_GROUPS * resnets.WIDTH_PER_GROUP
    stages = []
    for index, num_blocks in enumerate(RESNET50_BLOCKS):
        first_stride = 1 if index == 0 else 2
        blocks = ResNet.make_stage(
            BottleneckBlock,
            num_blocks,
            stride_per_block=[first_stride] + [1] * (num_blocks - 1),
            in_channels=in_channels,
            out_channels=out_channels,
            bottleneck_channels=bottleneck_channels,
            num_groups=1,
            norm=resnets.NORM,
            stride_in_1x1=resnets.STRIDE_IN_1X1,
            dilation=1,
        )
        stages.append(blocks)
        in_channels = out_channels
        out_channels *= 2
        bottleneck_channels *= 2

    return CoDeCResNet(
        stem,
        stages,
        spec=spec,
        out_features=resnets.OUT_FEATURES,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
    )


def build_codec_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> CoDeCFPN:
    """Build an FPN on the CoDeC ResNet-50, as Detectron2's ``build_resnet_fpn_backbone`` does on its ResNet.

    The FPN convs named in ``MODEL.CODEC.FPN_SPEC`` (or in the FPN spec that
    ``MODEL.WEIGHTS`` stores) are CoDeC layers; see ``resolve_codec_fpn_spec``.
    """
    bottom_up = build_codec_resnet_backbone(cfg, input_shape)
    return CoDeCFPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        spec=resolve_codec_fpn_spec(cfg),
    )


_register_backbone(build_codec_resnet_backbone)
_register_backbone(build_codec_resnet_fpn_backbone)
