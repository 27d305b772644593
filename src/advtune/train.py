"""ONE training loop for standard, adversarial and selective training.

`fit(model, train, objective, config, selection=...)`: the objective decides what a step optimises
(clean CE, adversarial CE on any attack, TRADES); the selection decides which parameters may move.
Every step is a pure function of (seed, epoch, step), so a run killed at any point resumes from its
last checkpoint to bit-identical final weights.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import filenames as files
from .attacks import build_attack
from .cost import CostMeter
from .data import TensorData, num_batches
from .errors import AdvtuneError
from .inputs import as_tensor_data
from .metrics import accuracy, robust_accuracy_quick
from .settings import number, setting
from .utils import (
    atomic_write_bytes,
    derive_seed,
    eval_mode,
    make_generator,
    model_device,
    progress,
)
from .weights import check_compatible

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "cosine", "step", "onecycle", "ssfd")

# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained (every job that trains takes one; its fields are the training flags)."""

    epochs: int = setting(2, help="passes over the training data", group="training")
    batch_size: int = setting(128, help="examples per optimizer step", group="training")
    optimizer: Literal["sgd", "adam"] = setting("adam", help="optimizer", choices=("adam", "sgd"), group="training")
    lr: float = setting(1e-3, help="learning rate", type=number, group="training")
    momentum: float = setting(0.9, help="SGD momentum", type=number, group="training")
    weight_decay: float = setting(0.0, help="weight decay", type=number, group="training")
    schedule: Literal["constant", "cosine", "step", "onecycle", "ssfd"] = setting(
        "constant", help="learning-rate schedule; ssfd = slow start, fast decay", choices=SCHEDULES, group="training"
    )
    warmup_epochs: float = setting(0.0, help="epochs of linear learning-rate warm-up", type=number, group="training")
    seed: int | None = setting(0, help="random seed (None: nondeterministic)", cli=False)  # the shared --seed
    eval_batch_size: int = setting(512, help="batch size of the accuracy checks", group="training")
    checkpoint_every: int = setting(0, help="also checkpoint every N steps (0: at epoch ends only)", group="training")
    val_attack_limit: int = setting(500, help="validation examples attacked after each epoch", group="training")
    # > 0: train exactly this many optimizer steps (as many epochs as that takes; `epochs` is then
    # ignored); schedules span them. Set from a gradient-evaluation budget (--budget).
    steps: int = setting(0, help="optimizer steps (0: epochs decide)", cli=False)

    def __post_init__(self) -> None:
        for name in ("lr", "momentum", "weight_decay", "warmup_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise AdvtuneError(f"{name} must be a finite number, got {v!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "checkpoint_every", "val_attack_limit", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise AdvtuneError(f"{name} must be an integer, got {v!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63
        ):
            raise AdvtuneError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if self.eval_batch_size <= 0 or self.val_attack_limit <= 0:
            raise AdvtuneError("eval batch size and val attack limit must be positive")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise AdvtuneError(f"epochs must be a non-negative integer, got {self.epochs}")
        if self.batch_size <= 0:
            raise AdvtuneError(f"batch size must be positive, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise AdvtuneError(f"learning rate must be positive, got {self.lr}")
        if self.optimizer not in ("sgd", "adam"):
            raise AdvtuneError(f"unknown optimizer {self.optimizer!r}; use sgd or adam")
        if self.schedule not in SCHEDULES:
            raise AdvtuneError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.weight_decay < 0 or not (0 <= self.momentum < 1):
            raise AdvtuneError("weight decay must be >= 0 and momentum in [0, 1)")
        if self.warmup_epochs < 0 or self.checkpoint_every < 0 or self.steps < 0:
            raise AdvtuneError("warmup epochs, checkpoint interval and max steps must be >= 0")

    def to_json(self) -> dict:
        return asdict(self)


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of a run: `cfg.steps` when set, else every step of every epoch."""
    return cfg.steps if cfg.steps else steps_per_epoch * cfg.epochs


def epochs_for(steps: int, steps_per_epoch: int) -> int:
    """Epochs needed to run `steps` optimizer steps."""
    return max(1, -(-steps // max(steps_per_epoch, 1)))


def lr_at(cfg: TrainConfig, step: int, total: int, steps_per_epoch: int | None = None) -> float:
    """Learning rate at a global step (a pure function: nothing to save for resume).

    ssfd ("slow start, fast decay", Jeddi et al. 2020, for adversarial fine-tuning): linear rise over
    the first 10% of steps (warmup_epochs, when set, overrides that), then linear decay to 0."""
    per_epoch = steps_per_epoch or total / max(cfg.epochs, 1)  # with cfg.steps set, epochs says nothing
    if cfg.schedule == "ssfd":
        warm = int(cfg.warmup_epochs * per_epoch) if cfg.warmup_epochs else max(1, total // 10)
        if step < warm:
            return cfg.lr * (step + 1) / warm
        return cfg.lr * max(0.0, (total - step) / max(total - warm, 1))
    warm = int(cfg.warmup_epochs * per_epoch)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(total - warm, 1)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return cfg.lr * (0.1 ** (int(t >= 0.5) + int(t >= 0.75)))
    if cfg.schedule == "onecycle":  # triangular: up to the peak at 40%, then down to 0 (fast-AT style)
        return cfg.lr * (t / 0.4 if t < 0.4 else max(0.0, (1 - t) / 0.6))
    return cfg.lr


# ---------------------------------------------------------------- objectives


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

    def __post_init__(self) -> None:
        if self.attack_mode not in ("eval", "train"):
            raise AdvtuneError(f"attack_mode must be eval or train, got {self.attack_mode!r}")
        if not 0 <= self.clean_weight <= 1:
            raise AdvtuneError(f"clean_weight must be in [0, 1], got {self.clean_weight}")
        if not 0 <= self.eps_warmup < 1:
            raise AdvtuneError(f"eps warm-up must be a share of training in [0, 1), got {self.eps_warmup}")

    def at(self, progress: float) -> "Adversarial":
        """This objective at a point of training (0..1): during the warm-up the attack's eps is
        scaled down linearly (MNIST at eps=0.3 does not start training from scratch otherwise)."""
        if not self.eps_warmup or progress >= self.eps_warmup:
            return self
        threat = self.attack.threat
        eps = threat.eps * max(progress / self.eps_warmup, 1e-3)
        return dataclasses.replace(self, attack=dataclasses.replace(self.attack, threat=threat.with_eps(eps)))

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


@dataclass(frozen=True)
class Trades:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x_adv)), where x_adv maximises the
    KL term by `steps` of projected steepest ascent from x + 0.001*N(0,1), run in eval mode."""

    threat: Any
    steps: int = 10
    step_size: float | None = None  # None -> 2.5 * eps / steps
    beta: float = 6.0
    name: str = "trades"

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.beta < 0:
            raise AdvtuneError("TRADES needs steps > 0 and beta >= 0")

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

    def describe(self) -> dict:
        return {
            "objective": self.name,
            "threat": self.threat.to_json(),
            "steps": self.steps,
            "step_size": self.step_size,
            "beta": self.beta,
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
        if not 0 <= self.eps_warmup < 1:
            raise AdvtuneError(f"eps warm-up must be a share of training in [0, 1), got {self.eps_warmup}")

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
        from torch.utils.flop_counter import FlopCounterMode

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


class OverfitGuard:
    """Catastrophic-overfitting guard for single-step (FGSM) training (Wong et al. 2020): after each
    epoch, PGD accuracy on a fixed training subset; if it falls more than `drop` below the best seen,
    the best weights are restored and training stops."""

    name = "overfit-guard"

    def __init__(
        self,
        attack,
        x: torch.Tensor,
        y: torch.Tensor,
        drop: float = 0.2,
        seed: int | None = 0,
        meter: CostMeter | None = None,
    ):
        self.attack, self.x, self.y, self.drop, self.seed, self.meter = attack, x, y, drop, seed, meter
        self.best_acc = -1.0
        self.best_state: dict | None = None
        self.tripped_at: int | None = None

    def __call__(self, model: nn.Module, record: dict) -> str | None:
        data = TensorData(self.x, self.y)
        acc = robust_accuracy_quick(model, data, self.attack, 256, self.seed, self.meter)
        record["guard_pgd_acc"] = acc
        if acc >= self.best_acc:
            self.best_acc = acc
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return None
        if acc < self.best_acc - self.drop:
            log.warning(
                "catastrophic overfitting: PGD accuracy on the guard subset fell from %.3f to %.3f; "
                "restoring the best weights and stopping",
                self.best_acc,
                acc,
            )
            model.load_state_dict(self.best_state)
            record["guard_reverted_to_acc"] = self.best_acc
            self.tripped_at = record.get("epoch")
            return "stop"
        return None


def clean() -> Clean:
    return Clean()


def adversarial(
    attack, attack_mode: Literal["eval", "train"] = "eval", clean_weight: float = 0.0, eps_warmup: float = 0.0
) -> Adversarial:
    return Adversarial(attack, attack_mode, clean_weight, eps_warmup)


def trades(threat, steps: int = 10, step_size: float | None = None, beta: float = 6.0) -> Trades:
    return Trades(threat, steps, step_size, beta)


def local_feature(
    model: nn.Module, layer: str, threat, steps: int = 10, clean_weight: float = 1.0, eps_warmup: float = 0.0
) -> LocalFeature:
    """The local objective for the block of `model` ending at `layer`; the reference is a frozen copy
    of the model as it is now."""
    import copy

    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        raise AdvtuneError(f"local: no module named {layer!r}; e.g. {', '.join(n for n in list(modules)[1:6])}")
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return LocalFeature(ref, layer, threat, steps, None, clean_weight, eps_warmup)


# ---------------------------------------------------------------- selection inside fit (one place)


# ---------------------------------------------------------------- objectives from specs


def _spec_params(name: str, params: str, types: dict[str, type]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        k, _, v = item.partition("=")
        k = {"step": "step_size"}.get(k.strip(), k.strip())
        if k not in types:
            raise AdvtuneError(f"unknown {name} parameter {k!r}; valid: {', '.join(types)}")
        try:
            kw[k] = types[k](v)
        except ValueError:
            raise AdvtuneError(f"{name} parameter {k} needs a {types[k].__name__}, got {v!r}") from None
    return kw


def build_objective(spec: str, threat, attack_mode: str = "eval", eps_warmup: float = 0.0, model=None):
    """`pgd:steps=10`, `fgsm`, `fgsm-rs`, ... -> adversarial(attack); `trades[:steps=..,beta=..]` -> TRADES;
    `local:layer=<module>[,steps=..,clean=..]` -> the local feature objective of the block ending at
    that module (needs the model: its current weights are the reference)."""
    name, _, params = spec.partition(":")
    name = name.strip().lower()
    if name == "trades":
        kw = _spec_params("TRADES", params, {"steps": int, "step_size": float, "beta": float})
        if eps_warmup:
            raise AdvtuneError("--eps-warmup is not supported with TRADES; drop it")
        return trades(threat, **kw)
    if name == "local":
        kw = _spec_params("local", params, {"layer": str, "steps": int, "clean": float})
        if "layer" not in kw:
            raise AdvtuneError("local needs the block's last module, e.g. local:layer=net.pool2,steps=10")
        if model is None:
            raise AdvtuneError("the local objective needs the model (its current features are the reference)")
        return local_feature(model, kw["layer"], threat, kw.get("steps", 10), kw.get("clean", 1.0), eps_warmup)
    return adversarial(build_attack(spec, threat), attack_mode, eps_warmup=eps_warmup)


class _Trainable:
    """Applies a Selection for the duration of fit:
    (a) tensors with no selected entry get requires_grad=False and stay out of the optimizer;
    (b) partially selected tensors get masked gradients AND their unselected slices are restored
        after every optimizer step (momentum and weight decay move entries with zero gradient);
    (c) BatchNorms whose parameters are all frozen run in eval mode (running stats don't move);
        partially selected BNs have their unselected running-stat entries restored after each step;
    (d) a selection covering everything changes nothing: exactly the full-training path.
    """

    def __init__(self, model: nn.Module, selection, example_input: torch.Tensor | None = None) -> None:
        self.model = model
        self.flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self.partial: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.frozen_bns: list[_BatchNorm] = []
        self.partial_bns: list[tuple[_BatchNorm, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if selection is None or selection.is_everything(model):
            return  # (d): selecting everything is exactly the full-training path
        # a traced forward finds the BatchNorm that follows each selected conv (see components.py)
        masks = selection.masks(model, example_input=example_input)
        for name, p in model.named_parameters():
            m = masks.get(name)
            if m is None or not bool(m.any()):
                p.requires_grad_(False)
            elif not bool(m.all()):
                m = m.to(p.device)
                self.partial.append((p, m, p.detach().clone()))
        for mod in model.modules():
            if not isinstance(mod, _BatchNorm) or not mod.track_running_stats:
                continue
            own = [p for p in mod.parameters(recurse=False)]
            if not own or not any(p.requires_grad for p in own):
                self.frozen_bns.append(mod)
            elif mod.weight is not None:
                wmask = next((m for p, m, _ in self.partial if p is mod.weight), None)
                if wmask is not None:
                    self.partial_bns.append((mod, ~wmask, mod.running_mean.clone(), mod.running_var.clone()))

    def snapshot(self) -> None:
        self.partial = [(p, m, p.detach().clone()) for p, m, _ in self.partial]
        self.partial_bns = [
            (bn, keep, bn.running_mean.clone(), bn.running_var.clone()) for bn, keep, _, _ in self.partial_bns
        ]

    def count(self) -> int:
        """Parameters that can change: full trainable tensors plus the selected entries of partial ones."""
        partial = {id(p): int(m.sum()) for p, m, _ in self.partial}
        return sum(partial.get(id(p), p.numel()) for p in self.model.parameters() if p.requires_grad)

    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def train_mode(self) -> None:
        self.model.train()
        for bn in self.frozen_bns:
            bn.eval()

    def mask_grads(self) -> None:
        for p, m, _ in self.partial:
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def restore_frozen(self) -> None:
        for p, m, frozen in self.partial:
            torch.where(m, p, frozen, out=p)
        for bn, keep, mean, var in self.partial_bns:
            bn.running_mean[keep] = mean[keep]
            bn.running_var[keep] = var[keep]

    def close(self) -> None:
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.flags[name])


# ---------------------------------------------------------------- the loop


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)
    stopped: str | None = None  # why training stopped early (a callback said so), if it did

    @property
    def last(self) -> dict:
        return self.epochs[-1] if self.epochs else {}


EpochCallback = Callable[[nn.Module, dict], "str | None"]
StepCallback = Callable[[nn.Module, int, CostMeter], None]  # (model, optimizer steps done, meter)


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the one process that writes records."""
    return _dist()[0] == 0


def cost_per_example(objective, model: nn.Module | None = None, example: torch.Tensor | None = None) -> float:
    """Gradient evaluations one training example costs under `objective`: attack steps + the update,
    or for a local objective its block passes weighted by the block's FLOPs share."""
    if hasattr(objective, "block_fraction"):
        if model is None or example is None:
            raise AdvtuneError("the cost of a local objective needs the model and an example input")
        return (objective.attack_grad_evals() + objective.update_passes()) * objective.block_fraction(model, example)
    return float(int(objective.attack_grad_evals()) + 1)


def steps_for_budget(
    budget: int, objective, batch_size: int, n_train: int | None = None, per_example: float | None = None
) -> int:
    """Optimizer steps that spend at least `budget` training gradient evaluations: a step costs its
    batch x (the attack's gradient evaluations + 1 for the update); the last batch of an epoch of
    `n_train` examples is smaller. At least one step."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise AdvtuneError(f"budget must be a positive number of gradient evaluations, got {budget!r}")
    per_example = per_example if per_example is not None else cost_per_example(objective)
    if not n_train:
        return max(1, math.ceil(budget / (per_example * batch_size)))
    sizes = [min(batch_size, n_train - i) for i in range(0, n_train, batch_size)]
    per_epoch = per_example * n_train
    epochs, rest = divmod(budget, per_epoch)
    steps = int(epochs) * len(sizes)
    for size in sizes:
        if rest <= 0:
            break
        rest -= per_example * size
        steps += 1
    return max(1, steps)


def _make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if not params:
        raise AdvtuneError("nothing to train: every parameter is frozen (empty selection?)")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(
    model: nn.Module,
    train: TensorData,
    objective: Objective | None = None,
    cfg: TrainConfig | None = None,
    *,
    val: TensorData | None = None,
    val_attack=None,
    selection=None,
    meter: CostMeter | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence[EpochCallback] = (),
    on_record: Callable[[History], None] | None = None,
    on_step: StepCallback | None = None,
    desc: str = "train",
) -> History:
    """Train `model` in place and return its per-epoch history.

    train / val: an (x, y) pair of tensors, an iterable of (x, y) batches such as a DataLoader (read
    once into memory), or an advtune split (see advtune.inputs). objective: clean() by default;
    cfg: TrainConfig() by default.
    checkpoint_dir: where `checkpoint.pt` is written atomically after every epoch (and every
    `cfg.checkpoint_every` steps); with resume=True training continues from it exactly.
    callbacks: called after each epoch with (model, record); returning "stop" ends training.
    on_record: called with the history after each epoch (the CLI writes metrics.jsonl there).
    on_step: called after every optimizer step with (model, steps done, meter), outside the timed
    part (the frontier benchmark saves snapshots there). `cfg.steps` sets the run's length in steps.
    """
    train = as_tensor_data(train, what="train")
    val = as_tensor_data(val, what="val") if val is not None else None
    objective = objective if objective is not None else clean()
    cfg = cfg if cfg is not None else TrainConfig()
    if len(train) == 0:
        raise AdvtuneError("the training split is empty; check --limit and the dataset")
    device = model_device(model)
    rank, world = _dist()
    meter = meter if meter is not None else CostMeter()
    example = train.to_float(train.x[:1], device)
    trainable = _Trainable(model, selection, example)
    try:
        params = trainable.params()
        opt = _make_optimizer(params, cfg)
        if not meter.flops_forward:
            meter.measure_model(model, tuple(train.x.shape[1:]))
        meter.trainable_params = trainable.count()
        steps_per_epoch = num_batches(len(train) // world, cfg.batch_size)
        total = total_steps(cfg, steps_per_epoch)
        n_epochs = epochs_for(total, steps_per_epoch) if cfg.steps else cfg.epochs
        history = History()
        epoch, step = 0, 0
        acc_state = _zero_acc(device)
        ckpt = Path(checkpoint_dir) / files.CHECKPOINT if checkpoint_dir else None
        if resume and ckpt is not None and ckpt.is_file():
            epoch, step, acc_state = _load_checkpoint(ckpt, model, opt, meter, history, cfg, device)
            trainable.snapshot()  # unselected slices: the loaded weights are the reference
            log.info("resumed from %s at epoch %d step %d", ckpt, epoch + 1, step)
        elif resume and ckpt is not None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", checkpoint_dir)
        attack_ge = int(objective.attack_grad_evals())
        block_fraction = objective.block_fraction(model, example) if hasattr(objective, "block_fraction") else None

        while epoch < n_epochs and history.stopped is None:
            meter.start()
            gen = make_generator(derive_seed(cfg.seed, "epoch", epoch))
            batches = train.batches(
                cfg.batch_size, shuffle=True, generator=gen, device=device, start=step, rank=rank, world_size=world
            )
            bar = progress(
                batches,
                desc=f"{desc} {epoch + 1}/{n_epochs}",
                total=min(steps_per_epoch, total - epoch * steps_per_epoch) - step,
                disable=None if rank == 0 else True,
            )
            trainable.train_mode()
            for x, y in bar:
                if epoch * steps_per_epoch + step >= total:
                    break
                g = make_generator(derive_seed(cfg.seed, "step", epoch, step), device)
                lr = lr_at(cfg, epoch * steps_per_epoch + step, total, steps_per_epoch)
                for group in opt.param_groups:
                    group["lr"] = lr
                step_objective = (
                    objective.at((epoch * steps_per_epoch + step) / max(total, 1))
                    if hasattr(objective, "at")
                    else objective
                )
                out = step_objective(model, x, y, generator=g)
                if not bool(torch.isfinite(out["loss"])):  # never train on (or save) a NaN model
                    raise AdvtuneError(
                        f"the training loss became {float(out['loss'].detach())} at epoch {epoch + 1}, step "
                        f"{step + 1}; "
                        "lower the learning rate (--lr) or check the data for NaN/huge values"
                    )
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                trainable.mask_grads()
                if world > 1:
                    _all_reduce_grads(params, world)
                opt.step()
                trainable.restore_frozen()
                with torch.no_grad():
                    acc_state[0] += out["loss"].detach() * len(y)
                    if out.get("logits") is not None:  # a local objective has no logits
                        acc_state[1] += (out["logits"].argmax(1) == y).sum()
                    acc_state[2] += len(y)
                if block_fraction is None:
                    meter.add_update(len(y), attack_ge)
                else:  # partial passes through an early block, counted in full-network equivalents
                    meter.add_partial(len(y), attack_ge + objective.update_passes(), block_fraction)
                step += 1
                if on_step is not None:
                    meter.stop()
                    on_step(model, epoch * steps_per_epoch + step, meter)
                    trainable.train_mode()
                    meter.start()
                if step % 50 == 0 and hasattr(bar, "set_postfix"):
                    bar.set_postfix(
                        loss=f"{(acc_state[0] / acc_state[2]).item():.3f}",
                        acc=f"{(acc_state[1] / acc_state[2]).item():.3f}",
                    )
                if (
                    cfg.checkpoint_every
                    and step % cfg.checkpoint_every == 0
                    and step < steps_per_epoch
                    and ckpt
                    and rank == 0
                ):
                    meter.stop()
                    _save_checkpoint(ckpt, model, opt, meter, history, cfg, epoch, step, acc_state)
                    meter.start()
            meter.stop()
            totals = _reduce(acc_state, world)
            record = {
                "epoch": epoch + 1,
                "train_loss": totals[0] / max(totals[2], 1),
                "train_acc": totals[1] / max(totals[2], 1) if block_fraction is None else None,
                "lr": lr_at(cfg, min((epoch + 1) * steps_per_epoch, total) - 1, total, steps_per_epoch),
                "examples": int(totals[2]),
                "grad_evals": meter.grad_evals,
                "wall_s": round(meter.wall_s, 3),
            }
            if val is not None and len(val):  # monitoring: not counted as training cost
                record["val_acc"] = accuracy(model, val, cfg.eval_batch_size)
                if val_attack is not None:
                    record["val_robust_acc"] = robust_accuracy_quick(
                        model, val.take(cfg.val_attack_limit), val_attack, cfg.eval_batch_size, cfg.seed
                    )
            history.epochs.append(record)
            log.info(
                "epoch %d: %s", epoch + 1, {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
            )
            for cb in callbacks:
                if cb(model, record) == "stop":
                    history.stopped = f"stopped by {getattr(cb, 'name', type(cb).__name__)} after epoch {epoch + 1}"
            epoch, step = epoch + 1, 0
            acc_state = _zero_acc(device)
            if ckpt is not None and rank == 0:
                _save_checkpoint(ckpt, model, opt, meter, history, cfg, epoch, step, acc_state)
            if on_record is not None and rank == 0:
                on_record(history)
        return history
    finally:
        trainable.close()


def _zero_acc(device) -> torch.Tensor:
    return torch.zeros(3, dtype=torch.float64, device=device)


def _reduce(t: torch.Tensor, world: int) -> list[float]:
    if world > 1:
        t = t.clone()
        dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def _all_reduce_grads(params, world: int) -> None:
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


# ---------------------------------------------------------------- checkpoints


def _save_checkpoint(
    path: Path,
    model,
    opt,
    meter: CostMeter,
    history: History,
    cfg: TrainConfig,
    epoch: int,
    step: int,
    acc_state: torch.Tensor,
) -> None:
    state = {
        "format": "advtune-checkpoint-1",
        "epoch": epoch,
        "step": step,
        "config": cfg.to_json(),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "meter": meter.to_json(),
        "history": {"epochs": history.epochs, "stopped": history.stopped},
        "acc_state": acc_state.cpu(),
        "rng": torch.get_rng_state(),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


RESUMABLE_CHANGES = ("epochs", "checkpoint_every")  # the training settings a resume may change


def config_changes(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """(key, recorded, now) for every training setting a resume would change, other than
    RESUMABLE_CHANGES; a key an older record lacks counts as its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return [
        (k, saved.get(k, defaults.get(k)), v)
        for k, v in now.items()
        if k not in RESUMABLE_CHANGES and saved.get(k, defaults.get(k)) != v
    ]


def _refuse_changed_config(saved: dict, cfg: TrainConfig) -> None:
    changed = config_changes(saved, cfg.to_json())
    if changed:
        raise AdvtuneError(
            f"--resume with a different config ({', '.join(f'{k}: {a} -> {b}' for k, a, b in changed)}); "
            "use the original settings or start a new run"
        )


def check_resume(checkpoint_dir: str | Path, cfg: TrainConfig) -> None:
    """Refuse a resume whose training config differs from its checkpoint's, before anything is
    written (fit checks again when it loads the checkpoint)."""
    path = Path(checkpoint_dir) / files.CHECKPOINT
    if not path.is_file():
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/foreign files
        raise AdvtuneError(
            f"checkpoint {path} is truncated or corrupt ({str(e).splitlines()[0][:120]}); "
            "delete it and rerun without --resume"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("config"), dict):
        _refuse_changed_config(state["config"], cfg)


def _load_checkpoint(path: Path, model, opt, meter: CostMeter, history: History, cfg: TrainConfig, device):
    try:
        # weights_only: tensors and plain containers only, never code from the file
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for truncated/foreign files
        raise AdvtuneError(
            f"checkpoint {path} is truncated or corrupt ({str(e).splitlines()[0][:120]}); "
            "delete it and rerun without --resume"
        ) from None
    if not isinstance(state, dict) or state.get("format") != "advtune-checkpoint-1":
        raise AdvtuneError(f"{path} is not an advtune training checkpoint; delete it or pick another --out")
    _refuse_changed_config(dict(state["config"]), cfg)
    check_compatible(model, state["model"], f"checkpoint {path}")
    model.load_state_dict(state["model"])
    try:
        opt.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise AdvtuneError(
            f"checkpoint {path} has optimizer state for other parameters ({e}); start a new run"
        ) from None
    meter.load_json(state["meter"])
    history.epochs = list(state["history"]["epochs"])
    history.stopped = state["history"]["stopped"]
    torch.set_rng_state(state["rng"].cpu())
    return int(state["epoch"]), int(state["step"]), state["acc_state"].to(device)
