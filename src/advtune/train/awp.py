"""Adversarial weight perturbation (`awp[:gamma=..,steps=..,step_size=..]`), an objective of `objectives.py`.

Wu, Xia and Wang (NeurIPS 2020, "Adversarial weight perturbation helps robust generalization") tie the gap between
robust training and test accuracy to the flatness of the weight loss landscape and flatten it by training on the
loss at weights pushed uphill: each step crafts x_adv against the weights w as PGD training does, then moves every
weight tensor that trains by v = gamma * ||w|| * g / ||g|| (g: the gradient of the adversarial loss, one tensor at a
time, every conv and linear weight, as theirs), and takes the gradient of CE(f_{w+v}(x_adv), y) to update w.
The aim here (issue 21, RESULTS round 26): a 10% mask fits the adversarial training loss as well as the whole
network and generalises worse (round 22). The implementation is this project's own: the perturbed forward is a
`torch.func.functional_call` with w + v (v detached), so the model's weights are never modified in place and the
loop, masks and average see an ordinary loss; the pass that finds v runs on copies of the BatchNorm statistics,
so they move once per step as in PGD training. gamma 0 skips that pass (and its cost): PGD training exactly.

`rwp[:sigma=..,steps=..]` is its free cousin (round 42): the same weights pushed by random Gaussian noise instead,
each output filter's (row's) noise of norm about sigma times that filter's norm, drawn afresh every step from the
step's generator (Flat-LoRA, Li et al. ICML 2025, and random weight perturbation, Li et al. 2024, from memory: noise
on the whole network while only the adapters or mask train, to seek a flatter minimum for what trains). No pass finds
the noise, so it costs what PGD training costs; under torchrun each rank draws its own noise, as it draws its own
random starts (so N processes average N draws a step where one process takes one). BatchNorm's running statistics
are collected at the noisy weights, as AWP's at the pushed ones."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from ..attacks import build_attack
from ..devices import eval_mode
from ..distributed import rank_and_world
from ..errors import AdvtuneError
from ..seeding import sample_on
from .lowrank import ADAPTABLE
from .ramp import check_eps_warmup, ramped_attack

AWP_STEPS = 5  # PGD steps when the spec gives none: harden's training attack
AWP_GAMMA = 0.005  # Wu et al.'s size for PGD adversarial training
RWP_SIGMA = 0.05  # Flat-LoRA's order of size (from memory), ten times AWP's push: random noise is not uphill


def pushed_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every conv and linear weight, as Wu et al. push them, whatever trains: a frozen layer's too,
    and a low-rank adapted layer's base weight (the adapters themselves are not pushed; the push reaches them
    through the weight they add to)."""
    out = []
    for prefix, mod in model.named_modules():
        if not isinstance(mod, ADAPTABLE):
            continue
        if parametrize.is_parametrized(mod, "weight"):
            name, p = "parametrizations.weight.original", mod.parametrizations.weight.original
        else:
            name, p = "weight", mod.weight
        out.append((f"{prefix}.{name}" if prefix else name, p))
    return out


def weight_perturbation(model: nn.Module, x: torch.Tensor, y: torch.Tensor, gamma: float) -> dict[str, torch.Tensor]:
    """name -> w + v for each conv and linear weight (`pushed_weights`), v = gamma ||w|| g / ||g|| uphill on CE(f(x),
    y); v is detached, so a loss on these tensors back-propagates to w at the pushed point. The model's parameters
    and BatchNorm statistics are left as they were. Under torchrun g is the ranks' mean, as the update's is."""
    named = pushed_weights(model)
    if not named or gamma == 0:
        return {}
    leaves = {n: p if p.requires_grad else p.detach().requires_grad_(True) for n, p in named}
    stats = {n: b.clone() for n, b in model.named_buffers()}  # this pass must not move the running statistics
    with torch.enable_grad():
        loss = nn.functional.cross_entropy(functional_call(model, {**stats, **leaves}, (x,), strict=False), y)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g.detach() for (_, p), g in zip(named, grads)]
    _, world = rank_and_world()
    if world > 1:  # every rank pushes to the same point, so N processes train as one
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        grads = list(torch.split(flat.div_(world), [g.numel() for g in grads]))
    out = {}
    for (name, p), g in zip(named, grads):
        norm = g.norm()
        if not bool(torch.isfinite(norm)) or float(norm) == 0:  # a tensor the loss does not reach, or an overflow
            continue
        out[name] = p + (gamma * p.detach().norm() / norm * g.view_as(p)).detach()
    return out


def random_perturbation(model: nn.Module, sigma: float, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """name -> w + n for each conv and linear weight (`pushed_weights`): n Gaussian, scaled so that each output
    filter's noise has norm sigma times that filter's norm (a filter of zeros gets none); detached, as AWP's push.
    sigma 0 draws nothing (the generator's stream is PGD training's)."""
    if not sigma:
        return {}
    out = {}
    for name, p in pushed_weights(model):
        rows = p.detach().reshape(p.shape[0], -1)
        where = sample_on(generator, p.device)  # the generator's device, then moved (seeding's rule)
        noise = torch.randn(rows.shape, generator=generator, device=where, dtype=p.dtype).to(p.device)
        size = sigma * rows.norm(dim=1, keepdim=True) / noise.norm(dim=1, keepdim=True).clamp_min(1e-12)
        out[name] = p + (noise * size).view_as(p)
    return out


def loss_at_moved_weights(model, x, y, attack, generator, move) -> dict:
    """awp's and rwp's step: examples crafted at the weights w (eval mode), then CE at `move(x_adv)`'s weights (name
    -> tensor, detached moves; {} or None: w itself) through `functional_call`, never in place."""
    with eval_mode(model):
        x_adv = attack(model, x, y, generator=generator)
    moved = move(x_adv)
    logits = functional_call(model, moved, (x_adv,), strict=False) if moved else model(x_adv)
    return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits, "x_adv": x_adv}


