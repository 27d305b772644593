"""Data augmentation of training batches, on the batch's device, reproducibly.

`crop-flip` is CIFAR-10's standard (He et al. 2016, and the adversarial-training literature that
follows it: Madry et al., Rice et al.): zero-pad 4 pixels, take a random crop of the original size, flip
horizontally with probability 1/2. Pixels stay in [0, 1] (the padding is black), so the threat model's
box is unchanged. Each step draws from its own derived generator (see `fit`), so a resumed run augments
exactly as the uninterrupted one would. Not for digits: a flipped 2 is no 2.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ..errors import AdvtuneError
from .config import AUGMENTS

PAD = 4  # pixels of zero padding before the random crop


def check_augment(kind: str) -> str:
    if kind not in AUGMENTS:
        raise AdvtuneError(f"unknown augmentation {kind!r}; valid: {', '.join(AUGMENTS)}")
    return kind


def augment(x: Tensor, kind: str, generator: torch.Generator | None = None) -> Tensor:
    """`x` (N, C, H, W) augmented by `kind` ("none" returns it as it is)."""
    if check_augment(kind) == "none" or len(x) == 0:
        return x
    n, c, h, w = x.shape
    dev = generator.device if generator is not None else x.device
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=generator, device=dev).to(x.device)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=generator, device=dev).to(x.device)
    flip = torch.rand(n, generator=generator, device=dev).to(x.device) < 0.5
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (n, h): the crop's rows in the padded image
    cols = torch.arange(w, device=x.device)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)  # (n, w), mirrored where flipped
    index = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[index, channel, rows[:, None, :, None], cols[:, None, None, :]]
