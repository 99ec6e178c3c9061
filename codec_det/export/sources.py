"""Loading the models to export: a torchvision ResNet-50 classifier, or a Detectron2 R-CNN and its backbone.

Both loaders are strict: every weight of the part that is exported must come
from the input files, so an artifact never carries randomly initialised
weights silently. Detectron2 is imported only by the Detectron2 loader.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from codec_det.checkpoint import MODEL_FILE, SPEC_FILE, load_state_dict_file, load_weights_strict
from codec_det.spec import CompressionSpec, SpecError
from codec_det.surgery import apply_spec

__all__ = [
    "CLASSIFIER",
    "DETECTRON2_BACKBONE",
    "ExportSubject",
    "load_classifier",
    "rebuild_classifier",
    "load_detectron2",
    "rebuild_detectron2_backbone",
]

logger = logging.getLogger(__name__)

CLASSIFIER = "classifier"
DETECTRON2_BACKBONE = "detectron2-backbone"

# Written by tools/compress_backbone.py --from-d2 instead of model.safetensors.
_D2_MODEL_FILE = "model.pth"


@dataclass
class ExportSubject:
    """A loaded model ready to export.

    Attributes:
        kind: ``CLASSIFIER`` (torchvision ResNet-50, images -> logits) or
            ``DETECTRON2_BACKBONE`` (bottom-up ResNet + FPN, images -> p2..p6).
        model: the exported module, in eval mode on the CPU.
        spec: the compression spec written next to the weights (no layers for
            an uncompressed model).
        fpn_spec: the FPN spec of a backbone whose FPN has CoDeC convs
            (``build_codec_resnet_fpn_backbone`` with ``MODEL.CODEC.FPN_SPEC``), else None.
        output_names: names of the model's outputs, in order.
        size_multiple: input height and width must be multiples of this.
        source: the input files, for the report.
        cfg: the Detectron2 config (Detectron2 subjects only).
        detector: the whole R-CNN the backbone belongs to (Detectron2 subjects only).
    """

    kind: str
    model: nn.Module
    spec: CompressionSpec
    output_names: list[str]
    size_multiple: int
    source: dict[str, Any]
    cfg: Any = None
    detector: nn.Module | None = None
    fpn_spec: CompressionSpec | None = None


def _uncompressed_spec(**metadata: Any) -> CompressionSpec:
    return CompressionSpec(architecture="resnet50", metadata={"uncompressed": True, **metadata})


def load_classifier(path: str | os.PathLike) -> ExportSubject:
    """Load a torchvision ResNet-50 classifier.

    Args:
        path: a directory written by ``tools/compress_backbone.py``
            (``spec.json`` and ``model.safetensors``), or the state-dict file of
            an uncompressed torchvision ResNet-50 (``.safetensors``, or a torch
            file read without unpickling objects).

    Raises:
        FileNotFoundError: the path or a file inside it is missing.
        SpecError: the spec is invalid or does not match the weights.
        ValueError: a file is unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"--compressed {path} not found: give a directory written by tools/compress_backbone.py "
            "or an uncompressed ResNet-50 state-dict file"
        )
    model = torchvision.models.resnet50()
    if path.is_dir():
        spec_file, weights = path / SPEC_FILE, path / MODEL_FILE
        if not spec_file.is_file():
            raise FileNotFoundError(f"{path} has no {SPEC_FILE}; give a directory written by tools/compress_backbone.py")
        if not weights.is_file():
            if (path / _D2_MODEL_FILE).is_file():
                raise ValueError(
                    f"{path} contains a Detectron2 checkpoint ({_D2_MODEL_FILE}, from tools/compress_backbone.py "
                    "--from-d2), not a classifier: export it with --config-file CFG --weights "
                    f"{path / _D2_MODEL_FILE}"
                )
            raise FileNotFoundError(f"{path} has {SPEC_FILE} but no {MODEL_FILE}; re-run tools/compress_backbone.py")
        spec = CompressionSpec.load(spec_file)
        apply_spec(model, spec)
        load_weights_strict(model, load_state_dict_file(weights), str(weights))
        source = {"compressed": str(path)}
    else:
        load_weights_strict(model, load_state_dict_file(path), str(path))
        spec = _uncompressed_spec()
        source = {"weights": str(path)}
    model.eval()
    return ExportSubject(
        kind=CLASSIFIER,
        model=model,
        spec=spec,
        output_names=["logits"],
        size_multiple=1,
        source=source,
    )


