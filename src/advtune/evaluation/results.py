"""What an evaluation returns: `EvalResult` (counts, so results can be summed) and `EpsCurve`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import Tensor

from ..threat import ThreatModel

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Clean, per-attack and worst-case accuracy with costs. Counts are kept so results can be summed."""

    threat: ThreatModel
    attacks: list[str]  # specs, in the order run
    n: int  # examples evaluated
    n_clean_correct: int
    n_robust: dict[str, int]  # per attack: clean-correct samples it did not break
    n_robust_worst: int  # robust to every attack
    grad_evals: dict[str, int]  # counted gradient evaluations (examples through forward+backward)
    forward_evals: dict[str, int]  # counted forward-only passes (queries)
    wall_time_s: dict[str, float]
    max_perturbation: dict[str, float]  # largest ||x_adv - x|| observed, in the threat's norm
    seed: int | None = None  # None: nondeterministic
    cascade: bool = False
    suspect: list[str] = field(default_factory=list)
    gate_grad_evals: int = 0
    total_wall_s: float = 0.0  # the whole evaluation: clean pass, every attack, checks and the gate
    # per evaluated example (CPU tensors, not serialised)
    robust: Tensor = field(default=None, repr=False)  # bool: clean-correct and robust to all attacks
    broken: dict[str, Tensor] = field(default=None, repr=False)  # int8: 1 broken, 0 survived, -1 not attacked
    labels: Tensor = field(default=None, repr=False)
    checksum: Tensor = field(default=None, repr=False)  # per-example sum of pixels (order fingerprint)

    @property
    def clean_accuracy(self) -> float:
        return self.n_clean_correct / self.n

    @property
    def accuracy(self) -> dict[str, float]:
        """Per attack (cumulative along the list when `cascade`)."""
        return {k: v / self.n for k, v in self.n_robust.items()}

    @property
    def worst_case_accuracy(self) -> float:
        return self.n_robust_worst / self.n

    def to_json(self) -> dict:
        return {
            "threat": self.threat.to_json(),
            "attacks": list(self.attacks),
            "seed": self.seed,
            "n": self.n,
            "mode": "cascade" if self.cascade else "full",
            "clean_accuracy": self.clean_accuracy,
            "accuracy": self.accuracy,
            "worst_case_accuracy": self.worst_case_accuracy,
            "n_clean_correct": self.n_clean_correct,
            "n_robust": dict(self.n_robust),
            "n_robust_worst": self.n_robust_worst,
            "grad_evals": dict(self.grad_evals),
            "grad_evals_per_example": {k: v / max(self.n_clean_correct, 1) for k, v in self.grad_evals.items()},
            "forward_evals": dict(self.forward_evals),
            "wall_time_s": dict(self.wall_time_s),
            "total_wall_s": self.total_wall_s,
            "max_perturbation": dict(self.max_perturbation),
            "gate_grad_evals": self.gate_grad_evals,
            "suspect": list(self.suspect),
        }


@dataclass
class EpsCurve:
    """Robust accuracy against eps, monotone by construction (see `eps_curve`)."""

    eps: list[float]
    accuracy: list[float]  # monotone: broken at eps_i => broken at every eps_j > eps_i
    raw_accuracy: list[float]  # each eps evaluated on its own
    clean_accuracy: float
    n: int
    attacks: list[list[str]]
    results: list[EvalResult] = field(repr=False, default_factory=list)
    suspect: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "eps": self.eps,
            "accuracy": self.accuracy,
            "raw_accuracy": self.raw_accuracy,
            "clean_accuracy": self.clean_accuracy,
            "n": self.n,
            "attacks": self.attacks,
            "suspect": list(self.suspect),
            "results": [r.to_json() for r in self.results],
        }
