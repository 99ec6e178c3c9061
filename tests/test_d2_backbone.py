import importlib
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import Conv2d, FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone  # noqa: E402
from torch import nn  # noqa: E402

import codec_det  # noqa: E402
from codec_det import add_codec_config  # noqa: E402
from codec_det.d2 import backbone as d2_backbone  # noqa: E402
from codec_det.d2.backbone import CoDeCResNet, spec_stride_in_1x1  # noqa: E402
from codec_det.d2.layers import CoDeCNormConv2d  # noqa: E402
from codec_det.d2.names import d2_to_torchvision_module, torchvision_to_d2_key, torchvision_to_d2_module  # noqa: E402
from codec_det.spec import SpecError, resolve_spec  # noqa: E402

torch.set_num_threads(2)

STAGES = ["res2", "res3", "res4", "res5"]


def make_cfg(spec="codec-45", backbone="build_codec_resnet_fpn_backbone", **resnets):
    cfg = get_cfg()
    add_codec_config(cfg)
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.MODEL.RESNETS.OUT_FEATURES = list(STAGES)
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.FPN.IN_FEATURES = list(STAGES)
    cfg.MODEL.CODEC.SPEC = spec
    for key, value in resnets.items():
        cfg.MODEL.RESNETS[key] = value
    return cfg


def bottom_up(model):
    return model.bottom_up if hasattr(model, "bottom_up") else model


def test_registry_has_both_builders():
    assert "build_codec_resnet_backbone" in BACKBONE_REGISTRY
    assert "build_codec_resnet_fpn_backbone" in BACKBONE_REGISTRY


def test_resnet_builder_output_shapes():
    model = build_backbone(make_cfg(backbone="build_codec_resnet_backbone"))

    assert isinstance(model, CoDeCResNet)
    shapes = model.output_shape()
    assert list(shapes) == STAGES
    assert [shapes[name].stride for name in STAGES] == [4, 8, 16, 32]
    assert [shapes[name].channels for name in STAGES] == [256, 512, 1024, 2048]

    with torch.no_grad():
        features = model(torch.randn(1, 3, 64, 96))
    assert {name: tuple(value.shape) for name, value in features.items()} == {
        "res2": (1, 256, 16, 24),
        "res3": (1, 512, 8, 12),
        "res4": (1, 1024, 4, 6),
        "res5": (1, 2048, 2, 3),
    }


def test_fpn_builder_output_shapes():
    model = build_backbone(make_cfg())

    levels = ["p2", "p3", "p4", "p5", "p6"]
    shapes = model.output_shape()
    assert list(shapes) == levels
    assert [shapes[name].stride for name in levels] == [4, 8, 16, 32, 64]
    assert all(shapes[name].channels == 256 for name in levels)
    assert isinstance(model.bottom_up, CoDeCResNet)

    with torch.no_grad():
        features = model(torch.randn(1, 3, 64, 64))
    assert [tuple(features[name].shape[-2:]) for name in levels] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]


def test_fpn_builder_reads_fpn_keys():
    cfg = make_cfg()
    cfg.MODEL.FPN.OUT_CHANNELS = 128
    cfg.MODEL.FPN.NORM = "GN"
    cfg.MODEL.FPN.FUSE_TYPE = "avg"
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]

    model = build_backbone(cfg)

    assert list(model.output_shape()) == ["p3", "p4", "p5", "p6"]
    assert all(shape.channels == 128 for shape in model.output_shape().values())
    assert model._fuse_type == "avg"
    assert isinstance(model.fpn_lateral3.norm, nn.GroupNorm)


def test_spec_layers_become_codec_layers():
    spec = resolve_spec("codec-45")
    model = build_backbone(make_cfg()).bottom_up
    modules = dict(model.named_modules())

    for name, entry in spec.layers.items():
        layer = modules[torchvision_to_d2_module(name)]
        assert isinstance(layer, CoDeCNormConv2d), name
        assert (layer.groups, layer.rank) == (entry.groups, entry.rank)
        assert layer.permutation_folded == entry.permutation_folded
    compressed = [name for name, module in modules.items() if isinstance(module, CoDeCNormConv2d)]
    assert len(compressed) == len(spec.layers)
    assert model.codec_spec.to_dict() == spec.to_dict()


def test_state_dict_keys_follow_detectron2():
    spec = resolve_spec("codec-45")
    compressed = {torchvision_to_d2_module(name) for name in spec.layers}
    stock = build_backbone(make_cfg(spec="", backbone="build_resnet_backbone")).state_dict()
    codec = build_backbone(make_cfg(backbone="build_codec_resnet_backbone")).state_dict()

    factor_leaves = {"input_factors", "height_factors", "width_factors", "filter_factors", "permutation",
                     "inverse_permutation"}
    codec_dense = {key for key in codec if key.rpartition(".")[2] not in factor_leaves}
    stock_dense = {key for key in stock if key.rpartition(".")[0] not in compressed}
    assert codec_dense == stock_dense
    assert "res2.0.conv2.norm.weight" in codec
    assert "res2.0.conv2.input_factors" in codec
    assert "res2.0.conv2.weight" not in codec
    assert "res3.0.shortcut.input_factors" in codec
    assert "res3.0.shortcut.norm.running_var" in codec


