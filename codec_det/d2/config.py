"""Config keys of the CoDeC backbone (``MODEL.CODEC``) and how its spec is found."""

from __future__ import annotations

import logging

from detectron2.config import CfgNode

from codec_det.d2.checkpoint import weights_codec_spec
from codec_det.spec import BUNDLED_SPECS, CompressionSpec, SpecError, resolve_spec

__all__ = ["add_codec_config", "resolve_codec_spec"]

logger = logging.getLogger(__name__)


def add_codec_config(cfg: CfgNode) -> CfgNode:
    """Add the ``MODEL.CODEC`` keys to a Detectron2 config, in place; a config that has them is left as it is.

    ``MODEL.CODEC.SPEC`` is the structure of the compressed backbone:

    - a ``spec.json`` path, or a directory written by ``tools/compress_backbone.py``;
    - a bundled preset, ``"codec-45"`` or ``"codec-66"`` (structure only, for training from scratch);
    - ``""``: the spec stored in ``MODEL.WEIGHTS`` when that file is a codec-det
      checkpoint (``tools/convert_to_d2.py``), else an uncompressed ResNet-50.
    """
    if "CODEC" in cfg.MODEL:
        return cfg
    cfg.MODEL.CODEC = CfgNode()
    cfg.MODEL.CODEC.SPEC = ""
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
