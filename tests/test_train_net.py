"""Tests of tools/train_net.py and codec_det.engine: training steps, evaluation, errors, multi-process runs."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2", reason="Detectron2 is installed by bash tools/setup_env.sh")

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances, Keypoints  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from codec_det.data.demo_fetch import default_demo_root, is_demo_data_complete  # noqa: E402
from codec_det.engine import (  # noqa: E402
    CodecTrainer,
    ConfigError,
    build_evaluator,
    check_datasets,
    fall_back_to_cpu,
    flatten_results,
    load_config,
    register_datasets,
)
from codec_det.layers.codec_conv import CoDeCConv2d  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS_DIR = REPO_ROOT / "configs"
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"
DEMO_ROOT = default_demo_root()

needs_demo_data = pytest.mark.skipif(
    not is_demo_data_complete(DEMO_ROOT),
    reason=f"demo photos not found in {DEMO_ROOT}; run `python -m codec_det.data.demo_fetch` "
    "(bash tools/setup_env.sh does)",
)

# Overrides that make a demo config cheap enough for a unit test: 128 px
# images, few proposals and ROIs, one iteration, and every detection kept so
# that evaluation always has predictions to score.
TINY_OPTS = [
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MAX_SIZE_TRAIN", "192",
    "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "192",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "32",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "200",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "32",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "TEST.DETECTIONS_PER_IMAGE", "10",
    "SOLVER.IMS_PER_BATCH", "1",
    "SOLVER.MAX_ITER", "1",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.STEPS", "()",
]

DEMO_CONFIGS = {
    "faster": "demo/codec_faster_rcnn_demo.yaml",
    "mask": "demo/codec_mask_rcnn_demo.yaml",
    "keypoint": "demo/codec_keypoint_rcnn_demo.yaml",
}

CODEC_FACTOR_NAMES = ("input_factors", "height_factors", "width_factors", "filter_factors")


@pytest.fixture(autouse=True)
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _tiny_config(task: str, output_dir: Path, *extra: str):
    return load_config(CONFIGS_DIR / DEMO_CONFIGS[task], [*TINY_OPTS, "OUTPUT_DIR", str(output_dir), *extra])


def _load_train_net():
    spec = importlib.util.spec_from_file_location("codec_train_net", TRAIN_NET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _register_once(name: str, json_file: Path, image_root: Path) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(json_file), str(image_root))


def _synthetic_batch(cfg) -> list[dict]:
    """One 128x160 image with two objects, with the annotations that ``cfg``'s heads train on."""
    height, width = 128, 160
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, height, width), generator=generator).float()
    boxes = torch.tensor([[10.0, 20.0, 90.0, 110.0], [70.0, 30.0, 150.0, 120.0]])

    instances = Instances((height, width))
    instances.gt_boxes = Boxes(boxes)
    instances.gt_classes = torch.zeros(2, dtype=torch.int64)
    if cfg.MODEL.MASK_ON:
        masks = torch.zeros(2, height, width, dtype=torch.bool)
        for index, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[index, y0:y1, x0:x1] = True
        instances.gt_masks = BitMasks(masks)
    if cfg.MODEL.KEYPOINT_ON:
        num_keypoints = cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS
        keypoints = torch.zeros(2, num_keypoints, 3)
        for index, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            keypoints[index, :, 0] = torch.linspace(x0 + 5, x1 - 5, num_keypoints)
            keypoints[index, :, 1] = torch.linspace(y0 + 5, y1 - 5, num_keypoints)
            keypoints[index, :, 2] = 2
        instances.gt_keypoints = Keypoints(keypoints)
    return [{"image": image, "instances": instances, "height": height, "width": width}]


