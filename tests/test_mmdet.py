"""MMDetection integration: the CoDeCResNet backbone, its configs and the training runner.

These tests skip when MMDetection does not import, unless CODEC_REQUIRE_MMDET=1
(as in CI), which makes that a failure.
"""

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

try:
    import mmcv.ops  # noqa: F401, the compiled ops that Mask R-CNN needs
    import mmdet  # noqa: F401
except (ImportError, AssertionError) as import_error:
    # mmdet raises AssertionError at import when mmcv has another version.
    if os.environ.get("CODEC_REQUIRE_MMDET") == "1":
        pytest.fail(
            f"CODEC_REQUIRE_MMDET=1 but MMDetection does not import ({import_error!r}); "
            "run `bash tools/setup_env.sh --with-mmdet`",
            pytrace=False,
        )
    pytest.skip(
        f"MMDetection does not import ({import_error!r}); `bash tools/setup_env.sh --with-mmdet` installs it",
        allow_module_level=True,
    )

from mmengine.config import Config  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.testing import demo_mm_inputs  # noqa: E402

from codec_det.checkpoint import MODEL_FILE, load_compressed  # noqa: E402
from codec_det.layers.codec_conv import CoDeCConv2d  # noqa: E402
from codec_det.mmdet import CoDeCResNet, spec_style  # noqa: E402
from codec_det.mmdet import backbone as mmdet_backbone  # noqa: E402
from codec_det.mmdet.runner import (  # noqa: E402
    FINAL_WEIGHTS_FILE,
    METRICS_FILE,
    check_data_files,
    evaluate,
    load_config,
    resolve_config_file,
    set_data_root,
    train_and_evaluate,
)
from codec_det.spec import SpecError, resolve_spec  # noqa: E402
from resnet_fixtures import randomize_norms, save_mixed_compression  # noqa: E402

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "mmdet"
STAGES = ["res2", "res3", "res4", "res5"]
STAGE_CHANNELS = [256, 512, 1024, 2048]

def relative_error(found, expected):
    return float((found - expected).norm() / expected.norm())


def build_backbone(**kwargs):
    return MODELS.build(dict(type="CoDeCResNet", **kwargs))


def codec_layers(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, CoDeCConv2d)}


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory):
    torch.manual_seed(0)
    dense = randomize_norms(torchvision.models.resnet50()).eval()
    return save_mixed_compression(dense, tmp_path_factory.mktemp("compressed"))


@pytest.fixture(scope="module")
def loaded_backbone(compressed_dir):
    model = build_backbone(weights=str(compressed_dir), frozen_stages=-1)
    model.init_weights()
    return model.eval()


# --- registration and structure -------------------------------------------------


def test_registry_builds_codec_resnet():
    model = build_backbone(spec="codec-45")

    assert isinstance(model, CoDeCResNet)
    assert MODELS.get("CoDeCResNet") is CoDeCResNet
    assert set(codec_layers(model)) == set(resolve_spec("codec-45").layers)


def test_output_shapes_all_stages():
    model = build_backbone(spec="codec-66").eval()

    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 64, 96))

    assert [tuple(output.shape) for output in outputs] == [
        (1, 256, 16, 24),
        (1, 512, 8, 12),
        (1, 1024, 4, 6),
        (1, 2048, 2, 3),
    ]


def test_out_indices_select_stages():
    model = build_backbone(spec="codec-45", out_indices=(1, 3)).eval()

    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 64, 64))

    assert len(outputs) == 2
    assert [output.shape[1] for output in outputs] == [512, 2048]


def test_state_dict_keys_follow_torchvision(compressed_dir):
    model = build_backbone(weights=str(compressed_dir))
    file_keys = {key for key in load_file(str(compressed_dir / MODEL_FILE)) if not key.startswith("fc.")}

    assert set(model.state_dict()) == file_keys
    assert "layer1.0.conv2.height_factors" in file_keys
    assert "layer1.0.downsample.0.filter_factors" in file_keys
    assert "layer1.0.bn2.running_var" in file_keys


