"""Training and evaluating MMDetection configs with the CoDeC backbone through MMEngine's ``Runner``.

Used by ``tools/mmdet_train.py``. Evaluation is MMDetection's ``CocoMetric``
(pycocotools), which reports COCO bbox and segm mAP under ``coco/bbox_mAP``,
``coco/segm_mAP`` and their AP50, AP75, small, medium and large variants.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner
from safetensors.torch import save_file

from codec_det.checkpoint import load_state_dict_file, load_weights_strict
from codec_det.spec import SpecError

__all__ = [
    "CONFIGS_DIR",
    "FINAL_WEIGHTS_FILE",
    "METRICS_FILE",
    "resolve_config_file",
    "load_config",
    "set_data_root",
    "check_data_files",
    "MetricsRecorderHook",
    "train_and_evaluate",
    "evaluate",
]

logger = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs" / "mmdet"
FINAL_WEIGHTS_FILE = "model_final.safetensors"
METRICS_FILE = "metrics.json"

_DATALOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")
_EVALUATORS = ("val_evaluator", "test_evaluator")


def resolve_config_file(value: str | os.PathLike) -> Path:
    """Return the config file ``value`` names: a path, or a path relative to ``configs/mmdet/``.

    Raises:
        FileNotFoundError: neither exists.
    """
    path = Path(value)
    if path.is_file():
        return path
    bundled = CONFIGS_DIR / path
    if bundled.is_file():
        return bundled
    raise FileNotFoundError(
        f"config {value} not found, neither as a path nor under {CONFIGS_DIR}; "
        "give a config file such as configs/mmdet/demo/mask-rcnn_codec45_demo_voc.py"
    )


def set_data_root(cfg: Config, root: str | os.PathLike) -> None:
    """Point every dataloader's ``data_root`` and every evaluator's ``ann_file`` at ``root``.

    Config files substitute ``data_root`` into the dataloaders and the
    evaluators' ``ann_file`` when they are read, so overriding the top-level
    variable afterwards changes nothing. This function rewrites the expanded
    values.
    An evaluator ``ann_file`` under the config's old ``data_root`` keeps its
    path relative to it.
    """
    old_root = str(cfg.get("data_root", ""))
    new_root = str(root).rstrip("/") + "/"
    for key in _DATALOADERS:
        if key in cfg and cfg[key] is not None:
            cfg[key].dataset.data_root = new_root
    for key in _EVALUATORS:
        evaluators = cfg.get(key)
        if evaluators is None:
            continue
        for evaluator in evaluators if isinstance(evaluators, list) else [evaluators]:
            ann_file = evaluator.get("ann_file")
            if ann_file and old_root and str(ann_file).startswith(old_root):
                evaluator.ann_file = new_root + str(ann_file)[len(old_root):]
    cfg.data_root = new_root


def check_data_files(cfg: Config, *, eval_only: bool = False) -> None:
    """Check that the annotation files and image folders the run reads exist, before any Runner is built.

    Training reads the train and val sets, evaluation only the test set. A
    relative path is relative to the working directory, as MMEngine reads it.
    Datasets without their own ``ann_file`` (dataset wrappers) and datasets
    or evaluators with ``backend_args`` (remote storage) are skipped.

    Raises:
        FileNotFoundError: an annotation file or image folder is missing; the message names it.
    """
    dataloaders = ("test_dataloader",) if eval_only else ("train_dataloader", "val_dataloader")
    evaluators = ("test_evaluator",) if eval_only else ("val_evaluator",)
    hint = (
        f"pass --data-root with the dataset folder, or run from the folder that the config's relative paths "
        f"start from (the working directory is {Path.cwd()})"
    )
    for key in dataloaders:
        dataset = (cfg.get(key) or {}).get("dataset") or {}
        if not dataset.get("ann_file") or dataset.get("backend_args"):
            continue
        data_root = Path(dataset.get("data_root") or "")
        ann_file = data_root / dataset.ann_file
        if not ann_file.is_file():
            raise FileNotFoundError(f"{key}: annotation file {ann_file} not found; {hint}")
        image_folder = data_root / ((dataset.get("data_prefix") or {}).get("img") or "")
        if not image_folder.is_dir():
            raise FileNotFoundError(f"{key}: image folder {image_folder} not found; {hint}")
    for key in evaluators:
        configured = cfg.get(key)
        for evaluator in configured if isinstance(configured, list) else [configured]:
            evaluator = evaluator or {}
            ann_file = evaluator.get("ann_file")
            if ann_file and not evaluator.get("backend_args") and not Path(ann_file).is_file():
                raise FileNotFoundError(f"{key}: annotation file {ann_file} not found; {hint}")


def load_config(
    config_file: str | os.PathLike,
    *,
    work_dir: str | os.PathLike | None = None,
    backbone_weights: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    options: dict[str, Any] | None = None,
) -> Config:
    """Read an MMDetection config and apply the command-line settings, in this order.

    Args:
        config_file: the config (see ``resolve_config_file``).
        work_dir: output folder; default ``output/mmdet/<config name>``.
        backbone_weights: a ``tools/compress_backbone.py`` directory; the
            backbone then takes its weights and its ``spec.json``.
        data_root: dataset folder (see ``set_data_root``).
        options: ``--cfg-options`` overrides, applied last.

    Raises:
        FileNotFoundError: the config or ``data_root`` does not exist.
        ValueError: the work directory is an existing file, or ``backbone_weights``
            is given for a config whose backbone is not ``CoDeCResNet``.
    """
    path = resolve_config_file(config_file)
    cfg = Config.fromfile(str(path))
    cfg.work_dir = str(work_dir) if work_dir is not None else str(Path("output") / "mmdet" / path.stem)
    if backbone_weights is not None:
        backbone = cfg.model.backbone
        if backbone.get("type") != "CoDeCResNet":
            raise ValueError(
                f"--backbone-weights needs a config whose model.backbone.type is 'CoDeCResNet', "
                f"but {path} uses {backbone.get('type')!r}"
            )
        backbone.weights = str(backbone_weights)
        backbone.spec = None
    if data_root is not None:
        if not Path(data_root).is_dir():
            raise FileNotFoundError(
                f"data root {data_root} is not a directory; give the dataset folder that the config's annotation "
                "files and image folders are relative to (for COCO, the folder that holds annotations/)"
            )
        set_data_root(cfg, data_root)
    if options:
        cfg.merge_from_dict(options)
    if Path(cfg.work_dir).exists() and not Path(cfg.work_dir).is_dir():
        raise ValueError(f"work directory {cfg.work_dir} exists and is not a directory; give --work-dir a directory path")
    return cfg


class MetricsRecorderHook(Hook):
    """Keep the metrics of the last validation or test run, which ``Runner.train`` does not return."""

    priority = "LOWEST"

    def __init__(self):
        self.metrics: dict[str, float] = {}

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.metrics = dict(metrics or {})

    def after_test_epoch(self, runner, metrics=None) -> None:
        self.metrics = dict(metrics or {})


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON through a temporary file and a rename."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=1, sort_keys=True)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    """Write the detector's state dict as safetensors through a temporary file and a rename."""
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(state, temporary, metadata={"format": "pt"})
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _numeric(metrics: dict) -> dict[str, float]:
    return {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float))}


