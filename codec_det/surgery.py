"""Model surgery: find the convs CoDeC can compress, swap modules, fold permutations.

Works on any model built from ``nn.Conv2d`` layers (torchvision ResNets,
VGG, MobileNet and the like). Everything that is not a replaced conv is kept
as it is.
"""

from __future__ import annotations

import logging

import torch
from torch import fx, nn

from codec_det.layers.codec_conv import CoDeCConv2d
from codec_det.spec import CODEC_LAYOUT, CompressionSpec, LayerSpec, SpecError

__all__ = [
    "compressible_convs",
    "set_submodule",
    "layer_spec",
    "build_layer",
    "apply_spec",
    "foldable_convs",
    "fold_permutations",
]

logger = logging.getLogger(__name__)

# A conv with this many input channels or fewer (an RGB stem) gains nothing
# from a shared input-channel factor: the 1x1 stage would be C -> G*R with
# R > C, and the dense conv is already cheap per output channel.
MIN_IN_CHANNELS = 4


def _skip_reason(conv: nn.Conv2d) -> str | None:
    if conv.groups > 1:
        kind = "depthwise" if conv.groups == conv.in_channels else "grouped"
        return f"{kind} conv (groups={conv.groups}): each filter sees a different input slice, no factor to share"
    if conv.in_channels <= MIN_IN_CHANNELS:
        return f"{conv.in_channels}-channel input (stem): too few input channels for a shared factor to save MACs"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: only zero padding is supported"
    return None


def compressible_convs(model: nn.Module, log: bool = True) -> tuple[dict[str, nn.Conv2d], dict[str, str]]:
    """Split the model's ``nn.Conv2d`` layers into compressible ones and skipped ones.

    Returns:
        ``(convs, skipped)``: convs by module name, and the reason each skipped
        conv stays dense. With ``log``, each skip is logged at INFO level.
    """
    convs: dict[str, nn.Conv2d] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Conv2d:
            continue
        reason = _skip_reason(module)
        if reason is None:
            convs[name] = module
            continue
        skipped[name] = reason
        if log:
            logger.info("%s stays dense: %s", name, reason)
    return convs, skipped


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, module)


def layer_spec(layer: CoDeCConv2d) -> LayerSpec:
    """Describe a compressed layer's structure for the spec."""
    return LayerSpec(
        method="codec",
        in_channels=layer.in_channels,
        out_channels=layer.out_channels,
        kernel_size=list(layer.kernel_size),
        stride=list(layer.stride),
        padding=layer.padding if isinstance(layer.padding, str) else list(layer.padding),
        dilation=list(layer.dilation),
        bias=layer.bias is not None,
        groups=layer.groups,
        rank=layer.rank,
        permutation=layer.permutation.tolist(),
        permutation_folded=layer.permutation_folded,
        layout=CODEC_LAYOUT,
    )


def build_layer(spec: LayerSpec, name: str = "layer") -> nn.Module:
    """Build an uninitialised compressed layer with the structure ``spec`` describes.

    Method ``"codec"`` gives a ``CoDeCConv2d``; the baseline methods ``"cp"``,
    ``"tucker2"`` and ``"svd"`` give their layers from ``codec_det.baselines``.
    """
    if spec.method in ("cp", "tucker2", "svd"):
        # Imported here: codec_det.baselines imports this module.
        from codec_det.baselines.methods import build_baseline_layer

        return build_baseline_layer(spec, name)
    if spec.method != "codec" or spec.layout != CODEC_LAYOUT:
        raise SpecError(
            f"layer {name}: method {spec.method!r} with layout {spec.layout!r} is not a CoDeC layer "
            f"(expected method 'codec', layout {CODEC_LAYOUT!r})"
        )
    spec.validate(name)
    return CoDeCConv2d(
        spec.in_channels,
        spec.out_channels,
        tuple(spec.kernel_size),
        groups=spec.groups,
        rank=spec.rank,
        stride=tuple(spec.stride),
        padding=spec.padding if isinstance(spec.padding, str) else tuple(spec.padding),
        dilation=tuple(spec.dilation),
        bias=spec.bias,
        permutation=torch.tensor(spec.permutation),
        permutation_folded=spec.permutation_folded,
    )