def test_reload_keeps_first_registration():
    registered = MODELS.get("CoDeCResNet")

    importlib.reload(mmdet_backbone)

    assert MODELS.get("CoDeCResNet") is registered


def test_codec_det_import_leaves_mmdet_out():
    code = "import sys, codec_det; sys.exit(1 if 'codec_det.mmdet' in sys.modules else 0)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    assert completed.returncode == 0, completed.stderr


# --- weights and equality with the Detectron2 backbone ---------------------------


def test_weights_load_into_every_tensor(compressed_dir, loaded_backbone):
    stored = load_file(str(compressed_dir / MODEL_FILE))
    state = loaded_backbone.state_dict()

    for key, tensor in state.items():
        assert torch.equal(tensor, stored[key]), key


def test_features_match_compressed_torchvision(compressed_dir, loaded_backbone):
    reference = load_compressed(compressed_dir, torchvision.models.resnet50()).eval()
    image = torch.randn(1, 3, 96, 64, generator=torch.Generator().manual_seed(3))

    with torch.no_grad():
        found = loaded_backbone(image)
        x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(image))))
        expected = []
        for layer in (reference.layer1, reference.layer2, reference.layer3, reference.layer4):
            x = layer(x)
            expected.append(x)

    for stage, feature, reference_feature in zip(STAGES, found, expected):
        assert relative_error(feature, reference_feature) <= 1e-4, stage


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_features_match_detectron2(compressed_dir, loaded_backbone, tmp_path, norm):
    pytest.importorskip("detectron2")
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from codec_det.d2 import add_codec_config, load_codec_checkpoint
    from codec_det.d2.convert import convert_to_d2

    converted = tmp_path / "codec_d2.pth"
    convert_to_d2(compressed_dir, converted)
    cfg = get_cfg()
    add_codec_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file("Base-RCNN-FPN.yaml"))
    cfg.MODEL.BACKBONE.NAME = "build_codec_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = str(converted)
    cfg.MODEL.CODEC.SPEC = ""
    detector = build_model(cfg)
    load_codec_checkpoint(detector, converted)
    detector.eval()
    image = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(5))

    with torch.no_grad():
        d2_features = detector.backbone.bottom_up(image)
        mmdet_features = loaded_backbone(image)

    assert loaded_backbone.layer1[0].conv2.permutation_folded
    assert len(mmdet_features) == len(STAGES)
    for stage, feature in zip(STAGES, mmdet_features):
        assert feature.shape == d2_features[stage].shape, stage
        assert relative_error(feature, d2_features[stage]) <= 1e-4, stage


def test_norm_eval_keeps_features_in_train_mode(compressed_dir, loaded_backbone):
    model = build_backbone(weights=str(compressed_dir), frozen_stages=-1, norm_eval=True)
    model.init_weights()
    model.train()
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))

    with torch.no_grad():
        found = model(image)
        expected = loaded_backbone(image)

    for stage, feature, reference_feature in zip(STAGES, found, expected):
        assert relative_error(feature, reference_feature) <= 1e-6, stage


# --- frozen_stages and norm_eval ---------------------------------------------------


@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 2, 4])
def test_frozen_stages_freeze_codec_factors(frozen_stages):
    model = build_backbone(spec="codec-45", frozen_stages=frozen_stages, norm_eval=False)
    model.train()

    stem_frozen = frozen_stages >= 0
    assert model.conv1.weight.requires_grad is not stem_frozen
    assert model.bn1.weight.requires_grad is not stem_frozen
    assert model.bn1.training is not stem_frozen
    for index in range(1, 5):
        stage = getattr(model, f"layer{index}")
        frozen = index <= frozen_stages
        factors = [parameter for layer in codec_layers(stage).values() for parameter in layer.factors()]
        assert factors, f"layer{index} has no CoDeC layer"
        assert all(parameter.requires_grad is not frozen for parameter in factors), f"layer{index}"
        assert all(parameter.requires_grad is not frozen for parameter in stage.parameters()), f"layer{index}"
        norms = [module for module in stage.modules() if isinstance(module, nn.BatchNorm2d)]
        assert all(norm.training is not frozen for norm in norms), f"layer{index}"


