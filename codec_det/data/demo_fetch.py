"""Download and convert the real demo photos that codec-det's demos and tests use.

Three small sets of real photos with real annotations, taken by package name
from the Python package index with pip (nothing here is committed, because
labelme is GPL-3.0 and the photos belong to their owners):

- ``voc``: the sdist of labelme 6.3.1, folder
  ``examples/instance_segmentation/data_dataset_coco``: 3 PASCAL VOC 2011
  photos with 12 instance polygons of 6 of the 20 VOC classes.
- ``cars``: the sdist of sahi 0.12.8, ``demo/demo_data/terrain2.png`` and
  ``terrain2_coco.json``: one aerial photo with 5 car boxes.
- ``quokka``: the wheel of imgaug 0.4.0, ``imgaug/quokka.jpg`` and
  ``quokka_annotations.json``: one photo of a quokka with a box, an outline
  polygon and 7 named keypoints.

Each set is written as COCO-format ``annotations.json`` plus images, with the
source package's LICENSE beside it, under one root folder (see
:func:`default_demo_root`)::

    manifest.json
    voc/annotations.json      voc/JPEGImages/2011_0000*.jpg
    cars/annotations.json     cars/images/terrain2.png
    quokka/annotations.json   quokka/images/quokka.jpg

Image ``file_name`` entries are relative to the dataset folder
(``voc/`` etc.), which is the ``image_root`` for Detectron2.

Run ``python -m codec_det.data.demo_fetch [--output DIR]``.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEMO_DATA_ENV",
    "DEMO_SOURCES",
    "MANIFEST_NAME",
    "QUOKKA_KEYPOINT_NAMES",
    "QUOKKA_SKELETON",
    "convert_imgaug_quokka",
    "convert_labelme_coco",
    "convert_sahi_coco",
    "default_demo_root",
    "fetch_demo_data",
    "is_demo_data_complete",
    "main",
]

logger = logging.getLogger(__name__)

DEMO_DATA_ENV = "CODEC_DEMO_DATA"
MANIFEST_NAME = "manifest.json"
# Bump when the converted files change, so that older fetches are redone.
FORMAT_VERSION = 1

# imgaug 0.4.0 names the quokka's keypoints as seen in the photo: "left" is
# the image's left side.
QUOKKA_KEYPOINT_NAMES = (
    "ear_tip_left",
    "ear_tip_right",
    "eye_left",
    "eye_right",
    "nose",
    "paw_left",
    "paw_right",
)
# COCO "skeleton": 1-based keypoint index pairs (ears to eyes, eyes to each
# other and to the nose, nose to the paws).
QUOKKA_SKELETON = ((1, 3), (2, 4), (3, 4), (3, 5), (4, 5), (5, 6), (5, 7))


@dataclass(frozen=True)
class DemoSource:
    """One package archive that the demo data is taken from."""

    requirement: str
    # "sdist" or "wheel": the archive format that pip downloads.
    archive: str
    license_member: str
    license_name: str


DEMO_SOURCES = {
    "voc": DemoSource(
        requirement="labelme==6.3.1",
        archive="sdist",
        license_member="labelme-6.3.1/LICENSE",
        license_name="GPL-3.0-only (labelme); photos from PASCAL VOC 2011, owned by their Flickr authors",
    ),
    "cars": DemoSource(
        requirement="sahi==0.12.8",
        archive="sdist",
        license_member="sahi-0.12.8/LICENSE",
        license_name="MIT (sahi)",
    ),
    "quokka": DemoSource(
        requirement="imgaug==0.4.0",
        archive="wheel",
        license_member="imgaug-0.4.0.dist-info/LICENSE",
        license_name="MIT (imgaug)",
    ),
}

_LABELME_DIR = "labelme-6.3.1/examples/instance_segmentation/data_dataset_coco"
_SAHI_DIR = "sahi-0.12.8/demo/demo_data"

# Counts of the published files, checked after conversion so that a changed
# archive fails loudly instead of producing a silently different demo.
_EXPECTED_COUNTS = {
    "voc": {"images": 3, "annotations": 12, "categories": 20},
    "cars": {"images": 1, "annotations": 5, "categories": 1},
    "quokka": {"images": 1, "annotations": 1, "categories": 1},
}


def default_demo_root() -> Path:
    """Return the folder that contains the demo data.

    ``$CODEC_DEMO_DATA`` when set. Otherwise ``datasets/codec_demo`` in the
    source checkout when codec_det is imported from one (a clone or an
    editable install), else ``datasets/codec_demo`` under the current
    directory, as Detectron2 resolves its own ``datasets`` folder.
    """
    from_env = os.environ.get(DEMO_DATA_ENV)
    if from_env:
        return Path(from_env).expanduser().resolve()

    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "setup.py").is_file() and (checkout / "codec_det").is_dir():
        return checkout / "datasets" / "codec_demo"
    return Path.cwd() / "datasets" / "codec_demo"


# ---------------------------------------------------------------------------
# Converters: plain dict in, COCO dict out, so they can be tested offline.
# ---------------------------------------------------------------------------


def convert_labelme_coco(data: dict[str, Any]) -> dict[str, Any]:
    """Convert labelme's ``labelme2coco.py`` output to a clean COCO dict.

    labelme writes a ``_background_`` category with id 0 and numbers images
    and annotations from 0. The background category is dropped (no
    annotation may use it). Annotation ids are renumbered from 1 because
    pycocotools' COCOeval stores the matched ground-truth id as the match
    flag, so a detection matched to ground truth id 0 counts as a false
    positive. Image ids are renumbered from 1 as well. Polygons, boxes,
    areas and the remaining category ids are kept.

    Raises:
        ValueError: an annotation uses the background category or an
            unknown image or category.
    """
    background_ids = {
        category["id"] for category in data["categories"] if category["name"] == "_background_"
    }
    categories = [
        copy.deepcopy(category) for category in data["categories"] if category["id"] not in background_ids
    ]
    category_ids = {category["id"] for category in categories}

    image_id_map = {}
    images = []
    for new_id, image in enumerate(data["images"], start=1):
        image_id_map[image["id"]] = new_id
        images.append({**copy.deepcopy(image), "id": new_id})

    annotations = []
    for new_id, annotation in enumerate(data["annotations"], start=1):
        if annotation["category_id"] not in category_ids:
            raise ValueError(
                f"labelme annotation {annotation['id']} has category_id "
                f"{annotation['category_id']}, which is the background or not a listed category"
            )
        if annotation["image_id"] not in image_id_map:
            raise ValueError(
                f"labelme annotation {annotation['id']} refers to unknown image_id {annotation['image_id']}"
            )
        annotations.append(
            {
                **copy.deepcopy(annotation),
                "id": new_id,
                "image_id": image_id_map[annotation["image_id"]],
            }
        )

    return {
        "info": {
            "description": "3 PASCAL VOC 2011 photos with instance polygons, from the examples of "
            "labelme 6.3.1, converted by codec-det (background category dropped, ids from 1)",
            "version": "1",
        },
        "licenses": copy.deepcopy(data.get("licenses", [])),
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def convert_sahi_coco(data: dict[str, Any], *, file_name: str) -> dict[str, Any]:
    """Convert sahi's ``terrain2_coco.json`` to a box-only COCO dict.

    sahi's file stores each box also as a rectangle "segmentation" and gives
    every annotation the whole image's area. The rectangles are not object
    masks, so they are dropped, and ``area`` becomes the box area. Ids are
    checked to start from 1 and kept.

    Args:
        data: the parsed ``terrain2_coco.json``.
        file_name: the image path to record, relative to the dataset folder.

    Raises:
        ValueError: the file has not exactly one image, or an id is 0.
    """
    if len(data["images"]) != 1:
        raise ValueError(f"expected 1 image in sahi's terrain2_coco.json, found {len(data['images'])}")
    for key in ("images", "annotations", "categories"):
        if any(item["id"] < 1 for item in data[key]):
            raise ValueError(f"sahi's terrain2_coco.json has {key} ids below 1")

    image = data["images"][0]
    annotations = []
    for annotation in data["annotations"]:
        x, y, width, height = (float(value) for value in annotation["bbox"])
        annotations.append(
            {
                "id": annotation["id"],
                "image_id": annotation["image_id"],
                "category_id": annotation["category_id"],
                "bbox": [x, y, width, height],
                "area": width * height,
                "iscrowd": int(annotation.get("iscrowd", 0)),
            }
        )

    return {
        "info": {
            "description": "1 aerial photo with 5 car boxes, from the demo data of sahi 0.12.8, "
            "converted by codec-det (rectangle masks dropped, box areas)",
            "version": "1",
        },
        "licenses": [],
        "images": [
            {
                "id": image["id"],
                "file_name": file_name,
                "width": int(image["width"]),
                "height": int(image["height"]),
            }
        ],
        "annotations": annotations,
        "categories": [
            {"id": category["id"], "name": category["name"], "supercategory": category.get("supercategory", "")}
            for category in data["categories"]
        ],
    }


def polygon_area(polygon: list[float]) -> float:
    """Return the area of a simple polygon ``[x1, y1, x2, y2, ...]`` (shoelace formula)."""
    xs = polygon[0::2]
    ys = polygon[1::2]
    twice_area = 0.0
    for index in range(len(xs)):
        next_index = (index + 1) % len(xs)
        twice_area += xs[index] * ys[next_index] - xs[next_index] * ys[index]
    return abs(twice_area) / 2.0


def convert_imgaug_quokka(
    annotations: dict[str, Any], *, width: int, height: int, file_name: str
) -> dict[str, Any]:
    """Convert imgaug's ``quokka_annotations.json`` to a COCO keypoint dict.

    One image, one category ``quokka`` (COCO ``keypoints`` and ``skeleton``
    fields filled), one instance with the file's box, outline polygon and 7
    keypoints, all with visibility 2 (labelled and visible). ``area`` is the
    polygon's area, which COCO's keypoint OKS uses as the object scale.

    Raises:
        ValueError: the file does not have one box, one polygon and the 7
            expected keypoint names in order.
    """
    boxes = annotations["bounding_boxes"]
    polygons = annotations["polygons"]
    keypoints = annotations["keypoints"]
    if len(boxes) != 1 or len(polygons) != 1:
        raise ValueError(
            f"expected 1 box and 1 polygon in imgaug's quokka annotations, "
            f"found {len(boxes)} and {len(polygons)}"
        )
    names = tuple(keypoint["label"] for keypoint in keypoints)
    if names != QUOKKA_KEYPOINT_NAMES:
        raise ValueError(f"unexpected quokka keypoint names {names}, expected {QUOKKA_KEYPOINT_NAMES}")

    box = boxes[0]
    x1, y1, x2, y2 = (float(box[key]) for key in ("x1", "y1", "x2", "y2"))
    polygon = []
    for point in polygons[0]["keypoints"]:
        polygon.extend([float(point["x"]), float(point["y"])])
    flat_keypoints = []
    for keypoint in keypoints:
        flat_keypoints.extend([float(keypoint["x"]), float(keypoint["y"]), 2])

    return {
        "info": {
            "description": "1 photo of a quokka with a box, an outline polygon and 7 keypoints, "
            "from imgaug 0.4.0, converted by codec-det to COCO keypoint format",
            "version": "1",
        },
        "licenses": [],
        "images": [{"id": 1, "file_name": file_name, "width": int(width), "height": int(height)}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": polygon_area(polygon),
                "segmentation": [polygon],
                "keypoints": flat_keypoints,
                "num_keypoints": len(keypoints),
                "iscrowd": 0,
            }
        ],
        "categories": [
            {
                "id": 1,
                "name": "quokka",
                "supercategory": "animal",
                "keypoints": list(QUOKKA_KEYPOINT_NAMES),
                "skeleton": [list(pair) for pair in QUOKKA_SKELETON],
            }
        ],
    }


# ---------------------------------------------------------------------------
# Download and archive access
# ---------------------------------------------------------------------------


def _download(source: DemoSource, destination: Path, download_dir: Path | None) -> Path:
    """Download ``source``'s archive with pip and return its path.

    pip runs an sdist's build backend to read its metadata but builds and
    installs nothing. With ``download_dir``, an archive already there is
    reused without asking pip.
    """
    name, version = source.requirement.split("==")
    if download_dir is not None:
        for candidate in sorted(download_dir.glob(f"{name}-{version}*")):
            if candidate.name.endswith((".tar.gz", ".zip", ".whl")):
                logger.info("Using %s from %s", candidate.name, download_dir)
                return candidate
        destination = download_dir
    destination.mkdir(parents=True, exist_ok=True)

    format_flag = "--no-binary" if source.archive == "sdist" else "--only-binary"
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", format_flag, ":all:",
        "--disable-pip-version-check", "--progress-bar", "off",
        "--dest", str(destination),
        source.requirement,
    ]  # fmt: skip
    logger.info("Downloading %s (%s) with pip", source.requirement, source.archive)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output_tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise RuntimeError(
            f"pip download of {source.requirement} ({source.archive}) failed with exit code "
            f"{result.returncode}; check that the package index is reachable, or pass "
            f"--download-dir with the archive already in it.\n{output_tail}"
        )

    for candidate in sorted(destination.glob(f"{name}-{version}*")):
        if candidate.name.endswith((".tar.gz", ".zip", ".whl")):
            return candidate
    raise RuntimeError(f"pip download of {source.requirement} succeeded but no archive is in {destination}")


class _Archive:
    """Read-only access to named members of an sdist (tar.gz or zip) or a wheel."""

    def __init__(self, path: Path):
        self.path = path
        if path.name.endswith((".whl", ".zip")):
            self._zip = zipfile.ZipFile(path)
            self._tar = None
        else:
            self._tar = tarfile.open(path, "r:*")
            self._zip = None

    def read(self, member: str) -> bytes:
        # Members are read as bytes by name, never extracted by path, so an
        # archive cannot write outside the output folder.
        try:
            if self._zip is not None:
                return self._zip.read(member)
            extracted = self._tar.extractfile(member)
        except KeyError as error:
            raise FileNotFoundError(f"{member} not found in {self.path.name}") from error
        if extracted is None:
            raise FileNotFoundError(f"{member} in {self.path.name} is not a regular file")
        return extracted.read()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        else:
            self._tar.close()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _check_counts(name: str, coco: dict[str, Any]) -> None:
    for key, expected in _EXPECTED_COUNTS[name].items():
        found = len(coco[key])
        if found != expected:
            raise ValueError(
                f"demo dataset {name!r} ({DEMO_SOURCES[name].requirement}) has {found} {key} "
                f"after conversion, expected {expected}; the published archive may have changed"
            )


# ---------------------------------------------------------------------------
# One builder per dataset: read the archive, convert, write into `folder`.
# Each returns the list of files it wrote, relative to `folder`.
# ---------------------------------------------------------------------------


def _build_voc(archive: _Archive, folder: Path) -> list[str]:
    labelme = json.loads(archive.read(f"{_LABELME_DIR}/annotations.json"))
    coco = convert_labelme_coco(labelme)
    _check_counts("voc", coco)

    files = ["annotations.json"]
    for image in coco["images"]:
        # labelme's file names are already "JPEGImages/<name>.jpg".
        _write_bytes(folder / image["file_name"], archive.read(f"{_LABELME_DIR}/{image['file_name']}"))
        files.append(image["file_name"])
    _write_json(folder / "annotations.json", coco)
    return files


def _build_cars(archive: _Archive, folder: Path) -> list[str]:
    from PIL import Image

    sahi = json.loads(archive.read(f"{_SAHI_DIR}/terrain2_coco.json"))
    file_name = "images/terrain2.png"
    coco = convert_sahi_coco(sahi, file_name=file_name)
    _check_counts("cars", coco)

    # The published PNG is palette-mode ("P"); store it as RGB so every
    # reader (PIL, OpenCV, torchvision) gets 3 channels.
    with Image.open(io.BytesIO(archive.read(f"{_SAHI_DIR}/terrain2.png"))) as image:
        size = image.size
        rgb = image.convert("RGB")
    expected_size = (coco["images"][0]["width"], coco["images"][0]["height"])
    if size != expected_size:
        raise ValueError(
            f"size mismatch: sahi's terrain2.png is {size[0]}x{size[1]} but terrain2_coco.json "
            f"records {expected_size[0]}x{expected_size[1]}"
        )
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rgb.save(folder / file_name, format="PNG")

    _write_json(folder / "annotations.json", coco)
    return ["annotations.json", file_name]


def _build_quokka(archive: _Archive, folder: Path) -> list[str]:
    from PIL import Image

    annotations = json.loads(archive.read("imgaug/quokka_annotations.json"))
    image_bytes = archive.read("imgaug/quokka.jpg")
    with Image.open(io.BytesIO(image_bytes)) as image:
        width, height = image.size
    file_name = "images/quokka.jpg"
    coco = convert_imgaug_quokka(annotations, width=width, height=height, file_name=file_name)
    _check_counts("quokka", coco)

    _write_bytes(folder / file_name, image_bytes)
    _write_json(folder / "annotations.json", coco)
    return ["annotations.json", file_name]


_BUILDERS = {"voc": _build_voc, "cars": _build_cars, "quokka": _build_quokka}


def is_demo_data_complete(root: Path) -> bool:
    """Return whether ``root`` contains a finished fetch of the current format."""
    manifest_path = Path(root) / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("format_version") != FORMAT_VERSION:
        return False
    if set(manifest.get("datasets", {})) != set(DEMO_SOURCES):
        return False
    for name, entry in manifest["datasets"].items():
        for relative in entry["files"]:
            if not (Path(root) / name / relative).is_file():
                return False
    return True


def fetch_demo_data(root: str | os.PathLike | None = None, *, force: bool = False,
                    download_dir: str | os.PathLike | None = None) -> Path:
    """Download the three demo datasets, convert them to COCO and return the root.

    Idempotent: a complete root of the current format is left as it is
    unless ``force``. The data is built in a temporary sibling folder and
    renamed into place, so an interrupted run never leaves a half-written
    root.

    Args:
        root: output folder; :func:`default_demo_root` when None.
        force: rebuild even if the root is complete.
        download_dir: keep the downloaded archives here and reuse any
            already present, instead of a throw-away folder.

    Raises:
        RuntimeError: pip failed to download one of the packages.
        ValueError: a converted dataset does not have the expected counts.
    """
    root = Path(root).expanduser().resolve() if root is not None else default_demo_root()
    if not force and is_demo_data_complete(root):
        logger.info("Demo data already complete in %s", root)
        return root

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        manifest = {"format_version": FORMAT_VERSION, "datasets": {}}
        archives_dir = staging / "_archives"
        for name, source in DEMO_SOURCES.items():
            archive_path = _download(
                source, archives_dir, Path(download_dir) if download_dir is not None else None
            )
            archive = _Archive(archive_path)
            try:
                folder = staging / name
                files = _BUILDERS[name](archive, folder)
                _write_bytes(folder / "LICENSE", archive.read(source.license_member))
                files.append("LICENSE")
            finally:
                archive.close()
            manifest["datasets"][name] = {
                "source": f"{source.requirement} ({source.archive})",
                "license": source.license_name,
                "annotations": "annotations.json",
                "files": files,
            }
            logger.info("Converted %s from %s into %s/", name, source.requirement, name)
        shutil.rmtree(archives_dir, ignore_errors=True)
        _write_json(staging / MANIFEST_NAME, manifest)

        # Swap the finished folder into place: a directory rename cannot
        # replace a non-empty directory, so move any old root aside first.
        previous = None
        if root.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.rename(root, previous / root.name)
        os.rename(staging, root)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    logger.info("Demo data written to %s", root)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m codec_det.data.demo_fetch",
        description="Download the codec-det demo photos (labelme, sahi and imgaug examples) "
        "with pip and convert them to COCO-format datasets.",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"output folder (default: ${DEMO_DATA_ENV}, else datasets/codec_demo in the checkout)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the output folder is complete")
    parser.add_argument(
        "--download-dir",
        type=Path,
        default=None,
        help="keep downloaded archives in this folder and reuse any already there (for offline re-runs)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        root = fetch_demo_data(args.output, force=args.force, download_dir=args.download_dir)
    except (RuntimeError, ValueError, OSError) as error:
        print(f"demo_fetch: failed: {error}", file=sys.stderr)
        return 1
    print(f"Demo data ready in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
