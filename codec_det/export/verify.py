"""Checking an exported artifact against the PyTorch model it came from.

The error of one output tensor is ``max|candidate - reference| / max|reference|``:
the largest absolute deviation relative to the output's scale. An
element-wise relative error would be meaningless at the many near-zero
activations of a ReLU network. An artifact passes at an input size when every
output has the reference's shape and an error at or below the tolerance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = ["DEFAULT_TOLERANCE", "ArtifactCheck", "flatten_outputs", "relative_error", "compare_outputs", "check_artifact"]

DEFAULT_TOLERANCE = 1e-4


@dataclass
class ArtifactCheck:
    """The result of running one artifact at one input shape."""

    artifact: str
    input_shape: list[int]
    max_rel_error: float
    passed: bool
    detail: str = ""
    output_shapes: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # JSON has no infinity: a shape mismatch is reported as null with its detail.
        if not math.isfinite(data["max_rel_error"]):
            data["max_rel_error"] = None
        return data


def flatten_outputs(output: Any, prefix: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Flatten a model output (tensor, array, dict, list or tuple of those) into named tensors, in order."""
    if isinstance(output, torch.Tensor):
        return [(prefix, output.detach().cpu())]
    if isinstance(output, np.ndarray):
        return [(prefix, torch.from_numpy(output))]
    if isinstance(output, dict):
        flat = []
        for key, value in output.items():
            flat.extend(flatten_outputs(value, str(key)))
        return flat
    if isinstance(output, (list, tuple)):
        flat = []
        for index, value in enumerate(output):
            flat.extend(flatten_outputs(value, f"{prefix}[{index}]"))
        return flat
    raise TypeError(f"cannot compare a model output of type {type(output).__name__}; expected tensors")


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Return ``max|candidate - reference| / max|reference|`` in float64 (absolute error when the reference is 0)."""
    reference = reference.detach().cpu().double()
    candidate = candidate.detach().cpu().double()
    if reference.numel() == 0:
        return 0.0
    if not torch.isfinite(candidate).all():
        return math.inf
    deviation = (candidate - reference).abs().max().item()
    scale = reference.abs().max().item()
    return deviation / scale if scale > 0 else deviation


def compare_outputs(
    reference: list[tuple[str, torch.Tensor]], candidate: list[tuple[str, torch.Tensor]]
) -> tuple[float, str]:
    """Compare two flattened outputs position by position; returns (largest error, mismatch description)."""
    if len(reference) != len(candidate):
        return math.inf, f"{len(candidate)} outputs, expected {len(reference)} ({[name for name, _ in reference]})"
    worst = 0.0
    for (name, expected), (_, actual) in zip(reference, candidate):
        if tuple(expected.shape) != tuple(actual.shape):
            return math.inf, f"output {name} has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
        worst = max(worst, relative_error(expected, actual))
    return worst, ""


def check_artifact(
    artifact: str,
    run: Callable[[torch.Tensor], Any],
    inputs: Sequence[torch.Tensor],
    expected: Sequence[list[tuple[str, torch.Tensor]]],
    tolerance: float = DEFAULT_TOLERANCE,
) -> list[ArtifactCheck]:
    """Run the artifact on each input and compare with the PyTorch model's flattened outputs.

    Args:
        artifact: the artifact's file name, for the report.
        run: calls the artifact on one input.
        inputs: one tensor per input shape to check.
        expected: ``flatten_outputs`` of the PyTorch model's output for each input.
    """
    checks = []
    for tensor, reference in zip(inputs, expected, strict=True):
        with torch.no_grad():
            actual = flatten_outputs(run(tensor))
        error, detail = compare_outputs(reference, actual)
        passed = error <= tolerance
        if not passed and not detail:
            detail = f"max_rel_error {error:.3g} exceeds the tolerance {tolerance:g}"
        if passed and all(value.numel() == 0 for _, value in reference):
            detail = "every output is empty (e.g. no detection above the score threshold): only shapes were compared"
        shapes = {name: list(value.shape) for name, value in actual}
        checks.append(ArtifactCheck(artifact, list(tensor.shape), error, passed, detail, shapes))
    return checks
