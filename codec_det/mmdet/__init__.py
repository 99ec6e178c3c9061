"""MMDetection integration: the CoDeC ResNet-50 backbone.

Importing this package registers ``CoDeCResNet`` in ``mmdet.registry.MODELS``.
It needs mmdet 3.3.0, mmengine 0.10.7 and mmcv 2.1.0 (``pip install -e .[mmdet]``
after ``bash tools/build_mmcv_wheel.sh``, or ``bash tools/setup_env.sh --with-mmdet``).
``import codec_det`` does not import it.
"""

from codec_det.mmdet.backbone import CoDeCResNet, resolve_backbone_spec
from codec_det.mmdet.structure import apply_codec_spec, spec_style
from codec_det.mmdet.weights import load_backbone_weights

__all__ = ["CoDeCResNet", "apply_codec_spec", "load_backbone_weights", "resolve_backbone_spec", "spec_style"]
