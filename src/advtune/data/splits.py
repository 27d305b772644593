"""Data held in memory: a split (`TensorData`: uint8 or float images, int64 labels, seeded batching
without per-sample Python) and a named `Dataset` (train/test/val splits, classes, channel statistics)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch

from ..errors import AdvtuneError

log = logging.getLogger(__name__)


@dataclass
class TensorData:
    """One split held in memory: x uint8 (N,C,H,W) (or float in [0,1]), y int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __repr__(self) -> str:  # not the pixels (print(ds) dumped thousands of characters of uint8)
        return f"TensorData({len(self)} x {tuple(self.x.shape[1:])} {str(self.x.dtype).removeprefix('torch.')})"

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise AdvtuneError(f"images must be N,C,H,W; got shape {tuple(self.x.shape)}")
        if len(self.x) != len(self.y):
            raise AdvtuneError(f"{len(self.x)} images but {len(self.y)} labels; they must match")
        if self.y.ndim != 1 or self.y.is_floating_point() or self.y.is_complex() or self.y.dtype == torch.bool:
            raise AdvtuneError(
                f"labels must be integer class indices of shape ({len(self.x)},), got {self.y.dtype} "
                f"{tuple(self.y.shape)}; whole numbers stored as floats: y.round().long(), one-hot rows: y.argmax(1)"
            )  # .long() here would truncate 1.7 to 1 without a word
        if self.x.dtype != torch.uint8 and not self.x.is_floating_point():
            raise AdvtuneError(f"images must be uint8 or floating point in [0, 1], got {self.x.dtype}")
        self.y = self.y.long()

    def __len__(self) -> int:
        return len(self.y)

    def take(self, n: int | None) -> "TensorData":
        """The first n examples (all when n is None)."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise AdvtuneError(f"limit must be positive, got {n}")
        return TensorData(self.x[:n], self.y[:n])

    def index(self, idx: torch.Tensor) -> "TensorData":
        return TensorData(self.x[idx], self.y[idx])

    def to_float(self, x: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        x = x.to(device) if device is not None else x
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def tensors(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as float [0,1] images and labels."""
        return self.to_float(self.x, device), self.y.to(device) if device is not None else self.y

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        device: torch.device | None = None,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Float [0,1] batches on `device`. One gather per batch: no per-sample Python.

        `start` skips the first batches (resume mid-epoch with the same permutation). With
        world_size > 1 each rank gets its own equal-sized shard of the (shared) permutation.
        """
        if batch_size <= 0:
            raise AdvtuneError(f"batch size must be positive, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        if world_size > 1:
            per_rank = n // world_size
            order = (
                order[rank * per_rank : (rank + 1) * per_rank] if not shuffle else order[rank::world_size][:per_rank]
            )
        count = num_batches(len(order), batch_size, drop_last)
        for b in range(start, count):
            idx = order[b * batch_size : (b + 1) * batch_size]
            yield self.to_float(self.x[idx], device), self.y[idx].to(device) if device is not None else self.y[idx]


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


@dataclass
class Dataset:
    """A named dataset: train/test splits, class names, per-channel statistics, where it came from."""

    name: str
    train: TensorData
    test: TensorData
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""
    val: TensorData | None = None
    notes: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split_validation(self, size: int | float, seed: int = 0) -> "Dataset":
        """Hold out `size` training examples (or a fraction) as a validation split, seeded."""
        n = len(self.train)
        k = int(round(size * n)) if isinstance(size, float) and size < 1 else int(size)
        if k <= 0 < size:  # a share that rounds to no example: no split at all was made without a word
            raise AdvtuneError(
                f"--val {size:g} of {n} training examples holds out none; give a larger share, or a count"
            )
        if k <= 0:
            return self
        if k >= n:
            raise AdvtuneError(f"validation size {k} leaves no training data (train has {n}); use a smaller --val")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return replace(
            self, train=self.train.index(perm[k:].sort().values), val=self.train.index(perm[:k].sort().values)
        )

    def limit(self, train: int | None = None, test: int | None = None) -> "Dataset":
        return replace(self, train=self.train.take(train), test=self.test.take(test))

    def __repr__(self) -> str:
        val = f", val={len(self.val)}" if self.val is not None else ""
        test = len(self.test) if self.test is not None else None  # (harden's in-memory dataset may have none)
        return (
            f"Dataset({self.name!r}, train={len(self.train)}, test={test}{val}, "
            f"input_shape={self.input_shape}, classes={len(self.classes)})"
        )

    def describe(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "input_shape": list(self.input_shape),
            "classes": self.classes,
            "train": len(self.train),
            "test": len(self.test),
            "val": len(self.val) if self.val is not None else 0,
            **({"order": self.notes["order"]} if "order" in self.notes else {}),  # an image folder's reading order
            **({"images": self.notes["images"]} if "images" in self.notes else {}),  # and its training images then
        }


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0,1] units (computed in chunks)."""
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(x), 4096):
        chunk = x[i : i + 4096].double() / 255.0
        s += chunk.sum((0, 2, 3))
        s2 += (chunk**2).sum((0, 2, 3))
    n = max(1, len(x) * x.shape[2] * x.shape[3])
    mean = s / n
    std = (s2 / n - mean**2).clamp_min(1e-12).sqrt()
    # floored at one grey level: a constant channel (an opaque alpha) rounded to 0.0 and Normalize divided by it
    return tuple(round(float(v), 4) for v in mean), tuple(max(round(float(v), 4), STD_FLOOR) for v in std)


STD_FLOOR = 0.0039  # ~1/255
