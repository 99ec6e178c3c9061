"""The compression spec: the structure of a compressed model, as versioned JSON.

A spec lists, for every compressed conv, the method and what is needed to
rebuild its modules before the weights are loaded (groups, rank, filter
permutation, stage layout), plus the convs that were left dense and why. The
weights themselves travel separately as safetensors.

Example of one layer entry::

    "layer3.0.conv2": {"method": "codec", "in_channels": 256, "out_channels": 256,
                       "kernel_size": [3, 3], "stride": [2, 2], "padding": [1, 1],
                       "dilation": [1, 1], "bias": false, "groups": 4, "rank": 96,
                       "permutation": [...], "permutation_folded": true,
                       "layout": "pointwise+grouped"}
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SPEC_FORMAT",
    "SPEC_VERSION",
    "LayerSpec",
    "CompressionSpec",
    "SpecError",
    "BUNDLED_SPECS",
    "BUNDLED_FPN_SPECS",
    "resolve_spec",
]

SPEC_FORMAT = "codec-det-spec"
SPEC_VERSION = 1

# Stage 1: dense 1x1 conv C -> G*R; stage 2: grouped kh x kw conv with the
# rank-1 kernels materialised. The only layout this version writes.
CODEC_LAYOUT = "pointwise+grouped"


class SpecError(ValueError):
    """A spec that is malformed or does not match the model or weights it is used with."""


@dataclass
class LayerSpec:
    """Structure of one compressed conv layer."""

    method: str
    in_channels: int
    out_channels: int
    kernel_size: list[int]
    stride: list[int]
    padding: list[int] | str
    dilation: list[int]
    bias: bool
    groups: int
    rank: int
    permutation: list[int]
    permutation_folded: bool = False
    layout: str = CODEC_LAYOUT
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, name: str) -> None:
        """Raise ``SpecError`` naming the layer when a field is out of range."""
        for key in ("in_channels", "out_channels", "groups", "rank"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SpecError(f"layer {name}: {key} must be a positive integer, got {value!r}")
        if self.out_channels % self.groups != 0:
            raise SpecError(
                f"layer {name}: groups={self.groups} does not divide out_channels={self.out_channels}"
            )
        if sorted(self.permutation) != list(range(self.out_channels)):
            raise SpecError(
                f"layer {name}: permutation must list each of the {self.out_channels} filters exactly once"
            )
        if len(self.kernel_size) != 2 or min(self.kernel_size) <= 0:
            raise SpecError(f"layer {name}: kernel_size must be two positive integers, got {self.kernel_size!r}")

    def geometry_mismatch(self, conv) -> dict[str, tuple[Any, Any]]:
        """Compare the conv geometry stored here with ``conv``'s (any ``nn.Conv2d``).

        Returns:
            ``{field: (spec value, conv value)}`` for each field that differs:
            channels, kernel, stride, padding, dilation, bias. Empty when they match.
        """
        model = {
            "in_channels": conv.in_channels,
            "out_channels": conv.out_channels,
            "kernel_size": list(conv.kernel_size),
            "stride": list(conv.stride),
            "padding": conv.padding if isinstance(conv.padding, str) else list(conv.padding),
            "dilation": list(conv.dilation),
            "bias": conv.bias is not None,
        }
        return {key: (getattr(self, key), value) for key, value in model.items() if getattr(self, key) != value}

    @staticmethod
    def describe_mismatch(mismatch: dict[str, tuple[Any, Any]]) -> str:
        """Format the output of ``geometry_mismatch`` as ``"stride [2, 2] (model: [1, 1]), ..."``."""
        return ", ".join(f"{key} {found} (model: {expected})" for key, (found, expected) in mismatch.items())


@dataclass
class CompressionSpec:
    """Structure of a compressed model: compressed layers, dense layers and run metadata.

    Attributes:
        architecture: model name, e.g. ``"resnet50"``.
        layers: compressed layers by module name (the model's ``named_modules`` names).
        skipped: convs left dense, by module name, with the reason.
        metadata: free-form facts about the run (target, preset, input size, totals).
    """

    architecture: str
    layers: dict[str, LayerSpec] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SPEC_FORMAT,
            "version": SPEC_VERSION,
            "architecture": self.architecture,
            "layers": {name: asdict(layer) for name, layer in self.layers.items()},
            "skipped": dict(self.skipped),
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "spec") -> "CompressionSpec":
        """Parse and validate a spec dict; ``source`` names it in error messages."""
        if not isinstance(data, dict) or data.get("format") != SPEC_FORMAT:
            raise SpecError(f"{source} is not a codec-det spec (expected \"format\": \"{SPEC_FORMAT}\")")
        version = data.get("version")
        if version != SPEC_VERSION:
            raise SpecError(
                f"{source} has spec version {version!r}; this codec-det reads version {SPEC_VERSION}. "
                "Re-run tools/compress_backbone.py with this version"
            )

        layers = {}
        for name, entry in data.get("layers", {}).items():
            try:
                layer = LayerSpec(**entry)
            except TypeError as error:
                raise SpecError(f"{source}: layer {name} has invalid fields: {error}") from None
            layer.validate(name)
            layers[name] = layer
        return cls(
            architecture=data.get("architecture", "unknown"),
            layers=layers,
            skipped=dict(data.get("skipped", {})),
            metadata=dict(data.get("metadata", {})),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the spec as JSON, atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as stream:
                json.dump(self.to_dict(), stream, indent=1)
                stream.write("\n")
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(temporary, 0o666 & ~mask)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompressionSpec":
        """Read and validate a spec file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"spec file {path} not found; tools/compress_backbone.py writes spec.json next to model.safetensors"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise SpecError(f"spec file {path} is not valid JSON: {error}") from None
        return cls.from_dict(data, source=f"spec file {path}")


# Structure-only specs of ResNet-50 at each preset, made by compressing
# randomly initialised weights (seed 0). They let a detector with a compressed
# backbone train from scratch when no compressed ImageNet weights exist.
BUNDLED_SPECS = {
    "codec-45": Path(__file__).parent / "specs" / "resnet50-codec-45.json",
    "codec-66": Path(__file__).parent / "specs" / "resnet50-codec-66.json",
}

# Structure-only specs of Detectron2's FPN (architecture "d2-fpn", 256 channels
# on res2..res5 of ResNet-50, no norm) that cut its MACs at 800x1216 by 45% and
# 66%, made from randomly initialised weights (seed 0) by
# codec_det.d2.compress_fpn.make_fpn_preset_spec.
BUNDLED_FPN_SPECS = {
    "codec-45": Path(__file__).parent / "specs" / "d2-fpn-codec-45.json",
    "codec-66": Path(__file__).parent / "specs" / "d2-fpn-codec-66.json",
}


def resolve_spec(
    value: str | os.PathLike, bundled: dict[str, Path] = BUNDLED_SPECS, spec_file: str = "spec.json"
) -> CompressionSpec:
    """Load a spec from a file path, a directory holding ``spec_file``, or a preset name of ``bundled``."""
    if str(value) in bundled:
        return CompressionSpec.load(bundled[str(value)])
    path = Path(value)
    if path.is_dir():
        path = path / spec_file
    if not path.is_file():
        raise FileNotFoundError(
            f"spec {value} not found: give a spec file path, a directory written by tools/compress_backbone.py "
            f"(holding {spec_file}), or one of the bundled presets {sorted(bundled)}"
        )
    return CompressionSpec.load(path)
