#!/usr/bin/env python
"""Measure MACs, parameters and latency of the original ResNet-50 against codec-45 and codec-66, in one run.

Targets (each at batch 1 and 8):

- classifier: torchvision ResNet-50, 224x224, images -> logits;
- trunk: Detectron2's bottom-up ResNet-50 (res2..res5), 800x1216;
- fpn: Detectron2's R50-FPN backbone (bottom-up and FPN, p2..p6), 800x1216;
- fpn-codec (opt-in): the fpn target with the FPN compressed too: codec-45 and
  codec-66 also take the bundled FPN spec of the same name (45% and 66% fewer
  FPN MACs); the original stays Detectron2's dense backbone.

Runtimes: eager (the model as trained), eager-fast (codec_det.export's
to_deploy_form: stage-2 kernels materialised once, batch norms folded),
torchscript (the fast form traced) and onnxruntime (the fast form exported
to ONNX, run by ONNX Runtime with its full graph optimisations). Eager and
TorchScript run in channels_last for every model; ONNX Runtime takes NCHW
input and picks its own internal layout.

Models are built from the bundled specs (codec_det.spec.resolve_spec) with
random weights: structure, not weight values, decides latency. MACs and
parameters are fvcore's, of the training form at batch 1. Latency is the
median over --repeats timed rounds after --warmup rounds, with the 25th and
75th percentiles. In each round every model runs once in turn, so that load
changes on a shared machine hit all models alike. Speedups are ratios of
medians to the original's from the same rounds.

Writes OUTPUT/benchmark.md (tables), OUTPUT/benchmark.json and
OUTPUT/benchmark.png (chart).

Examples:
    python tools/benchmark.py --quick --output output/benchmark
    python tools/benchmark.py --targets fpn --batches 1 --runtimes eager-fast onnxruntime --layers
    python tools/benchmark.py --targets fpn fpn-codec --batches 1 --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from torch import nn

import codec_det  # noqa: F401 - registers the CoDeC backbones with Detectron2 when it is installed
from codec_det.complexity import count_model
from codec_det.export.deploy import to_deploy_form
from codec_det.export.onnx import OnnxRunner, export_onnx
from codec_det.export.timing import measure_interleaved, time_compressed_layers
from codec_det.export.torchscript import trace_module
from codec_det.spec import resolve_spec
from codec_det.surgery import apply_spec

logger = logging.getLogger("codec_det.benchmark")

MODELS = ("original", "codec-45", "codec-66")
TARGETS = ("classifier", "trunk", "fpn", "fpn-codec")
DEFAULT_TARGETS = ("classifier", "trunk", "fpn")
RUNTIMES = ("eager", "eager-fast", "torchscript", "onnxruntime")
INPUT_SIZES = {"classifier": (224, 224), "trunk": (800, 1216), "fpn": (800, 1216), "fpn-codec": (800, 1216)}
# Height and width the ONNX graphs accept are multiples of this (the FPN adds upsampled maps).
SIZE_MULTIPLES = {"classifier": 1, "trunk": 32, "fpn": 32, "fpn-codec": 32}
OUTPUT_NAMES = {
    "classifier": ["logits"],
    "trunk": ["res2", "res3", "res4", "res5"],
    "fpn": ["p2", "p3", "p4", "p5", "p6"],
    "fpn-codec": ["p2", "p3", "p4", "p5", "p6"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(DEFAULT_TARGETS),
                        help=f"what to measure (default {' '.join(DEFAULT_TARGETS)})")
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES), help="how to run it")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes (default 1 8)")
    parser.add_argument("--quick", action="store_true",
                        help="batch 8 for the classifier only (800x1216 at batch 8 takes minutes per call on 2 "
                        "cores), 5 timed rounds and 1 warm-up round unless given")
    parser.add_argument("--repeats", type=int, help="timed rounds per measurement (default 7; 5 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 2; 1 with --quick)")
    parser.add_argument("--layers", action="store_true",
                        help="also time each compressed layer of the fpn and fpn-codec targets against its dense "
                        "conv (batch 1)")
    # NOTE: the cuda path has not been run: the machines this was written on have no GPU.
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and ONNX Runtime (default 2)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: latency as a caller sees it (default); cpu: CPU time of this process per call, "
                        "which leaves out waiting for a core on a busy machine (CPU only, with --threads 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--output", type=Path, default=Path("output/benchmark"), help="output directory")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 7
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    return args


# ---------------------------------------------------------------------------
# Models


def _randomise_norms(model: nn.Module, seed: int) -> None:
    """Give batch norms non-trivial statistics, so that folding them is exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "running_var", None) is not None and getattr(module, "running_mean", None) is not None:
                module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) * 0.2 - 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) * 0.5 + 0.75)