@pytest.mark.parametrize("norm_eval", [True, False])
def test_norm_eval_sets_batch_norm_mode(norm_eval):
    model = build_backbone(spec="codec-45", frozen_stages=-1, norm_eval=norm_eval)
    model.train()

    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    assert norms
    assert all(norm.training is not norm_eval for norm in norms)
    assert all(layer.training for layer in codec_layers(model).values())


def test_group_norm_builds_from_scratch():
    model = build_backbone(spec="codec-45", norm_cfg=dict(type="GN", num_groups=32, requires_grad=True))

    assert isinstance(model.layer1[0].gn2, nn.GroupNorm)
    assert isinstance(model.layer1[0].conv2, CoDeCConv2d)


# --- errors ------------------------------------------------------------------------


def test_missing_spec_file_rejected(tmp_path):
    with pytest.raises(FileNotFoundError) as raised:
        build_backbone(spec=str(tmp_path / "absent.json"))

    message = str(raised.value)
    assert "not found" in message
    assert "codec-45" in message


def test_neither_spec_nor_weights_rejected():
    with pytest.raises(ValueError, match="needs spec="):
        build_backbone()


def write_spec(tmp_path, edit):
    data = resolve_spec("codec-45").to_dict()
    edit(data["layers"])
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("argument, value", [("spec", 45), ("spec", {"layers": {}}), ("weights", 1)])
def test_spec_and_weights_must_be_paths(argument, value):
    arguments = {"spec": "codec-45", argument: value}
    with pytest.raises(ValueError, match=re.escape(f"{argument}={value!r} is a {type(value).__name__}")):
        build_backbone(**arguments)


def test_spec_with_wrong_channels_rejected(tmp_path):
    def widen(layers):
        layers["layer2.0.conv2"]["in_channels"] = 64

    with pytest.raises(SpecError, match=r"layer2\.0\.conv2.*in_channels 64 \(model: 128\)"):
        build_backbone(spec=str(write_spec(tmp_path, widen)))


def test_spec_with_unknown_layer_rejected(tmp_path):
    def rename(layers):
        layers["layer5.0.conv1"] = layers.pop("layer4.0.conv1")

    with pytest.raises(SpecError, match=r"layer5\.0\.conv1 is no module"):
        build_backbone(spec=str(write_spec(tmp_path, rename)))


def test_caffe_style_with_torchvision_spec_rejected():
    assert spec_style(resolve_spec("codec-45")) == "pytorch"

    with pytest.raises(SpecError, match="set style='pytorch'"):
        build_backbone(spec="codec-45", style="caffe")


def test_dilated_stage_rejected():
    with pytest.raises(SpecError, match=r"dilation \[1, 1\] \(model: \[2, 2\]\)"):
        build_backbone(spec="codec-45", strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2))


@pytest.mark.parametrize(
    "argument, value",
    [("depth", 101), ("deep_stem", True), ("avg_down", True), ("num_stages", 3), ("base_channels", 32)],
)
def test_unsupported_resnet_arguments(argument, value):
    with pytest.raises(ValueError, match=f"{argument}={value!r} is not supported"):
        build_backbone(spec="codec-45", **{argument: value})


@pytest.mark.parametrize(
    "argument, value",
    [("out_indices", (0, 4)), ("out_indices", (-1,)), ("out_indices", ()), ("frozen_stages", 5), ("frozen_stages", -2)],
)
def test_out_of_range_stage_arguments(argument, value):
    with pytest.raises(ValueError, match=re.escape(f"{argument}={value!r} is invalid")):
        build_backbone(spec="codec-45", **{argument: value})


def test_unknown_resnet_argument_rejected():
    with pytest.raises(ValueError, match=r"unknown arguments \['nonsense'\]"):
        build_backbone(spec="codec-45", nonsense=1)


def test_pretrained_init_cfg_rejected(compressed_dir):
    with pytest.raises(ValueError, match="remove pretrained="):
        build_backbone(spec="codec-45", init_cfg=dict(type="Pretrained", checkpoint=str(compressed_dir)))


