#!/usr/bin/env python
"""Benchmark the compression core on ResNet-50.

Prints, in one run:

1. the wall time to plan and decompose every ResNet-50 conv at ``codec-45``;
2. TensorLy's ``parafac`` run per filter on a sample of the same layers, at the
   per-filter rank whose MACs match the CoDeC layer's, against the coupled
   solver on the same layers: time (extrapolated from the sample to every
   filter of the layer) and relative error of both;
3. the latency (median after warm-up, batch 1, channels_last) of the original,
   ``codec-45`` and ``codec-66`` ResNet-50 trunks (conv1 to layer4) at 224x224
   and 800x1216, with ratios to the original measured in the same run. Each
   trunk runs in two forms: as trained (CoDeC stage-2 kernels rebuilt from the
   factors at every call, batch norms separate) and in the deployment form of
   ``codec_det.export.deploy.to_deploy_form`` (stage-2 kernels materialised
   once, batch norms folded into the convs, the original's included).

Run: ``.venv/bin/python benchmarks/bench_core.py [--threads 2] [--repeats 7]``
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import statistics
import time
import warnings

import numpy as np
import tensorly as tl
import torch
import torchvision
from tensorly.decomposition import parafac
from torch import nn

from codec_det.compress import compress_model
from codec_det.decompose import ALSSettings, decompose_conv
from codec_det.export.deploy import to_deploy_form
from codec_det.presets import get_preset

SAMPLE_LAYERS = ["layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2"]


def trunk(model: nn.Module) -> nn.Sequential:
    """ResNet trunk: stem and the four stages, without pooling and classifier."""
    return nn.Sequential(
        model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4
    )


def time_compression(preset_name: str, seed: int):
    preset = get_preset(preset_name)
    torch.manual_seed(seed)
    model = torchvision.models.resnet50().eval()
    start = time.perf_counter()
    result = compress_model(
        model,
        target_macs=preset.target_macs,
        target_params=preset.target_params,
        architecture="resnet50",
        progress=False,
    )
    return time.perf_counter() - start, result


def per_filter_parafac(dense: torch.Tensor, rank: int, sample: int, seed: int) -> tuple[float, float]:
    """Run parafac on ``sample`` filters of ``dense`` (N, C, kh, kw); return (seconds per filter, error)."""
    generator = np.random.default_rng(seed)
    indices = generator.choice(dense.shape[0], size=sample, replace=False)
    residual, total, elapsed = 0.0, 0.0, 0.0
    for index in indices:
        tensor = tl.tensor(dense[index].double().numpy())
        start = time.perf_counter()
        cp = parafac(tensor, rank, n_iter_max=ALSSettings.n_iter_max, tol=ALSSettings.tol, init="svd")
        elapsed += time.perf_counter() - start
        residual += float(np.sum((tl.cp_to_tensor(cp) - tensor) ** 2))
        total += float(np.sum(tensor**2))
    return elapsed / sample, (residual / total) ** 0.5


def compare_with_parafac(original: nn.Module, result, sample: int, seed: int) -> list[dict]:
    modules = dict(original.named_modules())
    reports = {row.layer: row for row in result.layers}
    rows = []
    for name in SAMPLE_LAYERS:
        report = reports[name]
        if report.rank is None:
            continue
        conv = modules[name]
        out_channels, in_channels, kh, kw = conv.weight.shape
        # Per-filter CP costs N * R_f * (C + kh*kw) MACs per output pixel: pick
        # R_f so that it spends the MACs of the CoDeC layer.
        output_pixels = report.macs_before / (out_channels * in_channels * kh * kw)
        codec_macs_per_pixel = report.macs_after / output_pixels
        filter_rank = max(1, round(codec_macs_per_pixel / (out_channels * (in_channels + kh * kw))))

        start = time.perf_counter()
        _, codec_error = decompose_conv(conv, groups=report.groups, rank=report.rank, name=name)
        codec_seconds = time.perf_counter() - start

        seconds_per_filter, parafac_error = per_filter_parafac(conv.weight.detach(), filter_rank, sample, seed)
        rows.append(
            {
                "layer": name,
                "groups": report.groups,
                "rank": report.rank,
                "codec_seconds": codec_seconds,
                "codec_error": codec_error,
                "filter_rank": filter_rank,
                "parafac_seconds": seconds_per_filter * out_channels,
                "parafac_error": parafac_error,
            }
        )
    return rows


def median_latency(model: nn.Module, size: tuple[int, int], repeats: int, warmup: int) -> tuple[float, float]:
    image = torch.randn(1, 3, *size).to(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last).eval()
    times = []
    with torch.inference_mode():
        for step in range(warmup + repeats):
            start = time.perf_counter()
            model(image)
            if step >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times), (max(times) - min(times)) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed forward passes per model and size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forward passes first")
    parser.add_argument("--sample", type=int, default=16, help="filters per layer given to parafac")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(f"# machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")

    seconds_45, result_45 = time_compression("codec-45", args.seed)
    seconds_66, result_66 = time_compression("codec-66", args.seed)
    print("\n## Decomposition time, all ResNet-50 convs (planning + clustering + ALS)\n")
    print("| preset | seconds | GMACs | M params |")
    print("|---|---|---|---|")
    for name, seconds, result in [("codec-45", seconds_45, result_45), ("codec-66", seconds_66, result_66)]:
        totals = result.totals
        print(f"| {name} | {seconds:.1f} | {totals['macs_after'] / 1e9:.3f} | {totals['params_after'] / 1e6:.2f} |")

    torch.manual_seed(args.seed)
    original = torchvision.models.resnet50().eval()
    rows = compare_with_parafac(original, result_45, args.sample, args.seed)
    print("\n## Coupled CP-ALS vs TensorLy parafac per filter, equal MACs (codec-45 ranks)\n")
    print("| layer | G | R | CoDeC s | CoDeC error | parafac rank | parafac s (all filters) | parafac error | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        speedup = row["parafac_seconds"] / row["codec_seconds"]
        print(
            f"| {row['layer']} | {row['groups']} | {row['rank']} | {row['codec_seconds']:.2f} | "
            f"{row['codec_error']:.4f} | {row['filter_rank']} | {row['parafac_seconds']:.2f} | "
            f"{row['parafac_error']:.4f} | {speedup:.1f}x |"
        )

    print("\n## Trunk latency, batch 1, channels_last (median ms, +- half range)\n")
    print("| form | input | original | codec-45 | codec-66 | codec-45 speed-up | codec-66 speed-up |")
    print("|---|---|---|---|---|---|---|")
    trained = {"original": trunk(original), "codec-45": trunk(result_45.model), "codec-66": trunk(result_66.model)}
    deployed = {name: copy.deepcopy(model) for name, model in trained.items()}
    for model in deployed.values():
        to_deploy_form(model)
    for form, models in [("as trained", trained), ("deployment", deployed)]:
        for size in [(224, 224), (800, 1216)]:
            latency = {name: median_latency(model, size, args.repeats, args.warmup) for name, model in models.items()}
            base = latency["original"][0]
            cells = [f"{latency[name][0] * 1e3:.1f} +- {latency[name][1] * 1e3:.1f}" for name in models]
            print(
                f"| {form} | {size[0]}x{size[1]} | {' | '.join(cells)} | {base / latency['codec-45'][0]:.2f}x | "
                f"{base / latency['codec-66'][0]:.2f}x |"
            )

if __name__ == "__main__":
    main()
