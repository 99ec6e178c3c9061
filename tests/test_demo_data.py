"""Tests of the demo datasets: fetched real photos, converters, synthetic generator, registration."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from codec_det.data import demo_datasets, demo_fetch, synthetic_coco

DEMO_ROOT = demo_fetch.default_demo_root()

needs_demo_data = pytest.mark.skipif(
    not demo_fetch.is_demo_data_complete(DEMO_ROOT),
    reason=f"demo data not found in {DEMO_ROOT}; run `python -m codec_det.data.demo_fetch` "
    "(bash tools/setup_env.sh does)",
)


def _coco_api(json_file: Path):
    coco_module = pytest.importorskip("pycocotools.coco", reason="pycocotools is installed with Detectron2")
    return coco_module.COCO(str(json_file))


def _load(name: str) -> dict:
    return json.loads((DEMO_ROOT / name / "annotations.json").read_text(encoding="utf-8"))


def _detectron2_available() -> bool:
    try:
        import detectron2  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------
# Fetched real photos
# ---------------------------------------------------------------------------


@needs_demo_data
def test_voc_counts_and_ids():
    coco = _coco_api(DEMO_ROOT / "voc" / "annotations.json")

    assert len(coco.getImgIds()) == 3
    assert len(coco.getAnnIds()) == 12
    assert len(coco.getCatIds()) == 20
    annotated = {annotation["category_id"] for annotation in coco.dataset["annotations"]}
    assert len(annotated) == 6
    assert min(coco.getAnnIds()) == 1
    assert sorted(coco.getAnnIds()) == list(range(1, 13))
    assert min(coco.getImgIds()) == 1


@needs_demo_data
def test_voc_has_no_background():
    data = _load("voc")

    names = [category["name"] for category in data["categories"]]
    assert "_background_" not in names
    assert all(category["id"] >= 1 for category in data["categories"])
    assert names[0] == "aeroplane"
    assert names[-1] == "tv/monitor"


@needs_demo_data
def test_voc_masks_and_images():
    coco = _coco_api(DEMO_ROOT / "voc" / "annotations.json")
    from PIL import Image

    for annotation in coco.dataset["annotations"]:
        assert annotation["segmentation"], annotation["id"]
        assert len(annotation["bbox"]) == 4
        mask = coco.annToMask(annotation)
        assert mask.sum() > 0, annotation["id"]
    for image in coco.dataset["images"]:
        with Image.open(DEMO_ROOT / "voc" / image["file_name"]) as photo:
            assert photo.size == (image["width"], image["height"])


@needs_demo_data
def test_cars_boxes():
    coco = _coco_api(DEMO_ROOT / "cars" / "annotations.json")
    from PIL import Image

    annotations = coco.dataset["annotations"]
    assert len(annotations) == 5
    assert sorted(coco.getAnnIds()) == [1, 2, 3, 4, 5]
    assert [category["name"] for category in coco.dataset["categories"]] == ["car"]
    for annotation in annotations:
        assert "segmentation" not in annotation
        assert annotation["area"] == pytest.approx(annotation["bbox"][2] * annotation["bbox"][3])
    image = coco.dataset["images"][0]
    with Image.open(DEMO_ROOT / "cars" / image["file_name"]) as photo:
        assert photo.mode == "RGB"
        assert photo.size == (image["width"], image["height"])


@needs_demo_data
def test_quokka_keypoints():
    coco = _coco_api(DEMO_ROOT / "quokka" / "annotations.json")

    category = coco.dataset["categories"][0]
    assert category["name"] == "quokka"
    assert tuple(category["keypoints"]) == demo_fetch.QUOKKA_KEYPOINT_NAMES
    assert len(category["keypoints"]) == 7
    (annotation,) = coco.dataset["annotations"]
    assert annotation["id"] == 1
    assert annotation["num_keypoints"] == 7
    keypoints = np.asarray(annotation["keypoints"], dtype=float).reshape(7, 3)
    assert (keypoints[:, 2] == 2).all()
    x, y, width, height = annotation["bbox"]
    assert (keypoints[:, 0] >= x).all()
    assert (keypoints[:, 0] <= x + width).all()
    assert (keypoints[:, 1] >= y).all()
    assert (keypoints[:, 1] <= y + height).all()
    assert coco.annToMask(annotation).sum() > 0.5 * width * height


@needs_demo_data
@pytest.mark.parametrize(
    ("name", "iou_type"),
    [("voc", "bbox"), ("voc", "segm"), ("cars", "bbox"), ("quokka", "segm"), ("quokka", "keypoints")],
)
def test_ground_truth_scores_full_ap(name, iou_type):
    # Scoring the ground truth as detections must give AP 1. With labelme's
    # annotation ids from 0, the instance with id 0 counts as a false
    # positive and bbox AP drops to about 0.95.
    cocoeval_module = pytest.importorskip("pycocotools.cocoeval", reason="pycocotools is installed with Detectron2")
    ground_truth = _coco_api(DEMO_ROOT / name / "annotations.json")
    detections = ground_truth.loadRes(
        [{**copy.deepcopy(annotation), "score": 1.0} for annotation in ground_truth.dataset["annotations"]]
    )
    evaluator = cocoeval_module.COCOeval(ground_truth, detections, iou_type)
    if iou_type == "keypoints":
        evaluator.params.kpt_oks_sigmas = np.asarray(demo_datasets.QUOKKA_OKS_SIGMAS)

    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()

    assert evaluator.stats[0] == pytest.approx(1.0)


@needs_demo_data
def test_fetch_skips_complete_root():
    before = (DEMO_ROOT / demo_fetch.MANIFEST_NAME).stat().st_mtime_ns

    assert demo_fetch.fetch_demo_data(DEMO_ROOT) == DEMO_ROOT
    assert (DEMO_ROOT / demo_fetch.MANIFEST_NAME).stat().st_mtime_ns == before


# ---------------------------------------------------------------------------
# Converters on small in-memory inputs (no download)
# ---------------------------------------------------------------------------

_LABELME_SAMPLE = {
    "images": [
        {"id": 0, "file_name": "JPEGImages/a.jpg", "width": 10, "height": 10},
        {"id": 1, "file_name": "JPEGImages/b.jpg", "width": 10, "height": 10},
    ],
    "annotations": [
        {"id": 0, "image_id": 0, "category_id": 2, "bbox": [1, 1, 2, 2], "area": 4,
         "segmentation": [[1, 1, 3, 1, 3, 3]], "iscrowd": 0},
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 3, 3], "area": 9,
         "segmentation": [[2, 2, 5, 2, 5, 5]], "iscrowd": 0},
    ],
    "categories": [
        {"id": 0, "name": "_background_", "supercategory": None},
        {"id": 1, "name": "aeroplane", "supercategory": None},
        {"id": 2, "name": "bicycle", "supercategory": None},
    ],
}  # fmt: skip


def test_labelme_converter_drops_background():
    coco = demo_fetch.convert_labelme_coco(_LABELME_SAMPLE)

    assert [category["name"] for category in coco["categories"]] == ["aeroplane", "bicycle"]
    assert [annotation["id"] for annotation in coco["annotations"]] == [1, 2]
    assert [image["id"] for image in coco["images"]] == [1, 2]
    assert [annotation["image_id"] for annotation in coco["annotations"]] == [1, 2]
    assert coco["annotations"][0]["segmentation"] == [[1, 1, 3, 1, 3, 3]]
    assert _LABELME_SAMPLE["annotations"][0]["id"] == 0, "the input must not be modified"


def test_labelme_converter_rejects_background_annotation():
    sample = copy.deepcopy(_LABELME_SAMPLE)
    sample["annotations"][0]["category_id"] = 0

    with pytest.raises(ValueError, match="background"):
        demo_fetch.convert_labelme_coco(sample)


def test_sahi_converter_fixes_area():
    sample = {
        "images": [{"id": 1, "file_name": "terrain2.png", "width": 100, "height": 50}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 5],
                         "segmentation": [[1, 2, 11, 2, 11, 7, 1, 7]], "area": 5000, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "car", "supercategory": "car"}],
    }  # fmt: skip

    coco = demo_fetch.convert_sahi_coco(sample, file_name="images/terrain2.png")

    assert coco["annotations"][0]["area"] == 50.0
    assert "segmentation" not in coco["annotations"][0]
    assert coco["images"][0]["file_name"] == "images/terrain2.png"


def test_quokka_converter_keypoints():
    sample = {
        "bounding_boxes": [{"x1": 10, "y1": 20, "x2": 110, "y2": 220, "label": "animal"}],
        "keypoints": [{"x": 20 + i, "y": 30 + i, "label": name}
                      for i, name in enumerate(demo_fetch.QUOKKA_KEYPOINT_NAMES)],
        "polygons": [{"keypoints": [{"x": 10, "y": 20}, {"x": 110, "y": 20}, {"x": 110, "y": 220}]}],
    }  # fmt: skip

    coco = demo_fetch.convert_imgaug_quokka(sample, width=200, height=300, file_name="images/quokka.jpg")

    (annotation,) = coco["annotations"]
    assert annotation["bbox"] == [10.0, 20.0, 100.0, 200.0]
    assert annotation["area"] == pytest.approx(100 * 200 / 2)
    assert annotation["keypoints"][:3] == [20.0, 30.0, 2]
    assert len(annotation["keypoints"]) == 21
    assert coco["categories"][0]["skeleton"][0] == [1, 3]


def test_quokka_converter_rejects_renamed_keypoint():
    sample = {
        "bounding_boxes": [{"x1": 0, "y1": 0, "x2": 1, "y2": 1}],
        "keypoints": [{"x": 0, "y": 0, "label": "tail"}],
        "polygons": [{"keypoints": []}],
    }

    with pytest.raises(ValueError, match="keypoint names"):
        demo_fetch.convert_imgaug_quokka(sample, width=1, height=1, file_name="q.jpg")


def test_polygon_area_square():
    assert demo_fetch.polygon_area([0, 0, 4, 0, 4, 4, 0, 4]) == 16.0


# ---------------------------------------------------------------------------
# Synthetic generator
# ---------------------------------------------------------------------------


def test_synthetic_is_deterministic(tmp_path):
    first = synthetic_coco.generate_synthetic_coco(tmp_path / "a", num_images=4, seed=7)
    second = synthetic_coco.generate_synthetic_coco(tmp_path / "b", num_images=4, seed=7)
    other = synthetic_coco.generate_synthetic_coco(tmp_path / "c", num_images=4, seed=8)
    from PIL import Image

    for name in ("instances.json", "person_keypoints.json"):
        assert (first / name).read_text() == (second / name).read_text(), name
    assert (first / "instances.json").read_text() != (other / "instances.json").read_text()
    for index in range(1, 5):
        image_name = f"images/{index:06d}.png"
        with Image.open(first / image_name) as a, Image.open(second / image_name) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b)), image_name


def test_synthetic_is_valid_coco(tmp_path):
    root = synthetic_coco.generate_synthetic_coco(tmp_path, num_images=6, seed=0, width=160, height=128)
    instances = _coco_api(root / "instances.json")

    assert len(instances.getImgIds()) == 6
    assert sorted(instances.getAnnIds()) == list(range(1, len(instances.getAnnIds()) + 1))
    assert [category["name"] for category in instances.dataset["categories"]] == [
        "person", "rectangle", "triangle", "ellipse"
    ]  # fmt: skip
    for image_id in instances.getImgIds():
        persons = instances.getAnnIds(imgIds=[image_id], catIds=[1])
        assert len(persons) >= 1, f"image {image_id} has no person"
    for annotation in instances.dataset["annotations"]:
        mask = instances.annToMask(annotation)
        assert annotation["area"] > 0
        assert mask.shape == (128, 160)
        # pycocotools' rasteriser drops part of the pixels that a thin limb
        # only partly covers, so its count is up to about 9% below the area.
        assert mask.sum() == pytest.approx(annotation["area"], rel=0.15), annotation["id"]
        x, y, width, height = annotation["bbox"]
        assert x >= 0, annotation["id"]
        assert y >= 0, annotation["id"]
        assert x + width <= 160, annotation["id"]
        assert y + height <= 128, annotation["id"]


def test_synthetic_keypoints_inside_boxes(tmp_path):
    root = synthetic_coco.generate_synthetic_coco(tmp_path, num_images=5, seed=1)
    keypoints = _coco_api(root / "person_keypoints.json")

    assert [category["name"] for category in keypoints.dataset["categories"]] == ["person"]
    assert keypoints.dataset["categories"][0]["keypoints"] == list(synthetic_coco.COCO_PERSON_KEYPOINT_NAMES)
    assert len(keypoints.dataset["annotations"]) >= 5
    for annotation in keypoints.dataset["annotations"]:
        points = np.asarray(annotation["keypoints"], dtype=float).reshape(17, 3)
        x, y, width, height = annotation["bbox"]
        assert annotation["num_keypoints"] == 17
        assert (points[:, 2] == 2).all()
        assert (points[:, 0] >= x - 1e-6).all(), annotation["id"]
        assert (points[:, 0] <= x + width + 1e-6).all(), annotation["id"]
        assert (points[:, 1] >= y - 1e-6).all(), annotation["id"]
        assert (points[:, 1] <= y + height + 1e-6).all(), annotation["id"]


def test_synthetic_rejects_zero_images(tmp_path):
    with pytest.raises(ValueError, match="num_images"):
        synthetic_coco.generate_synthetic_coco(tmp_path, num_images=0)


def test_synthetic_command_line(tmp_path):
    status = synthetic_coco.main(["--output", str(tmp_path), "--num-images", "2", "--seed", "5"])

    assert status == 0
    assert len(list((tmp_path / "images").glob("*.png"))) == 2


# ---------------------------------------------------------------------------
# Detectron2 registration
# ---------------------------------------------------------------------------


def test_modules_import_without_detectron2():
    # A None entry in sys.modules makes any import of detectron2 fail, as on a
    # machine without it.
    code = (
        "import sys\n"
        "sys.modules['detectron2'] = None\n"
        "import codec_det.data.demo_datasets, codec_det.data.synthetic_coco, codec_det.data.demo_fetch\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr


def test_register_missing_data_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="codec_det.data.demo_fetch") as error:
        demo_datasets.register_demo_datasets(tmp_path / "absent")

    assert str(tmp_path / "absent") in str(error.value)


@needs_demo_data
@pytest.mark.skipif(not _detectron2_available(), reason="Detectron2 is not installed")
def test_register_demo_datasets():
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names = demo_datasets.register_demo_datasets(DEMO_ROOT)
    assert demo_datasets.register_demo_datasets(DEMO_ROOT) == names

    assert names == ["codec_demo_voc", "codec_demo_cars", "codec_demo_quokka"]
    voc = DatasetCatalog.get("codec_demo_voc")
    assert len(voc) == 3
    assert sum(len(record["annotations"]) for record in voc) == 12
    assert all("segmentation" in obj for record in voc for obj in record["annotations"])
    assert len(MetadataCatalog.get("codec_demo_voc").thing_classes) == 20

    cars = DatasetCatalog.get("codec_demo_cars")
    assert sum(len(record["annotations"]) for record in cars) == 5
    assert MetadataCatalog.get("codec_demo_cars").thing_classes == ["car"]

    quokka = DatasetCatalog.get("codec_demo_quokka")
    assert len(quokka[0]["annotations"][0]["keypoints"]) == 21
    metadata = MetadataCatalog.get("codec_demo_quokka")
    assert metadata.keypoint_names == list(demo_datasets.QUOKKA_KEYPOINT_NAMES)
    assert len(metadata.keypoint_oks_sigmas) == 7
    assert metadata.keypoint_flip_map == demo_datasets.QUOKKA_KEYPOINT_FLIP_MAP


@pytest.mark.skipif(not _detectron2_available(), reason="Detectron2 is not installed")
def test_register_synthetic_dataset(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.detection_utils import create_keypoint_hflip_indices

    root = synthetic_coco.generate_synthetic_coco(tmp_path, num_images=3, seed=2)
    instances_name = f"codec_test_synthetic_{tmp_path.name}"
    keypoints_name = f"{instances_name}_keypoints"
    synthetic_coco.register_synthetic_dataset(instances_name, root)
    synthetic_coco.register_synthetic_dataset(keypoints_name, root, task="keypoints")

    assert len(DatasetCatalog.get(instances_name)) == 3
    assert MetadataCatalog.get(instances_name).thing_classes == ["person", "rectangle", "triangle", "ellipse"]
    records = DatasetCatalog.get(keypoints_name)
    assert all(len(obj["keypoints"]) == 51 for record in records for obj in record["annotations"])
    flip_indices = create_keypoint_hflip_indices([keypoints_name])
    assert list(flip_indices[:3]) == [0, 2, 1]