def test_weights_with_group_norm_rejected(compressed_dir):
    with pytest.raises(ValueError, match="use norm_cfg type 'BN'"):
        build_backbone(weights=str(compressed_dir), norm_cfg=dict(type="GN", num_groups=32))


def test_weights_with_missing_key_rejected(compressed_dir, tmp_path):
    state = load_file(str(compressed_dir / MODEL_FILE))
    del state["layer2.0.conv2.height_factors"]
    weights = tmp_path / "partial.safetensors"
    save_file(state, str(weights))
    model = build_backbone(spec=str(compressed_dir), weights=str(weights))

    with pytest.raises(SpecError, match=r"missing keys \['layer2\.0\.conv2\.height_factors'\]"):
        model.init_weights()


def test_weights_with_wrong_shape_rejected(compressed_dir, tmp_path):
    state = load_file(str(compressed_dir / MODEL_FILE))
    state["layer3.1.conv1.input_factors"] = state["layer3.1.conv1.input_factors"][:, :-1].contiguous()
    weights = tmp_path / "reshaped.safetensors"
    save_file(state, str(weights))
    model = build_backbone(spec=str(compressed_dir), weights=str(weights))

    with pytest.raises(SpecError, match=r"shape mismatches.*layer3\.1\.conv1\.input_factors"):
        model.init_weights()


def test_weights_of_another_spec_rejected(compressed_dir):
    with pytest.raises(SpecError, match="describes other layers than"):
        build_backbone(spec="codec-45", weights=str(compressed_dir))


def test_uncompressed_weights_rejected(tmp_path):
    weights = tmp_path / "resnet50.safetensors"
    save_file({key: value.contiguous() for key, value in torchvision.models.resnet50().state_dict().items()}, str(weights))
    model = build_backbone(spec="codec-45", weights=str(weights))

    with pytest.raises(SpecError, match=r"missing keys \[.*input_factors"):
        model.init_weights()


def test_missing_weights_file_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights .* not found"):
        build_backbone(spec="codec-45", weights=str(tmp_path / "absent.safetensors"))


def test_missing_weights_directory_named(tmp_path):
    absent = tmp_path / "absent"
    with pytest.raises(FileNotFoundError, match=f"weights {absent} not found"):
        build_backbone(weights=str(absent))


def test_weights_directory_without_spec_rejected(compressed_dir, tmp_path):
    (tmp_path / MODEL_FILE).write_bytes((compressed_dir / MODEL_FILE).read_bytes())

    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no spec.json"):
        build_backbone(weights=str(tmp_path))


