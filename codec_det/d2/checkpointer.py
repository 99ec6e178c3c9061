"""Strict loading of CoDeC backbone weights through Detectron2's checkpointer.

Detectron2's ``DetectionCheckpointer`` only logs a warning for weights that
are missing from a checkpoint and leaves them at their random initial
values. For a compressed backbone that usually means a checkpoint made for
another spec, and training would go on with random factors, so
``CoDeCCheckpointer`` raises instead, naming the keys.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling.backbone import ResNet
from torch import nn

from codec_det.d2.checkpoint import FPN_SPEC_KEY, SPEC_KEY
from codec_det.d2.fpn import CoDeCFPN, fpn_conv_names
from codec_det.spec import CompressionSpec, SpecError

__all__ = ["CoDeCCheckpointer", "codec_backbones", "codec_fpns", "load_codec_checkpoint"]

logger = logging.getLogger(__name__)

# Keys shown per kind of mismatch in an error message.
_MAX_KEYS_SHOWN = 10


def codec_backbones(model: nn.Module) -> dict[str, ResNet]:
    """Find the CoDeC ResNets in ``model``, by state-dict prefix (``"backbone.bottom_up."``).

    A CoDeC ResNet is a Detectron2 ``ResNet`` with a ``codec_spec`` attribute
    (``CoDeCResNet``); the spec may be None for an uncompressed one.
    """
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, ResNet) and hasattr(module, "codec_spec"):
            found[f"{name}." if name else ""] = module
    return found


def codec_fpns(model: nn.Module) -> dict[str, CoDeCFPN]:
    """Find the FPNs built by ``build_codec_resnet_fpn_backbone`` in ``model``, by state-dict prefix (``"backbone."``)."""
    return {f"{name}." if name else "": module for name, module in model.named_modules() if isinstance(module, CoDeCFPN)}


def _key_details(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    def shown(keys: list[str]) -> str:
        more = f" and {len(keys) - _MAX_KEYS_SHOWN} more" if len(keys) > _MAX_KEYS_SHOWN else ""
        return ", ".join(keys[:_MAX_KEYS_SHOWN]) + more

    details = []
    if missing:
        details.append(f"missing from the checkpoint: {shown(missing)}")
    if unexpected:
        details.append(f"in the checkpoint but not in the model: {shown(unexpected)}")
    if shapes:
        details.append(f"with other shapes: {shown(shapes)}")
    return "; ".join(details)


def _mismatch_message(prefix: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    return (
        f"the checkpoint's backbone weights under {prefix or '(no prefix)'!r} do not match the CoDeC backbone "
        f"({_key_details(missing, unexpected, shapes)}). Convert the weights with tools/convert_to_d2.py (or "
        "tools/compress_backbone.py --from-d2) and set MODEL.CODEC.SPEC to the spec they were made with, or \"\" "
        "to use the spec they store"
    )


def _fpn_mismatch_message(fpn: CoDeCFPN, missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    spec = fpn.codec_fpn_spec
    built = "a dense FPN" if spec is None else f"an FPN with {len(spec.layers)} CoDeC convs"
    return (
        f"the checkpoint's FPN weights do not match the model's FPN, built as {built} "
        f"({_key_details(missing, unexpected, shapes)}). Set MODEL.CODEC.FPN_SPEC to the FPN spec the weights were "
        "made with, or \"\" to use the FPN spec the checkpoint stores; a dense FPN checkpoint gets a compressed FPN "
        "from tools/compress_backbone.py --from-d2 CKPT --config CFG --fpn-preset PRESET"
    )


class CoDeCCheckpointer(DetectionCheckpointer):
    """A ``DetectionCheckpointer`` that requires exact backbone weights and saves the backbone's spec.

    Loading raises ``SpecError`` when any weight of a CoDeC ResNet in the model
    is missing from the checkpoint, has another shape, or when the
    checkpoint has weights under the ResNet's prefix that the model lacks
    (BatchNorm's ``num_batches_tracked`` counters excepted). Other modules
    (FPN, heads) load as in Detectron2, so ImageNet backbone weights still
    start a detector. The exception is a ``CoDeCFPN``. When the checkpoint
    has any weight of its lateral or output convs, every such weight must
    match, as for the ResNet. A checkpoint without FPN weights leaves the FPN
    at its initial values. Saving stores the ResNet's spec under
    ``"codec_spec"`` and the FPN's under ``"codec_fpn_spec"``, so that
    ``MODEL.CODEC.SPEC ""`` and ``MODEL.CODEC.FPN_SPEC ""`` rebuild the model
    from the saved file.
    """

    def load(self, path: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().load(path, *args, **kwargs)
        finally:
            # DetectionCheckpointer resets this only on success; a later load asserts it is None.
            self._parsed_url_during_load = None

    def _torch_load(self, f: str) -> dict[str, Any]:
        try:
            return super()._torch_load(f)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
            raise ValueError(f"checkpoint {f} is truncated or not a torch checkpoint: {error}") from None

    def _load_model(self, checkpoint: dict[str, Any]):
        # Detectron2 drops keys of the wrong shape from the dict it loads, so list the keys first.
        checkpoint_keys = list(checkpoint.get("model", {}))
        incompatible = super()._load_model(checkpoint)
        for prefix in codec_backbones(self.model):
            missing = [
                key for key in incompatible.missing_keys
                if key.startswith(prefix) and not key.endswith("num_batches_tracked")
            ]
            unexpected = [
                key for key in incompatible.unexpected_keys
                if key.startswith(prefix) and not key.endswith("num_batches_tracked")
            ]
            shapes = [
                f"{key} (checkpoint {tuple(file_shape)}, model {tuple(model_shape)})"
                for key, file_shape, model_shape in incompatible.incorrect_shapes
                if key.startswith(prefix)
            ]
            if missing or unexpected or shapes:
                raise SpecError(_mismatch_message(prefix, sorted(missing), sorted(unexpected), shapes))
        self._check_fpns(checkpoint_keys, incompatible)
        return incompatible

    def _check_fpns(self, checkpoint_keys: list[str], incompatible) -> None:
        for prefix, fpn in codec_fpns(self.model).items():
            conv_prefixes = tuple(f"{prefix}{name}." for name in fpn_conv_names(fpn))
            if not any(key.startswith(conv_prefixes) for key in checkpoint_keys):
                if fpn.codec_fpn_spec is not None:
                    logger.info(
                        "the checkpoint has no FPN weights: the %d CoDeC FPN convs keep their random initial factors",
                        len(fpn.codec_fpn_spec.layers),
                    )
                continue
            missing = sorted(key for key in incompatible.missing_keys if key.startswith(conv_prefixes))
            unexpected = sorted(key for key in incompatible.unexpected_keys if key.startswith(conv_prefixes))
            shapes = [
                f"{key} (checkpoint {tuple(file_shape)}, model {tuple(model_shape)})"
                for key, file_shape, model_shape in incompatible.incorrect_shapes
                if key.startswith(conv_prefixes)
            ]
            if missing or unexpected or shapes:
                raise SpecError(_fpn_mismatch_message(fpn, missing, unexpected, shapes))

    def save(self, name: str, **kwargs: Any) -> None:
        specs = [module.codec_spec for module in codec_backbones(self.model).values()]
        if len(specs) == 1 and SPEC_KEY not in kwargs:
            spec: CompressionSpec | None = specs[0]
            kwargs[SPEC_KEY] = None if spec is None else spec.to_dict()
        fpn_specs = [module.codec_fpn_spec for module in codec_fpns(self.model).values()]
        if len(fpn_specs) == 1 and FPN_SPEC_KEY not in kwargs:
            fpn_spec: CompressionSpec | None = fpn_specs[0]
            kwargs[FPN_SPEC_KEY] = None if fpn_spec is None else fpn_spec.to_dict()
        super().save(name, **kwargs)


def load_codec_checkpoint(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load a Detectron2 checkpoint into ``model`` with ``CoDeCCheckpointer``; returns the checkpoint's other entries.

    Raises:
        SpecError: the backbone weights do not match the model (see ``CoDeCCheckpointer``).
        ValueError: the file is truncated or not a torch checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    return CoDeCCheckpointer(model).load(path)
