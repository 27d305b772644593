"""Shared pieces of the attacks: losses, the input gradient, best-keeping, restarts on survivors.

Conventions every attack follows (DESIGN.md, "Attacks are pure"):
- gradients w.r.t. the input only, via `torch.autograd.grad` under `torch.enable_grad()`;
  parameters' `.grad` and `model.training` are never touched, the input is never mutated;
- every loss here is per sample and is *maximised* by the attacker (targeted losses are negated);
- the result is detached and has the input's shape, dtype and device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from typing import Callable, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..devices import out_of_memory
from ..errors import AdvtuneError
from ..threat import ThreatModel

LossFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


@runtime_checkable
class Attack(Protocol):
    """What `evaluate` and `train` rely on: a callable, immutable configuration."""

    threat: ThreatModel

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        generator: torch.Generator | None = None,
        target: Tensor | None = None,
    ) -> Tensor: ...

    def grad_evals(self) -> int: ...

    @property
    def spec(self) -> str: ...


# ------------------------------------------------------------------ losses (maximised)


def ce_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Cross-entropy of the true class; targeted: minus the cross-entropy of the target."""
    if target is None:
        return F.cross_entropy(logits, y, reduction="none")
    return -F.cross_entropy(logits, target, reduction="none")


def _need_classes(logits: Tensor, k: int, what: str) -> None:
    if logits.shape[1] < k:
        raise AdvtuneError(
            f"{what} needs a model with at least {k} classes, this one has {logits.shape[1]}; "
            "use the 'ce' loss (e.g. apgd-ce or pgd) instead"
        )


def dlr_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020, eq. 6): shift- and scale-invariant margin.

    untargeted: -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)
    targeted:   -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    """
    zs, order = logits.sort(dim=1, descending=True)
    z_y = logits.gather(1, y[:, None])[:, 0]
    if target is None:
        _need_classes(logits, 3, "the DLR loss")
        top_is_y = order[:, 0] == y
        z_other = torch.where(top_is_y, zs[:, 1], zs[:, 0])
        return -(z_y - z_other) / (zs[:, 0] - zs[:, 2] + 1e-12)
    _need_classes(logits, 4, "the targeted DLR loss")
    z_t = logits.gather(1, target[:, None])[:, 0]
    return -(z_y - z_t) / (zs[:, 0] - 0.5 * (zs[:, 2] + zs[:, 3]) + 1e-12)


def margin(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """How far the attack is from success (<0 means success): z_y - max_{i!=y} z_i, or max_{i!=t} z_i - z_t."""
    cls = y if target is None else target
    z_c = logits.gather(1, cls[:, None])[:, 0]
    others = logits.scatter(1, cls[:, None], float("-inf")).amax(dim=1)
    return z_c - others if target is None else others - z_c


def margin_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """The Carlini-Wagner style margin, negated so that larger is better for the attacker."""
    return -margin(logits, y, target)


LOSSES: dict[str, LossFn] = {"ce": ce_loss, "dlr": dlr_loss, "margin": margin_loss}


def success(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Per-sample bool: misclassified (untargeted) or classified as the target (targeted)."""
    pred = logits.argmax(dim=1)
    return pred != y if target is None else pred == target


# ------------------------------------------------------------------ gradient