def check_size(objective: str, name: str, value, what: str, example: float) -> None:
    """awp's gamma and rwp's sigma: a share of a weight's norm in [0, 1), refused in one line."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1 or math.isnan(value):
        raise AdvtuneError(f"{objective}: {name} ({what}) must be in [0, 1), e.g. {name}={example:g}; got {value!r}")


def check_gamma(gamma) -> None:
    check_size("awp", "gamma", gamma, "the weight perturbation's size relative to each tensor's norm", AWP_GAMMA)


@dataclass(frozen=True)
class WeightPerturbed:
    """PGD adversarial training on the loss at adversarially perturbed weights (module docstring). Costs the attack's
    gradient evaluations, one more for the pass that finds v (none at gamma 0), and the update's."""

    attack: Any
    gamma: float = AWP_GAMMA
    eps_warmup: float = 0.0
    name: str = "awp"

    def __post_init__(self) -> None:
        check_gamma(self.gamma)
        check_eps_warmup(self.eps_warmup)

    def at(self, progress: float) -> "WeightPerturbed":
        """During the warm-up the attack's eps is scaled down linearly, as for adversarial training."""
        return ramped_attack(self, progress)

    def __call__(self, model, x, y, *, generator=None):
        return loss_at_moved_weights(
            model, x, y, self.attack, generator, lambda x_adv: weight_perturbation(model, x_adv, y, self.gamma)
        )

    def attack_grad_evals(self) -> int:
        return int(self.attack.grad_evals()) + (1 if self.gamma else 0)  # the pass that finds the push

    def describe(self) -> dict:
        return {
            "objective": self.name,
            "attack": getattr(self.attack, "spec", repr(self.attack)),
            "threat": self.attack.threat.to_json(),
            "gamma": self.gamma,
            "eps_warmup": self.eps_warmup,
        }


@dataclass(frozen=True)
class NoisyWeights:
    """PGD adversarial training on the loss at randomly perturbed weights (module docstring: `rwp`). Costs what PGD
    training costs: the attack's gradient evaluations and the update's."""

    attack: Any
    sigma: float = RWP_SIGMA
    eps_warmup: float = 0.0
    name: str = "rwp"

    def __post_init__(self) -> None:
        check_sigma(self.sigma)
        check_eps_warmup(self.eps_warmup)

    def at(self, progress: float) -> "NoisyWeights":
        return ramped_attack(self, progress)

    def __call__(self, model, x, y, *, generator=None):
        return loss_at_moved_weights(
            model, x, y, self.attack, generator, lambda _: random_perturbation(model, self.sigma, generator)
        )

    def attack_grad_evals(self) -> int:
        return int(self.attack.grad_evals())

    def describe(self) -> dict:
        return {
            "objective": self.name,
            "attack": getattr(self.attack, "spec", repr(self.attack)),
            "threat": self.attack.threat.to_json(),
            "sigma": self.sigma,
            "eps_warmup": self.eps_warmup,
        }


def check_sigma(sigma) -> None:
    check_size("rwp", "sigma", sigma, "the noise's size relative to each filter's norm", RWP_SIGMA)


def training_attack(name: str, attack_mode: str, steps, step_size, random_start: bool):
    """The PGD attack of awp and rwp's examples, refused in one line where the spec cannot work."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise AdvtuneError(f"{name}: steps must be a positive number of PGD steps, got {steps!r}")
    if attack_mode != "eval":
        raise AdvtuneError(f"{name} crafts its examples with the model in eval mode; drop --attack-mode train")
    if step_size is not None and not 0 < step_size < math.inf:
        raise AdvtuneError(f"{name}: step_size must be > 0 (or left out: PGD's default), got {step_size!r}")
    kind = "pgd" if random_start else "bim"  # BIM: PGD from the clean input
    size = f",step_size={step_size}" if step_size is not None else ""
    return f"{kind}:steps={steps}{size}"


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
    random_start: bool = True,
) -> WeightPerturbed:
    """`awp[:gamma=..,steps=..,step_size=..,random_start=..]`: PGD training on the loss at adversarially perturbed
    weights (Wu et al. 2020); gamma 0 is PGD training step for step."""
    check_gamma(gamma)
    attack = build_attack(training_attack("awp", attack_mode, steps, step_size, random_start), threat)
    return WeightPerturbed(attack, float(gamma), eps_warmup)


build_awp.title = "AWP"  # type: ignore[attr-defined]


def build_rwp(
    threat,
    model,
    attack_mode,
    eps_warmup,
    /,
    *,
    sigma: float = RWP_SIGMA,
    steps: int = AWP_STEPS,
    step_size: float | None = None,
    random_start: bool = True,
) -> NoisyWeights:
    """`rwp[:sigma=..,steps=..,step_size=..,random_start=..]`: PGD training on the loss at randomly perturbed
    weights (each filter's noise sigma times its norm); sigma 0 is PGD training step for step."""
    check_sigma(sigma)
    attack = build_attack(training_attack("rwp", attack_mode, steps, step_size, random_start), threat)
    return NoisyWeights(attack, float(sigma), eps_warmup)


build_rwp.title = "RWP"  # type: ignore[attr-defined]
