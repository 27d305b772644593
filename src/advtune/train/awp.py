"""Adversarial weight perturbation (`awp[:gamma=..,steps=..,step_size=..]`), an objective of `objectives.py`.

Wu, Xia and Wang (NeurIPS 2020, "Adversarial weight perturbation helps robust generalization") tie the gap between
robust training and test accuracy to the flatness of the weight loss landscape and flatten it by training on the
loss at weights pushed uphill: each step crafts x_adv against the weights w as PGD training does, then moves every
weight tensor that trains by v = gamma * ||w|| * g / ||g|| (g: the gradient of the adversarial loss, one tensor at a
time, weight matrices and kernels only, as theirs), and takes the gradient of CE(f_{w+v}(x_adv), y) to update w.
The aim here (issue 21, RESULTS round 26): a 10% mask fits the adversarial training loss as well as the whole
network and generalises worse (round 22). The implementation is this project's own: the perturbed forward is a
`torch.func.functional_call` with w + v (v detached), so the model's weights are never modified in place and the
loop, masks and average see an ordinary loss; the pass that finds v runs on copies of the BatchNorm statistics,
so they move once per step as in PGD training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..attacks import build_attack
from ..devices import eval_mode
from ..errors import AdvtuneError
from .ramp import ramped_attack

AWP_STEPS = 5  # PGD steps when the spec gives none: harden's training attack
AWP_GAMMA = 0.005  # Wu et al.'s size for PGD adversarial training


def weight_perturbation(model: nn.Module, x: torch.Tensor, y: torch.Tensor, gamma: float) -> dict[str, torch.Tensor]:
    """name -> w + v for each weight tensor (dim > 1) that trains, v = gamma ||w|| g / ||g|| uphill on CE(f(x), y);
    v is detached, so a loss on these tensors back-propagates to w at the perturbed point. The model's parameters
    and BatchNorm statistics are left as they were."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
    if not named:
        return {}
    stats = {n: b.clone() for n, b in model.named_buffers()}  # this pass must not move the running statistics
    with torch.enable_grad():
        loss = nn.functional.cross_entropy(functional_call(model, stats, (x,), strict=False), y)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    out = {}
    for (name, p), g in zip(named, grads):
        if g is None:  # a tensor this loss does not reach
            continue
        scale = gamma * p.detach().norm() / (g.norm() + 1e-12)
        out[name] = p + (scale * g).detach()
    return out


def check_gamma(gamma) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma < 1 or math.isnan(gamma):
        raise AdvtuneError(
            f"awp: gamma (the weight perturbation's size relative to each tensor's norm) must be in [0, 1), e.g. "
            f"gamma=0.005; got {gamma!r}"
        )


@dataclass(frozen=True)
class WeightPerturbed:
    """PGD adversarial training on the loss at adversarially perturbed weights (module docstring). Costs the attack's
    gradient evaluations, one more for the pass that finds v, and the update's."""

    attack: Any
    gamma: float = AWP_GAMMA
    eps_warmup: float = 0.0
    name: str = "awp"

    def __post_init__(self) -> None:
        check_gamma(self.gamma)
        if not 0 <= self.eps_warmup < 1:
            raise AdvtuneError(f"eps warm-up must be a share of training in [0, 1), got {self.eps_warmup}")

    def at(self, progress: float) -> "WeightPerturbed":
        """During the warm-up the attack's eps is scaled down linearly, as for adversarial training."""
        return ramped_attack(self, progress)

    def __call__(self, model, x, y, *, generator=None):
        with eval_mode(model):
            x_adv = self.attack(model, x, y, generator=generator)
        perturbed = weight_perturbation(model, x_adv, y, self.gamma)
        logits = functional_call(model, perturbed, (x_adv,), strict=False) if perturbed else model(x_adv)
        return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits, "x_adv": x_adv}

    def attack_grad_evals(self) -> int:
        return int(self.attack.grad_evals()) + 1  # the pass that finds the weight perturbation

    def describe(self) -> dict:
        return {
            "objective": self.name,
            "attack": getattr(self.attack, "spec", repr(self.attack)),
            "threat": self.attack.threat.to_json(),
            "gamma": self.gamma,
            "eps_warmup": self.eps_warmup,
        }


def build_awp(
    threat,
    model,
    attack_mode,
    eps_warmup,
    /,
    *,
    gamma: float = AWP_GAMMA,
    steps: int = AWP_STEPS,
    step_size: float | None = None,
) -> WeightPerturbed:
    """`awp[:gamma=..,steps=..,step_size=..]`: PGD training on the loss at adversarially perturbed weights (Wu et al.
    2020); gamma 0 is PGD training step for step."""
    check_gamma(gamma)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise AdvtuneError(f"awp: steps must be a positive number of PGD steps, got {steps!r}")
    if attack_mode != "eval":
        raise AdvtuneError("awp crafts its examples with the model in eval mode; drop --attack-mode train")
    attack = build_attack(f"pgd:steps={steps}" + (f",step_size={step_size}" if step_size else ""), threat)
    return WeightPerturbed(attack, float(gamma), eps_warmup)


build_awp.title = "AWP"  # type: ignore[attr-defined]
