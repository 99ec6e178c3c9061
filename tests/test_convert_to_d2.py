import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

pytest.importorskip("detectron2")

from detectron2 import model_zoo  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from codec_det import add_codec_config  # noqa: E402
from codec_det.checkpoint import MODEL_FILE, SPEC_FILE, load_compressed  # noqa: E402
from codec_det.d2.checkpoint import read_d2_checkpoint  # noqa: E402
from codec_det.d2.checkpointer import CoDeCCheckpointer, load_codec_checkpoint  # noqa: E402
from codec_det.d2.convert import convert_to_d2  # noqa: E402
from codec_det.d2.layers import CoDeCNormConv2d  # noqa: E402
from codec_det.d2.names import torchvision_to_d2_key  # noqa: E402
from codec_det.spec import CompressionSpec, SpecError  # noqa: E402
from resnet_fixtures import randomize_norms, save_mixed_compression  # noqa: E402

torch.set_num_threads(2)

PREFIX = "backbone.bottom_up."
TOOL = Path(__file__).resolve().parents[1] / "tools" / "convert_to_d2.py"
STAGES = ["res2", "res3", "res4", "res5"]

def trunk_features(model, image):
    """res2..res5 of a torchvision ResNet."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(image))))
    features = {}
    for name, layer in zip(STAGES, (model.layer1, model.layer2, model.layer3, model.layer4)):
        x = layer(x)
        features[name] = x
    return features


def make_cfg(weights="", spec="", norm="FrozenBN"):
    cfg = get_cfg()
    add_codec_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file("Base-RCNN-FPN.yaml"))
    cfg.MODEL.BACKBONE.NAME = "build_codec_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.MODEL.CODEC.SPEC = str(spec)
    return cfg


def relative_error(found, expected):
    return float((found - expected).norm() / expected.norm())


@pytest.fixture(scope="module")
def dense_model():
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.resnet50()).eval()


@pytest.fixture(scope="module")
def compressed_dir(dense_model, tmp_path_factory):
    return save_mixed_compression(dense_model, tmp_path_factory.mktemp("compressed"))


@pytest.fixture(scope="module")
def converted(compressed_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("converted") / "codec_d2.pth"
    convert_to_d2(compressed_dir, output)
    return output


@pytest.fixture(scope="module")
def compressed_torchvision(compressed_dir):
    return load_compressed(compressed_dir, torchvision.models.resnet50()).eval()


def test_converted_checkpoint_format(converted, compressed_dir):
    checkpoint = torch.load(converted, map_location="cpu", weights_only=True)

    assert checkpoint["__author__"] == "codec-det"
    assert checkpoint["matching_heuristics"] is False
    assert checkpoint["codec_spec"] == CompressionSpec.load(compressed_dir / SPEC_FILE).to_dict()
    assert set(checkpoint) == {"model", "__author__", "matching_heuristics", "codec_spec"}


def test_converted_keys_exact(converted, compressed_torchvision):
    keys = set(torch.load(converted, map_location="cpu", weights_only=True)["model"])

    expected = {
        PREFIX + torchvision_to_d2_key(key)
        for key in compressed_torchvision.state_dict()
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked")
    }
    assert keys == expected
    for key in (
        "stem.conv1.weight",
        "stem.conv1.norm.running_var",
        "res2.0.conv1.norm.weight",
        "res2.0.conv2.height_factors",
        "res2.0.conv2.permutation",
        "res2.0.shortcut.input_factors",
        "res2.0.shortcut.filter_factors",
        "res2.0.shortcut.norm.bias",
        "res5.2.conv3.filter_factors",
        "res5.1.conv3.weight",
    ):
        assert PREFIX + key in keys
    assert not any("fc." in key or "num_batches_tracked" in key for key in keys)


def test_converted_keys_equal_model_keys(converted):
    model = build_model(make_cfg(weights=converted))
    checkpoint = read_d2_checkpoint(converted)

    model_keys = {key for key in model.state_dict() if key.startswith(PREFIX)}
    assert set(checkpoint["model"]) == model_keys
    incompatible = model.load_state_dict(checkpoint["model"], strict=False)
    assert [key for key in incompatible.missing_keys if key.startswith(PREFIX)] == []
    assert incompatible.unexpected_keys == []


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_compressed_features_match_torchvision(converted, compressed_torchvision, norm):
    model = build_model(make_cfg(weights=converted, norm=norm))
    load_codec_checkpoint(model, converted)
    model.eval()
    image = torch.randn(1, 3, 96, 64, generator=torch.Generator().manual_seed(3))

    with torch.no_grad():
        found = model.backbone.bottom_up(image)
        expected = trunk_features(compressed_torchvision, image)

    assert isinstance(model.backbone.bottom_up.res2[0].conv2, CoDeCNormConv2d)
    assert model.backbone.bottom_up.res2[0].conv2.permutation_folded
    for name in STAGES:
        assert relative_error(found[name], expected[name]) <= 1e-4, name


@pytest.fixture(scope="module")
def uncompressed_converted(dense_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("uncompressed")
    torch.save(dense_model.state_dict(), directory / "resnet50.pth")
    output = directory / "resnet50_d2.pth"
    assert convert_to_d2(directory / "resnet50.pth", output) is None
    return output


def test_uncompressed_features_match_torchvision(dense_model, uncompressed_converted):
    assert torch.load(uncompressed_converted, weights_only=True)["codec_spec"] is None
    model = build_model(make_cfg(weights=uncompressed_converted))
    assert model.backbone.bottom_up.codec_spec is None
    load_codec_checkpoint(model, uncompressed_converted)
    model.eval()
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))

    with torch.no_grad():
        found = model.backbone.bottom_up(image)
        expected = trunk_features(dense_model, image)

    for name in STAGES:
        assert relative_error(found[name], expected[name]) <= 1e-4, name


def test_uncompressed_safetensors_input(dense_model, uncompressed_converted, tmp_path):
    source = tmp_path / "resnet50.safetensors"
    save_file({key: tensor.contiguous() for key, tensor in dense_model.state_dict().items()}, str(source))
    output = tmp_path / "resnet50_d2.pth"

    convert_to_d2(source, output)

    found = torch.load(output, weights_only=True)["model"]
    expected = torch.load(uncompressed_converted, weights_only=True)["model"]
    assert set(found) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(found[key], tensor), key


def test_prefix_option(compressed_dir, tmp_path):
    output = tmp_path / "plain.pth"

    convert_to_d2(compressed_dir, output, prefix="backbone.")

    keys = torch.load(output, weights_only=True)["model"]
    assert "backbone.stem.conv1.weight" in keys
    assert not any(key.startswith(PREFIX) for key in keys)


def test_truncated_input_rejected(dense_model, tmp_path):
    source = tmp_path / "resnet50.pth"
    torch.save(dense_model.state_dict(), source)
    data = source.read_bytes()
    source.write_bytes(data[: len(data) // 2])

    with pytest.raises(ValueError, match="could not be read"):
        convert_to_d2(source, tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()


def test_truncated_safetensors_in_directory_rejected(compressed_dir, tmp_path):
    directory = tmp_path / "truncated"
    directory.mkdir()
    (directory / SPEC_FILE).write_bytes((compressed_dir / SPEC_FILE).read_bytes())
    data = (compressed_dir / MODEL_FILE).read_bytes()
    (directory / MODEL_FILE).write_bytes(data[: len(data) // 2])

    with pytest.raises(ValueError, match="not a readable safetensors file"):
        convert_to_d2(directory, tmp_path / "out.pth")


def copy_with_spec(compressed_dir, tmp_path, edit):
    directory = tmp_path / "edited"
    directory.mkdir()
    (directory / MODEL_FILE).write_bytes((compressed_dir / MODEL_FILE).read_bytes())
    data = json.loads((compressed_dir / SPEC_FILE).read_text())
    (directory / SPEC_FILE).write_text(edit(data))
    return directory


def test_spec_not_matching_weights_rejected(compressed_dir, tmp_path):
    def raise_rank(data):
        data["layers"]["layer3.1.conv1"]["rank"] = 40
        return json.dumps(data)

    directory = copy_with_spec(compressed_dir, tmp_path, raise_rank)

    with pytest.raises(SpecError, match=r"layer3\.1\.conv1"):
        convert_to_d2(directory, tmp_path / "out.pth")


def test_spec_invalid_json_rejected(compressed_dir, tmp_path):
    directory = copy_with_spec(compressed_dir, tmp_path, lambda data: json.dumps(data)[:100])

    with pytest.raises(SpecError, match="not valid JSON"):
        convert_to_d2(directory, tmp_path / "out.pth")


def test_truncated_checkpoint_rejected_at_build_and_load(converted, tmp_path):
    truncated = tmp_path / "truncated.pth"
    data = converted.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])

    with pytest.raises(ValueError, match="MODEL.WEIGHTS.*truncated"):
        build_model(make_cfg(weights=truncated))

    model = build_model(make_cfg(spec=""))
    with pytest.raises(ValueError, match="truncated"):
        load_codec_checkpoint(model, truncated)


def test_missing_backbone_key_is_an_error(converted, tmp_path):
    checkpoint = read_d2_checkpoint(converted)
    del checkpoint["model"][PREFIX + "res3.0.conv2.width_factors"]
    edited = tmp_path / "edited.pth"
    torch.save(checkpoint, edited)
    model = build_model(make_cfg(weights=edited))

    with pytest.raises(SpecError, match=r"missing from the checkpoint: backbone\.bottom_up\.res3\.0\.conv2\.width_factors"):
        load_codec_checkpoint(model, edited)


def test_uncompressed_weights_into_compressed_model_rejected(uncompressed_converted, compressed_dir):
    output = uncompressed_converted

    with pytest.raises(SpecError, match="describes another backbone"):
        build_model(make_cfg(weights=output, spec=compressed_dir))

    model = build_model(make_cfg(spec=compressed_dir))
    with pytest.raises(SpecError) as raised:
        load_codec_checkpoint(model, output)
    message = str(raised.value)
    assert "backbone.bottom_up.res2.0.conv2.input_factors" in message
    assert "backbone.bottom_up.res2.0.conv2.weight" in message
    assert "tools/convert_to_d2.py" in message


def test_checkpointer_save_stores_spec(converted, tmp_path):
    model = build_model(make_cfg(weights=converted))
    load_codec_checkpoint(model, converted)

    CoDeCCheckpointer(model, save_dir=str(tmp_path)).save("model_final")

    saved = tmp_path / "model_final.pth"
    checkpoint = torch.load(saved, map_location="cpu", weights_only=True)
    assert checkpoint["codec_spec"] == read_d2_checkpoint(converted)["codec_spec"]
    rebuilt = build_model(make_cfg(weights=saved))
    load_codec_checkpoint(rebuilt, saved)
    assert isinstance(rebuilt.backbone.bottom_up.res2[0].conv2, CoDeCNormConv2d)


def load_tool():
    spec = importlib.util.spec_from_file_location("codec_convert_to_d2", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_line(compressed_dir, tmp_path, capsys):
    convert_tool = load_tool()
    output = tmp_path / "codec_d2.pth"

    assert convert_tool.main([str(compressed_dir), str(output)]) == 0
    assert "9 compressed convs" in capsys.readouterr().out
    assert output.is_file()
    assert convert_tool.main([str(compressed_dir), str(output)]) == 2
    assert convert_tool.main([str(compressed_dir), str(output), "--overwrite"]) == 0
    assert convert_tool.main([str(compressed_dir), str(tmp_path / "codec_d2.pkl")]) == 2
    assert convert_tool.main([str(tmp_path / "absent"), str(tmp_path / "other.pth")]) == 2
