"""APGD-CE, APGD-DLR and APGD-T: step-size-free PGD with momentum.

Paper: Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks" (Algorithm 1, section 3). Initial step 2*eps; momentum alpha = 0.75; at the
checkpoints w_j the step is halved, and the run restarts from the best point, when
(1) the loss increased in fewer than rho * (w_j - w_{j-1}) of the steps since the last checkpoint, or
(2) the step was not halved at the last checkpoint and the best loss has not improved since.
APGD-T runs the targeted DLR loss against each of the top `n_target_classes` other classes
(capped at classes - 1), only on the samples no earlier target has fooled.
Parameters: `steps`, `restarts` (on samples not yet fooled), `loss` ("ce" | "dlr"), `rho`,
`n_target_classes` (APGD-T), `early_stop` (default true: a sample leaves the batch once fooled, so no
pass is spent on it; false: every sample runs all steps and keeps its highest-loss point).
Norms: linf and l2.
Cost: steps * restarts gradient evaluations per example (APGD-T: times n_target_classes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..threat import ThreatModel
from ._common import (
    LOSSES,
    AttackConfig,
    Best,
    LossFn,
    attack_entry,
    check_choice,
    check_float,
    check_int,
    check_threat,
    checked_logits,
    loss_and_grad,
    success,
    with_restarts,
)
from .registry import register

MOMENTUM = 0.75  # alpha in the paper
INITIAL_STEP = 2.0  # eta^(0) = 2 * eps


def checkpoints(steps: int) -> list[int]:
    """Iterations where the step size is reconsidered: w_j = ceil(p_j * steps), p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06). Returns w_1 < w_2 < ... <= steps (w_0 = 0 omitted)."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    # the tiny offset stops float noise (0.22 * 100 = 22.000000000000004) from rounding up
    return sorted({math.ceil(q * steps - 1e-9) for q in p[1:]} - {0})


def oscillating(increases: Tensor, window: int, rho: float) -> Tensor:
    """Condition 1: the loss went up in at most rho * window of the last `window` steps (AutoAttack's `<=`)."""
    return increases <= rho * window


def stalled(halved_last: Tensor, best_at_last_check: Tensor, best_now: Tensor) -> Tensor:
    """Condition 2: the step was not halved at the last checkpoint and the best loss has not improved."""
    return ~halved_last & (best_now <= best_at_last_check)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *[1] * (like.dim() - 1))


def _apgd_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    steps: int,
    loss_fn: LossFn,
    rho: float,
    generator: torch.Generator | None,
    loss_target: Tensor | None,
    success_target: Tensor | None,
    early_stop: bool = True,
) -> Best:
    """One APGD run from a random start (Algorithm 1): gradients at x_0..x_{steps-1}, a forward at x_steps.

    early_stop: a sample leaves the batch once it is fooled (its state is per sample, so the others'
    trajectories are unchanged); its result is the first fooling point instead of the highest-loss one
    over all steps, and no model pass is spent on it any more. False keeps every sample to the end."""
    x_cur = threat.random_start(x, generator)
    f_cur, logits, g = loss_and_grad(model, x_cur, y, loss_target, loss_fn, need_grad=True)
    best = Best(x_cur, f_cur, success(logits, y, success_target))  # what we return (the whole batch)
    x_max, g_max, f_max = x_cur, g, f_cur.clone()  # where APGD restarts from
    eta = torch.full((len(x),), INITIAL_STEP * threat.eps, dtype=x.dtype, device=x.device)
    x_prev = x_cur
    ckpts, j, last_ckpt = checkpoints(steps), 0, 0
    increases = torch.zeros(len(x), dtype=torch.long, device=x.device)
    # as AutoAttack's reduced_last_check: condition 2 cannot halve the step at the first checkpoint
    halved_last = torch.ones(len(x), dtype=torch.bool, device=x.device)
    f_max_last = f_max.clone()
    active = None  # indices into the batch of the samples still attacked (None: all of them)
    xs, ys, lt, st = x, y, loss_target, success_target
    for k in range(steps):  # iterate x_k -> x_{k+1}
        if early_stop:
            done = best.fooled if active is None else best.fooled[active]
            if bool(done.all()):
                break
            if bool(done.any()):  # shrink every per-sample state to the samples still robust
                keep = (~done).nonzero().flatten()
                active = keep if active is None else active[keep]
                xs, ys = x[active], y[active]
                lt = None if loss_target is None else loss_target[active]
                st = None if success_target is None else success_target[active]
                x_cur, x_prev, g, f_cur = x_cur[keep], x_prev[keep], g[keep], f_cur[keep]
                x_max, g_max, f_max, f_max_last = x_max[keep], g_max[keep], f_max[keep], f_max_last[keep]
                eta, increases, halved_last = eta[keep], increases[keep], halved_last[keep]
        z = threat.project(x_cur + threat.steepest_step(g, _bcast(eta, xs)), xs)
        a = 1.0 if k == 0 else MOMENTUM
        x_next = threat.project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev), xs)
        last = k == steps - 1  # the final iterate only needs a forward pass
        f_next, logits, g_next = loss_and_grad(model, x_next, ys, lt, loss_fn, need_grad=not last)
        fooled = success(logits, ys, st)
        if active is None:
            best.update(x_next, f_next, fooled)
        else:
            best.update_at(active, Best(x_next, f_next, fooled))
        increases += (f_next > f_cur).long()
        up = f_next > f_max
        x_max = torch.where(_bcast(up, xs), x_next, x_max)
        if g_next is not None:
            g_max = torch.where(_bcast(up, xs), g_next, g_max)
        f_max = torch.where(up, f_next, f_max)
        x_prev, x_cur, g, f_cur = x_cur, x_next, g_next, f_next
        if last or j >= len(ckpts) or k + 1 != ckpts[j]:
            continue
        halve = oscillating(increases, ckpts[j] - last_ckpt, rho) | stalled(halved_last, f_max_last, f_max)
        eta = torch.where(halve, eta / 2, eta)
        hb = _bcast(halve, xs)
        # restart the halved samples from their best point, without momentum
        x_cur = torch.where(hb, x_max, x_cur)
        x_prev = torch.where(hb, x_max, x_prev)
        g = torch.where(hb, g_max, g)
        f_cur = torch.where(halve, f_max, f_cur)
        halved_last, f_max_last, last_ckpt, j = halve, f_max.clone(), ckpts[j], j + 1
        increases.zero_()
    return best


