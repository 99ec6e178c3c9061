"""Detectron2 integration: the CoDeC ResNet-50 backbones, their config keys and checkpoints.

Importing this package registers ``build_codec_resnet_backbone`` and
``build_codec_resnet_fpn_backbone`` in Detectron2's ``BACKBONE_REGISTRY``.
It needs Detectron2; ``import codec_det`` imports it only when Detectron2 is
installed.
"""

from codec_det.d2.backbone import (
    CoDeCResNet,
    build_codec_resnet_backbone,
    build_codec_resnet_fpn_backbone,
)
from codec_det.d2.checkpointer import CoDeCCheckpointer, load_codec_checkpoint
from codec_det.d2.config import add_codec_config, resolve_codec_fpn_spec, resolve_codec_spec
from codec_det.d2.convert import convert_to_d2
from codec_det.d2.fpn import CoDeCFPN
from codec_det.d2.layers import CoDeCNormConv2d

__all__ = [
    "CoDeCCheckpointer",
    "CoDeCFPN",
    "CoDeCNormConv2d",
    "CoDeCResNet",
    "add_codec_config",
    "build_codec_resnet_backbone",
    "build_codec_resnet_fpn_backbone",
    "convert_to_d2",
    "load_codec_checkpoint",
    "resolve_codec_fpn_spec",
    "resolve_codec_spec",
]