def rebuild_classifier(spec: CompressionSpec, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Build a ResNet-50 from ``spec`` and load ``state`` strictly (the round trip of the saved weights)."""
    model = torchvision.models.resnet50()
    apply_spec(model, spec)
    load_weights_strict(model, state, source)
    return model.eval()


def _detectron2_config(config_file: str | os.PathLike, weights: str | os.PathLike, opts: list[str]):
    from detectron2.config import get_cfg

    from codec_det.d2 import add_codec_config

    config_file, weights = Path(config_file), Path(weights)
    if not config_file.is_file():
        raise FileNotFoundError(f"--config-file {config_file} not found")
    if not weights.is_file():
        raise FileNotFoundError(
            f"--weights {weights} not found; give a Detectron2 checkpoint (tools/train_net.py or tools/convert_to_d2.py)"
        )
    if len(opts) % 2:
        raise ValueError(f"config options must be KEY VALUE pairs, got {len(opts)} items: {opts}")
    cfg = get_cfg()
    add_codec_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def _strict_checkpointer(model: nn.Module, weights: str, required_prefix: str):
    """Build a ``CoDeCCheckpointer`` that also requires every weight under ``required_prefix`` to be in ``weights``."""
    from codec_det.d2 import CoDeCCheckpointer

    class _ExportCheckpointer(CoDeCCheckpointer):
        def _load_model(self, checkpoint):
            incompatible = super()._load_model(checkpoint)
            missing = sorted(
                key for key in incompatible.missing_keys
                if key.startswith(required_prefix) and not key.endswith("num_batches_tracked")
            )
            shapes = [key for key, *_ in incompatible.incorrect_shapes if key.startswith(required_prefix)]
            if missing or shapes:
                listed_keys = ", ".join((missing + shapes)[:10])
                more = len(missing) + len(shapes) - 10
                raise SpecError(
                    f"checkpoint {weights} lacks weights of the exported model under "
                    f"{required_prefix or '(no prefix)'!r}: {listed_keys}{f' and {more} more' if more > 0 else ''}. "
                    "A checkpoint from tools/convert_to_d2.py holds only the ResNet; export a trained detector "
                    "checkpoint (tools/train_net.py writes OUTPUT_DIR/model_final.pth)"
                )
            return incompatible

    return _ExportCheckpointer(model)


def load_detectron2(
    config_file: str | os.PathLike,
    weights: str | os.PathLike,
    opts: list[str] | None = None,
    *,
    full_detector: bool = False,
) -> ExportSubject:
    """Build the R-CNN of a Detectron2 config on the CPU and load its checkpoint strictly.

    The backbone may be a CoDeC one (``build_codec_resnet_fpn_backbone``) or
    Detectron2's own. Every backbone weight (every model weight with
    ``full_detector``) must be in the checkpoint, and a CoDeC backbone's spec
    must match it (``MODEL.CODEC.SPEC`` or the spec the checkpoint carries).

    Raises:
        FileNotFoundError: the config or checkpoint is missing.
        SpecError: the spec does not match the checkpoint, or weights are missing.
        ValueError: a file is unreadable or an option is invalid.
    """
    from detectron2.modeling import build_model

    cfg = _detectron2_config(config_file, weights, list(opts or []))
    model = build_model(cfg).eval()
    backbone = model.backbone
    if not hasattr(backbone, "bottom_up"):
        raise ValueError(
            f"MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME} builds a {type(backbone).__name__} without an FPN; "
            "export supports R50-FPN backbones (build_codec_resnet_fpn_backbone or build_resnet_fpn_backbone)"
        )

    checkpointer = _strict_checkpointer(model, str(weights), "" if full_detector else "backbone.")
    checkpointer.load(str(weights))
    model.eval()

    spec = getattr(backbone.bottom_up, "codec_spec", None)
    stride_in_1x1 = bool(cfg.MODEL.RESNETS.STRIDE_IN_1X1)
    if spec is None:
        spec = _uncompressed_spec(stride_in_1x1=stride_in_1x1)
    else:
        spec = copy.deepcopy(spec)
        spec.metadata["stride_in_1x1"] = stride_in_1x1
    fpn_spec = getattr(backbone, "codec_fpn_spec", None)

    return ExportSubject(
        kind=DETECTRON2_BACKBONE,
        model=backbone,
        spec=spec,
        output_names=list(backbone._out_features),
        size_multiple=max(1, int(backbone.size_divisibility)),
        source={"config_file": str(config_file), "weights": str(weights), "opts": list(opts or [])},
        cfg=cfg,
        detector=model,
        fpn_spec=copy.deepcopy(fpn_spec),
    )


def rebuild_detectron2_backbone(
    cfg,
    spec_file: str | os.PathLike,
    state: dict[str, torch.Tensor],
    source: str,
    fpn_spec_file: str | os.PathLike | None = None,
) -> nn.Module:
    """Build the backbone of ``cfg`` from saved specs and load ``state`` strictly (the round trip of the saved weights).

    ``fpn_spec_file`` is the FPN spec of a compressed FPN; None builds a dense FPN.
    """
    from detectron2.modeling import build_backbone

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""
    if cfg.MODEL.BACKBONE.NAME.startswith("build_codec_"):
        cfg.MODEL.CODEC.SPEC = str(spec_file)
        cfg.MODEL.CODEC.FPN_SPEC = "" if fpn_spec_file is None else str(fpn_spec_file)
    backbone = build_backbone(cfg)
    load_weights_strict(backbone, state, source)
    return backbone.eval()
