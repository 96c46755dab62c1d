"""The two tasks: where their data lives, which net they train, their recipe and their serving defaults."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from training.augment import random_affine_digits, random_photo_view
from training.mnist import DataFileError, load_mnist_split
from training.nets import (
    DigitNet,
    DigitNetConfig,
    EfficientNetLite0,
    FeatureNet,
    NormalizeImage,
    PixelClassifier,
    imagenet_state_dict,
)
from training.photos import CLASS_NAMES, Photo, decode_photo, load_photo_set, resize_center_crop
from training.repository import Batching, ServingConfig

__all__ = ["TASKS", "Batches", "Recipe", "Task", "TaskData"]


class Batches(Protocol):
    """Training batches of one epoch: (uint8 ``[B, H, W, C]`` images, ``[B]`` labels), and how many there are."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


_DRY_RUN_TRAIN, _DRY_RUN_EVAL = 32, 32  # images per split in --dry-run


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings. The backbone learns at ``backbone_lr_scale`` times the head's rate. With
    ``linear_probe_l2`` set, the head is first fitted alone on frozen features with that L2 penalty."""

    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    label_smoothing: float
    warmup_fraction: float = 0.05
    backbone_lr_scale: float = 1.0
    linear_probe_l2: float | None = None
    freeze_batchnorm: bool = False
    ema_decay: float | None = None


@dataclass
class TaskData:
    """Loaded data: labelled uint8 NHWC arrays per evaluation split, the training set and the files read."""

    eval_splits: dict[str, tuple[np.ndarray, np.ndarray]]
    train_batches: Callable[[int, torch.device, torch.Generator], Batches]
    files: list[Path]
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Task:
    """Everything that differs between the digit and the photo classifier."""

    name: str
    labels: tuple[str, ...]
    input_dims: tuple[int, int, int]  # H, W, C
    normalize: tuple[float, float]  # mean, std applied to raw 0..255 pixels inside the graph
    recipe: Recipe
    batching: Batching
    build_net: Callable[[], FeatureNet]
    load: Callable[[Path, bool], TaskData]
    test_split: str
    gpu_fp16: bool = False  # served in float16 on the GPU: only where held-out accuracy stays within 0.2 points

    @property
    def serving(self) -> ServingConfig:
        return ServingConfig(self.name, self.input_dims, self.labels, self.batching, gpu_fp16=self.gpu_fp16)

    def build_classifier(self) -> PixelClassifier:
        """Raw uint8 NHWC pixels in, logits out."""
        return PixelClassifier(NormalizeImage(*self.normalize), self.build_net())


# --- digits -------------------------------------------------------------------------------------------------


class _DeviceBatches:
    """Shuffled, augmented batches of a dataset that fits on the device (MNIST is 47 MB)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator):
        self.images, self.labels, self.batch_size, self.generator = images, labels, batch_size, generator

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.labels), generator=self.generator).to(self.images.device)
        for step in range(len(self)):
            index = order[step * self.batch_size : (step + 1) * self.batch_size]
            yield random_affine_digits(self.images[index]), self.labels[index]


def _load_digits(data_dir: Path, dry_run: bool) -> TaskData:
    folder = data_dir / "mnist" if (data_dir / "mnist").is_dir() else data_dir
    train, test = load_mnist_split(folder, "train"), load_mnist_split(folder, "test")
    train_limit, test_limit = (_DRY_RUN_TRAIN, _DRY_RUN_EVAL) if dry_run else (None, None)
    train_images, train_labels = train.images[:train_limit, :, :, None], train.labels[:train_limit]
    test_images, test_labels = test.images[:test_limit, :, :, None], test.labels[:test_limit]

    def batches(batch_size: int, device: torch.device, generator: torch.Generator) -> Batches:
        images = torch.from_numpy(train_images.copy()).to(device)
        labels = torch.from_numpy(train_labels.astype(np.int64)).to(device)
        return _DeviceBatches(images, labels, batch_size, generator)

    return TaskData(
        eval_splits={"train": (train_images, train_labels), "test": (test_images, test_labels)},
        train_batches=batches,
        files=[*train.files, *test.files],
    )


