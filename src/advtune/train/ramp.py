"""The eps ramp of an objective that trains on an attack's examples (`--eps-warmup`): one home for the objectives'
`at(progress)` and the check of their warm-up share."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from ..errors import AdvtuneError

T = TypeVar("T")


def check_eps_warmup(eps_warmup: float) -> None:
    """An objective's eps warm-up is a share of training in [0, 1), refused in one line otherwise."""
    if isinstance(eps_warmup, bool) or not isinstance(eps_warmup, (int, float)) or not 0 <= eps_warmup < 1:
        raise AdvtuneError(f"--eps-warmup must be a share of training in [0, 1), got {eps_warmup}")


def ramped_attack(objective: T, progress: float) -> T:
    """`objective` (a dataclass with `attack` and `eps_warmup`) at a point of training (0..1): during the warm-up its
    attack's eps is scaled down linearly (MNIST at eps=0.3 does not start training from scratch otherwise)."""
    warmup = objective.eps_warmup  # type: ignore[attr-defined]
    if not warmup or progress >= warmup:
        return objective
    threat = objective.attack.threat  # type: ignore[attr-defined]
    eps = threat.eps * max(progress / warmup, 1e-3)
    attack = dataclasses.replace(objective.attack, threat=threat.with_eps(eps))  # type: ignore[attr-defined]
    return dataclasses.replace(objective, attack=attack)  # type: ignore[type-var]