# ---------------------------------------------------------------------------
# One training step of each meta-architecture
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(DEMO_CONFIGS))
def test_training_step_reaches_codec_factors(task, tmp_path):
    cfg = _tiny_config(task, tmp_path)
    torch.manual_seed(0)
    model = CodecTrainer.build_model(cfg)
    model.train()

    with EventStorage(0):
        losses = model(_synthetic_batch(cfg))
    total = sum(losses.values())
    total.backward()

    expected = {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    if task == "mask":
        expected.add("loss_mask")
    if task == "keypoint":
        expected.add("loss_keypoint")
    assert set(losses) == expected
    for name, loss in losses.items():
        assert torch.isfinite(loss), f"{name} = {loss.item()}"

    codec_layers = {name: module for name, module in model.backbone.named_modules() if isinstance(module, CoDeCConv2d)}
    assert codec_layers, "the codec-45 backbone has no CoDeC layers"
    checked = 0
    for layer_name, layer in codec_layers.items():
        for factor_name in CODEC_FACTOR_NAMES:
            factor = getattr(layer, factor_name, None)
            if factor is None:
                continue
            assert factor.grad is not None, f"{layer_name}.{factor_name} has no gradient"
            assert torch.isfinite(factor.grad).all(), f"{layer_name}.{factor_name} has a non-finite gradient"
            checked += 1
    assert checked >= 2 * len(codec_layers)


def test_demo_backbone_is_codec_45(tmp_path):
    cfg = _tiny_config("faster", tmp_path)
    model = CodecTrainer.build_model(cfg)

    names = {name for name, module in model.backbone.named_modules() if isinstance(module, CoDeCConv2d)}

    assert any(".res2." in f".{name}." for name in names)
    assert any(".res5." in f".{name}." for name in names)
    assert all(parameter.requires_grad for parameter in model.backbone.parameters())


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


@needs_demo_data
def test_evaluation_returns_box_ap(tmp_path):
    cfg = _tiny_config("faster", tmp_path)
    register_datasets(cfg)
    model = CodecTrainer.build_model(cfg)

    results = CodecTrainer.test(cfg, model)

    assert set(results) == {"bbox"}
    assert {"AP", "AP50", "AP75"} <= set(results["bbox"])
    assert all(math.isfinite(value) for value in results["bbox"].values() if not math.isnan(value))
    assert 0.0 <= results["bbox"]["AP50"] <= 100.0


@needs_demo_data
def test_evaluator_uses_quokka_sigmas(tmp_path):
    cfg = _tiny_config("keypoint", tmp_path, "TEST.KEYPOINT_OKS_SIGMAS", "[]")
    register_datasets(cfg)

    evaluator = build_evaluator(cfg, "codec_demo_quokka")

    assert len(evaluator._kpt_oks_sigmas) == 7
    assert set(evaluator._tasks) == {"bbox", "keypoints"}
    assert evaluator._use_fast_impl is False


@needs_demo_data
def test_eval_only_quokka_keypoints(tmp_path):
    train_net = _load_train_net()
    args = train_net.build_parser().parse_args(
        ["--config", DEMO_CONFIGS["keypoint"], "--eval-only", *TINY_OPTS, "OUTPUT_DIR", str(tmp_path)]
    )

    results = train_net.main(args)

    assert set(results) == {"bbox", "keypoints"}
    assert {"AP", "AP50", "AP75", "APm", "APl"} <= set(results["keypoints"])
    assert (tmp_path / "config.yaml").is_file()


@pytest.mark.slow
@needs_demo_data
def test_train_then_eval_only(tmp_path, capsys):
    train_net = _load_train_net()
    parser = train_net.build_parser()
    train_args = parser.parse_args(["--config", DEMO_CONFIGS["faster"], *TINY_OPTS, "OUTPUT_DIR", str(tmp_path)])

    train_results = train_net.main(train_args)
    weights = tmp_path / "model_final.pth"
    eval_args = parser.parse_args(
        ["--config", DEMO_CONFIGS["faster"], "--eval-only", *TINY_OPTS,
         "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(tmp_path / "eval")]
    )
    eval_results = train_net.main(eval_args)

    assert weights.is_file()
    assert set(train_results) == {"bbox"}
    assert set(eval_results) == {"bbox"}
    assert eval_results["bbox"]["AP50"] == pytest.approx(train_results["bbox"]["AP50"], nan_ok=True)
    assert "Final COCO AP (percent):" in capsys.readouterr().out


@pytest.mark.slow
@needs_demo_data
@pytest.mark.parametrize("task", sorted(DEMO_CONFIGS))
def test_demo_schedule_learns(task, tmp_path):
    # The full demo schedule. Before training, the demos score a box AP50 of 0 to 1.4.
    train_net = _load_train_net()
    args = train_net.build_parser().parse_args(["--config", DEMO_CONFIGS[task], "OUTPUT_DIR", str(tmp_path)])

    results = train_net.main(args)

    assert results["bbox"]["AP50"] >= 30.0
    assert (tmp_path / "model_final.pth").is_file()


# ---------------------------------------------------------------------------
# Errors that say what to do
# ---------------------------------------------------------------------------


def _cli_error(capsys, argv: list[str]) -> str:
    train_net = _load_train_net()
    with pytest.raises(SystemExit) as exit_info:
        train_net.cli(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_cli_bad_config_key(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(f'_BASE_: "{CONFIGS_DIR / "codec_faster_rcnn.yaml"}"\nSOLVER:\n  MAX_ITERATIONS: 10\n')

    message = _cli_error(capsys, ["--config", str(config)])

    assert "SOLVER.MAX_ITERATIONS" in message
    assert str(config) in message


def test_cli_bad_override_key(capsys):
    message = _cli_error(capsys, ["--config", "codec_faster_rcnn.yaml", "MODEL.CODEC.SPECS", "codec-45"])

    assert "MODEL.CODEC.SPECS" in message


def test_cli_missing_config(capsys):
    message = _cli_error(capsys, ["--config", "codec_mask_rcnn_nope.yaml"])

    assert "codec_mask_rcnn_nope.yaml" in message
    assert "demo/codec_mask_rcnn_demo.yaml" in message


def test_cli_missing_spec_file(tmp_path, capsys):
    missing = tmp_path / "no_such_dir" / "spec.json"

    message = _cli_error(capsys, ["--config", DEMO_CONFIGS["faster"], "MODEL.CODEC.SPEC", str(missing)])

    assert str(missing) in message
    assert "codec-45" in message


def test_cli_truncated_weights(tmp_path, capsys):
    truncated = tmp_path / "model_final.pth"
    torch.save({"model": {"weight": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])

    argv = ["--config", DEMO_CONFIGS["faster"], "--eval-only", "MODEL.WEIGHTS", str(truncated), "MODEL.CODEC.SPEC", ""]

    message = _cli_error(capsys, argv)

    assert str(truncated) in message
    assert "truncated" in message


def test_cli_missing_coco(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    if os.path.isfile(os.path.join(root, "coco", "annotations", "instances_train2017.json")):
        pytest.skip(f"COCO-2017 is present under {root}")

    message = _cli_error(capsys, ["--config", "codec_faster_rcnn.yaml"])

    assert "coco_2017_train" in message
    assert "instances_train2017.json" in message
    assert "DETECTRON2_DATASETS" in message


def test_cli_missing_demo_photos(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CODEC_DEMO_DATA", str(tmp_path / "empty"))

    message = _cli_error(capsys, ["--config", DEMO_CONFIGS["mask"]])

    assert "demo_fetch" in message


def test_missing_image_folder(tmp_path):
    json_file = tmp_path / "annotations.json"
    json_file.write_text('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}')
    _register_once("codec_test_missing_images", json_file, tmp_path / "images")

    with pytest.raises(FileNotFoundError, match="image folder") as error:
        check_datasets(["codec_test_missing_images"], "DATASETS.TEST")
    assert str(tmp_path / "images") in str(error.value)


def test_unregistered_dataset():
    with pytest.raises(ConfigError, match="coco_2017_val"):
        check_datasets(["coco_2071_val"], "DATASETS.TEST")


def test_keypoint_sigmas_required(tmp_path):
    cfg = _tiny_config("keypoint", tmp_path, "TEST.KEYPOINT_OKS_SIGMAS", "[]")
    _register_once("codec_test_no_sigmas", tmp_path / "annotations.json", tmp_path)

    with pytest.raises(ConfigError, match="TEST.KEYPOINT_OKS_SIGMAS"):
        build_evaluator(cfg, "codec_test_no_sigmas")


# ---------------------------------------------------------------------------
# Devices and processes
# ---------------------------------------------------------------------------


def test_cuda_falls_back_to_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _tiny_config("faster", tmp_path, "MODEL.DEVICE", "cuda")

    assert fall_back_to_cpu(cfg)
    assert cfg.MODEL.DEVICE == "cpu"
    assert not fall_back_to_cpu(cfg)


def test_flatten_results_by_dataset():
    flat = flatten_results({"a": {"bbox": {"AP": 1.0}}, "b": {"bbox": {"AP": 2.0}, "segm": {"AP": 3.0}}})

    assert flat == {"a/bbox": {"AP": 1.0}, "b/bbox": {"AP": 2.0}, "b/segm": {"AP": 3.0}}


def test_print_results_table(capsys):
    train_net = _load_train_net()

    train_net.print_results({"bbox": {"AP": 12.5, "AP50": 30.25, "AP-car": 1.0}, "keypoints": {"AP": 5.0}})

    output = capsys.readouterr().out
    assert "| bbox " in output
    assert "30.25" in output
    assert "AP-car" not in output


@pytest.mark.slow
@needs_demo_data
def test_two_cpu_processes(tmp_path):
    command = [
        sys.executable, str(TRAIN_NET), "--config", DEMO_CONFIGS["faster"], "--num-gpus", "2", "--dist-url", "auto",
        *TINY_OPTS, "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "MODEL.DEVICE", "cpu",
        "OUTPUT_DIR", str(tmp_path),
    ]

    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)

    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    assert "World size: 2" in output
    assert output.count("Final COCO AP (percent):") == 1
    assert (tmp_path / "model_final.pth").is_file()
