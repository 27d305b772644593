"""Adversarial attacks: pure functions plus thin frozen configs, built from specs by `build_attack`.

>>> from advtune.threat import ThreatModel
>>> from advtune.attacks import build_attack
>>> attack = build_attack("pgd:steps=40,restarts=2", ThreatModel("linf", 8 / 255))
>>> x_adv = attack(model, x, y, generator=torch.Generator().manual_seed(0))   # doctest: +SKIP

Every attack: `attack(model, x, y, *, generator=None, target=None) -> x_adv` (detached, same shape,
dtype and device, inside `attack.threat`), `attack.grad_evals()` (per example, worst case) and
`attack.spec` (round-trips through `build_attack`). See docs/attacks.md.
"""

from ..threat import ThreatModel
from ._common import Attack, logits_of, margin
from .registry import (
    REGISTRY,
    attack_class,
    attack_params,
    build_attack,
    list_attacks,
    register,
    register_attack,
    split_attack_list,
)

# isort: off
# importing an attack module registers its attacks (@register); this order is list_attacks()' order
from .fgsm import FGSM, fgsm
from .pgd import MIFGSM, PGD, mifgsm, pgd
from .apgd import APGD, APGDT, apgd, apgd_targeted
from .square import Square, square
# isort: on

__all__ = [
    "APGD",
    "APGDT",
    "Attack",
    "FGSM",
    "MIFGSM",
    "PGD",
    "REGISTRY",
    "Square",
    "ThreatModel",
    "apgd",
    "apgd_targeted",
    "attack_class",
    "attack_params",
    "build_attack",
    "fgsm",
    "list_attacks",
    "logits_of",
    "margin",
    "mifgsm",
    "pgd",
    "register",
    "register_attack",
    "split_attack_list",
    "square",
]