@attack_entry("apgd")
def apgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 100,
    restarts: int = 1,
    loss: str = "ce",
    rho: float = 0.75,
    early_stop: bool = True,
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """APGD on `loss`, each sample's worst case over steps and restarts (restarts on survivors);
    early_stop: stop attacking a sample once it is fooled (see `_apgd_run`)."""
    loss_fn = LOSSES[loss]

    def run_once(xs: Tensor, ys: Tensor, ts: Tensor | None) -> Best:
        return _apgd_run(model, xs, ys, threat, steps, loss_fn, rho, generator, ts, ts, early_stop)

    return with_restarts(run_once, x, y, target, restarts).x.detach()


@attack_entry("apgd-t")
def apgd_targeted(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 100,
    restarts: int = 1,
    n_target_classes: int = 9,
    rho: float = 0.75,
    early_stop: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """APGD-T: targeted DLR towards the 2nd, 3rd, ... highest-scoring class, on survivors only (a model with
    fewer than 4 classes: targeted cross-entropy, as DLR's scale needs a 4th class)."""
    loss_fn = LOSSES["dlr"]
    best = None
    for rank in range(1, n_target_classes + 1):
        idx = torch.arange(len(x), device=x.device) if best is None else (~best.fooled).nonzero().flatten()
        if idx.numel() == 0:
            break
        xs, ys = x[idx], y[idx]
        with torch.no_grad():
            logits = checked_logits(model, xs, ys) if rank == 1 else model(xs)
        if rank == 1 and logits.shape[1] < 4:
            # targeted DLR divides by the gap to the 4th class: with 2 or 3 classes the targeted
            # cross-entropy steers towards each other class instead (the suite keeps its attacks)
            loss_fn = LOSSES["ce"]
        if rank >= logits.shape[1]:  # n_target_classes is capped at classes - 1
            break
        tgt = logits.argsort(dim=1, descending=True)[:, rank]

        # success stays untargeted: any misclassification counts, the target only steers the loss
        def run_once(xr: Tensor, yr: Tensor, tr: Tensor | None) -> Best:
            return _apgd_run(model, xr, yr, threat, steps, loss_fn, rho, generator, tr, None, early_stop)

        sub = with_restarts(run_once, xs, ys, tgt, restarts)
        if best is None:
            best = sub
        else:
            best.update_at(idx, sub)
    return best.x.detach()


@register("apgd-dlr", loss="dlr")
@register("apgd-ce", loss="ce")
@dataclass(frozen=True)
class APGD(AttackConfig):
    """APGD-CE (`apgd-ce`) or APGD-DLR (`apgd-dlr`); see the module docstring."""

    threat: ThreatModel
    steps: int = 100
    restarts: int = 1
    loss: str = "ce"
    rho: float = 0.75
    early_stop: bool = True  # evaluation: no pass on a sample once fooled; false: highest loss (training)

    function = staticmethod(apgd)
    spec_skip = ("loss",)

    def __post_init__(self) -> None:
        check_threat(self.threat, self.name, self.norms)
        check_choice("apgd loss", self.loss, ("ce", "dlr"))
        check_int(f"{self.name} steps", self.steps)
        check_int(f"{self.name} restarts", self.restarts)
        check_float(f"{self.name} rho", self.rho, high=1.0)

    @property
    def name(self) -> str:
        return f"apgd-{self.loss}"

    def grad_evals(self) -> int:
        return self.steps * self.restarts


@register("apgd-t")
@dataclass(frozen=True)
class APGDT(AttackConfig):
    """APGD-T (`apgd-t`): targeted DLR over the top classes; see the module docstring."""

    threat: ThreatModel
    steps: int = 100
    restarts: int = 1
    n_target_classes: int = 9
    rho: float = 0.75
    early_stop: bool = True

    name = "apgd-t"
    supports_target = False  # it picks its own targets
    function = staticmethod(apgd_targeted)

    def __post_init__(self) -> None:
        check_threat(self.threat, self.name, self.norms)
        check_int(f"{self.name} steps", self.steps)
        check_int(f"{self.name} restarts", self.restarts)
        check_int(f"{self.name} n_target_classes", self.n_target_classes)
        check_float(f"{self.name} rho", self.rho, high=1.0)

    def grad_evals(self) -> int:
        return self.steps * self.restarts * self.n_target_classes
