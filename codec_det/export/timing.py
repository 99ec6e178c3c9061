"""Latency measurement: several models timed in turns, so that a change of machine load hits all of them alike.

``measure_interleaved`` runs every candidate once per round (after warm-up
rounds) and returns, per candidate, the median and the 25th / 75th
percentiles of the time per call. On a shared CPU the absolute times move
with the load; ratios between candidates timed in the same rounds are the
numbers to compare.

Two clocks: ``"wall"`` (``time.perf_counter``) is the latency a caller sees.
``"cpu"`` (``time.process_time``, CPU time of all threads of this process)
leaves out the time spent waiting for a core while other processes run, so
it is the steadier measure on an oversubscribed machine. With more than one
compute thread it also counts the threads' spin-waiting, so use it with one
thread.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from codec_det.export.deploy import to_deploy_form
from codec_det.layers.codec_conv import CoDeCConv2d

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

__all__ = ["CLOCKS", "LatencyStats", "measure_interleaved", "LayerTiming", "time_compressed_layers"]


@dataclass
class LatencyStats:
    """Per-call wall times of one candidate, in milliseconds."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    runs: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure_interleaved(
    candidates: dict[str, Callable[[], Any]],
    *,
    warmup: int = 2,
    repeats: int = 7,
    synchronize: Callable[[], None] | None = None,
    clock: str = "wall",
) -> dict[str, LatencyStats]:
    """Time each zero-argument callable ``repeats`` times, one call of each candidate per round.

    Args:
        candidates: callables by name; each runs one inference.
        warmup: untimed rounds first (allocator, oneDNN primitive caches,
            TorchScript profiling runs).
        repeats: timed rounds.
        synchronize: called before each clock read, e.g. ``torch.cuda.synchronize``.
        clock: ``"wall"`` or ``"cpu"`` (see the module docstring).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if clock not in CLOCKS:
        raise ValueError(f"clock {clock!r} is unknown; choose one of {', '.join(CLOCKS)}")
    now = CLOCKS[clock]
    sync = synchronize or (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.inference_mode():
        for _ in range(warmup):
            for run in candidates.values():
                run()
        sync()
        for _ in range(repeats):
            for name, run in candidates.items():
                start = now()
                run()
                sync()
                times[name].append((now() - start) * 1e3)
    return {
        name: LatencyStats(statistics.median(values), _quantile(values, 0.25), _quantile(values, 0.75), len(values))
        for name, values in times.items()
    }


@dataclass
class LayerTiming:
    """One compressed layer timed alone on the input it receives in the model."""

    name: str
    input_shape: list[int]
    groups: int
    rank: int
    kernel_size: list[int]
    dense: LatencyStats
    fused: LatencyStats

    @property
    def speedup(self) -> float:
        return self.dense.median_ms / self.fused.median_ms


def time_compressed_layers(
    model: nn.Module,
    example: torch.Tensor,
    *,
    warmup: int = 1,
    repeats: int = 5,
    memory_format: torch.memory_format = torch.channels_last,
    clock: str = "wall",
) -> list[LayerTiming]:
    """Time every ``CoDeCConv2d`` of ``model`` in its fused deployment form against the equivalent dense conv.

    Each layer's input is recorded in one forward pass of ``example``. Then the
    layer's fused form and its ``to_dense()`` conv run on that input in turns,
    without the norms and activations. Returns one row per compressed layer,
    in model order.
    """
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, CoDeCConv2d):
            handles.append(module.register_forward_hook(lambda m, args, out, name=name: inputs.__setitem__(name, args[0])))
    try:
        with torch.inference_mode():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()

    rows = []
    modules = dict(model.named_modules())
    for name, feature in inputs.items():
        layer = modules[name]
        dense = CoDeCConv2d.to_dense(layer).eval().to(memory_format=memory_format)
        # The bare layer, without the norm and activation a Detectron2 CoDeCNormConv2d carries.
        bare = nn.Sequential()
        bare.add_module("layer", _bare_copy(layer))
        to_deploy_form(bare)
        bare = bare.to(memory_format=memory_format)
        feature = feature.clone().contiguous(memory_format=memory_format)
        stats = measure_interleaved(
            {"dense": lambda: dense(feature), "fused": lambda: bare(feature)},
            warmup=warmup,
            repeats=repeats,
            clock=clock,
        )
        rows.append(
            LayerTiming(
                name=name,
                input_shape=list(feature.shape),
                groups=layer.groups,
                rank=layer.rank,
                kernel_size=list(layer.kernel_size),
                dense=stats["dense"],
                fused=stats["fused"],
            )
        )
    return rows


def _bare_copy(layer: CoDeCConv2d) -> CoDeCConv2d:
    """Copy ``layer`` into a plain ``CoDeCConv2d`` with the same factors and permutation."""
    copy = CoDeCConv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        groups=layer.groups,
        rank=layer.rank,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        bias=layer.bias is not None,
        permutation=layer.permutation,
        permutation_folded=layer.permutation_folded,
    ).to(device=layer.input_factors.device, dtype=layer.input_factors.dtype)
    state = {key: value for key, value in layer.state_dict().items() if key in copy.state_dict()}
    copy.load_state_dict(state)
    return copy