def loss_and_grad(
    model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, loss_fn: LossFn, need_grad: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(per-sample loss, logits, d loss / d x) with autograd w.r.t. the input only.

    `torch.autograd.grad(..., [x])` skips the weight gradients that `loss.backward()` would compute
    (20-30% of a step) and never writes to `.grad`. With `need_grad=False` it is a plain forward
    (used for the final iterate, whose gradient would be thrown away).
    """
    if not need_grad:
        with torch.no_grad():
            logits = checked_logits(model, x, y, target)
            return loss_fn(logits, y, target).detach(), logits.detach(), None
    with torch.enable_grad():
        x_var = x.detach().requires_grad_(True)
        logits = checked_logits(model, x_var, y, target)
        loss = loss_fn(logits, y, target)
        (grad,) = torch.autograd.grad(loss.sum(), [x_var])
    return loss.detach(), logits.detach(), grad.detach()


# ------------------------------------------------------------------ best-keeping


def _bcast(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *[1] * (like.dim() - 1))


class Best:
    """Per sample, the worst case found so far: successful beats unsuccessful, then higher loss wins.

    Keeping the highest loss among successful points (not just the first success) also makes the
    result useful for adversarial training, where the loss value matters.
    """

    def __init__(self, x: Tensor, loss: Tensor, fooled: Tensor):
        self.x, self.loss, self.fooled = x.detach().clone(), loss.detach().clone(), fooled.clone()

    def update(self, x: Tensor, loss: Tensor, fooled: Tensor) -> None:
        better = (fooled & ~self.fooled) | ((fooled == self.fooled) & (loss > self.loss))
        self.x = torch.where(_bcast(better, x), x.detach(), self.x)
        self.loss = torch.where(better, loss, self.loss)
        self.fooled = self.fooled | fooled

    def update_at(self, idx: Tensor, other: "Best") -> None:
        """Merge the result of a run on the subset `idx` (restarts run on survivors only)."""
        sub = Best(self.x[idx], self.loss[idx], self.fooled[idx])
        sub.update(other.x, other.loss, other.fooled)
        self.x[idx], self.loss[idx], self.fooled[idx] = sub.x, sub.loss, sub.fooled


def with_restarts(
    run_once: Callable[[Tensor, Tensor, "Tensor | None"], Best],
    x: Tensor,
    y: Tensor,
    target: Tensor | None,
    restarts: int,
) -> Best:
    """Run `run_once` on all samples, then `restarts - 1` more times on the samples not yet fooled."""
    best = run_once(x, y, target)
    for _ in range(restarts - 1):
        idx = (~best.fooled).nonzero().flatten()
        if idx.numel() == 0:
            break
        best.update_at(idx, run_once(x[idx], y[idx], None if target is None else target[idx]))
    return best


# ------------------------------------------------------------------ validation


def check_call(x: Tensor, y: Tensor, target: Tensor | None, name: str) -> None:
    """Cheap checks at every attack call (`evaluate` validates data more thoroughly)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise AdvtuneError(
            f"{name}: x must be a floating-point tensor in pixel space, got "
            f"{getattr(x, 'dtype', type(x).__name__)}; divide uint8 images by 255"
        )
    if x.dim() < 2:
        raise AdvtuneError(f"{name}: x must be a batch (N, ...), got shape {tuple(x.shape)}; add x[None]")
    for t, what in ((y, "y"), (target, "target")):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dim() != 1 or len(t) != len(x) or t.is_floating_point():
            raise AdvtuneError(
                f"{name}: {what} must be an integer tensor of shape ({len(x)},), got "
                f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}"
            )


def check_inputs(
    model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, threat: ThreatModel, generator, name: str
) -> None:
    """The API boundary of every attack: what a person can get wrong, as one-line AdvtuneErrors."""
    check_call(x, y, target, name)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise AdvtuneError(
            f"{name}: generator must be a torch.Generator (or None), got {type(generator).__name__}; "
            "e.g. torch.Generator().manual_seed(0)"
        )
    p = next(model.parameters(), None)
    if p is not None and x.device != p.device:
        raise AdvtuneError(
            f"{name}: x is on {x.device} but the model is on {p.device}; move x with x.to({str(p.device)!r})"
        )
    if p is not None and p.is_floating_point() and x.dtype != p.dtype:
        raise AdvtuneError(f"{name}: x is {x.dtype} but the model is {p.dtype}; convert x with x.to({p.dtype})")
    for t, what in ((y, "y"), (target, "target")):
        if t is not None and t.device != x.device:
            raise AdvtuneError(f"{name}: {what} is on {t.device} but x on {x.device}; move it with {what}.to(x.device)")
    if len(x) == 0:
        return
    if not bool(torch.isfinite(x).all()):
        raise AdvtuneError(f"{name}: x contains NaN or inf; clean the data first")
    lo, hi = float(x.min()), float(x.max())
    if lo < threat.lower - 1e-6 or hi > threat.upper + 1e-6:
        raise AdvtuneError(
            f"{name}: x must lie in [{threat.lower:g}, {threat.upper:g}] (pixel space; normalisation is "
            f"the model's first layer), got values in [{lo:.4g}, {hi:.4g}]; undo the normalisation or "
            "divide by 255"
        )
    if int(y.min()) < 0:
        raise AdvtuneError(f"{name}: labels must be class indices >= 0, got {int(y.min())}")


