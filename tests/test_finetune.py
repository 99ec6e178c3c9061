"""Tests of fine-tuning: exact resumption, distillation, atomic checkpoints, data checks and the command line."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from codec_det.checkpoint import load_compressed, save_compressed
from codec_det.compress import compress_model
from codec_det.data import demo_crops, demo_fetch
from codec_det.decompose import ALSSettings
from codec_det.layers.codec_conv import CoDeCConv2d
from codec_det.training import checkpointing
from codec_det.training.checkpointing import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from codec_det.training.data import (
    DataLayoutError,
    SeededSampler,
    build_train_loader,
    build_val_loader,
    check_image_folder,
    load_image_folder,
    train_transform,
    val_transform,
)
from codec_det.training.distillation import DistillationLoss, distillation_kl
from codec_det.training.loop import build_optimizer, build_scheduler, evaluate, finetune
from codec_det.training.models import load_compressed_classifier, load_teacher

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tools"))
import finetune_classifier  # noqa: E402

IMAGE_SIZE = 32
CLASS_COLOURS = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run on one thread: with other processes sharing 2 cores, 2 threads made each step about 3x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_image_folder(root: Path, train_per_class: int = 4, val_per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name, colour in CLASS_COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = (rng.normal(0, 40, (IMAGE_SIZE, IMAGE_SIZE, 3)) + colour).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return _write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory) -> Path:
    """A torchvision ResNet-18 (1000 classes) with three convs compressed by CoDeC, as compress_backbone writes it."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    plan = {
        "layer1.0.conv1": (2, 8, None),
        "layer1.1.conv2": (1, 16, None),
        "layer2.0.downsample.0": (1, 16, None),
    }
    result = compress_model(model, plan=plan, input_size=(IMAGE_SIZE, IMAGE_SIZE), architecture="resnet18",
                            settings=ALSSettings(n_iter_max=5), progress=False)
    directory = tmp_path_factory.mktemp("compressed")
    save_compressed(result.model, result.spec, directory)
    return directory


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "resnet18-3.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)
    return path


class CrashingDataset(Dataset):
    """Raise ``RuntimeError`` on the ``crash_at``-th item load, as an interrupted job would stop."""

    def __init__(self, dataset: Dataset, crash_at: int | None):
        self.dataset = dataset
        self.crash_at = crash_at
        self.loads = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        self.loads += 1
        if self.crash_at is not None and self.loads == self.crash_at:
            raise RuntimeError("simulated interruption")
        return self.dataset[index]


def _run(compressed_dir: Path, image_folder: Path, checkpoint_dir: Path | None, *, resume: bool = False,
         crash_at: int | None = None, checkpoint_every: int = 0, teacher: nn.Module | None = None,
         kd_alpha: float = 0.5, epochs: int = 2, batch_size: int = 4, amp: bool = False):
    torch.manual_seed(0)
    model, _ = load_compressed_classifier(compressed_dir, "resnet18", num_classes=3)
    train_set = CrashingDataset(load_image_folder(image_folder, "train", train_transform(IMAGE_SIZE)), crash_at)
    val_set = load_image_folder(image_folder, "val", val_transform(IMAGE_SIZE))
    train_loader = build_train_loader(train_set, batch_size=batch_size, workers=0, seed=3)
    val_loader = build_val_loader(val_set, batch_size=6, workers=0)
    metrics = finetune(model, train_loader, val_loader, epochs=epochs, lr=0.05, warmup_epochs=0.5,
                       teacher=teacher, kd_alpha=kd_alpha, kd_temperature=2.0, device="cpu", amp=amp,
                       checkpoint_dir=checkpoint_dir, resume=resume, checkpoint_every=checkpoint_every,
                       progress=False)
    return model, metrics


def _assert_same_state(actual: nn.Module, expected: nn.Module) -> None:
    expected_state = expected.state_dict()
    for name, tensor in actual.state_dict().items():
        assert torch.equal(tensor, expected_state[name]), f"{name} differs after resuming"


