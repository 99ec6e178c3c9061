"""Generate a synthetic COCO-format detection dataset of coloured shapes and stick figures.

Each image has a noisy background, one or more "person" stick figures and
some rectangles, triangles and ellipses, none of them overlapping, so every
mask is exactly what is drawn. Two annotation files are written, laid out
like COCO-2017's:

- ``instances.json``: all four categories (``person`` id 1, ``rectangle``
  2, ``triangle`` 3, ``ellipse`` 4) with boxes and polygon masks. A
  person's mask is a list of polygons (head, neck, torso, limbs).
- ``person_keypoints.json``: the same images, only the persons, with
  COCO's 17 person keypoints (names, order and flip pairs as in COCO), all
  with visibility 2.

Images are PNG files in ``images/``. The output depends only on the
arguments: the same seed gives the same pixels and the same json.

Run ``python -m codec_det.data.synthetic_coco --output DIR --num-images N --seed S``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "COCO_PERSON_KEYPOINT_FLIP_MAP",
    "COCO_PERSON_KEYPOINT_NAMES",
    "COCO_PERSON_OKS_SIGMAS",
    "SYNTHETIC_CATEGORIES",
    "generate_synthetic_coco",
    "main",
    "register_synthetic_dataset",
]

logger = logging.getLogger(__name__)

SYNTHETIC_CATEGORIES = (
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 2, "name": "rectangle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "ellipse", "supercategory": "shape"},
)

# COCO-2017 person keypoints, in COCO's order. "left" is the person's left,
# which is the image's right for a figure facing the camera.
COCO_PERSON_KEYPOINT_NAMES = (
    "nose",
    "left_eye", "right_eye",
    "left_ear", "right_ear",
    "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow",
    "left_wrist", "right_wrist",
    "left_hip", "right_hip",
    "left_knee", "right_knee",
    "left_ankle", "right_ankle",
)  # fmt: skip
COCO_PERSON_KEYPOINT_FLIP_MAP = [
    (f"left_{part}", f"right_{part}")
    for part in ("eye", "ear", "shoulder", "elbow", "wrist", "hip", "knee", "ankle")
]
# COCO's per-keypoint OKS sigmas (the defaults of pycocotools' COCOeval).
COCO_PERSON_OKS_SIGMAS = [
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
    0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
]  # fmt: skip
# COCO's "skeleton": 1-based keypoint index pairs.
COCO_PERSON_SKELETON = [
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7],
    [6, 8], [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5],
    [4, 6], [5, 7],
]  # fmt: skip

# Keypoints of a figure facing the camera, as (u, v) fractions of its box
# (u across, v down). Elbows, wrists, knees and ankles get random offsets.
_PERSON_LAYOUT = {
    "nose": (0.50, 0.10),
    "left_eye": (0.55, 0.07), "right_eye": (0.45, 0.07),
    "left_ear": (0.61, 0.09), "right_ear": (0.39, 0.09),
    "left_shoulder": (0.70, 0.25), "right_shoulder": (0.30, 0.25),
    "left_elbow": (0.80, 0.42), "right_elbow": (0.20, 0.42),
    "left_wrist": (0.88, 0.57), "right_wrist": (0.12, 0.57),
    "left_hip": (0.62, 0.58), "right_hip": (0.38, 0.58),
    "left_knee": (0.64, 0.78), "right_knee": (0.36, 0.78),
    "left_ankle": (0.66, 0.96), "right_ankle": (0.34, 0.96),
}  # fmt: skip
_LIMBS = (
    ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
    ("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"),
    ("left_hip", "left_knee"), ("left_knee", "left_ankle"),
    ("right_hip", "right_knee"), ("right_knee", "right_ankle"),
)  # fmt: skip
_JITTERED = ("elbow", "wrist", "knee", "ankle")


def _circle_polygon(cx: float, cy: float, rx: float, ry: float, sides: int, angle: float = 0.0) -> list[float]:
    points = []
    for index in range(sides):
        theta = 2.0 * math.pi * index / sides
        x, y = rx * math.cos(theta), ry * math.sin(theta)
        points.extend([
            cx + x * math.cos(angle) - y * math.sin(angle),
            cy + x * math.sin(angle) + y * math.cos(angle),
        ])  # fmt: skip
    return points


def _segment_polygon(start: tuple[float, float], end: tuple[float, float], thickness: float) -> list[float]:
    """Return the quadrilateral of a line segment of the given thickness."""
    dx, dy = end[0] - start[0], end[1] - start[1]
    length = math.hypot(dx, dy) or 1.0
    nx, ny = -dy / length * thickness / 2.0, dx / length * thickness / 2.0
    return [
        start[0] + nx, start[1] + ny, end[0] + nx, end[1] + ny,
        end[0] - nx, end[1] - ny, start[0] - nx, start[1] - ny,
    ]  # fmt: skip


def _person(rng: np.random.Generator, x0: float, y0: float, width: float, height: float):
    """Return the polygons and keypoints of a stick figure filling box (x0, y0, width, height)."""
    keypoints = {}
    for name, (u, v) in _PERSON_LAYOUT.items():
        if name.split("_")[-1] in _JITTERED:
            u = float(np.clip(u + rng.uniform(-0.08, 0.08), 0.06, 0.94))
            v = float(np.clip(v + rng.uniform(-0.05, 0.03), 0.05, 0.96))
        keypoints[name] = (x0 + u * width, y0 + v * height)

    thickness = max(2.0, 0.07 * width)
    head_center = (x0 + 0.50 * width, y0 + 0.09 * height)
    polygons = [
        _circle_polygon(*head_center, rx=0.15 * width, ry=0.07 * height, sides=16),
        _segment_polygon(head_center, (x0 + 0.50 * width, y0 + 0.25 * height), thickness),
        [
            *keypoints["right_shoulder"], *keypoints["left_shoulder"],
            *keypoints["left_hip"], *keypoints["right_hip"],
        ],  # fmt: skip
    ]
    polygons.extend(_segment_polygon(keypoints[a], keypoints[b], thickness) for a, b in _LIMBS)
    flat_keypoints = []
    for name in COCO_PERSON_KEYPOINT_NAMES:
        flat_keypoints.extend([round(keypoints[name][0], 2), round(keypoints[name][1], 2), 2])
    return polygons, flat_keypoints


def _shape(rng: np.random.Generator, category: str, x0: float, y0: float, width: float, height: float):
    """Return the single polygon of a rectangle, triangle or ellipse inside the box."""
    if category == "rectangle":
        return [[x0, y0, x0 + width, y0, x0 + width, y0 + height, x0, y0 + height]]
    if category == "triangle":
        apex = x0 + float(rng.uniform(0.0, 1.0)) * width
        return [[apex, y0, x0 + width, y0 + height, x0, y0 + height]]
    return [_circle_polygon(x0 + width / 2, y0 + height / 2, width / 2, height / 2, sides=32)]


def _overlaps(box: tuple[float, float, float, float], placed: list[tuple[float, float, float, float]],
              margin: float) -> bool:
    x0, y0, w, h = box
    for px, py, pw, ph in placed:
        if x0 < px + pw + margin and px < x0 + w + margin and y0 < py + ph + margin and py < y0 + h + margin:
            return True
    return False


# Supersampling factor of the mask that estimates an instance's area.
_AREA_SUPERSAMPLING = 4


def _mask_stats(polygons: list[list[float]], width: int, height: int):
    """Return (area in pixels, [x, y, w, h] box) of the union of the polygons.

    The area is the union's geometric area, estimated by rasterising at
    4x the resolution: PIL fills every pixel that a polygon's edge touches,
    so a mask at 1x overstates thin limbs by up to a pixel on each side.
    """
    from PIL import Image, ImageDraw

    scale = _AREA_SUPERSAMPLING
    mask = Image.new("L", (width * scale, height * scale), 0)
    draw = ImageDraw.Draw(mask)
    for polygon in polygons:
        draw.polygon([value * scale for value in polygon], fill=1)
    area = round(float(np.asarray(mask, dtype=np.uint8).sum()) / scale**2, 2)

    xs = [x for polygon in polygons for x in polygon[0::2]]
    ys = [y for polygon in polygons for y in polygon[1::2]]
    x_min, y_min = max(0.0, min(xs)), max(0.0, min(ys))
    x_max, y_max = min(float(width), max(xs)), min(float(height), max(ys))
    return area, [round(x_min, 2), round(y_min, 2), round(x_max - x_min, 2), round(y_max - y_min, 2)]


def _place(rng: np.random.Generator, placed: list, width: int, height: int,
           box_width: float, box_height: float, margin: float) -> tuple[float, float, float, float] | None:
    for _ in range(50):
        x0 = float(rng.uniform(margin, width - box_width - margin))
        y0 = float(rng.uniform(margin, height - box_height - margin))
        box = (x0, y0, box_width, box_height)
        if not _overlaps(box, placed, margin):
            return box
    return None


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    base = rng.integers(20, 110, size=3)
    ramp = np.linspace(0.0, 40.0, width)[None, :, None]
    noise = rng.normal(0.0, 8.0, size=(height, width, 3))
    return np.clip(base[None, None, :] + ramp + noise, 0, 255).astype(np.uint8)


def _bright_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    colour = rng.integers(60, 256, size=3)
    colour[rng.integers(0, 3)] = 255
    return tuple(int(value) for value in colour)


def generate_synthetic_coco(
    output: str | os.PathLike,
    *,
    num_images: int = 32,
    seed: int = 0,
    width: int = 320,
    height: int = 240,
    max_shapes: int = 3,
    max_persons: int = 2,
) -> Path:
    """Write ``num_images`` synthetic images and their COCO annotations into ``output``.

    Every image has 1 to ``max_persons`` persons and 0 to ``max_shapes``
    shapes (fewer when they do not fit without overlap). Boxes are
    ``[x, y, w, h]`` in pixels; ``area`` is the rasterised mask's pixel
    count.

    Raises:
        ValueError: a count or a size is out of range.
    """
    from PIL import Image, ImageDraw

    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if width < 64 or height < 64:
        raise ValueError(f"images must be at least 64x64 pixels, got {width}x{height}")
    if max_persons < 1 or max_shapes < 0:
        raise ValueError(f"need max_persons >= 1 and max_shapes >= 0, got {max_persons} and {max_shapes}")

    output = Path(output)
    (output / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    category_ids = {category["name"]: category["id"] for category in SYNTHETIC_CATEGORIES}

    images, instances, keypoint_annotations = [], [], []
    for image_id in range(1, num_images + 1):
        canvas = Image.fromarray(_background(rng, width, height))
        draw = ImageDraw.Draw(canvas)
        placed: list[tuple[float, float, float, float]] = []
        margin = 3.0

        objects = ["person"] * int(rng.integers(1, max_persons + 1))
        shape_names = ("rectangle", "triangle", "ellipse")
        for _ in range(int(rng.integers(0, max_shapes + 1))):
            objects.append(shape_names[int(rng.integers(0, 3))])

        for category in objects:
            if category == "person":
                box_height = float(rng.uniform(0.45, 0.85)) * (height - 2 * margin)
                box_width = box_height * float(rng.uniform(0.4, 0.55))
            else:
                box_width = float(rng.uniform(0.12, 0.35)) * width
                box_height = float(rng.uniform(0.12, 0.35)) * height
            box = _place(rng, placed, width, height, box_width, box_height, margin)
            if box is None:
                continue
            placed.append(box)

            keypoints = None
            if category == "person":
                polygons, keypoints = _person(rng, *box)
            else:
                polygons = _shape(rng, category, *box)
            polygons = [[round(value, 2) for value in polygon] for polygon in polygons]

            colour = _bright_colour(rng)
            for polygon in polygons:
                draw.polygon(polygon, fill=colour)
            area, bbox = _mask_stats(polygons, width, height)

            annotation = {
                "id": len(instances) + 1,
                "image_id": image_id,
                "category_id": category_ids[category],
                "bbox": bbox,
                "area": area,
                "segmentation": polygons,
                "iscrowd": 0,
            }
            instances.append(annotation)
            if keypoints is not None:
                keypoint_annotations.append(
                    {
                        **annotation,
                        "id": len(keypoint_annotations) + 1,
                        "keypoints": keypoints,
                        "num_keypoints": len(COCO_PERSON_KEYPOINT_NAMES),
                    }
                )

        file_name = f"images/{image_id:06d}.png"
        canvas.save(output / file_name, format="PNG")
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})

    info = {
        "description": f"codec-det synthetic shapes and stick figures, seed {seed}",
        "version": "1",
    }
    instances_json = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": instances,
        "categories": [dict(category) for category in SYNTHETIC_CATEGORIES],
    }
    person_category = {
        **SYNTHETIC_CATEGORIES[0],
        "keypoints": list(COCO_PERSON_KEYPOINT_NAMES),
        "skeleton": COCO_PERSON_SKELETON,
    }
    keypoints_json = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": keypoint_annotations,
        "categories": [person_category],
    }
    for name, data in (("instances.json", instances_json), ("person_keypoints.json", keypoints_json)):
        (output / name).write_text(json.dumps(data) + "\n", encoding="utf-8")

    logger.info("Wrote %d images, %d instances (%d persons) to %s",
                len(images), len(instances), len(keypoint_annotations), output)
    return output


def register_synthetic_dataset(name: str, root: str | os.PathLike, *, task: str = "instances") -> str:
    """Register a generated dataset in ``root`` with Detectron2 and return ``name``.

    Args:
        name: the Detectron2 dataset name.
        root: the ``--output`` folder of :func:`generate_synthetic_coco`.
        task: ``"instances"`` (all categories, boxes and masks, for Faster
            and Mask R-CNN) or ``"keypoints"`` (persons only, with COCO's 17
            keypoints, for Keypoint R-CNN; its metadata carries
            ``keypoint_names``, ``keypoint_flip_map`` and
            ``keypoint_oks_sigmas``).

    Idempotent: a name already registered is left as it is.

    Raises:
        ValueError: ``task`` is neither "instances" nor "keypoints".
        FileNotFoundError: the annotation file is missing.
    """
    files = {"instances": "instances.json", "keypoints": "person_keypoints.json"}
    if task not in files:
        raise ValueError(f"task must be 'instances' or 'keypoints', got {task!r}")
    root = Path(root).expanduser().resolve()
    json_file = root / files[task]
    if not json_file.is_file():
        raise FileNotFoundError(
            f"{json_file} not found; generate it with "
            f"`python -m codec_det.data.synthetic_coco --output {root} --num-images N --seed S`"
        )

    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    if name in DatasetCatalog.list():
        return name
    if task == "instances":
        categories = SYNTHETIC_CATEGORIES
        metadata: dict[str, Any] = {}
    else:
        categories = SYNTHETIC_CATEGORIES[:1]
        metadata = {
            "keypoint_names": list(COCO_PERSON_KEYPOINT_NAMES),
            "keypoint_flip_map": list(COCO_PERSON_KEYPOINT_FLIP_MAP),
            "keypoint_oks_sigmas": list(COCO_PERSON_OKS_SIGMAS),
        }
    metadata["thing_classes"] = [category["name"] for category in categories]
    metadata["thing_dataset_id_to_contiguous_id"] = {
        category["id"]: index for index, category in enumerate(categories)
    }
    register_coco_instances(name, metadata, str(json_file), str(root))
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m codec_det.data.synthetic_coco",
        description="Generate a synthetic COCO-format dataset (shapes with masks, persons with keypoints).",
    )
    parser.add_argument("--output", type=Path, required=True, help="output folder")
    parser.add_argument("--num-images", type=int, default=32, help="number of images (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--width", type=int, default=320, help="image width in pixels (default: 320)")
    parser.add_argument("--height", type=int, default=240, help="image height in pixels (default: 240)")
    parser.add_argument("--max-shapes", type=int, default=3, help="max shapes per image (default: 3)")
    parser.add_argument("--max-persons", type=int, default=2, help="max persons per image (default: 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        output = generate_synthetic_coco(
            args.output,
            num_images=args.num_images,
            seed=args.seed,
            width=args.width,
            height=args.height,
            max_shapes=args.max_shapes,
            max_persons=args.max_persons,
        )
    except ValueError as error:
        print(f"synthetic_coco: invalid argument: {error}", file=sys.stderr)
        return 2
    print(f"Synthetic COCO dataset written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
