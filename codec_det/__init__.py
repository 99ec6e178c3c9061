"""codec-det: CoDeC coupled filters decomposition for compressed detection backbones.

The core (decomposition, compressed layer, spec, surgery) needs only torch.
Importing this package also registers the Detectron2 backbones when
Detectron2 is installed.
"""

from codec_det.checkpoint import load_compressed, save_compressed
from codec_det.compress import CompressionResult, compress_model, plan_compression
from codec_det.layers.codec_conv import CoDeCConv2d
from codec_det.presets import PRESETS, get_preset
from codec_det.spec import CompressionSpec, LayerSpec, SpecError

__all__ = [
    "CoDeCConv2d",
    "CompressionResult",
    "CompressionSpec",
    "LayerSpec",
    "PRESETS",
    "SpecError",
    "compress_model",
    "get_preset",
    "load_compressed",
    "plan_compression",
    "save_compressed",
]

__version__ = "0.1.0"

# The Detectron2 integration registers its backbones on import. Without
# Detectron2 the core above works on its own.
try:
    import detectron2  # noqa: F401
except ImportError:
    pass
else:
    from codec_det.d2 import (
        CoDeCCheckpointer,
        add_codec_config,
        build_codec_resnet_backbone,
        build_codec_resnet_fpn_backbone,
        load_codec_checkpoint,
    )

    __all__ += [
        "CoDeCCheckpointer",
        "add_codec_config",
        "build_codec_resnet_backbone",
        "build_codec_resnet_fpn_backbone",
        "load_codec_checkpoint",
    ]
