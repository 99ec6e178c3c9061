import copy
import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import Conv2d  # noqa: E402
from detectron2.modeling import build_backbone, build_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from codec_det import add_codec_config  # noqa: E402
from codec_det.checkpoint import load_weights_strict  # noqa: E402
from codec_det.complexity import count_model  # noqa: E402
from codec_det.d2.checkpoint import FPN_SPEC_KEY, read_d2_checkpoint, save_d2_checkpoint  # noqa: E402
from codec_det.d2.checkpointer import CoDeCCheckpointer, load_codec_checkpoint  # noqa: E402
from codec_det.d2.compress_fpn import (  # noqa: E402
    FPN_PRESET_CUTS,
    compress_d2_fpn_state,
    dense_fpn,
    fpn_target_macs,
)
from codec_det.d2.fpn import CoDeCFPN, fpn_conv_names  # noqa: E402
from codec_det.d2.layers import CoDeCNormConv2d  # noqa: E402
from codec_det.decompose import ALSSettings  # noqa: E402
from codec_det.export.deploy import to_deploy_form  # noqa: E402
from codec_det.spec import BUNDLED_FPN_SPECS, CompressionSpec, SpecError, resolve_spec  # noqa: E402

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "codec_faster_rcnn.yaml"
STAGES = ["res2", "res3", "res4", "res5"]
SIZE_ARGS = ["--input-size", "64", "96", "--second-size", "96", "128"]


def make_cfg(fpn_spec="codec-45", spec="", weights="", norm=""):
    cfg = get_cfg()
    add_codec_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_codec_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.OUT_FEATURES = list(STAGES)
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.FPN.IN_FEATURES = list(STAGES)
    cfg.MODEL.FPN.NORM = norm
    cfg.MODEL.CODEC.SPEC = spec
    cfg.MODEL.CODEC.FPN_SPEC = fpn_spec
    cfg.MODEL.WEIGHTS = str(weights)
    return cfg


def detector_cfg(fpn_spec="codec-45", weights=""):
    cfg = get_cfg()
    add_codec_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.CODEC.FPN_SPEC = fpn_spec
    cfg.MODEL.WEIGHTS = str(weights)
    return cfg


def image(size=(64, 96), batch=1, seed=3):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def max_relative_error(found, expected):
    return max(float((found[key] - expected[key]).abs().max() / expected[key].abs().max()) for key in expected)


def densify_fpn(backbone):
    """Copy ``backbone`` with each CoDeC FPN conv replaced by its dense reconstruction."""
    dense = copy.deepcopy(backbone)
    for name in fpn_conv_names(dense):
        layer = getattr(dense, name)
        if isinstance(layer, CoDeCNormConv2d):
            setattr(dense, name, layer.to_dense())
    return dense


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"codec_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def codec_detector(tmp_path_factory):
    """A Faster R-CNN with codec-45 ResNet and FPN, random weights, saved by ``CoDeCCheckpointer``."""
    directory = tmp_path_factory.mktemp("fpn_detector")
    torch.manual_seed(0)
    model = build_model(detector_cfg()).eval()
    CoDeCCheckpointer(model, save_dir=str(directory)).save("model")
    return model, directory / "model.pth"


# ---------------------------------------------------------------------------
# Building the FPN


def test_fpn_preset_builds_codec_layers():
    backbone = build_backbone(make_cfg())
    spec = resolve_spec("codec-45", bundled=BUNDLED_FPN_SPECS)

    assert isinstance(backbone, CoDeCFPN)
    assert backbone.codec_fpn_spec.architecture == "d2-fpn"
    for name in fpn_conv_names(backbone):
        layer = getattr(backbone, name)
        if name in spec.layers:
            assert isinstance(layer, CoDeCNormConv2d), name
            assert layer.rank == spec.layers[name].rank
            assert layer.groups == 1
        else:
            assert type(layer) is Conv2d, name
    assert backbone.output_convs == [backbone.fpn_output5, backbone.fpn_output4, backbone.fpn_output3, backbone.fpn_output2]
    assert backbone.lateral_convs[-1] is backbone.fpn_lateral2