def apply_spec(model: nn.Module, spec: CompressionSpec) -> nn.Module:
    """Replace the convs named in ``spec`` by uninitialised compressed layers, in place.

    Load the weights afterwards. Raises ``SpecError`` naming the layer when the
    spec names a module that is missing, is not a conv, or has another shape.
    """
    modules = dict(model.named_modules())
    for name, entry in spec.layers.items():
        conv = modules.get(name)
        if conv is None:
            raise SpecError(f"spec layer {name} is not a module of this {type(model).__name__}")
        if type(conv) is not nn.Conv2d:
            raise SpecError(f"spec layer {name} is a {type(conv).__name__} in this model, not an nn.Conv2d")
        expected = (conv.in_channels, conv.out_channels, list(conv.kernel_size), list(conv.stride))
        found = (entry.in_channels, entry.out_channels, entry.kernel_size, entry.stride)
        if expected != found:
            raise SpecError(
                f"spec layer {name} describes (in, out, kernel, stride) = {found}, "
                f"but the model's conv is {expected}; the spec was made for another model"
            )
        layer = build_layer(entry, name).to(device=conv.weight.device, dtype=conv.weight.dtype)
        set_submodule(model, name, layer)
    return model


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.ReLU)
    return node.op == "call_function" and node.target in (torch.relu, nn.functional.relu)


def _is_conv_consumer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op != "call_module":
        return False
    module = modules[node.target]
    if isinstance(module, CoDeCConv2d):
        return True
    return type(module) is nn.Conv2d and module.groups == 1


class _CompressedLayerTracer(fx.Tracer):
    """An fx tracer that keeps ``CoDeCConv2d`` as one graph node instead of tracing into it."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, CoDeCConv2d) or super().is_leaf_module(module, qualified_name)


def foldable_convs(model: nn.Module) -> dict[str, tuple[str, list[str]]]:
    """Find the convs whose output channel order can be folded into the next layers.

    A conv qualifies when its only consumer is a ``BatchNorm2d``, optionally
    followed by one elementwise ReLU, and everything after that is convs with
    ``groups == 1``. Permuting the batch norm's channels and the convs' input
    channels then absorbs any order of the conv's filters.

    Returns:
        ``{conv name: (batch norm name, [consumer conv names])}``; empty when
        the model cannot be traced by ``torch.fx``.
    """
    try:
        graph = _CompressedLayerTracer().trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure means no folding
        logger.info("permutations are not folded: torch.fx cannot trace %s (%s)", type(model).__name__, error)
        return {}

    modules = dict(model.named_modules())
    found: dict[str, tuple[str, list[str]]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], (nn.Conv2d, CoDeCConv2d)):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        norm = users[0]
        if not isinstance(modules[norm.target], nn.BatchNorm2d):
            continue

        after_norm = list(norm.users)
        if len(after_norm) == 1 and _is_relu(after_norm[0], modules):
            after_norm = list(after_norm[0].users)
        if after_norm and all(_is_conv_consumer(user, modules) for user in after_norm):
            found[node.target] = (norm.target, [user.target for user in after_norm])
    return found


def _permute_batch_norm(norm: nn.BatchNorm2d, permutation: torch.Tensor) -> None:
    for tensor in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
        if tensor is not None:
            tensor.data = tensor.data.index_select(0, permutation)


def _permute_input_channels(conv: nn.Module, permutation: torch.Tensor) -> None:
    if isinstance(conv, CoDeCConv2d):
        conv.input_factors.data = conv.input_factors.data.index_select(2, permutation)
    else:
        conv.weight.data = conv.weight.data.index_select(1, permutation)


def fold_permutations(model: nn.Module) -> list[str]:
    """Fold each compressed layer's filter permutation into the layers that follow it.

    The batch norm after the layer and the convs after that are permuted to
    expect the group order, and the layer stops running ``index_select``. The
    model computes the same function before and after.

    Returns:
        Names of the layers whose permutation was folded.
    """
    modules = dict(model.named_modules())
    folded = []
    for name, (norm_name, consumer_names) in foldable_convs(model).items():
        layer = modules[name]
        if not isinstance(layer, CoDeCConv2d) or layer.permutation_folded:
            continue
        permutation = layer.permutation
        _permute_batch_norm(modules[norm_name], permutation)
        for consumer_name in consumer_names:
            _permute_input_channels(modules[consumer_name], permutation)
        layer.permutation_folded = True
        folded.append(name)
    return folded