def logits_of(model: nn.Module, x: Tensor) -> Tensor:
    """model(x), with the mistakes that would surface deep inside torch turned into one-line errors:
    inputs the model cannot take (channels, size) and outputs that are not (N, classes) logits."""
    try:
        out = model(x)
    except TypeError as e:  # forward(self, x, mask): the evaluation and training call model(x) alone
        try:
            inspect.signature(model.forward).bind(x)
        except (TypeError, ValueError):
            pass  # the call itself is what failed
        else:
            raise  # raised inside the forward: the model's own error (the CLI names its line)
        raise AdvtuneError(
            f"the model's forward needs more than the inputs ({str(e).strip()[:120]}); wrap it in a module whose "
            "forward(x) supplies the rest"
        ) from None
    except RuntimeError as e:
        if out_of_memory(e):  # not the input's fault: the evaluation retries with fewer examples
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdvtuneError(
            f"the model cannot take inputs of shape {tuple(x.shape[1:])}: {first[:160]}; "
            "check the channels and image size the model was built for"
        ) from None
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != len(x):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        fix = "return the logits tensor alone" if isinstance(out, (tuple, list, dict)) else "keep the batch dimension"
        raise AdvtuneError(
            f"the model must return logits of shape (N, classes), one row per input, got {got} for {len(x)} "
            f"inputs; {fix} in its forward"
        )
    if out.shape[1] < 2:  # APGD-T crashed on it, training learned nothing at a loss of 0
        raise AdvtuneError(
            f"the model returns {out.shape[1]} output per example; classification needs (N, classes) logits with at "
            "least 2 classes (a binary task: 2 outputs, not one sigmoid logit)"
        )
    return out