def test_detectron2_checkpoint_rejected(compressed_dir, tmp_path):
    checkpoint = tmp_path / "model.pth"
    torch.save({"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(1)}, "__author__": "codec-det"}, checkpoint)
    model = build_backbone(spec=str(compressed_dir), weights=str(checkpoint))

    with pytest.raises(SpecError, match="is a Detectron2 checkpoint"):
        model.init_weights()


# --- detectors, configs and the runner ----------------------------------------------


def test_mask_rcnn_training_iteration(compressed_dir):
    cfg = Config.fromfile(str(CONFIGS / "mask-rcnn_codec45_r50_fpn_1x_coco.py"))
    cfg.model.backbone.weights = str(compressed_dir)
    cfg.model.backbone.spec = None
    cfg.model.roi_head.bbox_head.num_classes = 3
    cfg.model.roi_head.mask_head.num_classes = 3
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    packed = demo_mm_inputs(2, [(3, 128, 160), (3, 160, 128)], num_items=[2, 3], num_classes=3, with_mask=True)

    data = model.data_preprocessor(packed, True)
    losses = model(**data, mode="loss")
    loss, log_vars = model.parse_losses(losses)
    loss.backward()

    for key in ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"):
        assert key in log_vars, key
        assert torch.isfinite(torch.as_tensor(log_vars[key])), key
    assert torch.isfinite(loss)
    backbone = model.backbone
    for name, layer in codec_layers(backbone).items():
        for parameter in layer.factors():
            if name.startswith("layer1."):
                # frozen_stages=1 in the config freezes the stem and layer1.
                assert parameter.grad is None, name
                continue
            assert parameter.grad is not None, name
            assert torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "config, detector, spec, masks",
    [
        ("faster-rcnn_codec45_r50_fpn_1x_coco.py", "FasterRCNN", "codec-45", False),
        ("faster-rcnn_codec66_r50_fpn_1x_coco.py", "FasterRCNN", "codec-66", False),
        ("mask-rcnn_codec45_r50_fpn_1x_coco.py", "MaskRCNN", "codec-45", True),
        ("mask-rcnn_codec66_r50_fpn_1x_coco.py", "MaskRCNN", "codec-66", True),
        ("demo/faster-rcnn_codec45_demo_cars.py", "FasterRCNN", "codec-45", False),
        ("demo/mask-rcnn_codec45_demo_voc.py", "MaskRCNN", "codec-45", True),
    ],
)
def test_configs_build_codec_detectors(config, detector, spec, masks):
    cfg = Config.fromfile(str(CONFIGS / config))

    assert cfg.model.type == detector
    assert cfg.model.backbone.type == "CoDeCResNet"
    assert cfg.model.backbone.spec == spec
    assert cfg.model.backbone.style == "pytorch"
    assert cfg.model.data_preprocessor.bgr_to_rgb
    assert list(cfg.model.data_preprocessor.mean) == [123.675, 116.28, 103.53]
    assert "codec_det.mmdet" in cfg.custom_imports.imports
    metrics = cfg.val_evaluator.metric
    assert ("segm" in metrics) is masks
    model = MODELS.build(cfg.model)
    assert set(codec_layers(model.backbone)) == set(resolve_spec(spec).layers)


@pytest.mark.parametrize(
    "config, folder",
    [("demo/mask-rcnn_codec45_demo_voc.py", "voc"), ("demo/faster-rcnn_codec45_demo_cars.py", "cars")],
)
def test_demo_config_reads_bundled_photos(config, folder):
    cfg = Config.fromfile(str(CONFIGS / config))

    assert cfg.train_dataloader.dataset.data_root == f"datasets/codec_demo/{folder}/"
    assert cfg.val_evaluator.ann_file == f"datasets/codec_demo/{folder}/annotations.json"
    assert cfg.train_dataloader.num_workers == 0
    annotations_file = REPO / "datasets" / "codec_demo" / folder / "annotations.json"
    if not annotations_file.is_file():
        pytest.skip("demo photos not fetched; run python -m codec_det.data.demo_fetch")
    categories = sorted(json.loads(annotations_file.read_text())["categories"], key=lambda category: category["id"])
    assert list(cfg.train_dataloader.dataset.metainfo.classes) == [category["name"] for category in categories]


def test_set_data_root_rewrites_paths():
    cfg = Config.fromfile(str(CONFIGS / "mask-rcnn_codec45_r50_fpn_1x_coco.py"))

    set_data_root(cfg, "/data/coco")

    assert cfg.train_dataloader.dataset.data_root == "/data/coco/"
    assert cfg.val_dataloader.dataset.data_root == "/data/coco/"
    assert cfg.test_dataloader.dataset.data_root == "/data/coco/"
    assert cfg.val_evaluator.ann_file == "/data/coco/annotations/instances_val2017.json"
    assert cfg.test_evaluator.ann_file == "/data/coco/annotations/instances_val2017.json"


def test_load_config_backbone_weights(compressed_dir):
    cfg = load_config("mask-rcnn_codec66_r50_fpn_1x_coco.py", backbone_weights=compressed_dir)

    assert cfg.model.backbone.weights == str(compressed_dir)
    assert cfg.model.backbone.spec is None
    assert cfg.work_dir == str(Path("output") / "mmdet" / "mask-rcnn_codec66_r50_fpn_1x_coco")


def test_missing_config_says_where_it_looked():
    with pytest.raises(FileNotFoundError, match="configs/mmdet"):
        resolve_config_file("absent.py")


def test_missing_data_root_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"data root {tmp_path / 'absent'} is not a directory"):
        load_config("mask-rcnn_codec45_r50_fpn_1x_coco.py", data_root=tmp_path / "absent")


