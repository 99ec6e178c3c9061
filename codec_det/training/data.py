"""Image classification data for fine-tuning: ImageFolder splits, transforms, resumable sampling.

Every training sample gets its own augmentation seed, drawn from
``(seed, epoch)`` and the sample's position in the epoch. The augmentation of
a sample therefore does not depend on which worker process loads it or on
where a run was resumed. Together with an epoch order that depends only on
``(seed, epoch)``, this lets a run resumed in the middle of an epoch see the
same images with the same crops as an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms

from codec_det.training.distributed import DistributedContext

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataLayoutError",
    "train_transform",
    "val_transform",
    "check_image_folder",
    "load_image_folder",
    "SeededSampler",
    "SeededDataset",
    "build_train_loader",
    "build_val_loader",
    "build_image_folder_loaders",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataLayoutError(ValueError):
    """A data directory that is not in ImageFolder layout (``DIR/<split>/<class>/<image>``)."""


def train_transform(image_size: int = 224) -> transforms.Compose:
    """Build the standard ImageNet training augmentation: RandomResizedCrop, horizontal flip, normalisation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def val_transform(image_size: int = 224) -> transforms.Compose:
    """Build the standard ImageNet evaluation transform: resize to 256/224 of the crop, centre crop."""
    return transforms.Compose([
        transforms.Resize(round(image_size * 256 / 224)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


_LAYOUT_HINT = "expected ImageNet layout DIR/train/<class>/<image> and DIR/val/<class>/<image>"


def check_image_folder(root: str | os.PathLike, splits: tuple[str, ...] = ("train", "val")) -> list[str]:
    """Check that ``root`` contains each split as one folder per class, with the same classes.

    Returns:
        The sorted class names, as ``ImageFolder`` numbers them.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        DataLayoutError: a split folder is missing, contains images directly
            instead of class folders, or has other classes than the first split.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} not found; {_LAYOUT_HINT}")

    classes: list[str] | None = None
    for split in splits:
        folder = root / split
        if not folder.is_dir():
            raise DataLayoutError(f"data directory {root} has no {split}/ folder; {_LAYOUT_HINT}")
        split_classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
        loose_files = [entry.name for entry in os.scandir(folder) if entry.is_file()]
        if not split_classes:
            detail = f" but {len(loose_files)} loose files" if loose_files else ""
            raise DataLayoutError(
                f"{folder} has no class folders{detail}; sort its images into one folder per class "
                f"({_LAYOUT_HINT})"
            )
        if classes is None:
            classes = split_classes
        elif split_classes != classes:
            only_first = sorted(set(classes) - set(split_classes))[:5]
            only_here = sorted(set(split_classes) - set(classes))[:5]
            raise DataLayoutError(
                f"{folder} has other classes than {root / splits[0]}: missing {only_first}, extra {only_here}; "
                "both splits need the same class folders so that labels match"
            )
    return classes


def load_image_folder(root: str | os.PathLike, split: str, transform) -> datasets.ImageFolder:
    """Open ``root/split`` as a torchvision ``ImageFolder``, raising ``DataLayoutError`` when it has no images."""
    folder = Path(root) / split
    try:
        return datasets.ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as error:
        raise DataLayoutError(f"{folder} contains no readable images: {error}") from None


class SeededSampler(Sampler):
    """Shuffle per epoch, shard across ranks, and pair each index with an augmentation seed.

    Yields ``(index, seed)`` pairs for :class:`SeededDataset`. The order of an
    epoch depends only on ``(seed, epoch)``, as in ``DistributedSampler``;
    with ``pad`` the order is padded by repeating its head so that every rank
    gets the same number of samples. :meth:`set_start` skips the first samples
    of this rank's share, for resuming in the middle of an epoch.

    Args:
        size: number of samples in the dataset.
        shuffle: shuffle each epoch (training) or keep the dataset order.
        seed: base seed of the order and of the augmentation seeds.
        num_replicas: number of ranks the epoch is split over.
        rank: this process's rank.
        pad: repeat samples so that every rank gets ``ceil(size / num_replicas)``;
            without it the last ranks may get one sample fewer (evaluation).
    """

    def __init__(self, size: int, *, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 pad: bool = True):
        if size <= 0:
            raise ValueError(f"cannot sample from an empty dataset (size {size})")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.pad = pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch`` and start again from its first sample."""
        self.epoch = epoch
        self.start = 0

    def set_start(self, position: int) -> None:
        """Skip the first ``position`` samples of this rank's share of the current epoch."""
        if position < 0:
            raise ValueError(f"start position must be non-negative, got {position}")
        self.start = position

    def shard_size(self) -> int:
        """Return the number of samples this rank gets in a whole epoch."""
        if self.pad:
            return math.ceil(self.size / self.num_replicas)
        return len(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        return max(self.shard_size() - self.start, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.shuffle:
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        if self.pad:
            total = self.shard_size() * self.num_replicas
            repeats = math.ceil(total / self.size)
            order = order.repeat(repeats)[:total]
        # One seed per position of the padded order, drawn after the order so
        # that it is the same on every rank.
        sample_seeds = torch.randint(0, 2**62, (len(order),), generator=generator)

        positions = range(self.rank, len(order), self.num_replicas)[self.start:]
        for position in positions:
            yield int(order[position]), int(sample_seeds[position])


class SeededDataset(Dataset):
    """Wrap a dataset so that each ``(index, seed)`` key loads its sample with torch's RNG seeded by ``seed``.

    The CPU generator's state is restored afterwards, so loading in the main
    process (``num_workers=0``) leaves the training process's RNG untouched.
    Plain integer keys load without seeding (evaluation transforms draw no
    random numbers).

    NOTE: only torch's CPU generator is seeded; a transform that draws from
    Python's ``random`` or NumPy is not reproduced across resumptions.
    torchvision's ``transforms`` draw from torch's generator.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]):
        if isinstance(key, tuple):
            index, seed = key
            generator = torch.random.default_generator
            saved = generator.get_state()
            generator.manual_seed(seed)
            try:
                return self.dataset[index]
            finally:
                generator.set_state(saved)
        return self.dataset[key]


def _loader(dataset: Dataset, sampler: Sampler, *, batch_size: int, workers: int, drop_last: bool,
            context: DistributedContext, seed: int) -> DataLoader:
    # A private generator for the loader's base seed keeps the global RNG of
    # the training process out of data loading.
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        SeededDataset(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=context.device.type == "cuda",
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,
    )


def build_train_loader(dataset: Dataset, *, batch_size: int, workers: int = 4, seed: int = 0,
                       context: DistributedContext = DistributedContext()) -> DataLoader:
    """Build the shuffled, sharded, resumable training loader.

    ``batch_size`` is per process. The last incomplete batch of each epoch is
    dropped, so every step has ``batch_size`` samples (a batch of 1 breaks
    BatchNorm at 1x1 spatial size).

    Raises:
        ValueError: the dataset has fewer samples than one batch on every rank.
    """
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    if len(dataset) < batch_size * context.world_size:
        raise ValueError(
            f"the training set has {len(dataset)} images, fewer than one batch of {batch_size} "
            f"on each of {context.world_size} processes; lower --batch-size"
        )
    sampler = SeededSampler(len(dataset), shuffle=True, seed=seed, num_replicas=context.world_size,
                            rank=context.rank, pad=True)
    return _loader(dataset, sampler, batch_size=batch_size, workers=workers, drop_last=True,
                   context=context, seed=seed)


def build_val_loader(dataset: Dataset, *, batch_size: int, workers: int = 4,
                     context: DistributedContext = DistributedContext()) -> DataLoader:
    """Build the evaluation loader: dataset order, each image on exactly one rank, no padding."""
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    sampler = SeededSampler(len(dataset), shuffle=False, num_replicas=context.world_size, rank=context.rank,
                            pad=False)
    return _loader(dataset, sampler, batch_size=batch_size, workers=workers, drop_last=False,
                   context=context, seed=0)


def build_image_folder_loaders(root: str | os.PathLike, *, image_size: int = 224, batch_size: int = 64,
                               workers: int = 4, seed: int = 0,
                               context: DistributedContext = DistributedContext()
                               ) -> tuple[DataLoader, DataLoader, list[str]]:
    """Check ``root`` and build its training and validation loaders with the ImageNet transforms.

    Returns:
        ``(train_loader, val_loader, classes)``.
    """
    classes = check_image_folder(root)
    train_set = load_image_folder(root, "train", train_transform(image_size))
    val_set = load_image_folder(root, "val", val_transform(image_size))
    logger.info("data %s: %d training and %d validation images in %d classes", root, len(train_set),
                len(val_set), len(classes))
    train_loader = build_train_loader(train_set, batch_size=batch_size, workers=workers, seed=seed, context=context)
    val_loader = build_val_loader(val_set, batch_size=batch_size, workers=workers, context=context)
    return train_loader, val_loader, classes