def checked_logits(model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """:func:`logits_of`, and labels (and targets) that fit the model's number of outputs."""
    out = logits_of(model, x)
    for t, what in ((y, "labels"), (target, "targets")):
        if t is not None and len(t) and int(t.max()) >= out.shape[1]:
            raise AdvtuneError(
                f"{what} must be in [0, {out.shape[1] - 1}] for a model with {out.shape[1]} outputs, got {int(t.max())}"
            )
    return out


@contextlib.contextmanager
def preserved_buffers(model: nn.Module):
    """Attacks are pure: a model in train mode runs the attack with batch statistics, as the caller
    chose, but its BatchNorm running statistics are put back afterwards."""
    from torch.nn.modules.batchnorm import _NormBase  # BatchNorm and InstanceNorm with running statistics

    bns = [m for m in model.modules() if isinstance(m, _NormBase) and m.training and m.track_running_stats]
    saved = [
        [b.detach().clone() if b is not None else None for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
        for m in bns
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(bns, saved):
                for buf, old in ((m.running_mean, mean), (m.running_var, var), (m.num_batches_tracked, count)):
                    if buf is not None and old is not None:
                        buf.copy_(old)


def attack_entry(name: str, *, images: bool = False):
    """Decorator for an attack's functional entry point `fn(model, x, y, threat, ..., target=, generator=)`:
    validates the call (check_inputs; `images`: x must be (N, C, H, W)), keeps the model's buffers as
    they were (preserved_buffers), answers an empty batch itself and hands `fn` a detached, non-empty x."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(model, x, y, threat, *args, **kwargs):
            if not isinstance(model, nn.Module):
                raise AdvtuneError(f"{name}: model must be a torch.nn.Module, got {type(model).__name__}")
            with preserved_buffers(model):
                check_inputs(model, x, y, kwargs.get("target"), threat, kwargs.get("generator"), name)
                if images and x.dim() != 4:
                    raise AdvtuneError(
                        f"{name} needs images (N, C, H, W), got shape {tuple(x.shape)}; use pgd or apgd-ce"
                    )
                x, y = x.detach(), y.long()  # int32 labels (a common dataset dtype): the loss needs int64
                if isinstance(kwargs.get("target"), Tensor):
                    kwargs["target"] = kwargs["target"].long()
                if len(x) == 0:
                    return x.clone()
                return fn(model, x, y, threat, *args, **kwargs)

        return wrapper

    return deco


def check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AdvtuneError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_float(
    name: str, value, *, low: float = 0.0, high: float = math.inf, allow_none: bool = False, low_inclusive: bool = False
) -> None:
    if value is None and allow_none:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value >= low if low_inclusive else value > low) and value <= high
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and <= {high}" if math.isfinite(high) else "")
        raise AdvtuneError(f"{name} must be a number {bound}, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise AdvtuneError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_threat(threat, name: str, norms=("linf", "l2")) -> None:
    if not isinstance(threat, ThreatModel):
        raise AdvtuneError(
            f"{name}: threat must be a ThreatModel, got {type(threat).__name__}; e.g. ThreatModel('linf', 8/255)"
        )
    if threat.norm not in norms:
        raise AdvtuneError(
            f"{name} supports only the {'/'.join(norms)} threat model, not {threat.norm}; "
            f"use apgd-ce or pgd for {threat.norm}"
        )


def fmt_spec(name: str, obj, skip: tuple[str, ...] = ()) -> str:
    """`name:k=v,...` listing the fields that differ from their defaults (round-trips through build_attack)."""
    parts = []
    for f in dataclasses.fields(obj):
        if f.name == "threat" or f.name in skip:
            continue
        v = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING and v == f.default:
            continue
        parts.append(f"{f.name}={str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, float) else v}")
    return name + (":" + ",".join(parts) if parts else "")


class AttackConfig:
    """What every attack class shares; a subclass is a frozen dataclass whose fields (besides `threat`)
    are its pure function's keyword arguments, so it only declares fields, checks, `name`,
    `grad_evals` and `function = staticmethod(<the pure function>)`.

    `spec_skip`: fields the registered name implies (`random_start` of pgd vs bim), left out of `spec`.
    `supports_target = False`: the attack picks its own targets and refuses `target=`.
    `black_box = True`: a score-based or gradient-free attack (Square): the masking gate compares it against the
    white-box ones (without it the gate counts the attack as white-box, and holds it to beating FGSM where its
    `grad_evals()` is above 1).
    `norms`: the threat-model norms it supports (default: linf and l2; Square sets linf only)."""

    function: ClassVar[Callable[..., Tensor]]
    spec_skip: ClassVar[tuple[str, ...]] = ()
    supports_target: ClassVar[bool] = True
    black_box: ClassVar[bool] = False
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")

    @property
    def spec(self) -> str:
        return fmt_spec(self.name, self, skip=self.spec_skip)

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        generator: torch.Generator | None = None,
        target: Tensor | None = None,
    ) -> Tensor:
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "threat"}
        if self.supports_target:
            kwargs["target"] = target
        elif target is not None:
            raise AdvtuneError(f"{self.name} chooses its own targets; pass target= to apgd-ce/apgd-dlr or pgd instead")
        return type(self).function(model, x, y, self.threat, generator=generator, **kwargs)