@pytest.fixture(scope="module")
def uninterrupted(compressed_dir, image_folder, tmp_path_factory):
    """A 2-epoch run without interruption: 3 steps per epoch (12 images, batch 4).

    It passes ``resume=True`` on an empty directory, so the resumption tests
    that match it also show that such a run starts from the first epoch.
    """
    checkpoint_dir = tmp_path_factory.mktemp("uninterrupted")
    model, metrics = _run(compressed_dir, image_folder, checkpoint_dir, resume=True)
    return model, metrics, checkpoint_dir


# ---------------------------------------------------------------------------
# Exact resumption
# ---------------------------------------------------------------------------


def test_resume_after_epoch_matches_uninterrupted(compressed_dir, image_folder, uninterrupted, tmp_path):
    expected_model, expected_metrics, _ = uninterrupted

    # Load 17 is the 5th image of epoch 2: the crash comes after the checkpoint of epoch 1.
    with pytest.raises(RuntimeError, match="simulated interruption"):
        _run(compressed_dir, image_folder, tmp_path, crash_at=17)
    saved = load_checkpoint(tmp_path / "last.pth")
    assert saved["epoch"] == 1
    assert saved["step_in_epoch"] == 0

    model, metrics = _run(compressed_dir, image_folder, tmp_path, resume=True)
    _assert_same_state(model, expected_model)
    for actual, expected in zip(metrics["history"], expected_metrics["history"], strict=True):
        assert {key: value for key, value in actual.items() if key != "seconds"} == {
            key: value for key, value in expected.items() if key != "seconds"}
    assert metrics["steps"] == expected_metrics["steps"] == 6


def test_resume_mid_epoch_matches_uninterrupted(compressed_dir, image_folder, uninterrupted, tmp_path):
    expected_model, expected_metrics, _ = uninterrupted

    # With a checkpoint every step, load 18 (2nd batch of epoch 2) crashes after step 1 of epoch 2.
    with pytest.raises(RuntimeError, match="simulated interruption"):
        _run(compressed_dir, image_folder, tmp_path, crash_at=18, checkpoint_every=1)
    saved = load_checkpoint(tmp_path / "last.pth")
    assert saved["epoch"] == 1
    assert saved["step_in_epoch"] == 1

    model, metrics = _run(compressed_dir, image_folder, tmp_path, resume=True, checkpoint_every=1)
    _assert_same_state(model, expected_model)
    assert metrics["history"][-1]["train_loss"] == expected_metrics["history"][-1]["train_loss"]
    assert metrics["top1"] == expected_metrics["top1"]


def test_resume_finished_run_trains_nothing(compressed_dir, image_folder, uninterrupted, tmp_path):
    _, _, finished_dir = uninterrupted
    shutil.copy(finished_dir / "last.pth", tmp_path / "last.pth")
    before = load_checkpoint(tmp_path / "last.pth")

    model, metrics = _run(compressed_dir, image_folder, tmp_path, resume=True)

    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before["model"][name])
    assert metrics["steps"] == 6


def test_resume_rejects_other_batch_size_mid_epoch(compressed_dir, image_folder, tmp_path):
    with pytest.raises(RuntimeError, match="simulated interruption"):
        _run(compressed_dir, image_folder, tmp_path, crash_at=6, checkpoint_every=1)
    model, _ = load_compressed_classifier(compressed_dir, "resnet18", num_classes=3)
    train_set = load_image_folder(image_folder, "train", train_transform(IMAGE_SIZE))
    val_set = load_image_folder(image_folder, "val", val_transform(IMAGE_SIZE))

    with pytest.raises(ValueError, match="resume with the same data"):
        finetune(model, build_train_loader(train_set, batch_size=2, workers=0),
                 build_val_loader(val_set, batch_size=6, workers=0), epochs=2, lr=0.05,
                 checkpoint_dir=tmp_path, resume=True, progress=False)


