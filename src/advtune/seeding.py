"""Randomness, reproducibly: the global seeds, seeded generators and the per-batch and per-step streams
(derived from one seed, so results do not depend on batch order or the number of processes)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def seed_everything(seed: int | None) -> None:
    """Seed Python, NumPy and torch. Only entry points (CLI, experiment runner) call this."""
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """The caller's global random state (Python, NumPy, torch on the CPU and every CUDA device) as it was, after
    a block that seeds it for its own reproducibility (the API's analyze and harden run the commands' code)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator on `device`, or None when seed is None (recorded as nondeterministic)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def batch_generator(generator: torch.Generator | None, index: int, device=None) -> torch.Generator | None:
    """Batch `index`'s own random stream, derived from `generator` (None: the global RNG): work split
    over batches, or over processes, draws the same numbers however it is split."""
    if generator is None:
        return None
    return make_generator(derive_seed(generator.initial_seed(), "batch", index), device or generator.device)


def derive_seed(seed: int | None, *keys: int | str) -> int | None:
    """A stable sub-seed, e.g. derive_seed(seed, "epoch", 3): independent streams per purpose."""
    if seed is None:
        return None
    h = int(seed) & 0xFFFFFFFFFFFF
    for k in keys:
        for ch in str(k).encode():
            h = (h * 1000003 ^ ch) & 0xFFFFFFFFFFFF
        h = (h * 1000003 ^ 0x5F) & 0xFFFFFFFFFFFF
    return h


def sample_on(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where to draw random numbers: on the generator's device (the rule: sample there, then move)."""
    return generator.device if generator is not None else device
