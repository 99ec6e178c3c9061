"""A small image classification set cut from the demo photos: instance crops labelled by category.

The demo photos (see :mod:`codec_det.data.demo_fetch`) annotate 18 object
instances. The three categories with at least two instances are used:
``person`` (6 instances in the VOC photos), ``car`` (1 in the VOC photos, 5
in the aerial photo) and ``bus`` (2 in the VOC photos). Per category, the
last third of its instances (rounded up, in annotation order) is held out
for validation, so no validation image shows an instance seen in training:

=========  =====================  ===================
category   training instances     validation instances
=========  =====================  ===================
bus        1                      1
car        4                      2
person     4                      2
=========  =====================  ===================

Each instance gives several crops of its box, randomly enlarged by 0 to 40%
and shifted by up to 10% of the box size, resized so that the longer side is
``max_side`` pixels. The defaults write 144 training and 20 validation
images in ImageFolder layout::

    manifest.json
    train/bus/*.jpg  train/car/*.jpg  train/person/*.jpg
    val/bus/*.jpg    val/car/*.jpg    val/person/*.jpg

With 14 instances, this set shows that a fine-tuning pipeline runs and
learns. Its accuracy tells little about a model.

Run ``python -m codec_det.data.demo_crops [--output DIR]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from codec_det.data.demo_fetch import default_demo_root, is_demo_data_complete

__all__ = [
    "CROP_CATEGORIES",
    "CROP_SOURCES",
    "build_demo_crops",
    "default_crops_root",
    "is_demo_crops_complete",
    "main",
]

logger = logging.getLogger(__name__)

CROP_CATEGORIES = ("bus", "car", "person")
# Demo datasets the instances come from, in this order.
CROP_SOURCES = ("voc", "cars")
MANIFEST_NAME = "manifest.json"
# Bump when the written images change, so that older sets are rebuilt.
FORMAT_VERSION = 1


def default_crops_root() -> Path:
    """Return ``codec_demo_crops`` beside the demo data folder (``datasets/codec_demo_crops`` by default)."""
    return default_demo_root().parent / "codec_demo_crops"


def _instances(demo_root: Path) -> dict[str, list[dict[str, Any]]]:
    """Collect ``{category: [{"image": path, "bbox": [x, y, w, h]}, ...]}`` in annotation order."""
    instances: dict[str, list[dict[str, Any]]] = {name: [] for name in CROP_CATEGORIES}
    for source in CROP_SOURCES:
        folder = demo_root / source
        coco = json.loads((folder / "annotations.json").read_text(encoding="utf-8"))
        categories = {category["id"]: category["name"] for category in coco["categories"]}
        images = {image["id"]: folder / image["file_name"] for image in coco["images"]}
        for annotation in coco["annotations"]:
            name = categories[annotation["category_id"]]
            if name in instances and not annotation.get("iscrowd", 0):
                instances[name].append({"image": images[annotation["image_id"]], "bbox": annotation["bbox"]})
    return instances


def _split(instances: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    held_out = math.ceil(len(instances) / 3)
    return instances[:-held_out], instances[-held_out:]


def _crop_box(bbox: list[float], width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Return a jittered ``(left, top, right, bottom)`` around ``bbox``, clipped to the image."""
    x, y, box_width, box_height = bbox
    scale = rng.uniform(1.0, 1.4)
    centre_x = x + box_width / 2 + rng.uniform(-0.1, 0.1) * box_width
    centre_y = y + box_height / 2 + rng.uniform(-0.1, 0.1) * box_height
    half_width, half_height = scale * box_width / 2, scale * box_height / 2
    left = max(0, math.floor(centre_x - half_width))
    top = max(0, math.floor(centre_y - half_height))
    right = min(width, math.ceil(centre_x + half_width))
    bottom = min(height, math.ceil(centre_y + half_height))
    return left, top, right, bottom


