"""MMDetection's ResNet-50 with the convs named in a CoDeC spec replaced by ``CoDeCConv2d`` layers.

``CoDeCResNet`` is registered in ``mmdet.registry.MODELS`` when
``codec_det.mmdet`` is imported, so a config selects it with
``backbone=dict(type="CoDeCResNet", spec=..., weights=...)`` and
``custom_imports=dict(imports=["codec_det.mmdet"])``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mmdet.models.backbones import ResNet
from mmdet.registry import MODELS

from codec_det.checkpoint import MODEL_FILE, SPEC_FILE
from codec_det.mmdet.structure import apply_codec_spec, check_resnet_arguments, check_style
from codec_det.mmdet.weights import load_backbone_weights, resolve_weights_file
from codec_det.spec import BUNDLED_SPECS, CompressionSpec, SpecError, resolve_spec

__all__ = ["CoDeCResNet", "resolve_backbone_spec"]

logger = logging.getLogger(__name__)


def resolve_backbone_spec(spec: str | os.PathLike | None, weights: str | os.PathLike | None) -> CompressionSpec:
    """Return the spec of the backbone: ``spec`` when given, else the ``spec.json`` beside ``weights``.

    When both are given and ``weights`` is a compress-tool directory, its
    ``spec.json`` must describe the same layers as ``spec``.

    Raises:
        ValueError: neither is given, either is not a path or name, or only ``weights`` is given and it is a file.
        FileNotFoundError: ``spec`` names no file, directory or preset, or, without ``spec``,
            ``weights`` does not exist or its directory has no ``spec.json``.
        SpecError: the spec is invalid or differs from the weights directory's spec.
    """
    for name, value in (("spec", spec), ("weights", weights)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise ValueError(
                f"CoDeCResNet: {name}={value!r} is a {type(value).__name__}; give a path or, for spec, a preset name "
                f"({', '.join(sorted(BUNDLED_SPECS))})"
            )
    weights_dir = Path(weights) if weights is not None and Path(weights).is_dir() else None
    if spec is None:
        if weights is not None and not Path(weights).exists():
            raise FileNotFoundError(
                f"CoDeCResNet weights {weights} not found; give a directory written by tools/compress_backbone.py "
                f"(with {MODEL_FILE} and {SPEC_FILE})"
            )
        if weights_dir is None:
            raise ValueError(
                "CoDeCResNet needs spec= (a spec.json path, a tools/compress_backbone.py directory, or a preset "
                f"{sorted(BUNDLED_SPECS)}) or weights= set to a tools/compress_backbone.py directory"
            )
        if not (weights_dir / SPEC_FILE).is_file():
            raise FileNotFoundError(
                f"CoDeCResNet weights directory {weights_dir} has no {SPEC_FILE}; give a directory written by "
                f"tools/compress_backbone.py (with {MODEL_FILE} and {SPEC_FILE}), or set spec= to the spec "
                "the weights were made with"
            )
        return resolve_spec(weights_dir)

    try:
        resolved = resolve_spec(spec)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"CoDeCResNet spec {spec!r} not found: give a spec.json path, a directory written by "
            f"tools/compress_backbone.py, or a bundled preset ({', '.join(sorted(BUNDLED_SPECS))})"
        ) from None
    if weights_dir is not None and (weights_dir / SPEC_FILE).is_file():
        stored = resolve_spec(weights_dir)
        if stored.to_dict()["layers"] != resolved.to_dict()["layers"]:
            raise SpecError(
                f"CoDeCResNet spec {spec} describes other layers than {weights_dir / SPEC_FILE}, which the weights "
                "were saved with; leave spec unset to use the weights' spec, or give weights made with this spec"
            )
    return resolved


class CoDeCResNet(ResNet):
    """MMDetection's ResNet-50 whose convs named in a CoDeC spec are ``CoDeCConv2d`` layers.

    Module and state-dict names are torchvision's (``layer1.0.conv2``,
    ``layer1.0.bn2``, ``layer1.0.downsample.0``), so the weights of
    ``tools/compress_backbone.py`` load with exact keys; only their ImageNet
    classifier (``fc.*``) is dropped. The weights load in ``init_weights``, as
    MMDetection's pretrained backbones do, and a missing, unexpected or
    mis-shaped key raises ``SpecError``. Without ``weights`` the dense layers
    get MMDetection's ResNet initialisation and the CoDeC layers keep the
    random factors they were built with, for training from scratch.

    ``frozen_stages``, ``norm_cfg``, ``norm_eval``, ``out_indices``,
    ``strides``, ``dilations`` and ``with_cp`` act as in MMDetection's
    ``ResNet``. Freezing happens after the replacement, so a frozen stage
    freezes its CoDeC factors. Arguments that rename modules or change the
    graph around the convs (``deep_stem``, ``avg_down``, ``dcn``,
    ``plugins``, ``conv_cfg``, another depth) raise ``ValueError``, and so
    do unknown arguments and ``out_indices`` or ``frozen_stages`` outside
    ResNet-50's 4 stages.

    A folded permutation (``permutation_folded`` in the spec) makes a layer
    emit its filters in group order. The BatchNorm and conv after it store
    their weights in that order, so the block computes the same function
    with any ``norm_eval`` or freezing.

    Args:
        spec: a ``spec.json`` path, a ``tools/compress_backbone.py``
            directory, or a bundled preset (``"codec-45"``, ``"codec-66"``:
            structure only). None takes the spec beside ``weights``.
        weights: a ``tools/compress_backbone.py`` directory (its
            ``model.safetensors``) or a torchvision-named ResNet-50 state-dict
            file; None to train from scratch. Needs BatchNorm norms
            (``norm_cfg`` type ``BN`` or ``SyncBN``), whose names match.
        style: ``"pytorch"`` (stride in the 3x3 conv, as torchvision and
            the compress tool) or ``"caffe"``; must match the spec.
        Other arguments: as for MMDetection's ``ResNet``.
    """

    def __init__(
        self,
        spec: str | None = None,
        weights: str | None = None,
        depth: int = 50,
        style: str = "pytorch",
        init_cfg=None,
        **kwargs,
    ):
        check_resnet_arguments({"depth": depth, **kwargs})
        if kwargs.get("pretrained") is not None or _is_pretrained_init(init_cfg):
            raise ValueError(
                "CoDeCResNet loads its weights from weights= with exact keys; remove pretrained= and "
                "init_cfg=dict(type='Pretrained', ...), and set weights= to a tools/compress_backbone.py directory"
            )
        codec_spec = resolve_backbone_spec(spec, weights)
        check_style(codec_spec, style)
        weights_file = None if weights is None else resolve_weights_file(weights)

        super().__init__(depth=depth, style=style, init_cfg=init_cfg, **kwargs)
        if weights_file is not None and self.norm1_name != "bn1":
            raise ValueError(
                f"CoDeCResNet: norm_cfg {self.norm_cfg} names its norms {self.norm1_name}, but the weights in "
                f"{weights_file} contain BatchNorm weights (bn1, layer1.0.bn1, ...): use norm_cfg type 'BN' or "
                "'SyncBN', or train from scratch without weights"
            )

        apply_codec_spec(self, codec_spec)
        self.codec_spec = codec_spec
        self.weights_file = weights_file
        # ResNet.__init__ froze the dense convs that were just replaced.
        self._freeze_stages()
        logger.info(
            "built CoDeCResNet with %d CoDeC layers (%s), weights %s",
            len(codec_spec.layers),
            spec if spec is not None else weights,
            weights_file if weights_file is not None else "none (training from scratch)",
        )

    def train(self, mode: bool = True) -> "CoDeCResNet":
        """Set the training mode as MMDetection's ``ResNet`` does, and return ``self`` as ``nn.Module.train`` does.

        MMDetection's ``ResNet.train`` returns None, so ``model.eval()``
        would too.
        """
        super().train(mode)
        return self

    def init_weights(self) -> None:
        """Load ``weights`` with exact keys, or initialise as MMDetection's ResNet when there are none."""
        if self.weights_file is None:
            super().init_weights()
            return
        load_backbone_weights(self, self.weights_file)
        self._is_init = True


def _is_pretrained_init(init_cfg) -> bool:
    configs = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    return any(isinstance(config, dict) and config.get("type") == "Pretrained" for config in configs)


def register_backbone() -> None:
    """Register ``CoDeCResNet`` in ``mmdet.registry.MODELS``; a second import keeps the first registration.

    MMEngine's registry rejects a name registered twice, which
    ``importlib.reload`` of this module would otherwise do.
    """
    registered = MODELS.module_dict.get("CoDeCResNet")
    if registered is None:
        MODELS.register_module(module=CoDeCResNet)
        return
    if registered.__qualname__ != CoDeCResNet.__qualname__ or registered.__module__ != CoDeCResNet.__module__:
        raise RuntimeError(
            f"mmdet's MODELS registry already has another CoDeCResNet (from {registered.__module__}); "
            "remove the other registration"
        )
    logger.debug("CoDeCResNet is already registered; keeping the first registration")


register_backbone()
