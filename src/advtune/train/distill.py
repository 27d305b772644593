"""Distillation from a teacher on adversarial inputs (`distill:teacher=...`), an objective of `objectives.py`.

The teacher is a saved model (loaded weights-only) or, inside the probe rule (`--granularity probe`), `teacher=probe`:
the probe's own whole-network model, read from its folder once it has trained (runs/probe.py resolves it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..attacks import build_attack
from ..devices import eval_mode
from ..errors import AdvtuneError
from ..patch import state_sha256
from ..registry import convert_params, parse_spec
from .ramp import check_eps_warmup, ramped_attack


def check_mix(alpha, temperature) -> None:
    """The teacher's weight in [0, 1] and a positive temperature, refused in one line otherwise."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise AdvtuneError(f"distill: alpha (the teacher's weight) must be in [0, 1], got {alpha!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise AdvtuneError(f"distill: temperature must be > 0 (e.g. 2), got {temperature!r}")


def check_steps(steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise AdvtuneError(f"distill: steps must be a positive number of PGD steps, got {steps!r}")


@dataclass(frozen=True)
class Distill:
    """Adversarial training with a teacher (issue 21, RESULTS round 25): (1 - alpha) CE(f(x_adv), y) + alpha T^2
    KL(p_teacher(x_adv) || p_f(x_adv)) at temperature T, x_adv crafted against the student f by `attack`. Knowledge
    distillation is Hinton et al.'s (2015); distilling on adversarial inputs from a robust teacher against robust
    overfitting, Chen et al. 2021 ("Robust overfitting may be mitigated by properly learned smoothening"). The aim
    here: a sparse selection fits the adversarial training loss as well as the whole network but generalises
    worse (round 22), and a teacher's soft labels are a regulariser that costs no extra trainable entry. The
    teacher's forward pass is counted as one gradient evaluation per example (it costs about a third of one): the
    cost is overstated, never understated."""

    attack: Any
    teacher: nn.Module  # frozen, eval mode
    teacher_path: str  # what the record says the teacher was
    teacher_sha256: str = ""  # and which weights it held (a teacher retrained in the same folder differs)
    alpha: float = 0.5
    temperature: float = 2.0
    eps_warmup: float = 0.0
    name: str = "distill"

    def __post_init__(self) -> None:
        check_mix(self.alpha, self.temperature)
        check_eps_warmup(self.eps_warmup)

    def at(self, progress: float) -> "Distill":
        """During the warm-up the attack's eps is scaled down linearly, as for adversarial training."""
        return ramped_attack(self, progress)

    def __call__(self, model, x, y, *, generator=None):
        with eval_mode(model):
            x_adv = self.attack(model, x, y, generator=generator)
        logits = model(x_adv)
        with torch.no_grad():
            try:
                target = self.teacher(x_adv)
            except RuntimeError as e:
                raise AdvtuneError(
                    f"distill: the teacher in {self.teacher_path} cannot take this data's inputs ({first_line(e)}); "
                    "give a teacher trained on the same data"
                ) from None
        if target.shape != logits.shape:
            raise AdvtuneError(
                f"distill: the teacher in {self.teacher_path} gives {target.shape[-1]} outputs and the model "
                f"{logits.shape[-1]}; give a teacher trained on the same data"
            )
        t = float(self.temperature)
        soft = nn.functional.kl_div(
            nn.functional.log_softmax(logits / t, 1),
            nn.functional.log_softmax(target / t, 1),
            reduction="batchmean",
            log_target=True,
        )
        loss = (1 - self.alpha) * nn.functional.cross_entropy(logits, y) + self.alpha * t * t * soft
        return {"loss": loss, "logits": logits, "x_adv": x_adv}

    def attack_grad_evals(self) -> int:
        return int(self.attack.grad_evals()) + 1  # the teacher's forward, counted as a whole gradient evaluation

    def describe(self) -> dict:
        return {
            "objective": self.name,
            "attack": getattr(self.attack, "spec", repr(self.attack)),
            "threat": self.attack.threat.to_json(),
            "teacher": self.teacher_path,
            "teacher_sha256": self.teacher_sha256,
            "alpha": self.alpha,
            "temperature": self.temperature,
            "eps_warmup": self.eps_warmup,
        }


PROBE_TEACHER = "probe"  # distill:teacher=probe: the probe rule's own whole-network model teaches its masked stage


def load_teacher(path: str, model: nn.Module | None, load_model: Callable | None) -> nn.Module:
    """The teacher model saved in run folder `path`, frozen, on the student's device; refused when it does not take
    the student's inputs or give its number of classes. `load_model(folder, device) -> (model, meta)` is the
    commands' loader (advtune.models.load_model: weights-only), passed in so the training loop stays free of the
    model zoo."""
    if load_model is None:
        raise AdvtuneError(
            "distill loads its teacher with the caller's model loader: build_objective(..., "
            "load_model=advtune.models.load_model)"
        )
    if path.strip().lower() == PROBE_TEACHER:
        raise AdvtuneError(
            "distill: teacher=probe is the probe rule's own model and only exists inside --granularity probe; "
            "elsewhere give a model folder, e.g. teacher=runs/robust-model"
        )
    first = next(iter(model.parameters()), None) if model is not None else None
    device = first.device if first is not None else torch.device("cpu")
    teacher, meta = load_model(path, device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if model is not None:
        probe_input = torch.zeros(1, *meta["input_shape"], device=device)
        try:
            with eval_mode(model), torch.no_grad():
                out = model(probe_input)
        except RuntimeError as e:
            raise AdvtuneError(
                f"distill: the teacher in {path} takes inputs of shape {meta['input_shape']} and the model does not "
                f"({first_line(e)}); give a teacher trained on the same data"
            ) from None
        if tuple(out.shape) != (1, meta["num_classes"]):
            raise AdvtuneError(
                f"distill: the teacher in {path} has {meta['num_classes']} classes and the model "
                f"{out.shape[-1]}; give a teacher trained on the same data"
            )
    return teacher


def first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:120]


def _distill_params(spec: str) -> dict[str, str] | None:
    name, raw = parse_spec(spec, "objective")
    return raw if name == "distill" else None


def probe_stage_attack(spec: str) -> str | None:
    """For `distill:teacher=probe,...`: the attack its probe stage trains with (PGD with the same steps and step
    size, no teacher yet); None for any other spec."""
    raw = _distill_params(spec)
    if raw is None or raw.get("teacher", "").lower() != PROBE_TEACHER:
        return None
    keep = {k: raw[k] for k in ("steps", "step_size") if k in raw}
    keep.setdefault("steps", str(DISTILL_STEPS))
    return "pgd:" + ",".join(f"{k}={v}" for k, v in keep.items())


def check_probe_teacher(spec: str, folder: str | None) -> str | None:
    """For `distill:teacher=probe,...`: every parameter checked (the teacher aside, which does not exist yet) before
    the probe trains, and the attack the probe trains with; None for any other spec."""
    teaching = probe_stage_attack(spec)
    if teaching is None:
        return None
    if folder is None:
        raise AdvtuneError(
            "distill:teacher=probe reads the probe's model from its run folder: give the fine-tuning an output folder "
            "(--out)"
        )
    raw = _distill_params(spec) or {}
    kwargs = convert_params("distill", raw, build_distill, title="distill", skip=INJECTED)
    check_steps(kwargs.get("steps", DISTILL_STEPS))
    check_mix(kwargs.get("alpha", 0.5), kwargs.get("temperature", 2.0))
    with_probe_teacher(spec, folder)  # a folder a spec cannot carry
    return teaching


def with_probe_teacher(spec: str, folder: str) -> str:
    """`spec` with teacher=probe replaced by the probe's run folder (any other spec unchanged)."""
    if probe_stage_attack(spec) is None:
        return spec
    if "," in folder:
        raise AdvtuneError(
            f"distill: the probe's folder {folder!r} holds a comma, which a spec cannot carry; rename it"
        )
    raw = dict(_distill_params(spec) or {}, teacher=folder)
    return "distill:" + ",".join(f"{k}={v}" for k, v in raw.items())


INJECTED = ("load_model",)  # a builder's keyword-only parameters the caller passes, never the spec
DISTILL_STEPS = 5  # distill's PGD steps when the spec gives none: harden's training attack


def build_distill(
    threat,
    model,
    attack_mode,
    eps_warmup,
    /,
    *,
    teacher: str | None = None,
    steps: int = DISTILL_STEPS,
    step_size: float | None = None,
    alpha: float = 0.5,
    temperature: float = 2.0,
    load_model: Callable | None = None,
) -> Distill:
    """`distill:teacher=<run folder>[,steps=..,step=..,alpha=..,temperature=..]`: adversarial training on PGD
    examples with a teacher's soft labels (teacher=probe: the probe rule's own model, in --granularity probe)."""
    if not teacher:
        raise AdvtuneError("distill needs a teacher: distill:teacher=<a run folder with a model>, or teacher=probe")
    check_steps(steps)
    if attack_mode != "eval":
        raise AdvtuneError("distill crafts its examples with the model in eval mode; drop --attack-mode train")
    attack = build_attack(f"pgd:steps={steps}" + (f",step_size={step_size}" if step_size else ""), threat)
    net = load_teacher(teacher, model, load_model)
    return Distill(attack, net, teacher, state_sha256(net.state_dict()), alpha, temperature, eps_warmup)


build_distill.title = "distill"  # type: ignore[attr-defined]
