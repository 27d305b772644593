"""FGSM and FGSM-RS: one gradient step.

Papers: Goodfellow et al. 2015, "Explaining and Harnessing Adversarial Examples" (FGSM);
Wong, Rice & Kolter 2020, "Fast is better than free" (FGSM-RS: uniform random start, step 1.25*eps).
Parameters: `random_start` (False: FGSM, True: FGSM-RS), `step_size` (alias `step`; None: eps for FGSM,
1.25*eps for FGSM-RS).
Norms: linf (sign of the gradient) and l2 (normalised gradient, a.k.a. FGM).
Cost: 1 gradient evaluation per example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..threat import ThreatModel
from ._common import (
    AttackConfig,
    attack_entry,
    ce_loss,
    check_float,
    check_threat,
    loss_and_grad,
)
from .registry import register


@attack_entry("fgsm")
def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    step_size: float | None = None,
    random_start: bool = False,
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One steepest-ascent step on the cross-entropy from x (or from a random start), projected.

    The single-step result is returned as is (no best-keeping): FGSM is the reference point that
    the masking gate compares iterative attacks against, and training recipes expect exactly it.
    """
    step = step_size
    if step is None:
        step = 1.25 * threat.eps if random_start else threat.eps
    x0 = threat.random_start(x, generator) if random_start else x
    _, _, grad = loss_and_grad(model, x0, y, target, ce_loss)
    return threat.project(x0 + threat.steepest_step(grad, step), x).detach()


@register("fgsm-rs", random_start=True)
@register("fgsm", random_start=False)
@dataclass(frozen=True)
class FGSM(AttackConfig):
    """FGSM (`fgsm`) or FGSM-RS (`fgsm-rs`); see the module docstring."""

    threat: ThreatModel
    random_start: bool = False
    step_size: float | None = None

    function = staticmethod(fgsm)
    spec_skip = ("random_start",)

    def __post_init__(self) -> None:
        check_threat(self.threat, self.name, self.norms)
        check_float(f"{self.name} step_size", self.step_size, allow_none=True)

    @property
    def name(self) -> str:
        return "fgsm-rs" if self.random_start else "fgsm"

    def grad_evals(self) -> int:
        return 1