def _write_crops(instances: list[dict[str, Any]], folder: Path, *, crops: int, max_side: int,
                 rng: np.random.Generator) -> int:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for instance_index, instance in enumerate(instances):
        with Image.open(instance["image"]) as opened:
            image = opened.convert("RGB")
        for crop_index in range(crops):
            crop = image.crop(_crop_box(instance["bbox"], image.width, image.height, rng))
            factor = max_side / max(crop.size)
            size = (max(1, round(crop.width * factor)), max(1, round(crop.height * factor)))
            crop = crop.resize(size, Image.Resampling.BICUBIC)
            crop.save(folder / f"{instance['image'].stem}_{instance_index:02d}_{crop_index:02d}.jpg", quality=95)
            written += 1
    return written


def is_demo_crops_complete(root: str | os.PathLike) -> bool:
    """Return whether ``root`` contains a finished crop set of the current format."""
    try:
        manifest = json.loads((Path(root) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("format_version") == FORMAT_VERSION


def build_demo_crops(output: str | os.PathLike | None = None, *, demo_root: str | os.PathLike | None = None,
                     train_crops: int = 16, val_crops: int = 4, max_side: int = 128, seed: int = 0,
                     force: bool = False) -> Path:
    """Write the crop set in ImageFolder layout and return its folder.

    Idempotent: a complete set of the current format is kept unless ``force``.
    The set is written to a temporary sibling folder and renamed into place.

    Args:
        output: destination; :func:`default_crops_root` when None.
        demo_root: fetched demo data; :func:`~codec_det.data.demo_fetch.default_demo_root` when None.
        train_crops, val_crops: crops per training and per validation instance.
        max_side: longer side of each crop, in pixels.
        seed: seed of the crop jitter.

    Raises:
        FileNotFoundError: the demo photos have not been fetched.
    """
    output = Path(output).expanduser().resolve() if output is not None else default_crops_root()
    demo_root = Path(demo_root).expanduser().resolve() if demo_root is not None else default_demo_root()
    if not force and is_demo_crops_complete(output):
        logger.info("demo crops already complete in %s", output)
        return output
    if not is_demo_data_complete(demo_root):
        raise FileNotFoundError(
            f"demo photos not found in {demo_root}; run `python -m codec_det.data.demo_fetch` "
            "(or `bash tools/setup_env.sh`) to download them, or set CODEC_DEMO_DATA to their folder"
        )
    for name, value in (("train_crops", train_crops), ("val_crops", val_crops), ("max_side", max_side)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")

    rng = np.random.default_rng(seed)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        counts: dict[str, dict[str, int]] = {"train": {}, "val": {}}
        for category, instances in _instances(demo_root).items():
            train, val = _split(instances)
            counts["train"][category] = _write_crops(train, staging / "train" / category, crops=train_crops,
                                                     max_side=max_side, rng=rng)
            counts["val"][category] = _write_crops(val, staging / "val" / category, crops=val_crops,
                                                   max_side=max_side, rng=rng)
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": str(demo_root),
            "categories": list(CROP_CATEGORIES),
            "images": counts,
            "settings": {"train_crops": train_crops, "val_crops": val_crops, "max_side": max_side, "seed": seed},
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        staging.chmod(0o755)

        previous = None
        if output.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, previous / output.name)
        os.replace(staging, output)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    logger.info("wrote %d training and %d validation crops to %s", sum(counts["train"].values()),
                sum(counts["val"].values()), output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m codec_det.data.demo_crops",
        description="Cut a small ImageFolder classification set (bus, car, person) from the demo photos.",
    )
    parser.add_argument("--output", type=Path, default=None,
                        help="output folder (default: codec_demo_crops beside the demo data folder)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output folder is complete")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        root = build_demo_crops(args.output, force=args.force)
    except (FileNotFoundError, ValueError) as error:
        print(f"demo_crops: failed: {error}", file=sys.stderr)
        return 1
    print(f"Demo crops ready in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
