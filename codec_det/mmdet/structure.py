"""Checks that an MMDetection ResNet can carry a CoDeC spec, and the conv replacement itself.

MMDetection's ResNet-50 with ``norm_cfg`` of type ``BN`` or ``SyncBN`` uses
torchvision's module names (``conv1``, ``bn1``, ``layer1.0.conv2``,
``layer1.0.bn2``, ``layer1.0.downsample.0``), which are the names in specs
and in ``tools/compress_backbone.py`` weights, so no renaming is needed.
"""

from __future__ import annotations

import inspect
import re

from mmdet.models.backbones import ResNet
from torch import nn

from codec_det.spec import CompressionSpec, LayerSpec, SpecError
from codec_det.surgery import build_layer, set_submodule

__all__ = ["check_resnet_arguments", "spec_style", "check_style", "apply_codec_spec"]

_FIRST_BLOCK_CONV = re.compile(r"^layer[2-4]\.0\.conv([12])$")

# ResNet arguments that change module names or the graph around the convs.
# Each maps to the only value the CoDeC backbone builds, and the reason.
_FIXED_ARGUMENTS = {
    "depth": (50, "specs and weights describe ResNet-50"),
    "num_stages": (4, "the spec compresses convs in all four stages"),
    "base_channels": (64, "the spec's channel counts are ResNet-50's"),
    "deep_stem": (False, "a deep stem renames conv1/bn1 to stem.*, so the weights' keys would not match"),
    "avg_down": (False, "avg_down renames the shortcut conv to downsample.1, so the spec's names would not match"),
    "dcn": (None, "a deformable conv2 cannot be replaced by a CoDeC layer"),
    "conv_cfg": (None, "the CoDeC layers replace plain nn.Conv2d layers only"),
    "plugins": (None, "a plugin after conv1 or conv2 would see the group order of a folded permutation"),
}


# The keyword arguments of MMDetection's ResNet, which CoDeCResNet passes on.
_RESNET_ARGUMENTS = frozenset(inspect.signature(ResNet.__init__).parameters) - {"self"}

# ResNet-50 has 4 stages. MMDetection 3.3.0's ResNet asserts only max(out_indices) < 4,
# so a negative index is dropped without a message, and frozen_stages above 4
# fails with an AttributeError on layer5.
_NUM_STAGES = 4


def check_resnet_arguments(arguments: dict) -> None:
    """Reject MMDetection ``ResNet`` arguments that the CoDeC backbone does not build, naming the fix.

    Raises:
        ValueError: an argument is unknown, out of range, or differs from ResNet-50's plain layout.
    """
    unknown = sorted(set(arguments) - _RESNET_ARGUMENTS)
    if unknown:
        raise ValueError(
            f"CoDeCResNet: unknown arguments {unknown}; it takes spec, weights and the arguments of "
            f"MMDetection's ResNet ({', '.join(sorted(_RESNET_ARGUMENTS))})"
        )
    out_indices = arguments.get("out_indices", (0, 1, 2, 3))
    if (
        not isinstance(out_indices, (list, tuple))
        or not out_indices
        or any(type(index) is not int or not 0 <= index < _NUM_STAGES for index in out_indices)
    ):
        raise ValueError(
            f"CoDeCResNet: out_indices={out_indices!r} is invalid; give a non-empty tuple of stage indices "
            f"from 0 to {_NUM_STAGES - 1}, e.g. (0, 1, 2, 3)"
        )
    frozen_stages = arguments.get("frozen_stages", -1)
    if type(frozen_stages) is not int or not -1 <= frozen_stages <= _NUM_STAGES:
        raise ValueError(
            f"CoDeCResNet: frozen_stages={frozen_stages!r} is invalid; give an integer from -1 (nothing frozen) "
            f"to {_NUM_STAGES} (the stem and all stages frozen)"
        )
    for key, (value, reason) in _FIXED_ARGUMENTS.items():
        if key in arguments and arguments[key] != value:
            raise ValueError(f"CoDeCResNet: {key}={arguments[key]!r} is not supported ({reason}); set {key}={value!r}")
    stem_channels = arguments.get("stem_channels")
    if stem_channels not in (None, 64):
        raise ValueError(f"CoDeCResNet: stem_channels={stem_channels!r} is not supported; set stem_channels=64")


def spec_style(spec: CompressionSpec) -> str | None:
    """Return the MMDetection ``style`` that puts each stage's stride where the spec does.

    ``"caffe"`` puts the stride of a stage's first block in its 1x1 conv and
    ``"pytorch"`` in its 3x3 conv. The spec's ``metadata["stride_in_1x1"]``
    decides when present; otherwise the stride of a compressed
    ``layerK.0.conv1`` or ``conv2`` does. Returns None when the spec has neither.
    """
    stored = spec.metadata.get("stride_in_1x1")
    if isinstance(stored, bool):
        return "caffe" if stored else "pytorch"
    for name, entry in spec.layers.items():
        match = _FIRST_BLOCK_CONV.match(name)
        if match is not None and max(entry.stride) > 1:
            return "caffe" if match.group(1) == "1" else "pytorch"
    return None


def check_style(spec: CompressionSpec, style: str) -> None:
    """Raise ``SpecError`` when ``style`` places the stride elsewhere than the spec's weights expect."""
    expected = spec_style(spec)
    if expected is not None and style != expected:
        place = "1x1" if expected == "caffe" else "3x3"
        raise SpecError(
            f"CoDeCResNet: style={style!r}, but the spec puts the stride of each stage's first block "
            f"in its {place} conv: set style={expected!r}"
        )


def _check_geometry(name: str, conv: nn.Conv2d, entry: LayerSpec) -> None:
    mismatch = entry.geometry_mismatch(conv)
    if mismatch:
        raise SpecError(
            f"spec layer {name} does not match the conv of this ResNet: {LayerSpec.describe_mismatch(mismatch)}; "
            "the spec was made for another model, or strides or dilations differ from ResNet-50's"
        )


def apply_codec_spec(resnet: nn.Module, spec: CompressionSpec) -> nn.Module:
    """Replace the convs of an MMDetection ResNet-50 named in ``spec`` by uninitialised CoDeC layers, in place.

    Unlike ``codec_det.surgery.apply_spec``, which compares channels, kernel
    and stride, this checks padding, dilation and bias too, because ResNet's
    ``dilations`` argument changes them.

    Raises:
        SpecError: a spec name is no dense conv of this ResNet, or its geometry differs.
    """
    modules = dict(resnet.named_modules())
    for name, entry in spec.layers.items():
        conv = modules.get(name)
        if type(conv) is not nn.Conv2d:
            found = "no module" if conv is None else f"a {type(conv).__name__}"
            raise SpecError(f"spec layer {name} is {found} in this ResNet, not a dense nn.Conv2d; the spec was made for another model")
        if entry.method != "codec":
            raise SpecError(
                f"spec layer {name} has method {entry.method!r}; CoDeCResNet builds method 'codec' layers only"
            )
        _check_geometry(name, conv, entry)
        layer = build_layer(entry, name).to(device=conv.weight.device, dtype=conv.weight.dtype)
        set_submodule(resnet, name, layer)
    return resnet