def test_uncompressed_matches_stock_resnet():
    cfg_codec = make_cfg(spec="", backbone="build_codec_resnet_backbone", NORM="FrozenBN")
    cfg_stock = make_cfg(spec="", backbone="build_resnet_backbone", NORM="FrozenBN")
    codec = build_backbone(cfg_codec)
    stock = build_backbone(cfg_stock)

    assert codec.codec_spec is None
    codec.load_state_dict(stock.state_dict(), strict=True)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = stock(image)
        found = codec(image)
    for name in STAGES:
        torch.testing.assert_close(found[name], expected[name])


def test_freeze_at_two_freezes_stem_and_res2():
    cfg = make_cfg(NORM="BN", backbone="build_codec_resnet_backbone")
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    model = build_backbone(cfg)

    for name, parameter in model.named_parameters():
        frozen = name.startswith(("stem.", "res2."))
        assert parameter.requires_grad != frozen, name
    for name in ("stem.conv1.norm", "res2.0.conv1.norm", "res2.0.conv2.norm", "res2.2.conv3.norm"):
        assert isinstance(model.get_submodule(name), FrozenBatchNorm2d), name
    for name in ("res3.0.conv1.norm", "res3.0.conv2.norm", "res5.2.conv3.norm"):
        assert type(model.get_submodule(name)) is nn.BatchNorm2d, name
    assert isinstance(model.get_submodule("res2.0.conv2"), CoDeCNormConv2d)
    assert not model.get_submodule("res2.0.conv2").input_factors.requires_grad
    assert model.get_submodule("res3.0.conv2").input_factors.requires_grad


@pytest.mark.parametrize("freeze_at, frozen_stages", [(0, []), (1, ["stem"]), (5, ["stem", *STAGES])])
def test_freeze_at_levels(freeze_at, frozen_stages):
    cfg = make_cfg(NORM="BN", backbone="build_codec_resnet_backbone")
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    model = build_backbone(cfg)

    for name, parameter in model.named_parameters():
        frozen = name.split(".")[0] in frozen_stages
        assert parameter.requires_grad != frozen, name
    frozen_norms = [name for name, module in model.named_modules() if isinstance(module, FrozenBatchNorm2d)]
    assert all(name.split(".")[0] in frozen_stages for name in frozen_norms)


@pytest.mark.parametrize(
    "norm, norm_type", [("FrozenBN", FrozenBatchNorm2d), ("BN", nn.BatchNorm2d), ("GN", nn.GroupNorm),
                        ("SyncBN", nn.SyncBatchNorm)],
)
def test_norm_setting_in_dense_and_codec_convs(norm, norm_type):
    cfg = make_cfg(NORM=norm, backbone="build_codec_resnet_backbone")
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    model = build_backbone(cfg)

    for name in ("stem.conv1", "res2.0.conv1", "res2.0.conv2", "res4.0.shortcut", "res5.2.conv2"):
        assert type(model.get_submodule(name).norm) is norm_type, name
    assert isinstance(model.get_submodule("res2.0.conv2"), CoDeCNormConv2d)
    assert type(model.get_submodule("res2.0.conv1")) is Conv2d


def test_stride_in_1x1_with_torchvision_spec_rejected():
    cfg = make_cfg(STRIDE_IN_1X1=True)

    with pytest.raises(SpecError, match="set MODEL.RESNETS.STRIDE_IN_1X1 False"):
        build_backbone(cfg)


def test_stride_in_1x1_without_spec_as_detectron2():
    model = build_backbone(make_cfg(spec="", STRIDE_IN_1X1=True)).bottom_up

    assert model.res3[0].conv1.stride == (2, 2)
    assert model.res3[0].conv2.stride == (1, 1)
    assert model.output_shape()["res5"].stride == 32


def test_spec_stride_placement_from_metadata():
    spec = resolve_spec("codec-45")
    assert spec_stride_in_1x1(spec) is False

    spec.metadata["stride_in_1x1"] = True
    assert spec_stride_in_1x1(spec) is True


@pytest.mark.parametrize(
    "key, value",
    [("DEPTH", 101), ("NUM_GROUPS", 32), ("WIDTH_PER_GROUP", 4), ("RES5_DILATION", 2),
     ("DEFORM_ON_PER_STAGE", [False, True, False, False])],
)
def test_unsupported_resnet_settings(key, value):
    cfg = make_cfg(**{key: value})

    with pytest.raises(ValueError, match=f"MODEL.RESNETS.{key}"):
        build_backbone(cfg)