def test_fpn_spec_default_is_dense():
    cfg = make_cfg(fpn_spec="")
    backbone = build_backbone(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    stock = build_backbone(cfg)

    assert backbone.codec_fpn_spec is None
    assert all(type(getattr(backbone, name)) is Conv2d for name in fpn_conv_names(backbone))
    assert sorted(backbone.state_dict()) == sorted(stock.state_dict())


def test_compressed_fpn_equals_dense_reconstruction():
    torch.manual_seed(0)
    backbone = build_backbone(make_cfg(spec="codec-45")).eval()
    dense = densify_fpn(backbone)
    tensor = image()

    with torch.no_grad():
        expected = dense(tensor)
        found = backbone(tensor)

    assert all(type(getattr(dense, name)) is Conv2d for name in fpn_conv_names(dense))
    assert max_relative_error(found, expected) <= 1e-4


def test_compressed_fpn_deploy_form_equal():
    torch.manual_seed(0)
    backbone = build_backbone(make_cfg(fpn_spec="codec-66")).eval()
    fast = copy.deepcopy(backbone)
    report = to_deploy_form(fast)
    tensor = image()

    with torch.no_grad():
        expected = backbone(tensor)
        found = fast(tensor)

    assert set(backbone.codec_fpn_spec.layers) <= set(report.fused)
    assert type(fast.fpn_output2).__name__ == "FusedCoDeCConv2d"
    assert fast.output_convs[-1] is fast.fpn_output2
    assert max_relative_error(found, expected) <= 1e-4


@pytest.mark.parametrize("preset", sorted(FPN_PRESET_CUTS))
def test_fpn_preset_cuts_fpn_macs(preset):
    cfg = make_cfg(fpn_spec="")
    spec = resolve_spec(preset, bundled=BUNDLED_FPN_SPECS)
    dense = dense_fpn(cfg)
    compressed = CoDeCFPN(
        dense.bottom_up, STAGES, 256, top_block=dense.top_block, spec=spec
    )
    size = (800, 1216)
    dense_macs, _ = count_model(dense, size)
    compressed_macs, _ = count_model(compressed, size)

    assert abs(dense_macs / 1e9 - 55.12) < 0.01
    assert abs(1 - compressed_macs / dense_macs - FPN_PRESET_CUTS[preset]) < 0.01
    assert all(entry.rank % 8 == 0 for entry in spec.layers.values())
    assert spec.metadata["made_from"].startswith("random weights")


def test_fpn_preset_with_norm_drops_bias():
    backbone = build_backbone(make_cfg(norm="GN")).eval()

    layer = backbone.fpn_output2
    assert isinstance(layer, CoDeCNormConv2d)
    assert layer.bias is None
    assert type(layer.norm).__name__ == "GroupNorm"
    with torch.no_grad():
        features = backbone(image())
    assert features["p2"].shape == (1, 256, 16, 24)


def test_fpn_spec_with_norm_mismatch_rejected(tmp_path):
    spec = resolve_spec("codec-45", bundled=BUNDLED_FPN_SPECS)
    spec.save(tmp_path / "fpn_spec.json")

    with pytest.raises(SpecError, match=r"fpn_output2 does not match the model.s conv: bias True \(model: False\).*MODEL.FPN.NORM"):
        build_backbone(make_cfg(fpn_spec=str(tmp_path), norm="GN"))


def test_resnet_spec_as_fpn_spec_rejected():
    with pytest.raises(SpecError, match="architecture 'resnet50', expected 'd2-fpn'"):
        build_backbone(make_cfg(fpn_spec=str(ROOT / "codec_det" / "specs" / "resnet50-codec-45.json")))


def test_missing_fpn_spec_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="MODEL.CODEC.FPN_SPEC .* not found.*fpn_spec.json"):
        build_backbone(make_cfg(fpn_spec=str(tmp_path / "absent.json")))