def train_and_evaluate(cfg: Config) -> dict[str, float]:
    """Train with ``cfg``, then return the metrics of its last validation run.

    Writes ``model_final.safetensors`` (the detector's state dict, readable
    without unpickling) and ``metrics.json`` into ``cfg.work_dir``, next to
    MMEngine's own checkpoints and logs. Both files of an earlier run in
    that folder are removed first, so a failed run does not leave the
    folder looking finished. Returns an empty dict when the config's
    schedule runs no validation or the evaluator returns no metrics.
    """
    for name in (FINAL_WEIGHTS_FILE, METRICS_FILE):
        earlier = Path(cfg.work_dir) / name
        if earlier.is_file():
            earlier.unlink()
            logger.warning("removed %s of an earlier run; this run writes it again when it finishes", earlier)

    runner = Runner.from_cfg(cfg)
    recorder = MetricsRecorderHook()
    runner.register_hook(recorder)
    model = runner.train()

    work_dir = Path(runner.work_dir)
    _save_weights(model, work_dir / FINAL_WEIGHTS_FILE)
    metrics = _numeric(recorder.metrics)
    _write_json(work_dir / METRICS_FILE, metrics)
    logger.info("wrote %s and %s in %s", FINAL_WEIGHTS_FILE, METRICS_FILE, work_dir)
    return metrics


def evaluate(cfg: Config, checkpoint: str | os.PathLike, allow_pickle: bool = False) -> dict[str, float]:
    """Load a whole detector's weights with exact keys and run the config's test set; return the metrics.

    ``checkpoint`` is a ``model_final.safetensors`` written by
    ``train_and_evaluate``, or an MMEngine ``.pth`` checkpoint. A ``.pth`` is
    read with ``torch.load(weights_only=True)``, which rejects MMEngine's
    training checkpoints because they pickle the message hub and other
    objects: pass ``allow_pickle`` for a file you trust.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        ValueError: the file cannot be read without unpickling objects.
        SpecError: its keys or shapes differ from the detector's; the message names them.
    """
    state = load_state_dict_file(checkpoint, allow_pickle=allow_pickle)
    if state and not any(key.startswith("backbone.") for key in state):
        raise SpecError(
            f"checkpoint {checkpoint} contains no detector weights (no key starts with 'backbone.'), so it is "
            "probably a backbone's weights: pass a tools/compress_backbone.py folder as --backbone-weights to "
            f"train, and give --checkpoint the {FINAL_WEIGHTS_FILE} of a training run"
        )
    cfg.load_from = None
    runner = Runner.from_cfg(cfg)
    load_weights_strict(runner.model, state, str(checkpoint), target="the detector that the config builds")
    logger.info("loaded the detector weights from %s (%d tensors)", checkpoint, len(state))
    metrics = _numeric(runner.test())
    _write_json(Path(runner.work_dir) / METRICS_FILE, metrics)
    return metrics
