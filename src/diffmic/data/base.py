"""In-memory labelled image arrays: the common currency of every dataset reader.

Every reader (one per on-disk layout) returns a :class:`DataBundle` of uint8 image arrays at a fixed
size, so training never decodes files and augmentation runs on whole batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from diffmic.errors import DataError


@dataclass
class ImageArray:
    """One split: ``images`` uint8 (N, H, W, C) and ``labels`` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray
    ids: list[str] | None = None  # optional per-image identifiers (file names, rows)

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"images must be (N, H, W, C), got shape {self.images.shape}")
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise DataError(
                f"labels must be (N,) matching {len(self.images)} images, got shape {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DataBundle:
    """Train/val/test splits plus the class names; all splits share size and channels."""

    train: ImageArray
    val: ImageArray
    test: ImageArray
    class_names: list[str]
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[3])

    def split(self, name: str) -> ImageArray:
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split {name!r}; choose from ['train', 'val', 'test']")
        return getattr(self, name)


class ArrayDataset(Dataset):
    """A ``Dataset`` over an :class:`ImageArray`: yields (uint8 tensor (C, H, W), int label)."""

    def __init__(self, data: ImageArray) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(data.images)).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(data.labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


def check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
    """Raise a clear error if any label is outside [0, num_classes)."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(np.flatnonzero((labels < 0) | (labels >= num_classes))[0])
        raise DataError(
            f"{source}: label {int(labels[bad])} at row {bad} is out of range [0, {num_classes - 1}]"
        )