def build_classifier(model_name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet50()
    if model_name != "original":
        # The new CoDeC layers come with random factors (CoDeCConv2d.reset_parameters).
        apply_spec(model, resolve_spec(model_name))
    _randomise_norms(model, seed)
    return model.eval()


def build_fpn_backbone(model_name: str, seed: int, compress_fpn: bool = False) -> nn.Module:
    """Build Detectron2's R50-FPN backbone (FrozenBN, stride in the 3x3 conv), CoDeC or original.

    With ``compress_fpn``, a CoDeC model also takes the bundled FPN spec of its name.
    """
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    from codec_det.d2 import add_codec_config

    cfg = get_cfg()
    add_codec_config(cfg)
    stages = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.OUT_FEATURES = stages
    cfg.MODEL.FPN.IN_FEATURES = stages
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    if model_name == "original":
        cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    else:
        cfg.MODEL.BACKBONE.NAME = "build_codec_resnet_fpn_backbone"
        cfg.MODEL.CODEC.SPEC = model_name
        if compress_fpn:
            cfg.MODEL.CODEC.FPN_SPEC = model_name
    torch.manual_seed(seed)
    model = build_backbone(cfg)
    _randomise_norms(model, seed)
    return model.eval()


def build_models(target: str, seed: int) -> dict[str, nn.Module]:
    if target == "classifier":
        return {name: build_classifier(name, seed) for name in MODELS}
    backbones = {name: build_fpn_backbone(name, seed, compress_fpn=target == "fpn-codec") for name in MODELS}
    if target == "trunk":
        return {name: backbone.bottom_up for name, backbone in backbones.items()}
    return backbones


# ---------------------------------------------------------------------------
# Runtimes


def make_runner(
    model: nn.Module, runtime: str, target: str, example: torch.Tensor, device: str, threads: int, workdir: Path
) -> Callable[[torch.Tensor], Any]:
    """Prepare ``model`` for ``runtime`` and return a callable that runs one batch."""
    if runtime == "eager":
        return model.to(device=device, memory_format=torch.channels_last)

    fast = copy.deepcopy(model).cpu()
    to_deploy_form(fast)
    if runtime == "eager-fast":
        return fast.to(device=device, memory_format=torch.channels_last)
    if runtime == "torchscript":
        fast = fast.to(device=device, memory_format=torch.channels_last)
        return trace_module(fast, example.to(device=device, memory_format=torch.channels_last))

    path = Path(tempfile.mkdtemp(dir=workdir)) / "model.onnx"
    export_onnx(fast, example.cpu(), path, OUTPUT_NAMES[target], size_multiple=SIZE_MULTIPLES[target])
    return OnnxRunner(path, threads=threads, device="cuda" if device.startswith("cuda") else "cpu")


def prepare_input(runtime: str, batch: torch.Tensor, device: str) -> torch.Tensor:
    if runtime == "onnxruntime":
        return batch.cpu().contiguous()
    return batch.to(device=device, memory_format=torch.channels_last)


# ---------------------------------------------------------------------------
# Measurement


def measure_target(target: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    logger.info("building the %s models", target)
    models = build_models(target, args.seed)
    height, width = INPUT_SIZES[target]

    complexity = {}
    for name, model in models.items():
        macs, params = count_model(model, (height, width))
        complexity[name] = {"macs": macs, "params": params}
        logger.info("%s %s: %.2f GMACs, %.2f M parameters", target, name, macs / 1e9, params / 1e6)

    batches = [b for b in args.batches if not (args.quick and target != "classifier" and b > 1)]
    skipped = [b for b in args.batches if b not in batches]
    generator = torch.Generator().manual_seed(args.seed)
    example = torch.randn(1, 3, height, width, generator=generator)

    latency: dict[str, dict[str, dict[str, Any]]] = {}
    for runtime in args.runtimes:
        if runtime == "onnxruntime" and args.device.startswith("cuda"):
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                logger.warning("skipping onnxruntime on %s: no CUDA execution provider (onnxruntime-gpu)", args.device)
                continue
        logger.info("%s: preparing %s", target, runtime)
        runners = {
            name: make_runner(model, runtime, target, example, args.device, args.threads, workdir)
            for name, model in models.items()
        }
        for batch_size in batches:
            batch = prepare_input(runtime, torch.randn(batch_size, 3, height, width, generator=generator), args.device)
            logger.info("%s: timing %s at batch %d", target, runtime, batch_size)
            stats = measure_interleaved(
                {name: (lambda run=run: run(batch)) for name, run in runners.items()},
                warmup=args.warmup,
                repeats=args.repeats,
                synchronize=torch.cuda.synchronize if args.device.startswith("cuda") else None,
                clock=args.clock,
            )
            latency.setdefault(str(batch_size), {})[runtime] = {name: value.to_dict() for name, value in stats.items()}
            logger.info(
                "%s %s batch %d: %s", target, runtime, batch_size,
                ", ".join(f"{name} {value.median_ms:.1f} ms" for name, value in stats.items()),
            )
        del runners

    result: dict[str, Any] = {
        "input_size": [height, width],
        "complexity": complexity,
        "latency": latency,
        "batches_skipped": skipped,
    }
    if args.layers and target in ("fpn", "fpn-codec"):
        result["layers"] = measure_layers(models, example, args)
    return result


def measure_layers(models: dict[str, nn.Module], example: torch.Tensor, args: argparse.Namespace) -> dict[str, list]:
    rows = {}
    for name, model in models.items():
        if name == "original":
            continue
        logger.info("timing the compressed layers of %s one by one", name)
        timings = time_compressed_layers(
            model.to(args.device), example.to(device=args.device, memory_format=torch.channels_last),
            warmup=1, repeats=args.repeats, clock=args.clock,
        )
        rows[name] = [
            {
                "layer": row.name,
                "input_shape": row.input_shape,
                "kernel_size": row.kernel_size,
                "groups": row.groups,
                "rank": row.rank,
                "dense_ms": row.dense.median_ms,
                "fused_ms": row.fused.median_ms,
                "speedup": row.speedup,
            }
            for row in timings
        ]
    return rows


# ---------------------------------------------------------------------------
# Reports


def machine_description(device: str, threads: int) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {threads} thread{'s' if threads != 1 else ''}, torch {torch.__version__}"


def complexity_table(results: dict[str, Any]) -> list[str]:
    lines = ["| target | model | input | GMACs | M params | MACs ratio |", "|---|---|---|---|---|---|"]
    for target, data in results["targets"].items():
        base = data["complexity"]["original"]["macs"]
        size = "x".join(map(str, data["input_size"]))
        for name, entry in data["complexity"].items():
            lines.append(
                f"| {target} | {name} | {size} | {entry['macs'] / 1e9:.2f} | {entry['params'] / 1e6:.2f} | "
                f"{base / entry['macs']:.2f}x |"
            )
    return lines


def latency_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "Latency: median ms (25th-75th percentile); speedup = original's median / model's median, same rounds.",
        "",
        "| target | batch | runtime | original | codec-45 | codec-66 | codec-45 speedup | codec-66 speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for target, data in results["targets"].items():
        for batch, runtimes in data["latency"].items():
            for runtime, stats in runtimes.items():
                cells = [
                    f"{stats[name]['median_ms']:.1f} ({stats[name]['p25_ms']:.1f}-{stats[name]['p75_ms']:.1f})"
                    for name in MODELS
                ]
                base = stats["original"]["median_ms"]
                speedups = [f"{base / stats[name]['median_ms']:.2f}x" for name in MODELS[1:]]
                lines.append(f"| {target} | {batch} | {runtime} | " + " | ".join(cells + speedups) + " |")
    return lines


def best_runtime_table(results: dict[str, Any]) -> list[str]:
    """List each model's fastest runtime per target and batch, and speedups of best against best."""
    lines = [
        "Each model in its fastest runtime (median ms); speedup = original's best / model's best.",
        "",
        "| target | batch | original | codec-45 | codec-66 | codec-45 speedup | codec-66 speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for target, data in results["targets"].items():
        for batch, runtimes in data["latency"].items():
            best = {}
            for name in MODELS:
                runtime = min(runtimes, key=lambda key: runtimes[key][name]["median_ms"])
                best[name] = (runtime, runtimes[runtime][name]["median_ms"])
            cells = [f"{best[name][1]:.1f} ({best[name][0]})" for name in MODELS]
            speedups = [f"{best['original'][1] / best[name][1]:.2f}x" for name in MODELS[1:]]
            lines.append(f"| {target} | {batch} | " + " | ".join(cells + speedups) + " |")
    return lines


def layer_tables(results: dict[str, Any]) -> list[str]:
    lines = []
    for target, data in results["targets"].items():
        for name, rows in data.get("layers", {}).items():
            lines += [
                "",
                f"Compressed layers of {name} ({target}, batch 1, channels_last): median ms of the dense conv "
                "and of the fused CoDeC layer, each alone on the input it receives in the model.",
                "",
                "| layer | input | kernel | G | R | dense | fused | speedup |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for row in rows:
                lines.append(
                    f"| {row['layer']} | {'x'.join(map(str, row['input_shape'][1:]))} | "
                    f"{'x'.join(map(str, row['kernel_size']))} | {row['groups']} | {row['rank']} | "
                    f"{row['dense_ms']:.2f} | {row['fused_ms']:.2f} | {row['speedup']:.2f}x |"
                )
    return lines


def format_markdown(results: dict[str, Any]) -> str:
    lines = complexity_table(results) + [""] + latency_table(results) + [""] + best_runtime_table(results)
    lines += layer_tables(results)
    return "\n".join(lines) + "\n"


def plot_results(results: dict[str, Any], path: Path) -> None:
    """Draw one panel per target: speedup over the original per runtime, at batch 1, with the MACs ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = [t for t in results["targets"] if "1" in results["targets"][t]["latency"]]
    if not targets:
        return
    figure, axes = plt.subplots(1, len(targets), figsize=(4.6 * len(targets), 3.8), squeeze=False)
    colours = {"codec-45": "#4c72b0", "codec-66": "#dd8452"}
    for axis, target in zip(axes[0], targets):
        data = results["targets"][target]
        runtimes = list(data["latency"]["1"])
        width = 0.38
        for offset, name in enumerate(MODELS[1:]):
            speedups = []
            for runtime in runtimes:
                stats = data["latency"]["1"][runtime]
                speedups.append(stats["original"]["median_ms"] / stats[name]["median_ms"])
            positions = [index + (offset - 0.5) * width for index in range(len(runtimes))]
            axis.bar(positions, speedups, width, label=name, color=colours[name])
            ideal = data["complexity"]["original"]["macs"] / data["complexity"][name]["macs"]
            axis.axhline(ideal, color=colours[name], linestyle="--", linewidth=1)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(runtimes)))
        axis.set_xticklabels(runtimes, rotation=20)
        size = "x".join(map(str, data["input_size"]))
        axis.set_title(f"{target} {size}, batch 1")
        axis.set_ylabel("speedup over original (x)")
    axes[0][0].legend(title="bars: measured, dashed: MACs ratio", fontsize=8, title_fontsize=8)
    figure.suptitle(f"{results['machine']}, {results.get('clock', 'wall')} clock, {results['date']}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    args = parse_args(argv)
    if any(batch < 1 for batch in args.batches):
        logger.error("--batches must be positive, got %s", args.batches)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        logger.error("--device %s requested but torch sees no CUDA device; use --device cpu", args.device)
        return 2
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        logger.error("--clock cpu needs --device cpu and --threads 1 (it would count other threads' spin-waiting)")
        return 2
    if any(target != "classifier" for target in args.targets):
        try:
            import detectron2  # noqa: F401
        except ImportError:
            logger.error("the trunk and fpn targets need Detectron2; install it with bash tools/setup_env.sh or use --targets classifier")
            return 2
    torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)

    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(args.device, args.threads),
        "device": args.device,
        "command": "python tools/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "load_average_start": list(os.getloadavg()),
        "clock": args.clock,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "targets": {},
    }
    with tempfile.TemporaryDirectory(prefix="codec-benchmark-") as workdir:
        for target in args.targets:
            results["targets"][target] = measure_target(target, args, Path(workdir))
    results["load_average_end"] = list(os.getloadavg())

    markdown = format_markdown(results)
    header = (
        f"{results['date']}, {results['machine']}, load average {results['load_average_start'][0]:.1f} at start and "
        f"{results['load_average_end'][0]:.1f} at end; {args.warmup} warm-up and {args.repeats} timed rounds; "
        f"{args.clock} clock.\n\n"
    )
    (args.output / "benchmark.md").write_text(header + markdown)
    (args.output / "benchmark.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_results(results, args.output / "benchmark.png")
    print(header + markdown)
    print(f"wrote {args.output / 'benchmark.md'}, benchmark.json and benchmark.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