def test_fpn_spec_unknown_layer_rejected(tmp_path):
    data = resolve_spec("codec-45", bundled=BUNDLED_FPN_SPECS).to_dict()
    data["layers"]["fpn_output6"] = data["layers"]["fpn_output2"]
    (tmp_path / "fpn_spec.json").write_text(json.dumps(data))

    with pytest.raises(SpecError, match="fpn_output6 is no conv of this FPN"):
        build_backbone(make_cfg(fpn_spec=str(tmp_path / "fpn_spec.json")))


def test_add_codec_config_adds_fpn_key():
    cfg = get_cfg()
    add_codec_config(cfg)
    del cfg.MODEL.CODEC["FPN_SPEC"]

    add_codec_config(cfg)

    assert cfg.MODEL.CODEC.FPN_SPEC == ""


# ---------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_stores_fpn_spec(codec_detector):
    model, path = codec_detector
    checkpoint = read_d2_checkpoint(path)

    stored = CompressionSpec.from_dict(checkpoint[FPN_SPEC_KEY])
    assert stored.to_dict()["layers"] == model.backbone.codec_fpn_spec.to_dict()["layers"]
    assert "backbone.fpn_output2.input_factors" in checkpoint["model"]
    assert "backbone.fpn_output2.weight" not in checkpoint["model"]


def test_checkpoint_round_trip_strict(codec_detector):
    model, path = codec_detector
    torch.manual_seed(1)
    rebuilt = build_model(detector_cfg(fpn_spec="", weights=path)).eval()

    load_codec_checkpoint(rebuilt, path)

    assert rebuilt.backbone.codec_fpn_spec is not None
    expected = model.state_dict()
    found = rebuilt.state_dict()
    assert sorted(found) == sorted(expected)
    assert all(torch.equal(found[key], expected[key]) for key in expected)


def test_checkpoint_other_fpn_spec_rejected(codec_detector):
    _, path = codec_detector

    with pytest.raises(SpecError, match="FPN_SPEC codec-66 describes another FPN than MODEL.WEIGHTS"):
        build_model(detector_cfg(fpn_spec="codec-66", weights=path))


def test_dense_fpn_checkpoint_with_fpn_spec_rejected(tmp_path):
    torch.manual_seed(0)
    dense = build_model(detector_cfg(fpn_spec=""))
    path = tmp_path / "dense.pth"
    CoDeCCheckpointer(dense, save_dir=str(tmp_path)).save("dense")

    with pytest.raises(SpecError, match="stores a dense FPN"):
        build_model(detector_cfg(fpn_spec="codec-45", weights=path))


def test_fpn_weights_without_stored_spec_rejected(codec_detector, tmp_path):
    model, path = codec_detector
    checkpoint = read_d2_checkpoint(path)
    unmarked = tmp_path / "unmarked.pth"
    save_d2_checkpoint(unmarked, checkpoint["model"], model.backbone.bottom_up.codec_spec)
    dense_fpn_model = build_model(detector_cfg(fpn_spec="", weights=unmarked))

    with pytest.raises(SpecError) as error:
        load_codec_checkpoint(dense_fpn_model, unmarked)

    message = str(error.value)
    assert "FPN weights do not match the model's FPN, built as a dense FPN" in message
    assert "backbone.fpn_output2.weight" in message
    assert "backbone.fpn_output2.input_factors" in message


def test_old_checkpoint_without_fpn_spec_loads(tmp_path):
    torch.manual_seed(0)
    model = build_model(detector_cfg(fpn_spec="")).eval()
    path = tmp_path / "old.pth"
    save_d2_checkpoint(path, model.state_dict(), model.backbone.bottom_up.codec_spec)
    assert FPN_SPEC_KEY not in read_d2_checkpoint(path)

    rebuilt = build_model(detector_cfg(fpn_spec="", weights=path)).eval()
    load_codec_checkpoint(rebuilt, path)

    assert rebuilt.backbone.codec_fpn_spec is None
    assert torch.equal(rebuilt.backbone.fpn_output2.weight, model.backbone.fpn_output2.weight)


