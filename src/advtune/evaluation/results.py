"""What an evaluation returns: `EvalResult` (counts, so results can be summed; `EvalResult.read` reads
one back from its record) and `EpsCurve`."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import Tensor

from ..errors import AdvtuneError
from ..records import check, check_schema, problem
from ..storage import read_json
from ..threat import ThreatModel

log = logging.getLogger(__name__)


class ThreatRecord(TypedDict):
    norm: str
    eps: float
    lower: float
    upper: float


class EvalCounts(TypedDict):
    threat: ThreatRecord
    attacks: list[str]
    n: int
    n_clean_correct: int
    n_robust: dict[str, int]
    n_robust_worst: int
    grad_evals: dict[str, int]
    forward_evals: dict[str, int]
    wall_time_s: dict[str, float]
    max_perturbation: dict[str, float | None]  # null: NaN


class EvalRecord(EvalCounts, total=False):
    """The fields of an evaluation record (eval-<name>.json of one eps) that `EvalResult` is made of."""

    seed: int | None
    mode: str  # cascade or full
    suspect: list[str]
    gate_grad_evals: int
    gated: bool
    total_wall_s: float
    batch_size: int | None
    attack_chunks: dict[str, int]


@dataclass(eq=False)
class EvalResult:
    """Clean, per-attack and worst-case accuracy with costs. Counts are kept so results can be summed."""

    SCHEMA = 1  # of the evaluation record (eval-<name>.json) that holds it: its "schema"

    threat: ThreatModel
    attacks: list[str]  # specs, in the order run
    n: int  # examples evaluated
    n_clean_correct: int
    n_robust: dict[str, int]  # per attack: clean-correct samples it did not break
    n_robust_worst: int  # robust to every attack
    grad_evals: dict[str, int]  # counted gradient evaluations (examples through forward+backward)
    forward_evals: dict[str, int]  # counted forward-only passes (queries)
    wall_time_s: dict[str, float] = field(compare=False)  # timings: two equal evaluations differ in them
    max_perturbation: dict[str, float]  # largest ||x_adv - x|| observed, in the threat's norm
    seed: int | None = None  # None: nondeterministic
    cascade: bool = False
    suspect: list[str] = field(default_factory=list)
    gate_grad_evals: int = 0
    # whether the masking gate ran (False: gate=False, or an eps curve's larger eps): an empty `suspect` then says
    # nothing, where it read as "passed"
    gated: bool = True
    # the whole evaluation: clean pass, every attack, checks and the gate
    total_wall_s: float = field(default=0.0, compare=False)
    batch_size: int | None = None  # examples per batch (random draws depend on it); None: not recorded
    # per attack that ran out of device memory: the chunk it ran in after its last halving, the smallest over
    # processes (the batches before that ran larger chunks, so this says that draws changed, not how to replay
    # them); empty: every attack ran whole batches
    attack_chunks: dict[str, int] = field(default_factory=dict)
    # per evaluated example (CPU tensors, not serialised)
    # (not compared: `==` of tensors is no bool; the counts above say the same)
    robust: Tensor | None = field(default=None, repr=False, compare=False)  # bool: clean-correct, robust to all
    broken: dict[str, Tensor] | None = field(default=None, repr=False, compare=False)  # int8: 1 broken, 0 survived,
    # -1 not attacked
    labels: Tensor | None = field(default=None, repr=False, compare=False)
    checksum: Tensor | None = field(default=None, repr=False, compare=False)  # per-example pixel sums (order)

    def __repr__(self) -> str:  # the numbers a user looks for, not the raw counts and timings
        gate = ("SUSPECT: " + ", ".join(self.suspect)) if self.suspect else ("passed" if self.gated else "not run")
        clean = f"{100 * self.clean_accuracy:.2f}%" if self.n else "n/a"
        worst = f"{100 * self.worst_case_accuracy:.2f}%" if self.n else "n/a"
        return (
            f"EvalResult({self.threat}, n={self.n}, clean {clean}, worst case {worst}, attacks={self.attacks}, "
            f"gate {gate})"
        )

    def __eq__(self, other: object) -> bool:
        """The same measurement: every compared field (not the timings), NaN equal to NaN in the perturbation sizes,
        and the same images (labels and pixel checksums) where both results still hold them."""
        if not isinstance(other, EvalResult):
            return NotImplemented
        compared = [f.name for f in fields(self) if f.compare and f.name != "max_perturbation"]
        if any(getattr(self, n) != getattr(other, n) for n in compared):
            return False
        a, b = self.max_perturbation, other.max_perturbation
        if a.keys() != b.keys() or any(not (a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k]))) for k in a):
            return False
        for n in ("labels", "checksum"):
            x, y = getattr(self, n), getattr(other, n)
            if x is not None and y is not None and not torch.equal(x, y):
                return False
        return True

    __hash__ = None  # mutable, as a dataclass with eq

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
            "gated": self.gated,
            "suspect": list(self.suspect),
            "batch_size": self.batch_size,
            "attack_chunks": dict(self.attack_chunks),
        }

    @classmethod
    def from_json(cls, data: Any, path: Any = "evaluation record", *, rerun: str | None = None) -> "EvalResult":
        """The result an evaluation record holds (its `to_json()`, or eval-<name>.json of one eps), each
        field checked: a missing or malformed one is one line naming the file (`path`) and the field.
        The per-example tensors are not recorded: they are None."""
        check_schema(data, path, cls.SCHEMA, None, rerun=rerun)
        if data.get("kind", "single") != "single":
            raise problem(
                path, f"field 'kind' is {data['kind']!r}, not 'single': an eps curve, one result per eps", rerun
            )
        d = check(data, EvalRecord, path, rerun=rerun)
        try:
            threat = ThreatModel(**d["threat"])
        except AdvtuneError as e:
            raise problem(path, f"field 'threat' is no threat model ({e})", rerun) from None
        return cls(
            threat=threat,
            attacks=d["attacks"],
            n=d["n"],
            n_clean_correct=d["n_clean_correct"],
            n_robust=d["n_robust"],
            n_robust_worst=d["n_robust_worst"],
            grad_evals=d["grad_evals"],
            forward_evals=d["forward_evals"],
            wall_time_s=d["wall_time_s"],
            max_perturbation={k: float("nan") if v is None else v for k, v in d["max_perturbation"].items()},
            seed=d.get("seed"),
            batch_size=d.get("batch_size"),
            attack_chunks=d.get("attack_chunks", {}),
            cascade=d.get("mode") == "cascade",
            suspect=d.get("suspect", []),
            gate_grad_evals=d.get("gate_grad_evals", 0),
            gated=bool(d.get("gated", True)),  # records from before the field: as they were read
            total_wall_s=d.get("total_wall_s", 0.0),
        )

    @classmethod
    def read(cls, path: str | Path, *, rerun: str | None = None) -> "EvalResult":
        """The result of the evaluation record in the file `path` (eval-<name>.json of one eps)."""
        return cls.from_json(read_json(path, "evaluation"), path, rerun=rerun)


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
