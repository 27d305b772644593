"""PGD, BIM and MI-FGSM: iterated gradient steps projected onto the threat model.

Papers: Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks" (PGD:
random start, restarts); Kurakin et al. 2017, "Adversarial examples in the physical world"
(BIM / I-FGSM: PGD without random start); Dong et al. 2018, "Boosting Adversarial Attacks with
Momentum" (MI-FGSM: accumulate L1-normalised gradients with decay mu).
Parameters: `steps`, `step_size` (None: 2.5*eps/steps for PGD/BIM, eps/steps for MI-FGSM),
`restarts` (PGD only; restarts run on samples not yet fooled), `loss` ("ce", "dlr", "margin"),
`decay` (MI-FGSM).
Norms: linf and l2 (the step direction comes from `ThreatModel.steepest_step`).
Cost: steps * restarts gradient evaluations per example (+1 forward per run for the last iterate).
Every iterate is a candidate: each sample keeps its worst case over steps and restarts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import AdvtuneError
from ..threat import ThreatModel
from ._common import (
    LOSSES,
    AttackConfig,
    Best,
    attack_entry,
    check_choice,
    check_float,
    check_int,
    check_threat,
    loss_and_grad,
    success,
    with_restarts,
)
from .registry import register


def _iterate(model, x, y, target, threat, steps, loss_fn, x_start, step_fn) -> Best:
    """Shared loop: evaluate the iterate (a best-keeping candidate), then step. `step_fn(x_adv, grad)`."""
    x_adv, best = x_start, None
    for i in range(steps + 1):
        last = i == steps  # the final iterate only needs a forward pass
        loss, logits, grad = loss_and_grad(model, x_adv, y, target, loss_fn, need_grad=not last)
        fooled = success(logits, y, target)
        if best is None:
            best = Best(x_adv, loss, fooled)
        else:
            best.update(x_adv, loss, fooled)
        if not last:
            x_adv = threat.project(step_fn(x_adv, grad), x)
    return best


@attack_entry("pgd")
def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 10,
    step_size: float | None = None,
    restarts: int = 1,
    loss: str = "ce",
    random_start: bool = True,
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient ascent on `loss`; returns each sample's worst case over steps and restarts."""
    alpha = 2.5 * threat.eps / steps if step_size is None else step_size
    loss_fn = LOSSES[loss]

    def run_once(xs: Tensor, ys: Tensor, ts: Tensor | None) -> Best:
        start = threat.random_start(xs, generator) if random_start else xs
        return _iterate(
            model, xs, ys, ts, threat, steps, loss_fn, start, lambda xa, g: xa + threat.steepest_step(g, alpha)
        )

    return with_restarts(run_once, x, y, target, restarts).x.detach()


@attack_entry("mifgsm")
def mifgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 10,
    step_size: float | None = None,
    decay: float = 1.0,
    loss: str = "ce",
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Momentum iterative FGSM: g <- decay*g + grad/||grad||_1, step along `steepest_step(g)`."""
    alpha = threat.eps / steps if step_size is None else step_size
    momentum = torch.zeros_like(x)

    def step(x_adv: Tensor, grad: Tensor) -> Tensor:
        nonlocal momentum
        g = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        l1 = g.abs().flatten(1).sum(1).view(-1, *[1] * (g.dim() - 1))
        momentum = decay * momentum + g / (l1 + 1e-12)  # L1 normalisation makes steps comparable
        return x_adv + threat.steepest_step(momentum, alpha)

    return _iterate(model, x, y, target, threat, steps, LOSSES[loss], x, step).x.detach()


def _check_common(obj, name: str) -> None:
    check_threat(obj.threat, name, obj.norms)
    check_int(f"{name} steps", obj.steps)
    check_float(f"{name} step_size", obj.step_size, allow_none=True)
    check_choice(f"{name} loss", obj.loss, tuple(LOSSES))


@register("pgd", random_start=True)
@register("bim", random_start=False, restarts=1)
@dataclass(frozen=True)
class PGD(AttackConfig):
    """PGD (`pgd`, random start) or BIM / I-FGSM (`bim`, `random_start=False`); see the module docstring."""

    threat: ThreatModel
    steps: int = 10
    step_size: float | None = None
    restarts: int = 1
    loss: str = "ce"
    random_start: bool = True

    function = staticmethod(pgd)
    spec_skip = ("random_start",)

    def __post_init__(self) -> None:
        _check_common(self, self.name)
        check_int(f"{self.name} restarts", self.restarts)
        if not self.random_start and self.restarts > 1:
            raise AdvtuneError(
                "bim has no random start, so restarts would repeat the same run; use pgd:restarts=N instead"
            )

    @property
    def name(self) -> str:
        return "pgd" if self.random_start else "bim"

    def grad_evals(self) -> int:
        return self.steps * self.restarts


@register("mifgsm")
@dataclass(frozen=True)
class MIFGSM(AttackConfig):
    """MI-FGSM (`mifgsm`); see the module docstring."""

    threat: ThreatModel
    steps: int = 10
    step_size: float | None = None
    decay: float = 1.0
    loss: str = "ce"

    name = "mifgsm"
    function = staticmethod(mifgsm)

    def __post_init__(self) -> None:
        _check_common(self, self.name)
        check_float(f"{self.name} decay", self.decay, low_inclusive=True)

    def grad_evals(self) -> int:
        return self.steps
