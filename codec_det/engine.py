"""Detectron2 training and evaluation of R-CNN detectors with a CoDeC backbone.

The logic behind ``tools/train_net.py``: config loading with clear errors,
dataset registration and checks, the COCO evaluator and :class:`CodecTrainer`,
a ``DefaultTrainer`` that also trains in several processes on CPUs.

This module imports Detectron2. ``import codec_det`` does not import it, so the
core keeps working where Detectron2 is not installed.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultTrainer, create_ddp_model
from detectron2.engine.train_loop import AMPTrainer, SimpleTrainer, TrainerBase
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.modeling import GeneralizedRCNNWithTTA
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from codec_det.d2 import CoDeCCheckpointer, add_codec_config, resolve_codec_spec
from codec_det.data.demo_datasets import DEMO_DATASETS, register_demo_datasets

__all__ = [
    "COCO_PERSON_OKS_SIGMAS",
    "CodecTrainer",
    "ConfigError",
    "build_evaluator",
    "check_codec_spec",
    "check_datasets",
    "fall_back_to_cpu",
    "flatten_results",
    "keypoint_oks_sigmas",
    "load_config",
    "register_datasets",
    "resolve_config_file",
]

logger = logging.getLogger(__name__)

# pycocotools' COCOeval sigmas of the 17 COCO person keypoints, in COCO's
# keypoint order (nose, eyes, ears, shoulders, elbows, wrists, hips, knees,
# ankles). COCOEvaluator uses them when TEST.KEYPOINT_OKS_SIGMAS is empty.
COCO_PERSON_OKS_SIGMAS = (
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
    0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
)


# Backbone builders that read MODEL.CODEC.
CODEC_BACKBONES = ("build_codec_resnet_backbone", "build_codec_resnet_fpn_backbone")


class ConfigError(ValueError):
    """A config file, a command-line override or a config value that cannot be used."""


def resolve_config_file(value: str | os.PathLike, configs_dir: str | os.PathLike) -> Path:
    """Find a config file given as a path, or as a name relative to ``configs_dir``.

    ``codec_mask_rcnn.yaml`` and ``demo/codec_mask_rcnn_demo.yaml`` are looked
    up in ``configs_dir`` when they are not a file relative to the working
    directory.

    Raises:
        FileNotFoundError: neither place has the file; the message lists the
            configs in ``configs_dir``.
    """
    configs_dir = Path(configs_dir)
    if not str(value):
        raise FileNotFoundError(
            "no config file given: pass --config-file FILE, e.g. --config-file demo/codec_mask_rcnn_demo.yaml"
        )
    path = Path(value).expanduser()
    if path.is_file():
        return path.resolve()
    bundled = configs_dir / value
    if bundled.is_file():
        return bundled.resolve()

    available = sorted(str(file.relative_to(configs_dir)) for file in configs_dir.rglob("*.yaml"))
    raise FileNotFoundError(
        f"config file {value} not found, neither as a path nor in {configs_dir}. "
        f"The configs there are: {', '.join(available) or 'none'}"
    )


def load_config(config_file: str | os.PathLike, opts: Sequence[str] = ()) -> CfgNode:
    """Build a Detectron2 config with the ``MODEL.CODEC`` keys, from a yaml file and ``KEY VALUE`` overrides.

    Returns the config unfrozen.

    Raises:
        FileNotFoundError: ``config_file`` does not exist.
        ConfigError: the file is not valid yaml, the file or an override names
            a key that does not exist or gives a value of the wrong type, or
            the overrides are not pairs.
    """
    if not Path(config_file).is_file():
        raise FileNotFoundError(f"config file {config_file} not found")
    cfg = get_cfg()
    add_codec_config(cfg)

    try:
        cfg.merge_from_file(str(config_file))
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {config_file} is not valid yaml: {error}") from None
    except KeyError as error:
        raise ConfigError(
            f"config file {config_file}: {error.args[0]}. Fix or remove that key; the valid keys are "
            "Detectron2's (detectron2.config.get_cfg()) plus MODEL.CODEC.SPEC"
        ) from None
    except ValueError as error:
        raise ConfigError(f"config file {config_file}: {error}") from None

    opts = list(opts or ())
    if len(opts) % 2 != 0:
        raise ConfigError(
            f"config overrides must be KEY VALUE pairs, got an odd number of items: {' '.join(opts)}"
        )
    for key in opts[0::2]:
        if not _has_key(cfg, key):
            raise ConfigError(
                f"command-line override: no config key {key}. Check its spelling against {config_file} "
                "or Detectron2's detectron2.config.get_cfg()"
            )
    try:
        cfg.merge_from_list(opts)
    except ValueError as error:
        raise ConfigError(f"command-line override: {error}") from None

    _check_keypoint_settings(cfg)
    return cfg


def _has_key(cfg: CfgNode, key: str) -> bool:
    # yacs reports an unknown key in merge_from_list with an assert, which
    # `python -O` removes, so the key is looked up here first.
    if cfg.key_is_deprecated(key) or cfg.key_is_renamed(key):
        return True
    node = cfg
    for part in key.split("."):
        if not isinstance(node, CfgNode) or part not in node:
            return False
        node = node[part]
    return True


def _check_keypoint_settings(cfg: CfgNode) -> None:
    sigmas = list(cfg.TEST.KEYPOINT_OKS_SIGMAS)
    num_keypoints = cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS
    if cfg.MODEL.KEYPOINT_ON and sigmas and len(sigmas) != num_keypoints:
        raise ConfigError(
            f"TEST.KEYPOINT_OKS_SIGMAS has {len(sigmas)} values but MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS "
            f"is {num_keypoints}; give one sigma per keypoint"
        )


def fall_back_to_cpu(cfg: CfgNode) -> bool:
    """Set ``MODEL.DEVICE`` to ``cpu`` when it names CUDA and no CUDA device is available.

    Returns True when the device was changed.
    """
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
        return True
    return False


def register_datasets(cfg: CfgNode) -> list[str]:
    """Register the bundled demo datasets when ``cfg`` trains or tests on one of them.

    Returns the names of the demo datasets that the config uses.

    Raises:
        FileNotFoundError: the demo photos have not been fetched.
    """
    used = [name for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST) if name in DEMO_DATASETS]
    if used:
        register_demo_datasets()
    return sorted(set(used))


def check_datasets(names: Iterable[str], config_key: str) -> None:
    """Check that each dataset is registered and that its annotation file and image folder exist.

    Called before any data loader is built, so that a missing dataset fails
    with the path and the fix rather than deep inside Detectron2.

    Raises:
        ConfigError: a name is not a registered dataset.
        FileNotFoundError: a dataset's json file or image folder is missing.
    """
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            coco_names = sorted(n for n in registered if n.startswith(("coco_2017", "keypoints_coco_2017")))
            raise ConfigError(
                f"{config_key}: dataset {name!r} is not registered. COCO-2017 names are "
                f"{', '.join(coco_names)}; the bundled demo sets are {', '.join(sorted(DEMO_DATASETS))}"
            )

        metadata = MetadataCatalog.get(name)
        json_file = metadata.get("json_file", None)
        image_root = metadata.get("image_root", None)
        missing = []
        if json_file is not None and not os.path.isfile(json_file):
            missing.append(f"annotation file {json_file}")
        if image_root is not None and not os.path.isdir(image_root):
            missing.append(f"image folder {image_root}")
        if missing:
            raise FileNotFoundError(f"dataset {name} ({config_key}): {' and '.join(missing)} not found. "
                                    + _dataset_hint(name, json_file or image_root))


def _dataset_hint(name: str, path: str) -> str:
    if name in DEMO_DATASETS:
        return "Run `python -m codec_det.data.demo_fetch` to download the demo photos."
    # Detectron2 reads DETECTRON2_DATASETS once, when detectron2.data is imported.
    root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    if os.path.abspath(path).startswith(os.path.abspath(root) + os.sep):
        return (
            f"Detectron2 looks for its built-in datasets under DETECTRON2_DATASETS "
            f"(now {os.path.abspath(root)}); put COCO-2017 there as coco/annotations, coco/train2017 and "
            "coco/val2017, or set DETECTRON2_DATASETS to the folder that contains coco/ before starting."
        )
    return "Check the paths given when the dataset was registered."


def keypoint_oks_sigmas(cfg: CfgNode, dataset_name: str) -> list[float]:
    """Return the OKS sigmas for evaluating keypoints on ``dataset_name``.

    ``TEST.KEYPOINT_OKS_SIGMAS`` when set, else the dataset's
    ``keypoint_oks_sigmas`` metadata when it has any, else an empty list
    (COCOEvaluator then uses COCO's 17 person sigmas).

    Raises:
        ConfigError: keypoints are on, no sigmas are known and the head does
            not predict COCO's 17 keypoints.
    """
    sigmas = list(cfg.TEST.KEYPOINT_OKS_SIGMAS)
    if not sigmas:
        sigmas = list(MetadataCatalog.get(dataset_name).get("keypoint_oks_sigmas", []))
    num_keypoints = cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS
    if cfg.MODEL.KEYPOINT_ON and not sigmas and num_keypoints != len(COCO_PERSON_OKS_SIGMAS):
        raise ConfigError(
            f"MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS is {num_keypoints} and neither TEST.KEYPOINT_OKS_SIGMAS "
            f"nor the metadata of {dataset_name} gives OKS sigmas; set TEST.KEYPOINT_OKS_SIGMAS to "
            f"{num_keypoints} values"
        )
    return sigmas


def build_evaluator(cfg: CfgNode, dataset_name: str, output_folder: str | None = None) -> DatasetEvaluator:
    """Build Detectron2's COCOEvaluator for box, mask and keypoint AP with pycocotools' COCOeval.

    ``use_fast_impl=False`` because the fast implementation lives in
    Detectron2's compiled ``_C`` extension, which not every install can load.
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    # Tasks from the config rather than from the predictions, so that a model
    # without detections still reports every task (as NaN).
    tasks = ["bbox"]
    if cfg.MODEL.MASK_ON:
        tasks.append("segm")
    if cfg.MODEL.KEYPOINT_ON:
        tasks.append("keypoints")
    return COCOEvaluator(
        dataset_name,
        tasks=tuple(tasks),
        output_dir=output_folder,
        use_fast_impl=False,
        kpt_oks_sigmas=keypoint_oks_sigmas(cfg, dataset_name),
    )


def flatten_results(results: Mapping) -> dict[str, dict[str, float]]:
    """Turn ``{task: {metric: value}}`` or ``{dataset: {task: {...}}}`` into ``{"dataset/task": {...}}``."""
    flat: dict[str, dict[str, float]] = OrderedDict()
    for key, value in results.items():
        if not isinstance(value, Mapping):
            continue
        if value and all(isinstance(inner, Mapping) for inner in value.values()):
            for task, metrics in value.items():
                flat[f"{key}/{task}"] = dict(metrics)
        else:
            flat[key] = dict(value)
    return flat


class CodecTrainer(DefaultTrainer):
    """Detectron2's ``DefaultTrainer`` with the COCO evaluator, strict CoDeC checkpoints and multi-process CPU training.

    ``DefaultTrainer`` wraps the model in ``DistributedDataParallel`` with
    ``device_ids=[local_rank]``, which PyTorch rejects with a ValueError for a
    model on the CPU. This trainer passes ``device_ids=None`` there. Everything
    else follows ``DefaultTrainer``.
    """

    def __init__(self, cfg: CfgNode):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        # The same order as DefaultTrainer: model, optimizer, data loader.
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        device_ids = None if cfg.MODEL.DEVICE == "cpu" else [comm.get_local_rank()]
        model = create_ddp_model(model, broadcast_buffers=False, device_ids=device_ids)
        trainer_class = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_class(model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # Strict for the CoDeC backbone's weights, and saves its spec with them.
        self.checkpointer = CoDeCCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg

        self.register_hooks(self.build_hooks())

    def train(self):
        """Run training; returns the results of the last evaluation (empty when none ran)."""
        super().train()
        return getattr(self, "_last_eval_results", OrderedDict())

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate with test-time augmentation (``TEST.AUG``); results are keyed ``<task>_TTA``."""
        logger.info("Running inference with test-time augmentation ...")
        model = GeneralizedRCNNWithTTA(cfg, model)
        evaluators = [
            cls.build_evaluator(cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA"))
            for name in cfg.DATASETS.TEST
        ]
        results = cls.test(cfg, model, evaluators)
        return OrderedDict((f"{task}_TTA", metrics) for task, metrics in results.items())


def check_codec_spec(cfg: CfgNode) -> None:
    """Resolve the backbone's spec once, so that a missing or invalid spec fails before any model is built.

    Raises:
        FileNotFoundError: ``MODEL.CODEC.SPEC`` names no file, folder or bundled preset.
        SpecError: the spec is invalid or differs from the one stored in ``MODEL.WEIGHTS``.
    """
    if cfg.MODEL.BACKBONE.NAME in CODEC_BACKBONES:
        resolve_codec_spec(cfg)
