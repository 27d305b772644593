"""What a training step optimises: clean CE, adversarial CE on any attack (eps ramped), TRADES, distillation from a
teacher on adversarial inputs (distill.py), adversarial and random weight perturbation (awp.py), the local feature
objective;
`build_objective(spec, threat)` makes one from a CLI/YAML spec.

Spec objectives other than the attacks are builders in `OBJECTIVES` (an `advtune.registry.Registry`):
`builder(threat, model, attack_mode, eps_warmup, /, *, <spec parameters>)`, the spec parameters
keyword-only and typed, parsed with the attacks' one spec grammar (`advtune.registry.parse_spec`)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..attacks import build_attack
from ..devices import eval_mode
from ..errors import AdvtuneError
from ..keywords import keyword_errors
from ..registry import Registry, convert_params, parse_spec
from .awp import build_awp, build_rwp
from .distill import INJECTED, build_distill
from .ramp import check_eps_warmup, ramped_attack

log = logging.getLogger(__name__)


class Objective(Protocol):
    name: str

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]: ...

    def attack_grad_evals(self) -> int: ...

    def describe(self) -> dict: ...


@dataclass(frozen=True)
class Clean:
    """Cross-entropy on clean inputs (standard training)."""

    name: str = "clean"

    def __call__(self, model, x, y, *, generator=None):
        logits = model(x)
        return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits}

    def attack_grad_evals(self) -> int:
        return 0

    def describe(self) -> dict:
        return {"objective": self.name}


@dataclass(frozen=True)
class Adversarial:
    """Cross-entropy on adversarial inputs (Madry et al. 2018); `clean_weight` mixes in clean CE.

    attack_mode: the mode the model is in while the attack runs ("eval": BN uses running stats, as
    torchattacks does; "train": batch statistics, as fast adversarial training does). Recorded.
    """

    attack: Any
    attack_mode: Literal["eval", "train"] = "eval"
    clean_weight: float = 0.0
    eps_warmup: float = 0.0  # share of training over which eps ramps linearly from 0 to eps
    name: str = "adversarial"

    @keyword_errors()
    def __post_init__(self) -> None:
        if not callable(self.attack) or not hasattr(self.attack, "grad_evals"):  # a spec crashed at the first step
            raise AdvtuneError(
                f"adversarial() takes an attack object, e.g. adversarial(PGD(ThreatModel.linf(0.3), steps=10)), got "
                f"{self.attack!r} (a spec string needs its threat: build_attack('pgd:steps=10', threat))"
            )
        if self.attack_mode not in ("eval", "train"):
            raise AdvtuneError(f"attack_mode must be eval or train, got {self.attack_mode!r}")
        if not 0 <= self.clean_weight <= 1:
            raise AdvtuneError(f"clean_weight must be in [0, 1], got {self.clean_weight}")
        check_eps_warmup(self.eps_warmup)

    def at(self, progress: float) -> "Adversarial":
        """This objective at a point of training (0..1): during the warm-up the attack's eps is
        scaled down linearly (MNIST at eps=0.3 does not start training from scratch otherwise)."""
        return ramped_attack(self, progress)

    def __call__(self, model, x, y, *, generator=None):
        if self.attack_mode == "eval":
            with eval_mode(model):
                x_adv = self.attack(model, x, y, generator=generator)
        else:
            x_adv = self.attack(model, x, y, generator=generator)
        logits = model(x_adv)
        loss = nn.functional.cross_entropy(logits, y)
        if self.clean_weight:
            loss = (1 - self.clean_weight) * loss + self.clean_weight * nn.functional.cross_entropy(model(x), y)
        return {"loss": loss, "logits": logits, "x_adv": x_adv}

    def attack_grad_evals(self) -> int:
        return int(self.attack.grad_evals()) + (1 if self.clean_weight else 0)  # the clean term's extra pass

    def describe(self) -> dict:
        return {
            "objective": self.name,
            "attack": getattr(self.attack, "spec", repr(self.attack)),
            "threat": self.attack.threat.to_json() if hasattr(self.attack, "threat") else None,
            "attack_mode": self.attack_mode,
            "clean_weight": self.clean_weight,
            "eps_warmup": self.eps_warmup,
        }


def check_step_size(name: str, step_size) -> None:
    """An inner maximisation's step: a positive finite number, or None for its default (0 used to mean the default
    without a word, and a negative one ran a descent)."""
    ok = step_size is None or (
        not isinstance(step_size, bool) and isinstance(step_size, (int, float)) and 0 < step_size < math.inf
    )
    if not ok:
        raise AdvtuneError(f"{name}: step_size must be > 0 (or left out: 2.5 x eps / steps), got {step_size!r}")


@dataclass(frozen=True)
class Trades:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x_adv)), where x_adv maximises the
    KL term by `steps` of projected steepest ascent from x + 0.001*N(0,1), run in eval mode."""

    threat: Any
    steps: int = 10
    step_size: float | None = None  # None -> 2.5 * eps / steps
    beta: float = 6.0
    eps_warmup: float = 0.0  # share of training over which eps ramps linearly from 0 to eps
    name: str = "trades"

    @keyword_errors()
    def __post_init__(self) -> None:
        if not hasattr(self.threat, "eps") or not hasattr(self.threat, "with_eps"):  # trades(0.1) crashed later
            raise AdvtuneError(
                f"trades() takes a ThreatModel, e.g. trades(ThreatModel.linf(8/255)), got {self.threat!r}"
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise AdvtuneError(f"TRADES needs steps > 0, got {self.steps!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 < self.beta < math.inf:
            raise AdvtuneError(
                f"TRADES needs beta > 0 (e.g. trades:beta=6; larger trades clean for robust), got {self.beta!r}"
            )
        check_step_size("TRADES", self.step_size)
        check_eps_warmup(self.eps_warmup)

    def at(self, progress: float) -> "Trades":
        """TRADES at a point of training: during the warm-up its inner maximisation's eps is scaled
        down linearly, as for adversarial training (a step size left to the default follows eps)."""
        if not self.eps_warmup or progress >= self.eps_warmup:
            return self
        eps = self.threat.eps * max(progress / self.eps_warmup, 1e-3)
        return dataclasses.replace(self, threat=self.threat.with_eps(eps))

    def _inner(self, model, x, p_clean, generator):
        step = self.step_size or 2.5 * self.threat.eps / self.steps
        noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device)
        x_adv = self.threat.project(x + 0.001 * noise.to(x.device, x.dtype), x)
        for _ in range(self.steps):
            x_adv = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                kl = nn.functional.kl_div(nn.functional.log_softmax(model(x_adv), 1), p_clean, reduction="sum")
                (g,) = torch.autograd.grad(kl, x_adv)
            x_adv = self.threat.project(x_adv.detach() + self.threat.steepest_step(g, step), x)
        return x_adv.detach()

    def __call__(self, model, x, y, *, generator=None):
        with eval_mode(model), torch.no_grad():
            p_clean = nn.functional.softmax(model(x), 1)
        with eval_mode(model):
            x_adv = self._inner(model, x, p_clean, generator)
        logits = model(x)
        logits_adv = model(x_adv)
        robust = nn.functional.kl_div(
            nn.functional.log_softmax(logits_adv, 1), nn.functional.softmax(logits, 1), reduction="batchmean"
        )
        return {
            "loss": nn.functional.cross_entropy(logits, y) + self.beta * robust,
            "logits": logits_adv,
            "x_adv": x_adv,
        }

    def attack_grad_evals(self) -> int:
        return self.steps + 1  # inner steps, plus the second forward/backward of the update (x and x_adv)

    def forward_passes(self) -> int:
        return 1  # the clean prediction the inner maximisation starts from (no gradient: FLOPs, not grad evals)

    def describe(self) -> dict:
        return {
            "objective": self.name,
            "threat": self.threat.to_json(),
            "steps": self.steps,
            "step_size": self.step_size,
            "beta": self.beta,
            "eps_warmup": self.eps_warmup,
        }


class _StopForward(Exception):
    """Raised by a hook to end a forward pass at a layer (the rest of the network never runs)."""


def forward_to(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output of module `layer` for input x, running only the part of the forward before it:
    a hook on `layer` stores its output and stops the pass, so a backward from it is also partial.
    Works for any nn.Module whose forward calls `layer` once."""
    modules = dict(model.named_modules())
    if layer not in modules:
        raise AdvtuneError(
            f"no module named {layer!r} in the model; modules: {', '.join(n for n in modules if n)[:300]}"
        )
    box: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        box["out"] = output
        raise _StopForward

    handle = modules[layer].register_forward_hook(hook)
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "out" not in box:
        raise AdvtuneError(f"module {layer!r} did not run in the forward pass; pick a module the forward calls")
    return box["out"]


@dataclass(frozen=True)
class LocalFeature:
    """A local adversarial objective for an early block that ends at module `layer` (advtune's own
    cost lever, issue 8): the attack *maximises* ||F(x + d) - F_ref(x)||^2 and the update minimises
    it (plus `clean_weight` x ||F(x) - F_ref(x)||^2), where F is the model's block output and F_ref
    the original model's on the clean input. Both back-propagate only through the block, so a step
    costs the block's share of the network (`block_fraction`, measured in FLOPs), not a full pass.
    Only the block's parameters get gradients: select them (e.g. layers up to `layer`)."""

    reference: nn.Module  # the original model (frozen, eval mode): the features to keep
    layer: str  # module whose output ends the block, e.g. "net.pool2"
    threat: Any
    steps: int = 10
    step_size: float | None = None  # None -> 2.5 * eps / steps
    clean_weight: float = 1.0
    eps_warmup: float = 0.0
    name: str = "local-feature"

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.clean_weight < 0:
            raise AdvtuneError("the local objective needs steps > 0 and clean_weight >= 0")
        check_eps_warmup(self.eps_warmup)

    def at(self, progress: float) -> "LocalFeature":
        if not self.eps_warmup or progress >= self.eps_warmup:
            return self
        return dataclasses.replace(
            self, threat=self.threat.with_eps(self.threat.eps * max(progress / self.eps_warmup, 1e-3))
        )

    def __call__(self, model, x, y, *, generator=None):
        with torch.no_grad():
            target = forward_to(self.reference, self.layer, x)
        step = self.step_size or 2.5 * self.threat.eps / self.steps
        with eval_mode(model):
            x_adv = self.threat.random_start(x, generator)
            for _ in range(self.steps):
                x_adv = x_adv.detach().requires_grad_(True)
                with torch.enable_grad():
                    dist_ = (forward_to(model, self.layer, x_adv) - target).pow(2).sum()
                    (g,) = torch.autograd.grad(dist_, x_adv)
                x_adv = self.threat.project(x_adv.detach() + self.threat.steepest_step(g, step), x)
        loss = (forward_to(model, self.layer, x_adv.detach()) - target).pow(2).mean()
        if self.clean_weight:
            loss = loss + self.clean_weight * (forward_to(model, self.layer, x) - target).pow(2).mean()
        return {"loss": loss, "logits": None, "x_adv": x_adv.detach()}

    def attack_grad_evals(self) -> int:
        return self.steps  # block passes (see block_fraction)

    def update_passes(self) -> int:
        return 2 if self.clean_weight else 1

    def block_fraction(self, model: nn.Module, example: torch.Tensor) -> float:
        """FLOPs of a forward+backward through the block / through the whole model (one example)."""
        # backward() on a fresh input (FlopCounterMode cannot wrap autograd.grad on a leaf); the
        # reference's parameters are frozen, so only the input-gradient path is counted on both sides
        flops = []
        for run in (lambda x: forward_to(self.reference, self.layer, x), self.reference):
            x = example[:1].detach().clone().requires_grad_(True)
            with FlopCounterMode(display=False) as fc:
                run(x).sum().backward()
            flops.append(fc.get_total_flops())
        return float(flops[0] / max(flops[1], 1))

    def describe(self) -> dict:
        return {
            "objective": self.name,
            "layer": self.layer,
            "threat": self.threat.to_json(),
            "steps": self.steps,
            "step_size": self.step_size,
            "clean_weight": self.clean_weight,
            "eps_warmup": self.eps_warmup,
        }


def clean() -> Clean:
    return Clean()


def adversarial(
    attack, attack_mode: Literal["eval", "train"] = "eval", clean_weight: float = 0.0, eps_warmup: float = 0.0
) -> Adversarial:
    return Adversarial(attack, attack_mode, clean_weight, eps_warmup)


def trades(
    threat, steps: int = 10, step_size: float | None = None, beta: float = 6.0, eps_warmup: float = 0.0
) -> Trades:
    return Trades(threat, steps, step_size, beta, eps_warmup)


def local_feature(
    model: nn.Module, layer: str, threat, steps: int = 10, clean_weight: float = 1.0, eps_warmup: float = 0.0
) -> LocalFeature:
    """The local objective for the block of `model` ending at `layer`; the reference is a frozen copy
    of the model as it is now."""
    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        raise AdvtuneError(f"local: no module named {layer!r}; e.g. {', '.join(n for n in list(modules)[1:6])}")
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return LocalFeature(ref, layer, threat, steps, None, clean_weight, eps_warmup)


# name -> builder of an objective spec that is not an attack (any other name is `adversarial(attack)`)
OBJECTIVES: Registry[Callable[..., Any]] = Registry("objective")


@OBJECTIVES.register("trades")
def _build_trades(
    threat, model, attack_mode, eps_warmup, /, *, steps: int = 10, step_size: float | None = None, beta: float = 6.0
) -> Trades:
    """`trades[:steps=..,step=..,beta=..]`: TRADES (with the eps ramp when one is given)."""
    if attack_mode != "eval":  # it was ignored without a word
        raise AdvtuneError("trades crafts its examples with the model in eval mode; drop --attack-mode train")
    return trades(threat, steps, step_size, beta, eps_warmup)


_build_trades.title = "TRADES"  # type: ignore[attr-defined]  # how errors name it (default: the spec name)


@OBJECTIVES.register("local")
def _build_local(
    threat, model, attack_mode, eps_warmup, /, *, layer: str | None = None, steps: int = 10, clean: float = 1.0
) -> LocalFeature:
    """`local:layer=<module>[,steps=..,clean=..]`: the local feature objective of the block ending at
    that module (needs the model: its current weights are the reference)."""
    if attack_mode != "eval":
        raise AdvtuneError("local crafts its examples with the model in eval mode; drop --attack-mode train")
    if layer is None:
        raise AdvtuneError("local needs the block's last module, e.g. local:layer=net.pool2,steps=10")
    if model is None:
        raise AdvtuneError("the local objective needs the model (its current features are the reference)")
    return local_feature(model, layer, threat, steps, clean, eps_warmup)


OBJECTIVES.register("distill")(build_distill)
NEEDS_MODEL = ("local", "distill")  # built on the model (its features) or a teacher: checked when they are built
OBJECTIVES.register("awp")(build_awp)
OBJECTIVES.register("rwp")(build_rwp)


def check_objective(spec: str, threat, attack_mode: str = "eval") -> None:
    """An objective or attack spec refused in one line from the spec alone (its name, its parameters, the threat and
    the attack mode), before any model or data is read; what needs the model (a layer's name, a teacher) is checked
    when it is built."""
    name, raw = parse_spec(spec, "objective")
    builder = OBJECTIVES.get(name, None)
    if builder is None:
        try:
            build_attack(spec, threat)
        except AdvtuneError as e:  # a training spec may also name an objective: list those too
            if not str(e).startswith("unknown attack"):
                raise
            raise AdvtuneError(f"{e}; training objectives: {', '.join(OBJECTIVES)}") from None
    else:
        kwargs = convert_params(name, raw, builder, title=getattr(builder, "title", name), skip=INJECTED)
        if name not in NEEDS_MODEL:  # its values (TRADES' beta and step, awp's gamma, ...) checked by building it
            builder(threat, None, attack_mode, 0.0, **kwargs)
        elif name == "local" and attack_mode != "eval":  # what local_objective refuses first, without the model
            raise AdvtuneError("local crafts its examples with the model in eval mode; drop --attack-mode train")


def build_objective(spec: str, threat, attack_mode: str = "eval", eps_warmup: float = 0.0, model=None, load_model=None):
    """`pgd:steps=10`, `fgsm`, `fgsm-rs`, ... -> adversarial(attack); `trades[:steps=..,beta=..]` -> TRADES;
    `local:layer=<module>[,steps=..,clean=..]` -> the local feature objective of the block ending at
    that module (needs the model: its current weights are the reference); `distill:teacher=<run folder>[,steps=..,
    alpha=..,temperature=..]` -> PGD training with a teacher's soft labels (distill.py; `load_model` loads the
    teacher: pass advtune.models.load_model); `awp[:gamma=..,steps=..]` -> PGD training at adversarially perturbed
    weights, `rwp[:sigma=..,steps=..]` at randomly perturbed ones (awp.py). The names in `OBJECTIVES`
    are objectives, any other is an attack."""
    name, raw = parse_spec(spec, "objective")
    builder = OBJECTIVES.get(name, None)
    if builder is None:
        return adversarial(build_attack(spec, threat), attack_mode, eps_warmup=eps_warmup)
    kwargs = convert_params(name, raw, builder, title=getattr(builder, "title", name), skip=INJECTED)
    if "load_model" in inspect.signature(builder).parameters:  # distill's teacher: loaded by the caller's loader
        kwargs["load_model"] = load_model
    return builder(threat, model, attack_mode, eps_warmup, **kwargs)
