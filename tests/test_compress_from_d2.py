import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2 import model_zoo  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from codec_det import add_codec_config  # noqa: E402
from codec_det.complexity import count_model  # noqa: E402
from codec_det.d2.checkpoint import read_d2_checkpoint, save_d2_checkpoint  # noqa: E402
from codec_det.d2.checkpointer import load_codec_checkpoint  # noqa: E402
from codec_det.d2.compress import (  # noqa: E402
    compress_d2_state,
    load_bottom_up,
    read_source_checkpoint,
    torchvision_trunk,
)
from codec_det.d2.layers import CoDeCNormConv2d  # noqa: E402
from codec_det.decompose import ALSSettings  # noqa: E402
from codec_det.spec import CompressionSpec, SpecError  # noqa: E402

torch.set_num_threads(2)

PREFIX = "backbone.bottom_up."
STAGES = ["res2", "res3", "res4", "res5"]
TOOL = Path(__file__).resolve().parents[1] / "tools" / "compress_backbone.py"
COMPRESSED = ["layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2", "layer3.0.conv1"]


def stock_cfg():
    """Detectron2's R50-FPN Faster R-CNN: MSRA layout (STRIDE_IN_1X1 True), FrozenBN."""
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("Base-RCNN-FPN.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def codec_cfg(weights):
    cfg = get_cfg()
    add_codec_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file("Base-RCNN-FPN.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_codec_resnet_fpn_backbone"
    cfg.MODEL.WEIGHTS = str(weights)
    return cfg


def randomize_frozen_norms(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            size = module.num_features
            module.weight.copy_(0.5 + torch.rand(size, generator=generator))
            module.bias.copy_(0.1 * torch.randn(size, generator=generator))
            module.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(size, generator=generator))


def trunk_features(model, image):
    x = model.maxpool(model.relu(model.bn1(model.conv1(image))))
    features = {}
    for name, layer in zip(STAGES, (model.layer1, model.layer2, model.layer3, model.layer4)):
        x = layer(x)
        features[name] = x
    return features


def relative_error(found, expected):
    return float((found - expected).norm() / expected.norm())


def load_tool():
    spec = importlib.util.spec_from_file_location("codec_compress_backbone", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A randomly initialised R50-FPN saved by DetectionCheckpointer, with its config file."""
    directory = tmp_path_factory.mktemp("trained")
    cfg = stock_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        randomize_frozen_norms(model)
    DetectionCheckpointer(model, save_dir=str(directory)).save("model_final")
    (directory / "config.yaml").write_text(cfg.dump())
    return directory / "model_final.pth", directory / "config.yaml", model


@pytest.fixture(scope="module")
def compressed(trained, tmp_path_factory):
    checkpoint, config, _ = trained
    cfg = get_cfg()
    add_codec_config(cfg)
    cfg.merge_from_file(str(config))
    state = read_source_checkpoint(checkpoint)

    trunk = torchvision_trunk(stride_in_1x1=True, norm="FrozenBN")
    all_convs = [name for name, module in trunk.named_modules() if isinstance(module, torch.nn.Conv2d)]
    total_macs, _ = count_model(trunk, (64, 64))
    new_state, result = compress_d2_state(
        state,
        cfg,
        source=str(checkpoint),
        target_macs=0.97 * total_macs,
        input_size=(64, 64),
        keep_dense=tuple(name for name in all_convs if name not in COMPRESSED),
        settings=ALSSettings(n_iter_max=3),
        progress=False,
    )
    output = tmp_path_factory.mktemp("compressed") / "model.pth"
    save_d2_checkpoint(output, new_state, result.spec)
    return output, state, result


def test_trunk_matches_detectron2_bottom_up(trained):
    checkpoint, _, model = trained
    state = read_source_checkpoint(checkpoint)
    trunk = torchvision_trunk(stride_in_1x1=True, norm="FrozenBN")

    load_bottom_up(trunk, state, PREFIX, str(checkpoint))

    trunk.eval()
    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.backbone.bottom_up(image)
        found = trunk_features(trunk, image)
    for name in STAGES:
        assert relative_error(found[name], expected[name]) <= 1e-5, name


def test_budget_compresses_some_layers(compressed):
    _, _, result = compressed

    assert result.spec.layers
    assert set(result.spec.layers) <= set(COMPRESSED)
    assert result.spec.metadata["stride_in_1x1"] is True
    assert result.totals["macs_after"] < result.totals["macs_before"]


def test_round_trip_loads_strictly(compressed):
    output, original, result = compressed
    checkpoint = read_d2_checkpoint(output)
    model = build_model(codec_cfg(output))

    load_codec_checkpoint(model, output)

    incompatible = model.load_state_dict(checkpoint["model"], strict=False)
    assert incompatible.missing_keys == []
    assert incompatible.unexpected_keys == []
    for name in result.spec.layers:
        stage, block, conv = name.split(".")
        layer = model.backbone.bottom_up.get_submodule(f"res{int(stage[-1]) + 1}.{block}.{conv}")
        assert isinstance(layer, CoDeCNormConv2d), name
    assert CompressionSpec.from_dict(checkpoint["codec_spec"]).to_dict() == result.spec.to_dict()


def test_round_trip_keeps_heads(compressed):
    output, original, _ = compressed
    checkpoint = read_d2_checkpoint(output)

    heads = {key for key in original if not key.startswith(PREFIX)}
    assert heads == {key for key in checkpoint["model"] if not key.startswith(PREFIX)}
    for key in heads:
        assert torch.equal(checkpoint["model"][key], original[key]), key


def test_round_trip_features_and_outputs(compressed):
    output, _, result = compressed
    model = build_model(codec_cfg(output))
    load_codec_checkpoint(model, output)
    model.eval()
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(5)) * 255

    with torch.no_grad():
        features = model.backbone.bottom_up(image[None])
        expected = trunk_features(result.model.eval(), image[None])
        outputs = model([{"image": image, "height": 64, "width": 96}])

    for name in STAGES:
        assert relative_error(features[name], expected[name]) <= 1e-4, name
    instances = outputs[0]["instances"]
    assert torch.isfinite(instances.pred_boxes.tensor).all()
    assert torch.isfinite(instances.scores).all()


def test_missing_bottom_up_rejected(trained):
    checkpoint, config, _ = trained
    cfg = get_cfg()
    add_codec_config(cfg)
    cfg.merge_from_file(str(config))
    state = read_source_checkpoint(checkpoint)
    del state[PREFIX + "res4.2.conv2.weight"]

    with pytest.raises(SpecError, match=r"missing \['backbone\.bottom_up\.res4\.2\.conv2\.weight'\]"):
        compress_d2_state(state, cfg, plan={}, input_size=(64, 64), progress=False)


def test_compressed_checkpoint_rejected(trained, compressed):
    _, config, _ = trained
    output, _, _ = compressed
    cfg = get_cfg()
    add_codec_config(cfg)
    cfg.merge_from_file(str(config))

    with pytest.raises(ValueError, match="already has a CoDeC-compressed backbone"):
        compress_d2_state(read_source_checkpoint(output), cfg, plan={}, input_size=(64, 64), progress=False)


def test_pickle_requires_allow_pickle(tmp_path):
    path = tmp_path / "model_final.pkl"
    path.write_bytes(b"not read")

    with pytest.raises(ValueError, match="--allow-pickle"):
        read_source_checkpoint(path)


def test_command_line_option_errors(trained, tmp_path):
    checkpoint, config, _ = trained
    tool = load_tool()

    with pytest.raises(SystemExit, match="--from-d2 needs --config"):
        tool.main(["--from-d2", str(checkpoint), "--preset", "codec-45", "--output", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="--config goes with --from-d2"):
        tool.main(["--init", "random", "--config", str(config), "--preset", "codec-45", "--output", str(tmp_path / "b")])


def test_command_line_truncated_checkpoint(trained, tmp_path):
    checkpoint, config, _ = trained
    truncated = tmp_path / "truncated.pth"
    data = checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    tool = load_tool()

    status = tool.main(
        ["--from-d2", str(truncated), "--config", str(config), "--preset", "codec-45", "--output", str(tmp_path / "out")]
    )

    assert status == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_command_line_round_trip(trained, tmp_path):
    checkpoint, config, _ = trained
    output = tmp_path / "out"
    tool = load_tool()

    status = tool.main(
        ["--from-d2", str(checkpoint), "--config", str(config), "--target-macs", "3.9", "--als-iterations", "3",
         "--output", str(output)]
    )

    assert status == 0
    assert {path.name for path in output.iterdir()} == {"model.pth", "spec.json", "report.csv", "report.png",
                                                        "config.yaml"}
    cfg = get_cfg()
    add_codec_config(cfg)
    cfg.merge_from_file(str(output / "config.yaml"))
    assert cfg.MODEL.BACKBONE.NAME == "build_codec_resnet_fpn_backbone"
    model = build_model(cfg)
    load_codec_checkpoint(model, cfg.MODEL.WEIGHTS)
    incompatible = model.load_state_dict(read_d2_checkpoint(cfg.MODEL.WEIGHTS)["model"], strict=False)
    assert incompatible.missing_keys == []
    assert incompatible.unexpected_keys == []
    model.eval()
    with torch.no_grad():
        outputs = model([{"image": torch.rand(3, 64, 64) * 255, "height": 64, "width": 64}])
    assert torch.isfinite(outputs[0]["instances"].scores).all()
