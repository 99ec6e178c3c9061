import csv
import importlib.util
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "compress_backbone.py"
REQUIRED_COLUMNS = [
    "layer", "shape", "groups", "rank", "macs_before", "macs_after",
    "params_before", "params_after", "rel_error",
]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("compress_backbone", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compress_backbone"] = module
    spec.loader.exec_module(module)
    return module


def quick_args(output):
    return ["--init", "random", "--target-macs", "3.4", "--als-iterations", "1", "--output", str(output)]


@pytest.fixture(scope="module")
def finished_run(tool, tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "codec"
    assert tool.main(quick_args(output)) == 0
    return output


def test_writes_all_outputs(finished_run):
    names = sorted(path.name for path in finished_run.iterdir())

    assert names == ["model.safetensors", "report.csv", "report.png", "spec.json"]


def test_report_has_layer_rows_and_total(finished_run):
    with open(finished_run / "report.csv") as stream:
        rows = list(csv.DictReader(stream))

    assert list(rows[0]) [: len(REQUIRED_COLUMNS)] == REQUIRED_COLUMNS
    assert rows[-1]["layer"] == "total"
    assert int(rows[-1]["macs_before"]) == 4111512576
    assert abs(int(rows[-1]["macs_after"]) / 3.4e9 - 1) <= 0.02
    assert len(rows) == 53


def test_rejects_non_empty_output(tool, finished_run):
    with pytest.raises(SystemExit, match="pass --overwrite"):
        tool.main(quick_args(finished_run))


def test_output_file_rejected_with_overwrite(tool, tmp_path):
    output = tmp_path / "codec"
    output.write_text("not a directory")

    with pytest.raises(SystemExit, match="is not a directory"):
        tool.main([*quick_args(output), "--overwrite"])
    assert output.read_text() == "not a directory"


def test_failed_run_leaves_no_output(tool, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while writing the chart")

    monkeypatch.setattr(tool, "plot_mac_reduction", crash)
    output = tmp_path / "codec"

    with pytest.raises(RuntimeError, match="simulated crash"):
        tool.main(quick_args(output))

    assert not output.exists()
    assert list(tmp_path.iterdir()) == []


def test_target_below_floor_is_an_error(tool, tmp_path, caplog):
    args = ["--init", "random", "--target-macs", "0.2", "--output", str(tmp_path / "out")]

    assert tool.main(args) == 2
    assert "MACs target 0.200 G is below" in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["codec", "svd"])
def test_target_above_model_is_an_error(tool, tmp_path, caplog, method):
    args = ["--init", "random", "--target-macs", "1000", "--method", method, "--output", str(tmp_path / "out")]

    assert tool.main(args) == 2
    assert "MACs target 1000.000 G (model 4.112 G) is not below the uncompressed model" in caplog.text
    assert not (tmp_path / "out").exists()


def test_check_targets_below_model():
    from codec_det.budget import check_targets_below_model

    check_targets_below_model(4e9, 25e6, target_macs=1e12, target_params=10e6)
    check_targets_below_model(4e9, 25e6, target_macs=2e9, target_params=None)
    with pytest.raises(ValueError, match="MACs target .* and parameter target .* are not below"):
        check_targets_below_model(4e9, 25e6, target_macs=5e9, target_params=30e6)


def test_truncated_weights_file(tool, tmp_path, caplog):
    import torch

    weights = tmp_path / "resnet50.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, weights)
    weights.write_bytes(weights.read_bytes()[:300])
    args = ["--weights", str(weights), "--preset", "codec-45", "--output", str(tmp_path / "out")]

    assert tool.main(args) == 2
    assert "is truncated, corrupt or not a torch checkpoint" in caplog.text
    assert "--allow-pickle" not in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
@pytest.mark.parametrize("option", ["--target-macs", "--target-params"])
def test_invalid_target_rejected(tool, tmp_path, option, value):
    budget = {"--target-macs": "2", "--target-params": "10"}
    budget[option] = value
    args = ["--init", "random", "--output", str(tmp_path / "out")]
    for name, number in budget.items():
        args += [name, number]

    with pytest.raises(SystemExit, match=f"{option} must be a positive finite number"):
        tool.main(args)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "-2"])
def test_invalid_threads_rejected(tool, tmp_path, value):
    args = ["--init", "random", "--preset", "codec-66", "--threads", value, "--output", str(tmp_path / "out")]

    with pytest.raises(SystemExit, match=f"--threads must be a positive integer, got {value}"):
        tool.main(args)
    assert not (tmp_path / "out").exists()


def test_missing_weights_file(tool, tmp_path):
    args = ["--weights", str(tmp_path / "absent.pth"), "--preset", "codec-45", "--output", str(tmp_path / "out")]

    with pytest.raises(SystemExit, match="absent.pth not found"):
        tool.main(args)


def test_nan_weights_rejected(tool, tmp_path, caplog):
    import torch
    import torchvision

    state = torchvision.models.resnet50().state_dict()
    state["layer2.0.conv2.weight"][0, 0, 0, 0] = float("nan")
    weights = tmp_path / "nan.pth"
    torch.save(state, weights)
    args = ["--weights", str(weights), "--preset", "codec-45", "--output", str(tmp_path / "out")]

    assert tool.main(args) == 2
    assert "layer2.0.conv2.weight contains NaN or Inf" in caplog.text
