"""The transfer attack: adversarial examples crafted on another model, tried on this one.

`transfer:source=<run folder>[,attack=apgd-ce]` runs the white-box `attack` (an attack name with its
default settings, APGD without early stopping: the highest-loss point transfers) against the source
model (a saved advtune run, loaded weights-only) and returns its adversarial examples for the model
under evaluation. It never touches the evaluated model's gradients, so like Square it is a black-box
witness for the masking gate: when examples transferred
from, say, an adversarially trained model break more images than the white-box attacks on the model
itself, those gradients are not to be trusted (Athalye et al. 2018; the issue's check for
parameter-efficient tuning). Cost: the source model's gradient evaluations, which the evaluation's
counter (hooked on the evaluated model) does not see; the evaluated model gets one forward pass.

Registered in the attack registry when `advtune.evaluation` is imported (it needs the model store,
which sits above the attacks).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import filenames as files
from ..attacks import build_attack, register
from ..attacks._common import AttackConfig, attack_entry
from ..errors import AdvtuneError
from ..models import load_model
from ..threat import ThreatModel


@functools.lru_cache(maxsize=4)
def _source(path: str, device: str) -> nn.Module:
    folder = Path(path)
    if not folder.is_dir():
        raise AdvtuneError(f"transfer: source {path!r} is not a run folder; give source=<a trained run's folder>")
    model, _ = load_model(folder, device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@attack_entry("transfer")
def transfer(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    source: str = "",
    attack: str = "apgd-ce",
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """`attack`'s adversarial examples on the source model (the evaluated `model` is not queried)."""
    src = _source(source, str(x.device))
    crafted = build_attack(attack, threat)
    if getattr(crafted, "early_stop", False):
        # the highest-loss point on the source transfers; its first success sits just across the source's boundary
        # (and an image fooled at the random start would carry no attack at all): about a third as strong
        crafted = replace(crafted, early_stop=False)
    return crafted(src, x, y, generator=generator, target=target).detach()


@register("transfer")
@dataclass(frozen=True)
class Transfer(AttackConfig):
    """The transfer attack (`transfer:source=RUN[,attack=NAME]`); see the module docstring."""

    threat: ThreatModel
    source: str = ""
    attack: str = "apgd-ce"

    name = "transfer"
    black_box = True  # the evaluated model's gradients play no part: a witness for the masking gate
    function = staticmethod(transfer)

    def __post_init__(self) -> None:
        if not self.source:
            raise AdvtuneError(
                "transfer needs source=<run folder of the model to craft on>, e.g. transfer:source=runs/at"
            )
        if not (Path(self.source) / files.MODEL_META).is_file():  # refused when the list is built, before any work
            raise AdvtuneError(
                f"transfer: source {self.source!r} is not a run folder with a saved model; give source=<a trained run>"
            )
        bad = f"transfer: attack={self.attack!r} must be a white-box attack name, e.g. apgd-ce or pgd"
        if ":" in self.attack:
            raise AdvtuneError(bad)
        if getattr(build_attack(self.attack, self.threat), "black_box", False):  # unknown names: one line here
            raise AdvtuneError(bad)

    def grad_evals(self) -> int:
        return 0  # on the evaluated model; the source's are its own (see the module docstring)

    def forward_evals(self) -> int:
        return 1