def test_trunk_checkpoint_starts_compressed_fpn(codec_detector, tmp_path, caplog):
    model, path = codec_detector
    state = {key: value for key, value in read_d2_checkpoint(path)["model"].items() if key.startswith("backbone.bottom_up.")}
    trunk = tmp_path / "trunk.pth"
    save_d2_checkpoint(trunk, state, model.backbone.bottom_up.codec_spec)
    rebuilt = build_model(detector_cfg(fpn_spec="codec-45", weights=trunk))

    with caplog.at_level(logging.INFO, logger="codec_det.d2.checkpointer"):
        load_codec_checkpoint(rebuilt, trunk)

    assert "keep their random initial factors" in caplog.text
    assert torch.equal(rebuilt.backbone.bottom_up.stem.conv1.weight, model.backbone.bottom_up.stem.conv1.weight)


# ---------------------------------------------------------------------------
# Compressing a trained FPN


@pytest.fixture(scope="module")
def compressed_fpn_state():
    torch.manual_seed(0)
    model = build_model(detector_cfg(fpn_spec="")).eval()
    state = model.state_dict()
    cfg = detector_cfg(fpn_spec="")
    new_state, result = compress_d2_fpn_state(
        state, cfg, cut=0.45, input_size=(64, 96), settings=ALSSettings(n_iter_max=3), progress=False
    )
    return model, state, new_state, result


def test_fpn_compression_meets_budget(compressed_fpn_state):
    model, _, _, result = compressed_fpn_state
    totals = result.totals

    assert result.spec.architecture == "d2-fpn"
    assert result.spec.layers
    assert totals["macs_after"] <= 0.55 * totals["macs_before"] + 1
    assert all(entry.groups == 1 for entry in result.spec.layers.values())


def test_fpn_compression_keeps_other_weights(compressed_fpn_state):
    _, state, new_state, result = compressed_fpn_state

    for name in result.spec.layers:
        assert f"backbone.{name}.weight" not in new_state
        assert f"backbone.{name}.input_factors" in new_state
    unchanged = [key for key in state if not key.startswith(tuple(f"backbone.{name}." for name in result.spec.layers))]
    assert all(torch.equal(new_state[key], state[key]) for key in unchanged)


def test_fpn_compression_round_trip(compressed_fpn_state, tmp_path):
    model, _, new_state, result = compressed_fpn_state
    path = tmp_path / "model.pth"
    save_d2_checkpoint(path, new_state, model.backbone.bottom_up.codec_spec, fpn_spec=result.spec)
    rebuilt = build_model(detector_cfg(fpn_spec="", weights=path)).eval()

    load_codec_checkpoint(rebuilt, path)

    errors = {report.layer: report.rel_error for report in result.layers if report.rank is not None}
    for name, error in errors.items():
        original = getattr(model.backbone, name).weight
        reconstructed = getattr(rebuilt.backbone, name).reconstruct_weight()
        assert float((reconstructed - original).norm() / original.norm()) == pytest.approx(error, rel=1e-3, abs=1e-5)


def test_fpn_compression_rejects_compressed_fpn(codec_detector):
    _, path = codec_detector
    state = read_d2_checkpoint(path)["model"]

    with pytest.raises(ValueError, match="already has a CoDeC-compressed FPN"):
        compress_d2_fpn_state(state, detector_cfg(fpn_spec=""), cut=0.45)


def test_fpn_target_macs_rejects_bad_cut():
    with pytest.raises(ValueError, match="between 0 and 1, got 1.5"):
        fpn_target_macs(dense_fpn(make_cfg(fpn_spec="")), 1.5)


# ---------------------------------------------------------------------------
# Export


def test_compressed_fpn_export_round_trip(codec_detector, tmp_path):
    model, path = codec_detector
    export_tool = load_tool("export_backbone")
    output = tmp_path / "export"

    status = export_tool.main(
        ["--config-file", str(CONFIG), "--weights", str(path), "--output", str(output), "--deploy-form", "fast",
         *SIZE_ARGS]
    )

    assert status == 0
    report = json.loads((output / "export_report.json").read_text())
    assert report["passed"]
    assert report["compressed_fpn_layers"] == len(model.backbone.codec_fpn_spec.layers)
    assert set(report["artifacts"]) == {"backbone.safetensors", "backbone.ts", "backbone.onnx"}

    cfg = detector_cfg(fpn_spec=str(output / "fpn_spec.json"))
    cfg.MODEL.CODEC.SPEC = str(output / "spec.json")
    backbone = build_backbone(cfg).eval()
    load_weights_strict(backbone, load_file(str(output / "backbone.safetensors")), "backbone.safetensors")
    traced = torch.jit.load(str(output / "backbone.ts"))
    tensor = image(size=(96, 128), batch=2)
    with torch.no_grad():
        expected = model.backbone(tensor)
        assert max_relative_error(backbone(tensor), expected) == 0.0
        assert max_relative_error(traced(tensor), expected) <= 1e-4