def test_work_dir_that_is_a_file_rejected(tmp_path):
    work_file = tmp_path / "work"
    work_file.write_text("")

    with pytest.raises(ValueError, match=f"work directory {work_file} exists and is not a directory"):
        load_config("demo/mask-rcnn_codec45_demo_voc.py", work_dir=work_file)


def test_check_data_files_names_missing_paths(tmp_path):
    cfg = load_config("mask-rcnn_codec45_r50_fpn_1x_coco.py", data_root=tmp_path)
    with pytest.raises(FileNotFoundError, match=f"train_dataloader: annotation file {tmp_path}/annotations"):
        check_data_files(cfg)
    with pytest.raises(FileNotFoundError, match=f"test_dataloader: annotation file {tmp_path}/annotations"):
        check_data_files(cfg, eval_only=True)

    (tmp_path / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        (tmp_path / "annotations" / f"instances_{split}.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"train_dataloader: image folder {tmp_path}/train2017 not found"):
        check_data_files(cfg)

    (tmp_path / "train2017").mkdir()
    (tmp_path / "val2017").mkdir()
    check_data_files(cfg)
    check_data_files(cfg, eval_only=True)


def test_failed_training_removes_earlier_outputs(tmp_path):
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    for name in (FINAL_WEIGHTS_FILE, METRICS_FILE):
        (work_dir / name).write_text("from an earlier run")
    cfg = load_config("demo/mask-rcnn_codec45_demo_voc.py", work_dir=work_dir, data_root=tmp_path)

    with pytest.raises(FileNotFoundError):
        train_and_evaluate(cfg)
    assert not (work_dir / FINAL_WEIGHTS_FILE).exists()
    assert not (work_dir / METRICS_FILE).exists()


def test_evaluate_rejects_backbone_weights(compressed_dir, tmp_path):
    cfg = load_config("mask-rcnn_codec45_r50_fpn_1x_coco.py", work_dir=tmp_path)

    with pytest.raises(SpecError, match="contains no detector weights"):
        evaluate(cfg, compressed_dir / MODEL_FILE)


def test_evaluate_names_mismatched_keys(tmp_path):
    checkpoint = tmp_path / "detector.safetensors"
    save_file({"backbone.absent.weight": torch.zeros(1)}, str(checkpoint))
    cfg = load_config("mask-rcnn_codec45_r50_fpn_1x_coco.py", work_dir=tmp_path / "work")

    with pytest.raises(SpecError, match=r"unexpected keys \['backbone\.absent\.weight'\]") as raised:
        evaluate(cfg, checkpoint)
    assert "missing keys ['backbone.bn1." in str(raised.value)


@pytest.mark.slow
def test_demo_training_runs_through_tool(tmp_path):
    if not (REPO / "datasets" / "codec_demo" / "voc" / "annotations.json").is_file():
        pytest.skip("demo photos not fetched; run python -m codec_det.data.demo_fetch")
    work_dir = tmp_path / "demo"
    command = [
        sys.executable,
        str(REPO / "tools" / "mmdet_train.py"),
        "demo/mask-rcnn_codec45_demo_voc.py",
        "--work-dir",
        str(work_dir),
        "--threads",
        "2",
        "--cfg-options",
        "train_cfg.max_iters=2",
        "train_cfg.val_interval=2",
    ]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)

    assert completed.returncode == 0, completed.stderr[-4000:]
    metrics = json.loads((work_dir / "metrics.json").read_text())
    for key in ("coco/bbox_mAP", "coco/segm_mAP", "coco/bbox_mAP_50"):
        assert key in metrics, key
        assert 0.0 <= metrics[key] <= 1.0, key
    assert (work_dir / "model_final.safetensors").is_file()

    evaluation = subprocess.run(
        command[:3]
        + ["--work-dir", str(tmp_path / "eval"), "--threads", "2", "--eval-only", "--checkpoint",
           str(work_dir / "model_final.safetensors")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert evaluation.returncode == 0, evaluation.stderr[-4000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics
