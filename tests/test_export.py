import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from codec_det.checkpoint import save_compressed
from codec_det.export import FusedCoDeCConv2d, relative_error, to_deploy_form
from codec_det.export.verify import compare_outputs, flatten_outputs
from codec_det.layers.codec_conv import CoDeCConv2d
from codec_det.spec import resolve_spec
from codec_det.surgery import apply_spec
from resnet_fixtures import randomize_norms

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
# The traced size and a second size: small, so that the default suite stays fast.
SIZE = (64, 96)
SECOND_SIZE = (96, 128)
SIZE_ARGS = ["--input-size", *map(str, SIZE), "--second-size", *map(str, SECOND_SIZE)]
ARTIFACTS = ["backbone.safetensors", "spec.json", "backbone.ts", "backbone.onnx", "export_report.json"]
TOLERANCE = 1e-4


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def classifier(preset=None):
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    if preset is not None:
        apply_spec(model, resolve_spec(preset))
    return randomize_norms(model).eval()


def inputs(sizes=(SIZE, SECOND_SIZE)):
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(batch, 3, *size, generator=generator) for batch, size in zip((1, 2), sizes)]


def assert_matches(reference, candidate, tensors, tolerance=TOLERANCE):
    for tensor in tensors:
        with torch.no_grad():
            error, detail = compare_outputs(flatten_outputs(reference(tensor)), flatten_outputs(candidate(tensor)))
        assert detail == "", f"at {tuple(tensor.shape)}: {detail}"
        assert error <= tolerance, f"at {tuple(tensor.shape)}: max_rel_error {error:.3g}"


def assert_nothing_written(output):
    assert not output.exists()
    leftovers = [path.name for path in output.parent.iterdir() if path.name.startswith(f".{output.name}.")]
    assert leftovers == []


# ---------------------------------------------------------------------------
# Deployment form


@pytest.mark.parametrize("preset", [None, "codec-45", "codec-66"])
def test_deploy_form_equals_training_form(preset):
    model = classifier(preset)
    deployed = copy.deepcopy(model)

    report = to_deploy_form(deployed)

    compressed = 0 if preset is None else len(resolve_spec(preset).layers)
    assert len(report.fused) == compressed
    assert len(report.folded_norms) == 53
    assert not any(isinstance(module, (CoDeCConv2d, nn.BatchNorm2d)) for module in deployed.modules())
    assert_matches(model, deployed, inputs(), tolerance=1e-5)


@pytest.mark.parametrize("groups", [1, 4])
def test_deploy_form_unfolded_permutation(groups):
    torch.manual_seed(0)
    permutation = torch.randperm(32)
    layer = CoDeCConv2d(16, 32, 3, groups=groups, rank=4, padding=1, bias=True, permutation=permutation)
    model = randomize_norms(nn.Sequential(layer, nn.BatchNorm2d(32), nn.ReLU())).eval()
    deployed = copy.deepcopy(model)

    report = to_deploy_form(deployed)

    fused = deployed[0]
    assert isinstance(fused, FusedCoDeCConv2d)
    assert report.folded_norms == ["1"]
    # One group lets the stage-2 rows take the original order; several groups keep the index_select.
    assert (fused.output_index is not None) == (groups > 1)
    assert_matches(model, deployed, [torch.randn(2, 16, 9, 11)], tolerance=1e-5)


def test_deploy_form_dense_layers_option():
    model = classifier("codec-45")
    deployed = copy.deepcopy(model)

    report = to_deploy_form(deployed, dense_layers=["layer1.0.conv2"])

    assert report.densified == ["layer1.0.conv2"]
    assert type(deployed.layer1[0].conv2) is nn.Conv2d
    assert_matches(model, deployed, inputs()[:1], tolerance=1e-5)


def test_deploy_form_rejects_unknown_dense_layer():
    with pytest.raises(ValueError, match="layer1.0.conv1"):
        to_deploy_form(classifier("codec-45"), dense_layers=["layer1.0.conv1"])


def test_relative_error_scale():
    reference = torch.tensor([0.0, 2.0, -4.0])

    assert relative_error(reference, reference) == 0.0
    assert relative_error(reference, reference + torch.tensor([0.0, 0.0, 0.4])) == pytest.approx(0.1)
    assert relative_error(reference, torch.tensor([0.0, float("nan"), 0.0])) == float("inf")


# ---------------------------------------------------------------------------
# Classifier path


@pytest.fixture(scope="module")
def export_tool():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    return load_tool("export_backbone")


@pytest.fixture(scope="module")
def codec_classifier_dir(tmp_path_factory):
    model = classifier("codec-45")
    directory = tmp_path_factory.mktemp("codec45")
    save_compressed(model, resolve_spec("codec-45"), directory)
    return model, directory


@pytest.fixture(scope="module")
def codec_classifier_export(export_tool, codec_classifier_dir, tmp_path_factory):
    _, directory = codec_classifier_dir
    output = tmp_path_factory.mktemp("exports") / "codec45"
    status = export_tool.main(["--compressed", str(directory), "--output", str(output), "--deploy-form", "fast", *SIZE_ARGS])
    return status, output


def check_artifacts(output, reference, size_multiple=1):
    """Load each artifact on its own (not through the tool) and compare it with ``reference`` at two sizes."""
    import onnx

    from codec_det.export.onnx import OnnxRunner
    from codec_det.export.torchscript import load_torchscript

    tensors = inputs()
    traced = load_torchscript(output / "backbone.ts")
    assert_matches(reference, traced, tensors)

    model = onnx.load(str(output / "backbone.onnx"))
    assert max(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")) >= 17
    shape = model.graph.input[0].type.tensor_type.shape.dim
    assert [bool(dim.dim_param) for dim in shape] == [True, False, True, True]
    assert_matches(reference, OnnxRunner(output / "backbone.onnx", threads=2), tensors)


def check_report(output, artifacts):
    report = json.loads((output / "export_report.json").read_text())
    assert report["passed"] is True
    assert sorted(report["artifacts"]) == sorted(artifacts)
    for name in artifacts:
        checks = report["artifacts"][name]["checks"]
        assert [check["input_shape"] for check in checks][-1][-2:] == list(SECOND_SIZE)
        assert len(checks) == 2
        assert all(check["passed"] and check["max_rel_error"] <= TOLERANCE for check in checks)
    return report


def test_classifier_codec_export(codec_classifier_export, codec_classifier_dir):
    status, output = codec_classifier_export
    reference, _ = codec_classifier_dir

    assert status == 0
    assert sorted(path.name for path in output.iterdir()) == sorted(ARTIFACTS)
    report = check_report(output, ["backbone.safetensors", "backbone.ts", "backbone.onnx"])
    assert report["deploy_form"] == "fast"
    assert report["compressed_layers"] == len(resolve_spec("codec-45").layers)
    check_artifacts(output, reference)


def test_classifier_weights_round_trip(codec_classifier_export, codec_classifier_dir):
    from safetensors.torch import load_file

    from codec_det.export.sources import rebuild_classifier
    from codec_det.spec import CompressionSpec

    _, output = codec_classifier_export
    reference, _ = codec_classifier_dir
    rebuilt = rebuild_classifier(
        CompressionSpec.load(output / "spec.json"), load_file(str(output / "backbone.safetensors")), "test"
    )

    assert_matches(reference, rebuilt, inputs(), tolerance=0.0)


def test_classifier_original_export(export_tool, tmp_path):
    reference = classifier()
    weights = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), weights)
    output = tmp_path / "original"

    status = export_tool.main(["--compressed", str(weights), "--output", str(output), *SIZE_ARGS])

    assert status == 0
    report = check_report(output, ["backbone.safetensors", "backbone.ts", "backbone.onnx"])
    assert report["deploy_form"] == "training"
    assert report["compressed_layers"] == 0
    check_artifacts(output, reference)


# ---------------------------------------------------------------------------
# Errors: a clear message, exit status 2, and no output directory


def test_spec_not_matching_weights(export_tool, codec_classifier_dir, tmp_path, caplog):
    _, directory = codec_classifier_dir
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    (mismatched / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    resolve_spec("codec-66").save(mismatched / "spec.json")
    output = tmp_path / "out"

    status = export_tool.main(["--compressed", str(mismatched), "--output", str(output), *SIZE_ARGS])

    assert status == 2
    assert "do not match the model built from the spec" in caplog.text
    assert_nothing_written(output)


def test_missing_weights_file(export_tool, codec_classifier_dir, tmp_path, caplog):
    _, directory = codec_classifier_dir
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "spec.json").write_bytes((directory / "spec.json").read_bytes())
    output = tmp_path / "out"

    status = export_tool.main(["--compressed", str(partial), "--output", str(output)])

    assert status == 2
    assert "no model.safetensors" in caplog.text
    assert_nothing_written(output)


def test_missing_input_path(export_tool, tmp_path, caplog):
    output = tmp_path / "out"

    status = export_tool.main(["--compressed", str(tmp_path / "absent"), "--output", str(output)])

    assert status == 2
    assert "absent not found" in caplog.text
    assert_nothing_written(output)


def test_full_detector_with_classifier_rejected(export_tool, codec_classifier_dir, tmp_path, caplog):
    _, directory = codec_classifier_dir
    output = tmp_path / "out"

    status = export_tool.main(["--compressed", str(directory), "--output", str(output), "--full-detector"])

    assert status == 2
    assert "--full-detector needs a Detectron2 model" in caplog.text
    assert_nothing_written(output)


def test_failed_check_writes_nothing(export_tool, codec_classifier_dir, tmp_path, caplog):
    _, directory = codec_classifier_dir
    output = tmp_path / "out"

    # The fast form differs from the training form by float rounding, far above this tolerance.
    status = export_tool.main(
        ["--compressed", str(directory), "--output", str(output), "--deploy-form", "fast", "--tolerance", "1e-15",
         *SIZE_ARGS]
    )

    assert status == 1
    assert "check failed (backbone.ts at 1x3x64x96" in caplog.text
    assert_nothing_written(output)


# ---------------------------------------------------------------------------
# Detectron2 path


@pytest.fixture(scope="module")
def d2_config():
    pytest.importorskip("detectron2")
    return ROOT / "configs" / "codec_faster_rcnn.yaml"


def d2_checkpoint(config, path, *opts):
    """Build the R-CNN of ``config`` with random weights and save it as a codec-det Detectron2 checkpoint."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from codec_det import add_codec_config
    from codec_det.d2.checkpoint import save_d2_checkpoint

    cfg = get_cfg()
    add_codec_config(cfg)
    cfg.merge_from_file(str(config))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = randomize_norms(build_model(cfg)).eval()
    spec = getattr(model.backbone.bottom_up, "codec_spec", None)
    save_d2_checkpoint(path, model.state_dict(), spec)
    return model


@pytest.fixture(scope="module")
def d2_codec(d2_config, tmp_path_factory):
    path = tmp_path_factory.mktemp("d2codec") / "model.pth"
    return d2_checkpoint(d2_config, path), path


@pytest.fixture(scope="module")
def d2_codec_export(export_tool, d2_config, d2_codec, tmp_path_factory):
    _, weights = d2_codec
    output = tmp_path_factory.mktemp("d2exports") / "codec45"
    status = export_tool.main(
        ["--config-file", str(d2_config), "--weights", str(weights), "--output", str(output), "--deploy-form", "fast",
         *SIZE_ARGS]
    )
    return status, output


def test_d2_codec_export(d2_codec_export, d2_codec):
    status, output = d2_codec_export
    model, _ = d2_codec

    assert status == 0
    assert sorted(path.name for path in output.iterdir()) == sorted(ARTIFACTS)
    report = check_report(output, ["backbone.safetensors", "backbone.ts", "backbone.onnx"])
    assert report["kind"] == "detectron2-backbone"
    assert report["compressed_layers"] == len(resolve_spec("codec-45").layers)
    check_artifacts(output, model.backbone)


def test_d2_spec_file_rebuilds_backbone(d2_codec_export, d2_codec):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone
    from safetensors.torch import load_file

    from codec_det import add_codec_config
    from codec_det.checkpoint import load_weights_strict

    _, output = d2_codec_export
    model, _ = d2_codec
    cfg = get_cfg()
    add_codec_config(cfg)
    cfg.merge_from_file(str(ROOT / "configs" / "codec_faster_rcnn.yaml"))
    cfg.MODEL.CODEC.SPEC = str(output / "spec.json")
    backbone = build_backbone(cfg).eval()
    load_weights_strict(backbone, load_file(str(output / "backbone.safetensors")), "backbone.safetensors")

    assert_matches(model.backbone, backbone, inputs(), tolerance=0.0)


def test_d2_original_export(export_tool, tmp_path):
    pytest.importorskip("detectron2")
    config = ROOT / "configs" / "Base-CoDeC-RCNN-FPN.yaml"
    opts = ["MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone"]
    weights = tmp_path / "model.pth"
    model = d2_checkpoint(config, weights, *opts)
    output = tmp_path / "out"

    status = export_tool.main(
        ["--config-file", str(config), "--weights", str(weights), "--output", str(output), *SIZE_ARGS, *opts]
    )

    assert status == 0
    report = check_report(output, ["backbone.safetensors", "backbone.ts", "backbone.onnx"])
    assert report["compressed_layers"] == 0
    check_artifacts(output, model.backbone)


def test_d2_spec_not_matching_checkpoint(export_tool, d2_config, d2_codec, tmp_path, caplog):
    _, weights = d2_codec
    output = tmp_path / "out"

    status = export_tool.main(
        ["--config-file", str(d2_config), "--weights", str(weights), "--output", str(output), *SIZE_ARGS,
         "MODEL.CODEC.SPEC", "codec-66"]
    )

    assert status == 2
    assert "describes another backbone than the spec stored in MODEL.WEIGHTS" in caplog.text
    assert_nothing_written(output)


def test_d2_missing_checkpoint(export_tool, d2_config, tmp_path, caplog):
    output = tmp_path / "out"

    status = export_tool.main(["--config-file", str(d2_config), "--weights", str(tmp_path / "absent.pth"), "--output", str(output)])

    assert status == 2
    assert "absent.pth not found" in caplog.text
    assert_nothing_written(output)


def test_d2_checkpoint_without_fpn_rejected(export_tool, d2_config, d2_codec, tmp_path, caplog):
    from codec_det.d2.checkpoint import read_d2_checkpoint, save_d2_checkpoint

    _, weights = d2_codec
    checkpoint = read_d2_checkpoint(weights)
    state = {key: value for key, value in checkpoint["model"].items() if not key.startswith("backbone.fpn_")}
    trunk_only = tmp_path / "trunk_only.pth"
    save_d2_checkpoint(trunk_only, state, resolve_spec("codec-45"))
    output = tmp_path / "out"

    status = export_tool.main(["--config-file", str(d2_config), "--weights", str(trunk_only), "--output", str(output), *SIZE_ARGS])

    assert status == 2
    assert "lacks weights of the exported model" in caplog.text
    assert "backbone.fpn_" in caplog.text
    assert_nothing_written(output)


def test_d2_size_not_divisible(export_tool, d2_config, d2_codec, tmp_path, caplog):
    _, weights = d2_codec
    output = tmp_path / "out"

    status = export_tool.main(
        ["--config-file", str(d2_config), "--weights", str(weights), "--output", str(output), "--input-size", "64", "90"]
    )

    assert status == 2
    assert "divisible by 32" in caplog.text
    assert_nothing_written(output)


@pytest.mark.slow
@pytest.mark.parametrize("config_name", ["codec_mask_rcnn.yaml", "codec_keypoint_rcnn.yaml"])
def test_full_detector_export(export_tool, config_name, tmp_path):
    pytest.importorskip("detectron2")
    config = ROOT / "configs" / config_name
    weights = tmp_path / "model.pth"
    # With random heads every score is about 1 / (classes + 1); a zero threshold keeps detections to compare.
    opts = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    d2_checkpoint(config, weights, *opts)
    output = tmp_path / "out"

    status = export_tool.main(
        ["--config-file", str(config), "--weights", str(weights), "--output", str(output), "--full-detector",
         "--deploy-form", "fast", "--input-size", "128", "192", "--second-size", "96", "160", *opts]
    )

    assert status == 0
    report = json.loads((output / "export_report.json").read_text())
    checks = report["artifacts"]["detector.ts"]["checks"]
    assert [check["input_shape"] for check in checks] == [[3, 128, 192], [3, 96, 160]]
    assert all(check["passed"] for check in checks)
    # Boxes of at least one detection were compared, not only empty outputs.
    assert all(max(shape[0] for shape in check["output_shapes"].values()) > 0 for check in checks)


# ---------------------------------------------------------------------------
# Latency measurement and the benchmark's report


def test_measure_interleaved_runs_in_turns():
    from codec_det.export.timing import measure_interleaved

    calls = []
    stats = measure_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=3)

    assert calls == ["a", "b"] * 4
    assert stats["a"].runs == 3
    assert stats["a"].p25_ms <= stats["a"].median_ms <= stats["a"].p75_ms


def test_benchmark_tables_and_chart(tmp_path):
    benchmark = load_tool("benchmark")
    stats = {name: {"median_ms": value, "p25_ms": value, "p75_ms": value, "runs": 3}
             for name, value in (("original", 10.0), ("codec-45", 5.0), ("codec-66", 4.0))}
    slower = {name: {key: value * 2 if key != "runs" else value for key, value in entry.items()}
              for name, entry in stats.items()}
    results = {
        "date": "2026-01-01",
        "machine": "test machine",
        "targets": {
            "classifier": {
                "input_size": [224, 224],
                "complexity": {"original": {"macs": 4e9, "params": 25e6}, "codec-45": {"macs": 2e9, "params": 14e6},
                               "codec-66": {"macs": 1e9, "params": 9e6}},
                "latency": {"1": {"eager": slower, "onnxruntime": stats}},
            }
        },
    }

    markdown = benchmark.format_markdown(results)
    benchmark.plot_results(results, tmp_path / "chart.png")

    assert "| classifier | codec-45 | 224x224 | 2.00 | 14.00 | 2.00x |" in markdown
    assert "| classifier | 1 | eager | 20.0 (20.0-20.0) | 10.0 (10.0-10.0) | 8.0 (8.0-8.0) | 2.00x | 2.50x |" in markdown
    assert "| classifier | 1 | 10.0 (onnxruntime) | 5.0 (onnxruntime) | 4.0 (onnxruntime) | 2.00x | 2.50x |" in markdown
    assert (tmp_path / "chart.png").stat().st_size > 0
