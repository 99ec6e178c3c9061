"""TorchScript export of a whole Detectron2 R-CNN through Detectron2's ``TracingAdapter``.

The traced module takes one image, a float tensor (3, H, W) in the
``INPUT.FORMAT`` channel order and 0-255 range. The model's own
preprocessing (normalisation, padding to ``size_divisibility``) is inside the
graph. It returns the fields of the predicted ``Instances`` flattened to a
tuple of tensors, in the order of Detectron2's ``flatten_to_tuple``: boxes
(R, 4), scores (R,), classes (R,), then masks (R, 1, 28, 28) for Mask R-CNN
or keypoints (R, K, 3) and heatmaps for Keypoint R-CNN. Boxes are in the
input image's coordinates; masks are the ROI masks before pasting, since
Detectron2's ``do_postprocess=False`` path is used.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from codec_det.export.torchscript import quiet_jit_deprecation

__all__ = ["detector_adapter", "trace_detector"]

logger = logging.getLogger(__name__)


def _inference(model: nn.Module, inputs: list[dict[str, torch.Tensor]]):
    instances = model.inference(inputs, do_postprocess=False)[0]
    return [{"instances": instances}]


def detector_adapter(model: nn.Module, image: torch.Tensor) -> nn.Module:
    """Wrap a ``GeneralizedRCNN`` so that it maps an image (3, H, W) to a tuple of tensors."""
    from detectron2.export import TracingAdapter
    from detectron2.modeling import GeneralizedRCNN

    if not isinstance(model, GeneralizedRCNN):
        raise ValueError(
            f"--full-detector supports Detectron2's GeneralizedRCNN (Faster, Mask, Keypoint R-CNN), "
            f"not {type(model).__name__}"
        )
    if image.dim() != 3:
        raise ValueError(f"the detector takes one image (3, H, W), got shape {tuple(image.shape)}")
    return TracingAdapter(model.eval(), [{"image": image}], _inference)


def trace_detector(model: nn.Module, image: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace the whole R-CNN on ``image`` (3, H, W) with ``TracingAdapter``."""
    adapter = detector_adapter(model, image)
    with torch.no_grad(), quiet_jit_deprecation():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    logger.info("traced %s on an image of %s", type(model).__name__, tuple(image.shape))
    return traced
