"""Detectron2's FPN with its lateral and output convs optionally replaced by CoDeC layers.

The FPN spec is a ``CompressionSpec`` with architecture ``"d2-fpn"`` whose
layer names are Detectron2's FPN module names: ``fpn_lateral2`` to
``fpn_lateral5`` (1x1, ResNet channels to 256) and ``fpn_output2`` to
``fpn_output5`` (3x3, 256 to 256). Without a spec the FPN is Detectron2's.
"""

from __future__ import annotations

import logging
import math

from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling.backbone import FPN, Backbone
from torch import nn

from codec_det.d2.layers import CoDeCNormConv2d
from codec_det.spec import CompressionSpec, LayerSpec, SpecError
from codec_det.surgery import set_submodule

__all__ = [
    "FPN_ARCHITECTURE",
    "CoDeCFPN",
    "FeatureShapes",
    "fpn_conv_names",
    "apply_fpn_spec",
]

logger = logging.getLogger(__name__)

FPN_ARCHITECTURE = "d2-fpn"


def fpn_conv_names(fpn: FPN) -> list[str]:
    """List the FPN's lateral and output conv names (``fpn_lateral2``, ..., ``fpn_output5``)."""
    return [name for name in fpn._modules if name.startswith(("fpn_lateral", "fpn_output"))]


class CoDeCFPN(FPN):
    """Detectron2's ``FPN`` with the convs named in a CoDeC FPN spec replaced by ``CoDeCNormConv2d`` layers.

    State-dict keys are those of Detectron2's FPN except under each
    compressed conv, which stores the CoDeC factors
    (``fpn_output2.input_factors``) and keeps its norm
    (``fpn_output2.norm.weight``) when ``norm`` is set.

    Detectron2's ``FPN.forward`` runs the convs from the plain lists
    ``lateral_convs`` and ``output_convs``. Here assigning a new module to a
    conv's attribute (``setattr``, as ``to_deploy_form`` and model surgery
    do) also puts it in those lists, so the replacement is the conv that runs.

    Args:
        bottom_up, in_features, out_channels, norm, top_block, fuse_type,
            square_pad: as for Detectron2's ``FPN``.
        spec: structure of the compressed FPN convs (architecture
            ``"d2-fpn"``); None builds Detectron2's dense FPN.
    """

    def __init__(
        self,
        bottom_up: Backbone,
        in_features: list[str],
        out_channels: int,
        norm: str = "",
        top_block: nn.Module | None = None,
        fuse_type: str = "sum",
        square_pad: int = 0,
        *,
        spec: CompressionSpec | None = None,
    ):
        super().__init__(
            bottom_up,
            in_features,
            out_channels,
            norm=norm,
            top_block=top_block,
            fuse_type=fuse_type,
            square_pad=square_pad,
        )
        self._lateral_conv_names = [self._registered_name(conv) for conv in self.lateral_convs]
        self._output_conv_names = [self._registered_name(conv) for conv in self.output_convs]
        self.codec_fpn_spec = spec
        if spec is not None:
            apply_fpn_spec(self, spec)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if isinstance(value, nn.Module) and name.startswith(("fpn_lateral", "fpn_output")):
            names = self.__dict__.get("_lateral_conv_names", [])
            if name in names:
                self.lateral_convs = [getattr(self, conv_name) for conv_name in names]
            names = self.__dict__.get("_output_conv_names", [])
            if name in names:
                self.output_convs = [getattr(self, conv_name) for conv_name in names]

    def _registered_name(self, conv: nn.Module) -> str:
        for name, module in self._modules.items():
            if module is conv:
                return name
        raise ValueError(f"{type(conv).__name__} is not a direct submodule of this FPN")


def apply_fpn_spec(fpn: FPN, spec: CompressionSpec) -> FPN:
    """Replace the FPN convs named in ``spec`` by uninitialised ``CoDeCNormConv2d`` layers, in place.

    Each conv's norm and activation move into its replacement. Raises
    ``SpecError`` naming the layer when the spec is not an FPN spec, names a
    module that is no dense FPN conv, or describes another geometry.
    """
    if spec.architecture != FPN_ARCHITECTURE:
        raise SpecError(
            f"the FPN spec has architecture {spec.architecture!r}, expected {FPN_ARCHITECTURE!r}: "
            "MODEL.CODEC.FPN_SPEC takes FPN specs (fpn_spec.json of tools/compress_backbone.py --from-d2 "
            "--fpn-preset, or a bundled preset); ResNet specs go to MODEL.CODEC.SPEC"
        )
    names = fpn_conv_names(fpn)
    for name, entry in spec.layers.items():
        conv = getattr(fpn, name, None) if name in names else None
        if type(conv) is not Conv2d:
            found = "no conv of this FPN" if conv is None else f"a {type(conv).__name__}, not a dense Conv2d"
            raise SpecError(f"FPN spec layer {name} is {found}; the FPN has {', '.join(names)}")
        _check_geometry(name, conv, entry)

        layer = CoDeCNormConv2d.from_spec(entry, name, norm=conv.norm, activation=conv.activation)
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        set_submodule(fpn, name, layer)
    return fpn


def _check_geometry(name: str, conv: Conv2d, entry: LayerSpec) -> None:
    mismatch = entry.geometry_mismatch(conv)
    if not mismatch:
        return
    message = f"FPN spec layer {name} does not match the model's conv: {LayerSpec.describe_mismatch(mismatch)}"
    if "bias" in mismatch:
        message += (
            "; Detectron2's FPN convs have a bias only when MODEL.FPN.NORM is \"\", so set MODEL.FPN.NORM "
            "as the spec was made"
        )
    else:
        message += "; the spec was made for another FPN (MODEL.FPN.OUT_CHANNELS, MODEL.FPN.IN_FEATURES)"
    raise SpecError(message)


class FeatureShapes(Backbone):
    """A bottom-up stand-in that returns zero feature maps with a ResNet's shapes, to run an FPN alone.

    The MACs count and the rank planning of an FPN need the shapes of its
    inputs, not their values, so this stand-in skips the ResNet's cost.

    Args:
        shapes: channels and stride of each feature map, e.g. ``{"res2": ShapeSpec(channels=256, stride=4)}``.
    """

    def __init__(self, shapes: dict[str, ShapeSpec]):
        super().__init__()
        self._shapes = dict(shapes)
        self._out_features = list(shapes)
        self._out_feature_channels = {name: shape.channels for name, shape in shapes.items()}
        self._out_feature_strides = {name: shape.stride for name, shape in shapes.items()}

    def forward(self, x):
        """Map images (B, C, H, W) to zero maps (B, channels, ceil(H / stride), ceil(W / stride))."""
        batch, _, height, width = x.shape
        return {
            name: x.new_zeros(batch, shape.channels, math.ceil(height / shape.stride), math.ceil(width / shape.stride))
            for name, shape in self._shapes.items()
        }

    def output_shape(self) -> dict[str, ShapeSpec]:
        return dict(self._shapes)