# ---------------------------------------------------------------------------
# Benchmark target


def test_benchmark_fpn_codec_target_models():
    benchmark = load_tool("benchmark")

    models = benchmark.build_models("fpn-codec", seed=0)

    assert models["original"].__class__.__name__ == "FPN"
    assert models["codec-45"].codec_fpn_spec.metadata["target"] == "codec-45"
    assert models["codec-66"].codec_fpn_spec.metadata["target"] == "codec-66"
    assert isinstance(models["codec-66"].fpn_output2, CoDeCNormConv2d)


@pytest.mark.slow
def test_compress_tool_with_fpn_preset(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    cfg = detector_cfg(fpn_spec="")
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.CODEC.SPEC = ""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    (tmp_path / "config.yaml").write_text(cfg.dump())
    output = tmp_path / "out"

    status = load_tool("compress_backbone").main(
        ["--from-d2", str(tmp_path / "model_final.pth"), "--config", str(tmp_path / "config.yaml"),
         "--preset", "codec-66", "--fpn-preset", "codec-66", "--als-iterations", "3", "--output", str(output)]
    )

    assert status == 0
    assert {"model.pth", "spec.json", "fpn_spec.json", "fpn_report.csv", "config.yaml"} <= {p.name for p in output.iterdir()}
    fpn_spec = CompressionSpec.load(output / "fpn_spec.json")
    assert fpn_spec.metadata["target"] == "codec-66"
    assert fpn_spec.metadata["macs_after"] <= 0.34 * fpn_spec.metadata["macs_before"] + 1
    compressed_cfg = get_cfg()
    add_codec_config(compressed_cfg)
    compressed_cfg.merge_from_file(str(output / "config.yaml"))
    compressed_cfg.MODEL.DEVICE = "cpu"
    rebuilt = build_model(compressed_cfg).eval()
    load_codec_checkpoint(rebuilt, output / "model.pth")
    assert set(rebuilt.backbone.codec_fpn_spec.layers) == set(fpn_spec.layers)
    assert torch.equal(rebuilt.roi_heads.box_predictor.cls_score.weight, model.roi_heads.box_predictor.cls_score.weight)


@pytest.mark.slow
def test_compress_tool_keeps_compressed_fpn(tmp_path):
    cfg = detector_cfg(fpn_spec="codec-45")
    cfg.MODEL.CODEC.SPEC = ""
    torch.manual_seed(0)
    source = build_model(cfg).eval()
    CoDeCCheckpointer(source, save_dir=str(tmp_path)).save("source")
    (tmp_path / "config.yaml").write_text(cfg.dump())
    output = tmp_path / "out"

    status = load_tool("compress_backbone").main(
        ["--from-d2", str(tmp_path / "source.pth"), "--config", str(tmp_path / "config.yaml"),
         "--target-macs", "4.0", "--als-iterations", "2", "--output", str(output)]
    )

    assert status == 0
    compressed_cfg = get_cfg()
    add_codec_config(compressed_cfg)
    compressed_cfg.merge_from_file(str(output / "config.yaml"))
    compressed_cfg.MODEL.DEVICE = "cpu"
    rebuilt = build_model(compressed_cfg).eval()
    load_codec_checkpoint(rebuilt, output / "model.pth")
    assert rebuilt.backbone.codec_fpn_spec is not None
    assert torch.equal(rebuilt.backbone.fpn_output2.input_factors, source.backbone.fpn_output2.input_factors)