def test_res2_out_channels_without_spec():
    cfg = make_cfg(spec="", backbone="build_codec_resnet_backbone", RES2_OUT_CHANNELS=128)

    model = build_backbone(cfg)

    assert [model.output_shape()[name].channels for name in STAGES] == [128, 256, 512, 1024]


def test_missing_spec_file_says_what_to_do(tmp_path):
    cfg = make_cfg(spec=str(tmp_path / "absent" / "spec.json"))

    with pytest.raises(FileNotFoundError) as raised:
        build_backbone(cfg)

    message = str(raised.value)
    assert "MODEL.CODEC.SPEC" in message
    assert "tools/compress_backbone.py" in message
    assert "codec-45" in message


def test_invalid_json_spec_rejected(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text('{"format": "codec-det-spec", "layers": {')

    with pytest.raises(SpecError, match="not valid JSON"):
        build_backbone(make_cfg(spec=str(path)))


def write_spec(tmp_path, edit):
    data = resolve_spec("codec-45").to_dict()
    edit(data["layers"])
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_spec_with_wrong_shape_rejected(tmp_path):
    def shrink(layers):
        layers["layer1.0.conv2"]["in_channels"] = 32

    with pytest.raises(SpecError, match=r"layer1\.0\.conv2 \(Detectron2 res2\.0\.conv2\).*in_channels 32"):
        build_backbone(make_cfg(spec=write_spec(tmp_path, shrink)))


def test_spec_with_unknown_layer_rejected(tmp_path):
    def rename(layers):
        layers["layer5.0.conv2"] = layers.pop("layer4.0.conv2")

    with pytest.raises(SpecError, match="layer5.0.conv2 is not a conv or norm"):
        build_backbone(make_cfg(spec=write_spec(tmp_path, rename)))


def test_spec_in_stage_not_built_rejected():
    cfg = make_cfg(backbone="build_codec_resnet_backbone")
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4"]

    with pytest.raises(SpecError, match="res5"):
        build_backbone(cfg)


def test_codec_layer_matches_its_dense_conv():
    layer = CoDeCNormConv2d(
        16, 32, 3, groups=2, rank=4, stride=2, padding=1, bias=False,
        permutation=torch.randperm(32, generator=torch.Generator().manual_seed(0)),
        norm=nn.BatchNorm2d(32), activation=torch.relu,
    ).eval()
    with torch.no_grad():
        layer.norm.running_mean.uniform_(-1, 1)
    image = torch.randn(2, 16, 12, 12)

    dense = layer.to_dense()

    assert isinstance(dense, Conv2d)
    assert dense.norm is layer.norm
    with torch.no_grad():
        torch.testing.assert_close(dense(image), layer(image), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "torchvision, detectron2",
    [("conv1.weight", "stem.conv1.weight"), ("bn1.running_mean", "stem.conv1.norm.running_mean"),
     ("layer1.0.conv1.weight", "res2.0.conv1.weight"), ("layer3.5.bn3.bias", "res4.5.conv3.norm.bias"),
     ("layer2.0.downsample.0.input_factors", "res3.0.shortcut.input_factors"),
     ("layer4.0.downsample.1.weight", "res5.0.shortcut.norm.weight")],
)
def test_name_mapping_both_ways(torchvision, detectron2):
    assert torchvision_to_d2_key(torchvision) == detectron2
    module = detectron2.rpartition(".")[0]
    assert d2_to_torchvision_module(module) == torchvision.rpartition(".")[0]


def test_name_mapping_rejects_classifier():
    with pytest.raises(SpecError, match="fc"):
        torchvision_to_d2_key("fc.weight")


def test_reload_keeps_first_registration():
    registered = BACKBONE_REGISTRY.get("build_codec_resnet_fpn_backbone")

    importlib.reload(d2_backbone)

    assert BACKBONE_REGISTRY.get("build_codec_resnet_fpn_backbone") is registered


def test_codec_det_exports_add_codec_config():
    assert codec_det.add_codec_config is add_codec_config
    assert "add_codec_config" in codec_det.__all__


def test_add_codec_config_twice_keeps_values():
    cfg = get_cfg()
    add_codec_config(cfg)
    cfg.MODEL.CODEC.SPEC = "codec-66"

    add_codec_config(cfg)

    assert cfg.MODEL.CODEC.SPEC == "codec-66"


def test_import_without_detectron2():
    # sys.modules[name] = None makes every import of that name raise ImportError.
    code = (
        "import sys; sys.modules['detectron2'] = None; import codec_det; "
        "assert not hasattr(codec_det, 'add_codec_config'); print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
