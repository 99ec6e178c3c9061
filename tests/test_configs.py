"""Tests of the Detectron2 configs in configs/: they load, and they say what their names promise."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("detectron2", reason="Detectron2 is installed by bash tools/setup_env.sh")

from codec_det.data.demo_datasets import QUOKKA_OKS_SIGMAS  # noqa: E402
from codec_det.engine import COCO_PERSON_OKS_SIGMAS, ConfigError, load_config, resolve_config_file  # noqa: E402

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
ALL_CONFIGS = sorted(str(path.relative_to(CONFIGS_DIR)) for path in CONFIGS_DIR.rglob("*.yaml"))

# config -> (spec, task, train dataset, test dataset)
COCO_CONFIGS = {
    "codec_faster_rcnn.yaml": ("codec-45", "faster", "coco_2017_train", "coco_2017_val"),
    "codec_mask_rcnn.yaml": ("codec-45", "mask", "coco_2017_train", "coco_2017_val"),
    "codec_keypoint_rcnn.yaml": ("codec-45", "keypoint", "keypoints_coco_2017_train", "keypoints_coco_2017_val"),
    "codec66_faster_rcnn.yaml": ("codec-66", "faster", "coco_2017_train", "coco_2017_val"),
    "codec66_mask_rcnn.yaml": ("codec-66", "mask", "coco_2017_train", "coco_2017_val"),
    "codec66_keypoint_rcnn.yaml": ("codec-66", "keypoint", "keypoints_coco_2017_train", "keypoints_coco_2017_val"),
}

# config -> (task, dataset)
DEMO_CONFIGS = {
    "demo/codec_faster_rcnn_demo.yaml": ("faster", "codec_demo_cars"),
    "demo/codec_mask_rcnn_demo.yaml": ("mask", "codec_demo_voc"),
    "demo/codec_keypoint_rcnn_demo.yaml": ("keypoint", "codec_demo_quokka"),
}


def _load(name: str, opts=()):
    return load_config(CONFIGS_DIR / name, opts)


def _assert_task(cfg, task: str) -> None:
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    assert cfg.MODEL.MASK_ON == (task == "mask")
    assert cfg.MODEL.KEYPOINT_ON == (task == "keypoint")


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_loads(name):
    cfg = _load(name)

    assert cfg.MODEL.BACKBONE.NAME == "build_codec_resnet_fpn_backbone"
    assert cfg.MODEL.RESNETS.DEPTH == 50


def test_expected_configs_exist():
    assert set(COCO_CONFIGS) | set(DEMO_CONFIGS) <= set(ALL_CONFIGS)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_base_stays_in_configs(name):
    path = CONFIGS_DIR / name
    base = yaml.safe_load(path.read_text()).get("_BASE_")
    if base is None:
        return

    resolved = (path.parent / base).resolve()
    assert resolved.is_file()
    assert resolved.is_relative_to(CONFIGS_DIR)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_torchvision_input_conventions(name):
    cfg = _load(name)

    assert cfg.INPUT.FORMAT == "RGB"
    assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False


def test_base_has_r50_fpn_settings():
    cfg = _load("Base-CoDeC-RCNN-FPN.yaml")

    assert list(cfg.MODEL.RESNETS.OUT_FEATURES) == ["res2", "res3", "res4", "res5"]
    assert list(cfg.MODEL.FPN.IN_FEATURES) == ["res2", "res3", "res4", "res5"]
    assert [list(sizes) for sizes in cfg.MODEL.ANCHOR_GENERATOR.SIZES] == [[32], [64], [128], [256], [512]]
    assert [list(ratios) for ratios in cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS] == [[0.5, 1.0, 2.0]]
    assert list(cfg.MODEL.RPN.IN_FEATURES) == ["p2", "p3", "p4", "p5", "p6"]
    assert cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN == 2000
    assert cfg.MODEL.RPN.PRE_NMS_TOPK_TEST == 1000
    assert cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN == 1000
    assert cfg.MODEL.RPN.POST_NMS_TOPK_TEST == 1000
    assert cfg.MODEL.ROI_HEADS.NAME == "StandardROIHeads"
    assert list(cfg.MODEL.ROI_HEADS.IN_FEATURES) == ["p2", "p3", "p4", "p5"]
    assert cfg.MODEL.ROI_BOX_HEAD.NAME == "FastRCNNConvFCHead"
    assert cfg.MODEL.ROI_BOX_HEAD.NUM_FC == 2
    assert cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION == 7
    assert cfg.MODEL.ROI_MASK_HEAD.NAME == "MaskRCNNConvUpsampleHead"
    assert cfg.MODEL.ROI_MASK_HEAD.NUM_CONV == 4
    assert cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION == 14
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (640, 672, 704, 736, 768, 800)
    assert cfg.INPUT.MAX_SIZE_TRAIN == 1333
    assert cfg.INPUT.MIN_SIZE_TEST == 800
    assert cfg.INPUT.MAX_SIZE_TEST == 1333


@pytest.mark.parametrize("name", sorted(COCO_CONFIGS))
def test_coco_config_datasets_and_schedule(name):
    spec, task, train, test = COCO_CONFIGS[name]
    cfg = _load(name)

    _assert_task(cfg, task)
    assert cfg.MODEL.CODEC.SPEC == spec
    assert tuple(cfg.DATASETS.TRAIN) == (train,)
    assert tuple(cfg.DATASETS.TEST) == (test,)
    assert cfg.SOLVER.MAX_ITER == 90000
    assert tuple(cfg.SOLVER.STEPS) == (60000, 80000)
    assert cfg.SOLVER.IMS_PER_BATCH == 16
    assert cfg.SOLVER.BASE_LR == 0.02


@pytest.mark.parametrize("name", ["codec_keypoint_rcnn.yaml", "codec66_keypoint_rcnn.yaml"])
def test_coco_keypoint_config(name):
    cfg = _load(name)

    assert cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS == 17
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1
    assert list(cfg.TEST.KEYPOINT_OKS_SIGMAS) == pytest.approx(COCO_PERSON_OKS_SIGMAS)


def test_coco_output_dirs_differ():
    output_dirs = [_load(name).OUTPUT_DIR for name in COCO_CONFIGS]

    assert len(set(output_dirs)) == len(output_dirs)


@pytest.mark.parametrize("name", sorted(DEMO_CONFIGS))
def test_demo_config_trains_from_scratch_on_cpu(name):
    task, dataset = DEMO_CONFIGS[name]
    cfg = _load(name)

    _assert_task(cfg, task)
    assert cfg.MODEL.CODEC.SPEC == "codec-45"
    assert cfg.MODEL.WEIGHTS == ""
    assert cfg.MODEL.DEVICE == "cpu"
    assert cfg.MODEL.RESNETS.NORM == "GN"
    assert cfg.MODEL.FPN.NORM == "GN"
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert tuple(cfg.DATASETS.TRAIN) == (dataset,)
    assert tuple(cfg.DATASETS.TEST) == (dataset,)
    assert cfg.INPUT.RANDOM_FLIP == "horizontal"
    assert cfg.DATALOADER.NUM_WORKERS == 0
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED
    assert all(step < cfg.SOLVER.MAX_ITER for step in cfg.SOLVER.STEPS)


def test_quokka_demo_keypoints():
    cfg = _load("demo/codec_keypoint_rcnn_demo.yaml")

    assert cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS == 7
    assert list(cfg.TEST.KEYPOINT_OKS_SIGMAS) == pytest.approx(QUOKKA_OKS_SIGMAS)


def test_bad_key_in_file(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(f'_BASE_: "{CONFIGS_DIR / "codec_mask_rcnn.yaml"}"\nMODEL:\n  ROI_HEADZ:\n    NUM_CLASSES: 3\n')

    with pytest.raises(ConfigError, match="MODEL.ROI_HEADZ") as error:
        load_config(config)
    assert str(config) in str(error.value)


def test_bad_override_key():
    with pytest.raises(ConfigError, match="SOLVER.MAX_ITERS"):
        _load("codec_mask_rcnn.yaml", ["SOLVER.MAX_ITERS", "10"])


def test_override_wrong_type():
    with pytest.raises(ConfigError, match="SOLVER.MAX_ITER"):
        _load("codec_mask_rcnn.yaml", ["SOLVER.MAX_ITER", "many"])


def test_override_odd_length():
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        _load("codec_mask_rcnn.yaml", ["SOLVER.MAX_ITER"])


def test_override_applies():
    cfg = _load("codec_mask_rcnn.yaml", ["MODEL.CODEC.SPEC", "codec-66", "SOLVER.MAX_ITER", "10"])

    assert cfg.MODEL.CODEC.SPEC == "codec-66"
    assert cfg.SOLVER.MAX_ITER == 10


def test_keypoint_sigma_count_mismatch():
    with pytest.raises(ConfigError, match="one sigma per keypoint"):
        _load("demo/codec_keypoint_rcnn_demo.yaml", ["MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", "17"])


def test_resolve_config_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    assert resolve_config_file("codec_mask_rcnn.yaml", CONFIGS_DIR) == CONFIGS_DIR / "codec_mask_rcnn.yaml"
    assert (
        resolve_config_file("demo/codec_mask_rcnn_demo.yaml", CONFIGS_DIR)
        == CONFIGS_DIR / "demo" / "codec_mask_rcnn_demo.yaml"
    )


def test_resolve_config_path_first(tmp_path, monkeypatch):
    local = tmp_path / "codec_mask_rcnn.yaml"
    local.write_text("MODEL:\n  MASK_ON: True\n")
    monkeypatch.chdir(tmp_path)

    assert resolve_config_file("codec_mask_rcnn.yaml", CONFIGS_DIR) == local


def test_resolve_config_missing():
    with pytest.raises(FileNotFoundError, match="codec_mask_rcnn_demo.yaml") as error:
        resolve_config_file("no_such_config.yaml", CONFIGS_DIR)
    assert "no_such_config.yaml" in str(error.value)