# --- catdog -------------------------------------------------------------------------------------------------


class _PhotoViews(Dataset[tuple[np.ndarray, int]]):
    """Random augmented views of encoded photos, decoded in the loader's worker processes."""

    def __init__(self, photos: list[Photo], size: int) -> None:
        self.photos, self.size = photos, size

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        photo = self.photos[index]
        return random_photo_view(decode_photo(photo.data), self.size), photo.label


def _center_views(photos: list[Photo], size: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([np.asarray(resize_center_crop(decode_photo(p.data), size)) for p in photos])
    return images, np.array([p.label for p in photos], dtype=np.uint8)


def _find_photo_set(data_dir: Path) -> Path:
    folder = data_dir / "catdog" if (data_dir / "catdog").is_dir() else data_dir
    if (folder / "train").is_dir():
        return folder
    zips = sorted(folder.glob("*.zip"))
    if len(zips) != 1:
        raise DataFileError(f"{folder}: expected train/ and val/ folders or exactly one .zip, found {len(zips)} zips")
    return zips[0]


def _load_catdog(data_dir: Path, dry_run: bool) -> TaskData:
    source = _find_photo_set(data_dir)
    photo_set = load_photo_set(source)
    train, val = photo_set.splits["train"], photo_set.splits["val"]
    if dry_run:  # a few of each class
        half_train, half_eval = _DRY_RUN_TRAIN // 2, _DRY_RUN_EVAL // 2
        train = [p for c in (0, 1) for p in [q for q in train if q.label == c][:half_train]]
        val = [p for c in (0, 1) for p in [q for q in val if q.label == c][:half_eval]]
    size = 224

    def batches(batch_size: int, device: torch.device, generator: torch.Generator) -> Batches:
        workers = 0 if dry_run else min(12, os.cpu_count() or 1)
        return DataLoader(
            _PhotoViews(train, size),
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            generator=generator,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )

    return TaskData(
        eval_splits={"train": _center_views(train, size), "val": _center_views(val, size)},
        train_batches=batches,
        files=[source],
        skipped=photo_set.skipped,
    )


def _pretrained_lite0() -> FeatureNet:
    net = EfficientNetLite0()
    net.load_state_dict(imagenet_state_dict(), strict=True)
    net.replace_classifier(len(CLASS_NAMES))
    return net


TASKS: dict[str, Task] = {
    "digits": Task(
        name="digits",
        labels=tuple(str(d) for d in range(10)),
        input_dims=(28, 28, 1),
        normalize=(0.1307 * 255, 0.3081 * 255),  # MNIST's pixel mean and standard deviation
        recipe=Recipe(epochs=20, batch_size=256, learning_rate=3e-3, weight_decay=5e-4, label_smoothing=0.05),
        # No queue delay: under load a batch is whatever queued while the last one ran (benchmarks/BENCHMARKS.md).
        batching=Batching(max_batch_size=1024, max_queue_delay_microseconds=0, max_queue_size=8192),
        build_net=lambda: DigitNet(DigitNetConfig()),
        load=_load_digits,
        test_split="test",
    ),
    "catdog": Task(
        name="catdog",
        labels=CLASS_NAMES,
        input_dims=(224, 224, 3),
        normalize=(127.0, 128.0),  # the scaling the ImageNet weights were trained with
        recipe=Recipe(
            epochs=6,
            batch_size=64,
            learning_rate=3e-4,
            weight_decay=1e-2,
            label_smoothing=0.0,
            backbone_lr_scale=0.1,
            linear_probe_l2=5e-4,
            freeze_batchnorm=True,
            ema_decay=0.99,
        ),
        # Two instances, two runs in flight on the GPU: 11-24% more images/s than one (benchmarks/BENCHMARKS.md).
        batching=Batching(max_batch_size=128, max_queue_delay_microseconds=0, max_queue_size=1024, instance_count=2),
        build_net=_pretrained_lite0,
        load=_load_catdog,
        test_split="val",
        # FP16 on the GPU: 0.9940 held-out accuracy as in FP32, more images/s (benchmarks/BENCHMARKS.md).
        gpu_fp16=True,
    ),
}
