"""A synthetic task a tiny CNN learns in seconds (tests, demos, docs): blobs in image quadrants."""

from __future__ import annotations

import logging

import torch

from .splits import Dataset, TensorData, channel_stats

log = logging.getLogger(__name__)


def synthetic_blobs(
    n: int,
    classes: int = 4,
    size: int = 16,
    channels: int = 1,
    generator: torch.Generator | None = None,
    noise: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A task a 2-conv CNN learns in seconds: the class is the image region holding a bright blob.

    Returns float32 images in [0,1] of shape (n, channels, size, size) and int64 labels.
    Regions are the quadrants (classes<=4) or vertical stripes (classes>4).
    """
    y = torch.randint(0, classes, (n,), generator=generator)
    x = noise * torch.rand(n, channels, size, size, generator=generator)
    half = size // 2
    blob = max(2, size // 4)
    for c in range(classes):
        idx = (y == c).nonzero().flatten()
        if len(idx) == 0:
            continue
        if classes <= 4:
            r0, c0 = (c // 2) * half, (c % 2) * half
            rr, cc = half - blob, half - blob
        else:
            width = size // classes
            r0, c0 = 0, c * width
            rr, cc = size - blob, max(width - blob, 0)
        # a random position of the blob inside the class's region
        dr = torch.randint(0, rr + 1, (len(idx),), generator=generator)
        dc = torch.randint(0, cc + 1, (len(idx),), generator=generator)
        for k, i in enumerate(idx.tolist()):
            r, q = r0 + int(dr[k]), c0 + int(dc[k])
            x[i, :, r : r + blob, q : q + blob] += 0.8
    return x.clamp_(0, 1), y


def synthetic_dataset(seed: int = 0, n_train: int = 2000, n_test: int = 500) -> Dataset:
    """`synthetic`: 1x16x16 blobs, 4 classes, for smoke tests and the CLI's offline examples."""
    g = torch.Generator().manual_seed(10_000 + seed)
    x, y = synthetic_blobs(n_train + n_test, generator=g)
    xu = (x * 255).round().to(torch.uint8)
    train, test = TensorData(xu[:n_train], y[:n_train]), TensorData(xu[n_train:], y[n_train:])
    mean, std = channel_stats(train.x)
    return Dataset(
        "synthetic", train, test, ["top-left", "top-right", "bottom-left", "bottom-right"], mean, std, "generated"
    )