def test_resume_rejects_other_model(image_folder, uninterrupted, tmp_path):
    _, _, finished_dir = uninterrupted
    shutil.copy(finished_dir / "last.pth", tmp_path / "last.pth")
    dense = torchvision.models.resnet18(num_classes=3)
    train_set = load_image_folder(image_folder, "train", train_transform(IMAGE_SIZE))
    val_set = load_image_folder(image_folder, "val", val_transform(IMAGE_SIZE))

    with pytest.raises(ValueError, match="does not match this model"):
        finetune(dense, build_train_loader(train_set, batch_size=4, workers=0),
                 build_val_loader(val_set, batch_size=6, workers=0), epochs=2, lr=0.05,
                 checkpoint_dir=tmp_path, resume=True, progress=False)


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def test_checkpoint_survives_crash_during_save(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    first = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "weights": torch.arange(4.0)}
    save_checkpoint(first, path)

    def crashing_save(state, stream):
        stream.write(b"partial checkpoint bytes")
        raise OSError("simulated disk full")

    monkeypatch.setattr(checkpointing.torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated disk full"):
        save_checkpoint({**first, "weights": torch.zeros(4)}, path)
    monkeypatch.undo()

    assert torch.equal(load_checkpoint(path)["weights"], torch.arange(4.0))
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["last.pth"]


def test_load_checkpoint_rejects_pickled_objects(tmp_path):
    path = tmp_path / "last.pth"
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "object": SeededSampler(3, shuffle=True)},
               path)
    with pytest.raises(ValueError, match="tensor-only"):
        load_checkpoint(path)


def test_load_checkpoint_rejects_other_files(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="not a codec-det fine-tuning checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")


