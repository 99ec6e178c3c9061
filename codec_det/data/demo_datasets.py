"""Detectron2 registration of the real demo datasets fetched by :mod:`codec_det.data.demo_fetch`.

=====================  ======================  =====================================
dataset name           folder under the root   content
=====================  ======================  =====================================
``codec_demo_voc``     ``voc/``                3 photos, 12 instance polygons and
                                               boxes, 20 VOC classes (6 annotated)
``codec_demo_cars``    ``cars/``               1 aerial photo, 5 car boxes, no masks
``codec_demo_quokka``  ``quokka/``             1 photo, 1 quokka: box, polygon and
                                               7 keypoints
=====================  ======================  =====================================

Importing this module does not import Detectron2; :func:`register_demo_datasets`
does.

Training Keypoint R-CNN on ``codec_demo_quokka`` needs
``MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS 7``, and evaluating it needs
``TEST.KEYPOINT_OKS_SIGMAS`` set to :data:`QUOKKA_OKS_SIGMAS`. With that
option empty, Detectron2's COCOEvaluator keeps pycocotools' 17 COCO person
sigmas and raises an AssertionError because they do not match the 7
keypoints.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from codec_det.data.demo_fetch import QUOKKA_KEYPOINT_NAMES, default_demo_root

__all__ = [
    "DEMO_DATASETS",
    "QUOKKA_KEYPOINT_CONNECTION_RULES",
    "QUOKKA_KEYPOINT_FLIP_MAP",
    "QUOKKA_KEYPOINT_NAMES",
    "QUOKKA_OKS_SIGMAS",
    "demo_dataset_metadata",
    "register_demo_datasets",
]

logger = logging.getLogger(__name__)

# Detectron2 dataset name -> folder under the demo root.
DEMO_DATASETS = {
    "codec_demo_voc": "voc",
    "codec_demo_cars": "cars",
    "codec_demo_quokka": "quokka",
}

# Pairs of keypoints that swap under a horizontal flip. The names describe
# the image's left and right, so a flip swaps each pair.
QUOKKA_KEYPOINT_FLIP_MAP = [
    ("ear_tip_left", "ear_tip_right"),
    ("eye_left", "eye_right"),
    ("paw_left", "paw_right"),
]

# Per-keypoint OKS sigmas, in the order of QUOKKA_KEYPOINT_NAMES. No
# annotator study exists for quokkas, so each keypoint takes the COCO person
# sigma of the closest human body part, as pycocotools' COCOeval defines
# them: ear 0.035 for the ear tips, eye 0.025, nose 0.026 and wrist 0.062
# for the front paws.
QUOKKA_OKS_SIGMAS = [0.035, 0.035, 0.025, 0.025, 0.026, 0.062, 0.062]

# (keypoint, keypoint, RGB colour) triples that Detectron2's Visualizer
# draws as lines; the same edges as the COCO "skeleton" in the json.
QUOKKA_KEYPOINT_CONNECTION_RULES = [
    ("ear_tip_left", "eye_left", (102, 204, 255)),
    ("ear_tip_right", "eye_right", (51, 153, 255)),
    ("eye_left", "eye_right", (255, 255, 0)),
    ("eye_left", "nose", (102, 0, 204)),
    ("eye_right", "nose", (51, 102, 255)),
    ("nose", "paw_left", (255, 128, 0)),
    ("nose", "paw_right", (255, 153, 51)),
]


def _load_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def demo_dataset_metadata(name: str, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Build the Detectron2 metadata of demo dataset ``name`` from its json.

    ``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` are computed
    as Detectron2's ``load_coco_json`` computes them (categories sorted by
    id), so the two never disagree. The quokka set also gets
    ``keypoint_names``, ``keypoint_flip_map``,
    ``keypoint_connection_rules`` and ``keypoint_oks_sigmas``.

    Raises:
        KeyError: ``name`` is not a demo dataset.
        FileNotFoundError: the dataset's annotations.json is missing.
        ValueError: the quokka json's keypoint names differ from
            :data:`QUOKKA_KEYPOINT_NAMES`.
    """
    if name not in DEMO_DATASETS:
        raise KeyError(f"unknown demo dataset {name!r}; expected one of {sorted(DEMO_DATASETS)}")
    root = Path(root) if root is not None else default_demo_root()
    folder = root / DEMO_DATASETS[name]
    json_file = folder / "annotations.json"
    if not json_file.is_file():
        raise FileNotFoundError(_missing_data_message(root, json_file))

    categories = sorted(_load_json(json_file)["categories"], key=lambda category: category["id"])
    metadata: dict[str, Any] = {
        "thing_classes": [category["name"] for category in categories],
        "thing_dataset_id_to_contiguous_id": {
            category["id"]: index for index, category in enumerate(categories)
        },
    }

    if name == "codec_demo_quokka":
        names = tuple(categories[0].get("keypoints", ()))
        if names != QUOKKA_KEYPOINT_NAMES:
            raise ValueError(
                f"{json_file} lists keypoints {names}, expected {QUOKKA_KEYPOINT_NAMES}; "
                "re-run python -m codec_det.data.demo_fetch --force"
            )
        metadata.update(
            keypoint_names=list(QUOKKA_KEYPOINT_NAMES),
            keypoint_flip_map=list(QUOKKA_KEYPOINT_FLIP_MAP),
            keypoint_connection_rules=list(QUOKKA_KEYPOINT_CONNECTION_RULES),
            keypoint_oks_sigmas=list(QUOKKA_OKS_SIGMAS),
        )
    return metadata


def _missing_data_message(root: Path, missing: Path) -> str:
    return (
        f"codec-det demo data not found in {root} (missing {missing}). "
        "Run `python -m codec_det.data.demo_fetch` (or `bash tools/setup_env.sh`) to download it, "
        "or set CODEC_DEMO_DATA to the folder that holds it."
    )


def register_demo_datasets(root: str | os.PathLike | None = None) -> list[str]:
    """Register ``codec_demo_voc``, ``codec_demo_cars`` and ``codec_demo_quokka`` with Detectron2.

    Uses ``detectron2.data.datasets.register_coco_instances`` with the
    metadata of :func:`demo_dataset_metadata`. Idempotent: a name already in
    ``DatasetCatalog`` is left as it is (with a warning if it points at
    another json file).

    Args:
        root: demo data folder; :func:`~codec_det.data.demo_fetch.default_demo_root`
            (``$CODEC_DEMO_DATA`` or ``datasets/codec_demo``) when None.

    Returns:
        The three dataset names.

    Raises:
        FileNotFoundError: the data has not been fetched into ``root``.
    """
    root = Path(root).expanduser().resolve() if root is not None else default_demo_root()
    # Check every file before registering anything, so a missing fetch fails
    # the same way whether or not Detectron2 is installed.
    for folder in DEMO_DATASETS.values():
        json_file = root / folder / "annotations.json"
        if not json_file.is_file():
            raise FileNotFoundError(_missing_data_message(root, json_file))

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    registered = set(DatasetCatalog.list())
    for name, folder in DEMO_DATASETS.items():
        json_file = root / folder / "annotations.json"
        if name in registered:
            existing = MetadataCatalog.get(name).get("json_file")
            if existing is not None and Path(existing) != json_file:
                logger.warning("Dataset %s is already registered with %s; keeping it, not %s",
                               name, existing, json_file)
            continue
        register_coco_instances(name, demo_dataset_metadata(name, root), str(json_file), str(root / folder))
    return list(DEMO_DATASETS)
