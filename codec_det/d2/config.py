"""Config keys of the CoDeC backbone (``MODEL.CODEC``) and how its spec is found."""

from __future__ import annotations

import logging

from detectron2.config import CfgNode

from codec_det.d2.checkpoint import weights_codec_spec, weights_fpn_spec
from codec_det.spec import BUNDLED_FPN_SPECS, BUNDLED_SPECS, CompressionSpec, SpecError, resolve_spec

__all__ = ["FPN_SPEC_FILE", "add_codec_config", "resolve_codec_spec", "resolve_codec_fpn_spec"]

# The FPN spec file that tools/compress_backbone.py --from-d2 and tools/export_backbone.py write.
FPN_SPEC_FILE = "fpn_spec.json"

logger = logging.getLogger(__name__)


def add_codec_config(cfg: CfgNode) -> CfgNode:
    """Add the ``MODEL.CODEC`` keys to a Detectron2 config, in place; a config that has them is left as it is.

    ``MODEL.CODEC.SPEC`` is the structure of the compressed backbone:

    - a ``spec.json`` path, or a directory written by ``tools/compress_backbone.py``;
    - a bundled preset, ``"codec-45"`` or ``"codec-66"`` (structure only, for training from scratch);
    - ``""``: the spec stored in ``MODEL.WEIGHTS`` when that file is a codec-det
      checkpoint (``tools/convert_to_d2.py``), else an uncompressed ResNet-50.

    ``MODEL.CODEC.FPN_SPEC`` is the structure of the compressed FPN, read by
    ``build_codec_resnet_fpn_backbone`` only:

    - a spec path, or a directory holding ``fpn_spec.json``
      (``tools/compress_backbone.py --from-d2 --fpn-preset``);
    - a bundled preset, ``"codec-45"`` or ``"codec-66"`` (structure only, 45%
      or 66% fewer FPN MACs at 800x1216);
    - ``""`` (the default): the FPN spec stored in ``MODEL.WEIGHTS`` when that
      checkpoint stores one, else Detectron2's dense FPN.
    """
    if "CODEC" not in cfg.MODEL:
        cfg.MODEL.CODEC = CfgNode()
        cfg.MODEL.CODEC.SPEC = ""
    if "FPN_SPEC" not in cfg.MODEL.CODEC:
        cfg.MODEL.CODEC.FPN_SPEC = ""
    return cfg


def resolve_codec_spec(cfg: CfgNode) -> CompressionSpec | None:
    """Return the spec the backbone of ``cfg`` is built with, or None for an uncompressed backbone.

    Raises:
        FileNotFoundError: ``MODEL.CODEC.SPEC`` names no file, directory or preset.
        SpecError: the spec is invalid, or differs from the spec stored in ``MODEL.WEIGHTS``.
        ValueError: ``MODEL.WEIGHTS`` is a truncated or unreadable torch file.
    """
    if "CODEC" not in cfg.MODEL:
        raise KeyError("the config has no MODEL.CODEC keys: call codec_det.add_codec_config(cfg) before merging files")
    value = cfg.MODEL.CODEC.SPEC
    weights = cfg.MODEL.WEIGHTS
    carries_spec, carried = weights_codec_spec(weights)

    if not value:
        if carries_spec:
            layers = 0 if carried is None else len(carried.layers)
            logger.info("using the spec stored in MODEL.WEIGHTS %s (%d compressed convs)", weights, layers)
            return carried
        return None

    try:
        spec = resolve_spec(value)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"MODEL.CODEC.SPEC {value!r} not found: set it to a spec.json path, a directory written by "
            f"tools/compress_backbone.py, a bundled preset ({', '.join(sorted(BUNDLED_SPECS))}), or \"\" to use "
            "the spec stored in a checkpoint written by tools/convert_to_d2.py"
        ) from None
    except SpecError as error:
        raise SpecError(f"MODEL.CODEC.SPEC {value}: {error}") from None

    if carries_spec and _structure(carried) != _structure(spec):
        raise SpecError(
            f"MODEL.CODEC.SPEC {value} describes another backbone than the spec stored in MODEL.WEIGHTS {weights}; "
            "set MODEL.CODEC.SPEC \"\" to use the checkpoint's spec, or give weights made with this spec"
        )
    return spec


def _structure(spec: CompressionSpec | None) -> dict:
    """Return the per-layer entries that decide the modules built and how they run (permutations included)."""
    return {} if spec is None else spec.to_dict()["layers"]


def resolve_codec_fpn_spec(cfg: CfgNode) -> CompressionSpec | None:
    """Return the FPN spec the backbone of ``cfg`` is built with, or None for Detectron2's dense FPN.

    A bundled preset is made for an FPN without norm, whose convs have a
    bias. With ``MODEL.FPN.NORM`` set, the preset's layers are built without
    bias, as Detectron2 builds the FPN convs then; groups and ranks stay.

    Raises:
        FileNotFoundError: ``MODEL.CODEC.FPN_SPEC`` names no file, directory or preset.
        SpecError: the spec is invalid, or differs from the FPN spec stored in ``MODEL.WEIGHTS``.
        ValueError: ``MODEL.WEIGHTS`` is a truncated or unreadable torch file.
    """
    if "CODEC" not in cfg.MODEL or "FPN_SPEC" not in cfg.MODEL.CODEC:
        raise KeyError("the config has no MODEL.CODEC.FPN_SPEC key: call codec_det.add_codec_config(cfg) before merging files")
    value = cfg.MODEL.CODEC.FPN_SPEC
    weights = cfg.MODEL.WEIGHTS
    carries_spec, carried = weights_fpn_spec(weights)

    if not value:
        if carries_spec and carried is not None:
            logger.info("using the FPN spec stored in MODEL.WEIGHTS %s (%d compressed convs)", weights, len(carried.layers))
        return carried

    try:
        spec = resolve_spec(value, bundled=BUNDLED_FPN_SPECS, spec_file=FPN_SPEC_FILE)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"MODEL.CODEC.FPN_SPEC {value!r} not found: set it to an FPN spec path, a directory holding "
            f"{FPN_SPEC_FILE} (tools/compress_backbone.py --from-d2 --fpn-preset), a bundled preset "
            f"({', '.join(sorted(BUNDLED_FPN_SPECS))}), or \"\" for the FPN spec stored in MODEL.WEIGHTS"
        ) from None
    except SpecError as error:
        raise SpecError(f"MODEL.CODEC.FPN_SPEC {value}: {error}") from None

    if str(value) in BUNDLED_FPN_SPECS and cfg.MODEL.FPN.NORM:
        for entry in spec.layers.values():
            entry.bias = False
    if carries_spec and _structure(carried) != _structure(spec):
        stored = "a dense FPN" if carried is None else f"an FPN spec with {len(carried.layers)} compressed convs"
        raise SpecError(
            f"MODEL.CODEC.FPN_SPEC {value} describes another FPN than MODEL.WEIGHTS {weights}, which stores "
            f"{stored}; set MODEL.CODEC.FPN_SPEC \"\" to use the checkpoint's FPN, or compress the checkpoint's "
            "FPN with tools/compress_backbone.py --from-d2 CKPT --config CFG --fpn-preset PRESET"
        )
    return spec