def test_rng_state_round_trip_through_checkpoint(tmp_path):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    save_checkpoint({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "rng": capture_rng_state()},
                    tmp_path / "last.pth")
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])

    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "last.pth")["rng"])

    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_checkpoint_contents(uninterrupted):
    _, _, checkpoint_dir = uninterrupted
    saved = load_checkpoint(checkpoint_dir / "last.pth")

    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "global_step", "best_top1", "ranks"):
        assert key in saved, key
    assert saved["epoch"] == 2
    assert saved["global_step"] == 6
    assert saved["scheduler"]["last_epoch"] == 6
    assert len(saved["history"]) == 2
    assert set(saved["ranks"][0]["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert any(name.endswith("input_factors") for name in saved["model"])


# ---------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------


def test_distillation_kl_matches_formula():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    temperature = 3.0
    p_teacher = torch.softmax(teacher / temperature, dim=1)
    expected = (p_teacher * (p_teacher.log() - torch.log_softmax(student / temperature, dim=1))).sum(1).mean()

    assert torch.allclose(distillation_kl(student, teacher, temperature), expected * temperature**2, atol=1e-6)
    assert distillation_kl(student, student, temperature).abs() < 1e-6


def test_distillation_loss_mixes_terms():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    targets = torch.tensor([0, 1, 2, 3])
    cross_entropy = nn.functional.cross_entropy(student, targets)
    soft = distillation_kl(student, teacher, 2.0)

    mixed = DistillationLoss(alpha=0.25, temperature=2.0)(student, targets, teacher)

    assert torch.allclose(mixed, 0.75 * cross_entropy + 0.25 * soft)
    assert not torch.allclose(mixed, cross_entropy)
    assert torch.allclose(DistillationLoss(alpha=0.0, temperature=2.0)(student, targets), cross_entropy)


def test_distillation_loss_rejects_bad_values():
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(alpha=1.5, temperature=2.0)
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(alpha=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="same number of classes"):
        DistillationLoss(alpha=0.5, temperature=2.0)(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long),
                                                     torch.zeros(2, 4))


class CountingTeacher(nn.Module):
    """Wrap a model and count its forward calls."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return self.model(images)


def test_finetune_distils_only_when_asked(compressed_dir, image_folder, teacher_file):
    # One step per epoch (12 images, batch 12), so the training loss is that of the first step.
    teacher = CountingTeacher(load_teacher(teacher_file, "resnet18", num_classes=3))
    _, plain = _run(compressed_dir, image_folder, None, teacher=teacher, kd_alpha=0.0, epochs=1, batch_size=12)
    assert teacher.calls == 0

    _, distilled = _run(compressed_dir, image_folder, None, teacher=teacher, kd_alpha=0.5, epochs=1, batch_size=12)
    assert teacher.calls == 1
    assert not teacher.training
    assert all(not parameter.requires_grad for parameter in teacher.parameters())
    assert distilled["history"][0]["train_loss"] != plain["history"][0]["train_loss"]


def test_load_teacher_rejects_other_class_count(teacher_file):
    with pytest.raises(ValueError, match="3 classes but the student has 10"):
        load_teacher(teacher_file, "resnet18", num_classes=10)


# ---------------------------------------------------------------------------
# Data, schedule and evaluation
# ---------------------------------------------------------------------------


def test_sampler_shards_cover_dataset_once():
    shards = [list(SeededSampler(10, shuffle=True, seed=1, num_replicas=3, rank=rank, pad=False)) for rank in range(3)]
    indices = [index for shard in shards for index, _ in shard]
    assert sorted(indices) == list(range(10))

    padded = [list(SeededSampler(10, shuffle=True, seed=1, num_replicas=3, rank=rank)) for rank in range(3)]
    assert [len(shard) for shard in padded] == [4, 4, 4]


def test_sampler_start_skips_same_samples():
    sampler = SeededSampler(12, shuffle=True, seed=4)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_start(5)
    assert list(sampler) == full[5:]
    assert len(sampler) == 7

    sampler.set_epoch(3)
    assert len(sampler) == 12
    assert list(sampler) != full


def test_scheduler_warms_up_then_decays():
    optimizer = build_optimizer(nn.Linear(2, 2), lr=0.1)
    scheduler = build_scheduler(optimizer, total_steps=10, warmup_steps=2, warmup_factor=0.1)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()

    assert rates[0] == pytest.approx(0.01)
    assert rates[1] == pytest.approx(0.055)
    assert rates[2] == pytest.approx(0.1)
    assert all(later <= earlier for earlier, later in zip(rates[2:], rates[3:]))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


class FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.logits = logits

    def forward(self, images):
        return self.logits[: images.shape[0]] + self.weight


def test_evaluate_counts_top1_and_top5():
    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1], [1.0, 2, 3, 4, 5, 6], [0.0, 2, 3, 4, 5, 9]])
    targets = torch.tensor([0, 0, 1])  # hit at rank 1, rank 6 (miss), rank 5
    loader = DataLoader(list(zip(torch.zeros(3, 1), targets)), batch_size=3)

    metrics = evaluate(FixedLogits(logits), loader)

    assert metrics["top1"] == pytest.approx(100 / 3)
    assert metrics["top5"] == pytest.approx(200 / 3)
    assert metrics["count"] == 3


def test_finetune_logs_amp_off_on_cpu(compressed_dir, image_folder, caplog):
    with caplog.at_level("INFO", logger="codec_det.training.loop"):
        _run(compressed_dir, image_folder, None, epochs=1, batch_size=12, amp=True)
    assert "AMP requested but the device is cpu" in caplog.text


def test_check_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        check_image_folder(tmp_path / "missing")

    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataLayoutError, match="no val/ folder"):
        check_image_folder(tmp_path)

    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "0001.jpg").write_bytes(b"")
    with pytest.raises(DataLayoutError, match="no class folders but 1 loose files"):
        check_image_folder(tmp_path)

    (tmp_path / "val" / "dog").mkdir()
    with pytest.raises(DataLayoutError, match="other classes"):
        check_image_folder(tmp_path)

    (tmp_path / "val" / "cat").mkdir()
    (tmp_path / "val" / "dog").rmdir()
    assert check_image_folder(tmp_path) == ["cat"]
    with pytest.raises(DataLayoutError, match="no readable images"):
        load_image_folder(tmp_path, "train", None)


@pytest.mark.skipif(not demo_fetch.is_demo_data_complete(demo_fetch.default_demo_root()),
                    reason="demo photos not fetched; run `python -m codec_det.data.demo_fetch`")
def test_demo_crops_layout(tmp_path):
    root = demo_crops.build_demo_crops(tmp_path / "crops", train_crops=2, val_crops=1, max_side=32)

    assert check_image_folder(root) == ["bus", "car", "person"]
    counts = {split: {name: len(list((root / split / name).glob("*.jpg"))) for name in demo_crops.CROP_CATEGORIES}
              for split in ("train", "val")}
    assert counts == {"train": {"bus": 2, "car": 8, "person": 8}, "val": {"bus": 1, "car": 2, "person": 2}}
    with Image.open(next((root / "val" / "car").glob("*.jpg"))) as image:
        assert max(image.size) == 32
    assert demo_crops.is_demo_crops_complete(root)


def test_demo_crops_without_photos(tmp_path):
    with pytest.raises(FileNotFoundError, match="demo_fetch"):
        demo_crops.build_demo_crops(tmp_path / "crops", demo_root=tmp_path / "no-photos")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _cli(compressed_dir: Path, image_folder: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--compressed", str(compressed_dir), "--arch", "resnet18", "--data", str(image_folder),
        "--image-size", str(IMAGE_SIZE), "--batch-size", "12", "--workers", "0", "--lr", "0.05",
        "--output", str(output), "--no-progress", *extra,
    ]


def test_cli_writes_loadable_directory(compressed_dir, image_folder, teacher_file, tmp_path, capsys):
    output = tmp_path / "finetuned"
    status = finetune_classifier.main(_cli(compressed_dir, image_folder, output, "--num-classes", "3",
                                           "--epochs", "1", "--teacher-weights", str(teacher_file)))
    assert status == 0
    assert {"model.safetensors", "spec.json", "last.pth", "metrics.json", "log.txt"} <= {
        entry.name for entry in output.iterdir()}
    assert "top-1" in capsys.readouterr().out

    model = load_compressed(output, torchvision.models.resnet18(num_classes=3))
    assert isinstance(model.layer1[0].conv1, CoDeCConv2d)
    spec = json.loads((output / "spec.json").read_text())
    assert spec["metadata"]["num_classes"] == 3
    assert spec["metadata"]["finetune"]["kd_alpha"] == 0.5
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["classes"] == sorted(CLASS_COLOURS)
    assert len(metrics["history"]) == 1
    assert "epoch 1/1" in (output / "log.txt").read_text()

    # The fine-tuned directory is itself a valid --compressed input.
    status = finetune_classifier.main(_cli(output, image_folder, tmp_path / "again", "--epochs", "1"))
    assert status == 0


def test_cli_output_needs_resume(compressed_dir, image_folder, tmp_path):
    output = tmp_path / "run"
    arguments = _cli(compressed_dir, image_folder, output, "--num-classes", "3", "--epochs", "1")
    assert finetune_classifier.main(arguments) == 0
    first = load_file(str(output / "model.safetensors"))

    with pytest.raises(SystemExit, match="pass --resume"):
        finetune_classifier.main(arguments)
    assert finetune_classifier.main(arguments + ["--resume"]) == 0
    # Resuming a finished run trains nothing and writes the same weights again.
    again = load_file(str(output / "model.safetensors"))
    assert again.keys() == first.keys()
    for name, tensor in first.items():
        assert torch.equal(again[name], tensor), name


def test_cli_eval_only_prints_accuracy(compressed_dir, image_folder, capsys):
    arguments = [
        "--compressed", str(compressed_dir), "--arch", "resnet18", "--data", str(image_folder), "--num-classes", "3",
        "--image-size", str(IMAGE_SIZE), "--workers", "0", "--eval-only", "--no-progress",
    ]
    assert finetune_classifier.main(arguments) == 0
    assert "on 6 images" in capsys.readouterr().out


def test_cli_eval_only_needs_no_train_split(compressed_dir, image_folder, tmp_path, capsys):
    shutil.copytree(image_folder / "val", tmp_path / "val")
    arguments = [
        "--compressed", str(compressed_dir), "--arch", "resnet18", "--data", str(tmp_path), "--num-classes", "3",
        "--image-size", str(IMAGE_SIZE), "--workers", "0", "--eval-only", "--no-progress",
    ]
    assert finetune_classifier.main(arguments) == 0
    assert "on 6 images" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--compressed": "no-such-dir"}, "has no spec.json"),
        ({"--data": "no-such-data"}, "--data directory no-such-data not found"),
        ({"--epochs": "0"}, "--epochs must be positive"),
        ({"--kd-alpha": "2"}, "--kd-alpha must be in"),
        ({"--teacher-weights": "missing.pth"}, "--teacher-weights file missing.pth not found"),
    ],
)
def test_cli_rejects_bad_arguments(compressed_dir, image_folder, tmp_path, change, message):
    arguments = _cli(compressed_dir, image_folder, tmp_path / "out", "--num-classes", "3")
    for option, value in change.items():
        if option in arguments:
            arguments[arguments.index(option) + 1] = value
        else:
            arguments += [option, value]
    with pytest.raises(SystemExit, match=message):
        finetune_classifier.main(arguments)


def test_cli_reports_data_errors(compressed_dir, image_folder, tmp_path, caplog):
    flat = tmp_path / "flat"
    (flat / "train" / "a").mkdir(parents=True)
    (flat / "val").mkdir()
    (flat / "val" / "0001.jpg").write_bytes(b"")
    assert finetune_classifier.main(_cli(compressed_dir, flat, tmp_path / "out1", "--num-classes", "1")) == 2
    assert "no class folders" in caplog.text

    assert finetune_classifier.main(_cli(compressed_dir, image_folder, tmp_path / "out2")) == 2
    assert "pass --num-classes 3" in caplog.text

    assert finetune_classifier.main(_cli(compressed_dir, image_folder, tmp_path / "out3", "--num-classes", "5")) == 2
    assert "has 3 class folders" in caplog.text


def test_cli_rejects_spec_of_other_arch(compressed_dir, image_folder, tmp_path, caplog):
    arguments = _cli(compressed_dir, image_folder, tmp_path / "out", "--num-classes", "3")
    arguments[arguments.index("--arch") + 1] = "resnet34"
    assert finetune_classifier.main(arguments) == 2
    assert "pass --arch resnet18" in caplog.text


@pytest.mark.slow
def test_cli_two_process_gloo(compressed_dir, image_folder, tmp_path):
    output = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO_ROOT / "tools" / "finetune_classifier.py"),
        *_cli(compressed_dir, image_folder, output, "--num-classes", "3", "--epochs", "2", "--device", "cpu",
              "--checkpoint-every", "1", "--batch-size", "4"),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert completed.returncode == 0, completed.stderr[-4000:]

    saved = load_checkpoint(output / "last.pth")
    assert len(saved["ranks"]) == 2
    # 12 images over 2 processes at batch 4: 1 step per epoch.
    assert saved["global_step"] == 2
    assert saved["config"]["world_size"] == 2
    log = (output / "log.txt").read_text()
    assert "epoch 2/2" in log
    assert "[rank 1]" not in log
    load_compressed(output, torchvision.models.resnet18(num_classes=3))

    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600, env=environment)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in (output / "log.txt").read_text()
