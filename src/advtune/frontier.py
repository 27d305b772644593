"""The robustness-per-compute frontier: what the curves of an experiment say, computed from its records.

An experiment whose variants take snapshots (`points:`) writes `frontier.json`: one row per
(variant, snapshot) with its worst-case robust accuracy and its cost in gradient evaluations,
counted the same way on every curve (a fine-tuning curve includes the base model's training and,
for a selective recipe, the analysis behind its selection; training from scratch starts at 0).

Here: the reference's plateau (adversarial training from scratch, `reference: true`), the cost it
needed to get there, and for every other curve how close it came and at what share of that cost.
Nothing is recomputed from models; the report and docs/RESULTS.md read these numbers.

The points are typed records (`FrontierPoint`, in frontier.json's `Frontier`); every function here
also takes them as the dicts the file holds, checked as they are read.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Sequence, TypeVar, Union

from .errors import AdvtuneError
from .records import Record

log = logging.getLogger(__name__)

PLATEAU_TOLERANCE = 0.01  # a curve is on its plateau within 1 point of its best
TARGET_GAP = 0.02  # the target: the reference plateau minus 2 points
ACC_EPS = 1e-9  # accuracies compared with this slack: 0.259 - 0.02 is 0.23899999999999999 in floats


@dataclass(frozen=True, kw_only=True)
class FrontierPoint(Record):
    """One (variant, checkpoint) of the frontier: its accuracy and its cost, counted the same way on
    every curve (total = the run's training + the base model's training + the analysis)."""

    variant: str
    kind: str  # the variant's kind: standard, train, finetune, harden
    select: str | None = None
    eps: float | None = None
    reference: bool = False  # the reference curve (adversarial training from scratch)
    step: int | None = None  # the snapshot's optimizer step (None: the final model)
    train_grad_evals: int = 0  # this run's training up to the point
    base_grad_evals: int = 0
    analysis_grad_evals: int = 0
    total_grad_evals: int
    wall_s: float = 0.0
    clean_acc: float
    robust_acc: float  # worst case over the evaluation's attacks
    trainable_params: int | None = None
    param_share: float | None = None
    suspect: str = ""  # what the masking gate found ("": passed)


@dataclass(frozen=True)
class Frontier(Record):
    """frontier.json: the points of an experiment's curves."""

    SCHEMA = 1
    KIND = "frontier"

    points: tuple[FrontierPoint, ...]


Point = Union[FrontierPoint, dict]
P = TypeVar("P", FrontierPoint, dict)


def as_points(points: Sequence[Point], source: str = "frontier points") -> list[FrontierPoint]:
    """Frontier points as records: dicts (as frontier.json holds them) are checked and read, a missing
    or malformed field is one line naming `source` and the field."""
    return [
        p if isinstance(p, FrontierPoint) else FrontierPoint.from_json(p, source, at=f"points[{i}]")
        for i, p in enumerate(points)
    ]


@dataclass(frozen=True)
class Plateau:
    variant: str
    robust_acc: float  # the best robust accuracy on the reference curve
    cost: int  # total gradient evaluations of its first point within PLATEAU_TOLERANCE
    clean_acc: float  # clean accuracy of that first point
    points: int
    first_robust_acc: float = 0.0  # robust accuracy of that first point (the plateau's cost is paid there)
    best_cost: int = 0  # total gradient evaluations of the best point
    best_clean_acc: float = 0.0
    # no point before the last came within the tolerance of the best: no plateau seen, level and cost lower bounds
    still_rising: bool = False


@dataclass(frozen=True)
class CurveVerdict:
    variant: str
    kind: str
    select: str | None
    param_share: float | None
    best_robust_acc: float
    best_clean_acc: float
    best_cost: int
    reached_target: bool  # robust >= plateau - TARGET_GAP at some point
    cost_to_target: int | None  # total gradient evaluations of the first such point
    cost_share_of_reference: float | None  # cost_to_target / the reference's cost to its plateau
    robust_at_reference_budget: float | None  # best robust at or below the given budget share of the reference

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def curves(points: Sequence[P]) -> dict[str, list[P]]:
    """{variant: its points by cost}, each point as given (a FrontierPoint or its dict)."""
    out: dict[str, list[tuple[int, P]]] = {}
    for rec, p in zip(as_points(points), points):
        out.setdefault(rec.variant, []).append((rec.total_grad_evals, p))
    return {v: [p for _, p in sorted(pts, key=lambda cp: cp[0])] for v, pts in out.items()}


def reference_plateau(points: Sequence[Point], reference: str | None = None) -> Plateau:
    """The plateau of the reference curve (by name, or the curve marked `reference`; of several so marked, e.g.
    PGD-AT and fast AT, the one that plateaus highest: the selection is judged against the stronger baseline, not
    the first name in the alphabet)."""
    points = as_points(points)
    by = curves(points)
    if reference is None:
        refs = sorted({p.variant for p in points if p.reference})
        if not refs:
            raise AdvtuneError("no reference curve: mark adversarial training from scratch with reference: true")
        if len(refs) > 1:
            usable = [r for r in refs if any(not p.suspect for p in by.get(r, []))]
            plateaus = [reference_plateau(points, r) for r in usable]
            if plateaus:
                return max(plateaus, key=lambda q: (q.robust_acc, -q.cost))
        reference = refs[0]
    if reference not in by:
        raise AdvtuneError(f"reference curve {reference!r} has no points; curves: {', '.join(by)}")
    pts = [p for p in by[reference] if not p.suspect]
    if not pts:
        raise AdvtuneError(f"every point of the reference curve {reference!r} tripped the masking gate")
    top = max(pts, key=lambda p: (p.robust_acc, -p.total_grad_evals))
    best = top.robust_acc
    first = next(p for p in pts if p.robust_acc >= best - PLATEAU_TOLERANCE - ACC_EPS)
    return Plateau(
        reference,
        best,
        int(first.total_grad_evals),
        first.clean_acc,
        len(pts),
        first.robust_acc,
        int(top.total_grad_evals),
        top.clean_acc,
        first is pts[-1],  # no earlier point came within the tolerance of the best (one checkpoint shows no plateau)
    )


def verdicts(points: Sequence[Point], plateau: Plateau, budget_share: float = 0.25) -> list[CurveVerdict]:
    """How every other curve compares with the reference plateau. Suspect points (gate) never count."""
    out = []
    for name, pts in curves(as_points(points)).items():
        if name == plateau.variant or pts[0].kind == "standard":  # the starting point is no curve
            continue
        ok = [p for p in pts if not p.suspect]
        if not ok:
            continue
        best = max(ok, key=lambda p: (p.robust_acc, -p.total_grad_evals))
        hit = next((p for p in ok if p.robust_acc >= plateau.robust_acc - TARGET_GAP - ACC_EPS), None)
        within = [p.robust_acc for p in ok if p.total_grad_evals <= budget_share * plateau.cost]
        out.append(
            CurveVerdict(
                name,
                ok[0].kind,
                ok[0].select,
                ok[0].param_share,
                best.robust_acc,
                best.clean_acc,
                int(best.total_grad_evals),
                hit is not None,
                int(hit.total_grad_evals) if hit else None,
                hit.total_grad_evals / plateau.cost if hit and plateau.cost else None,
                max(within) if within else None,
            )
        )
    return out


def _rows(by: dict[str, list[FrontierPoint]], fields: tuple[str, ...]) -> list[tuple]:
    return [tuple(getattr(p, f) for f in fields) for v in by.values() for p in v]


def _standard(by: dict[str, list[FrontierPoint]]) -> dict[str, list[FrontierPoint]]:
    """The standard model's curve(s) among `by`."""
    return {v: c for v, c in by.items() if c[0].kind == "standard"}


def merge_curves(published: Sequence[Point], new: Sequence[Point]) -> tuple[list[FrontierPoint], list[str]]:
    """A frontier published earlier, updated by a run that holds only some of its curves (a machine that
    reran the base model and a few variants): each curve of `new` replaces the published curve of that
    name, the others are kept, in the published order. Returns the points and the names kept.
    Curves of two runs belong on one plot only if they start from the same base model, so where both
    hold the standard model's curve its points must agree (accuracies and cost; the wall time may not):
    otherwise, or where either lacks that curve, the merge is refused with a one-line error. A run whose
    only curves besides the standard model's are trained from scratch (kind train: the references) starts
    from no base, so its curves join whatever base was published, and the published standard curve stays."""
    old, fresh = curves(as_points(published, "the published frontier")), curves(as_points(new))
    fields = ("variant", "step", "total_grad_evals", "clean_acc", "robust_acc")
    mine, theirs = _standard(fresh), _standard(old)
    scratch = {v: c for v, c in fresh.items() if c[0].kind == "train"}
    if scratch and len(scratch) + len(mine) == len(fresh):  # only from-scratch curves (and a standard one)
        if mine and theirs and _rows(mine, fields) != _rows(theirs, fields):
            # the references inherit the base's training recipe, data and evaluation settings, not its weights
            log.warning(
                "this run's standard model differs from the published one: its from-scratch curves are merged, "
                "the published standard curve is kept; check that the setting (data, recipe, evaluation) is the same"
            )
        replacing = {**({} if theirs else mine), **scratch}  # a published frontier without a standard curve gets one
    else:
        for by, where in ((theirs, "the published frontier"), (mine, "this run's frontier")):
            if not by:
                raise AdvtuneError(
                    f"{where} has no standard model's curve, so whether both start from the same base cannot be "
                    "checked; publish this run alone (--replace)"
                )
        old_base, new_base = _rows(theirs, fields), _rows(mine, fields)
        if old_base != new_base:
            diff = next(
                (
                    f"{f} {a[i]} vs {b[i]}"
                    for a, b in zip(new_base, old_base)
                    for i, f in enumerate(fields)
                    if a[i] != b[i]
                ),
                f"{len(new_base)} vs {len(old_base)} points",
            )
            raise AdvtuneError(
                f"the standard model of this run differs from the published one ({diff}): the published curves "
                "start from another base; publish this run alone (--replace) or rerun on the published base"
            )
        replacing = fresh
    kept = [v for v in old if v not in replacing]
    merged = [p for v in old for p in (replacing[v] if v in replacing else old[v])]
    merged += [p for v in replacing if v not in old for p in replacing[v]]
    return merged, kept


def robust_at(points: Sequence[Point], variant: str, budget: float) -> float | None:
    """The best robust accuracy a curve reached at or below `budget` total gradient evaluations."""
    vals = [
        p.robust_acc
        for p in curves(as_points(points)).get(variant, [])
        if p.total_grad_evals <= budget and not p.suspect
    ]
    return max(vals) if vals else None


def findings(points: Sequence[Point], budget_share: float = 0.25) -> list[str]:
    """Plain sentences computed from the frontier points (no claim the numbers do not make), one
    group per eps (a curve is only ever compared with the reference at its own eps)."""
    by_eps: dict[float | None, list[FrontierPoint]] = {}
    for p in as_points(points):
        by_eps.setdefault(p.eps, []).append(p)
    lines: list[str] = []
    for eps, pts in sorted(by_eps.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        sub = _findings_one(pts, budget_share)
        if len(by_eps) > 1:
            sub = [f"eps={eps:g}: {line}" for line in sub]
        lines += sub
    return lines


def _findings_one(points: Sequence[FrontierPoint], budget_share: float) -> list[str]:
    try:
        plateau = reference_plateau(points)
    except AdvtuneError:
        return []
    # two checkpoints, named apart: the best one sets the level, the first one within the tolerance sets the cost
    verb = "is still rising at its last checkpoint," if plateau.still_rising else "plateaus at"
    lines = [
        f"Reference **{plateau.variant}** (adversarial training from scratch) {verb} "
        f"{100 * plateau.robust_acc:.2f}% worst-case robust accuracy, its best checkpoint (clean "
        f"{100 * plateau.best_clean_acc:.2f}%, at {plateau.best_cost:,} gradient evaluations); it was first within "
        f"{100 * PLATEAU_TOLERANCE:g} point of that at {plateau.cost:,} ({100 * plateau.first_robust_acc:.2f}%, "
        f"clean {100 * plateau.clean_acc:.2f}%): the plateau's cost"
        + (" (a lower bound on both: a longer run may climb further)." if plateau.still_rising else ".")
    ]
    if not plateau.cost:  # a reference whose cost is not recorded (0): no share of it is computed
        lines[0] += " Its cost is not recorded, so no curve's cost is stated as a share of it."
    for v in verdicts(points, plateau, budget_share):
        share = f"{100 * v.param_share:.1f}% of the parameters" if v.param_share is not None else "share not recorded"
        if v.reached_target:
            of_ref = (
                f" = {100 * v.cost_share_of_reference:.1f}% of the reference's cost to its plateau"
                if v.cost_share_of_reference is not None
                else ""
            )
            lines.append(
                f"**{v.variant}** ({share}) reached {100 * (plateau.robust_acc - TARGET_GAP):.2f}% "
                f"(the plateau minus {100 * TARGET_GAP:g} points) at {v.cost_to_target:,} gradient evaluations"
                f"{of_ref}; best {100 * v.best_robust_acc:.2f}%."
            )
        else:
            at = (
                f"; within {100 * budget_share:g}% of the reference's cost it reached "
                f"{100 * v.robust_at_reference_budget:.2f}%"
                if v.robust_at_reference_budget is not None
                else ""
            )
            lines.append(
                f"**{v.variant}** ({share}) did not reach the plateau minus {100 * TARGET_GAP:g} points: best "
                f"{100 * v.best_robust_acc:.2f}% at {v.best_cost:,} gradient evaluations"
                + (f" ({100 * v.best_cost / plateau.cost:.1f}% of the reference's cost)" if plateau.cost else "")
                + f"{at}."
            )
    if len(lines) > 1:  # a best-of-N read off the same images that measure it: optimistic alike for every curve
        lines.append(
            "Each curve's best, the plateau and the first points reaching a target are read off the evaluated test "
            "images after the fact (harden itself chooses its checkpoint on held-out training images)."
        )
    return lines


def markdown_table(points: Sequence[Point]) -> str:
    """The frontier as a Markdown table: one row per point, cost columns first (docs/RESULTS.md)."""
    head = (
        "variant",
        "trainable params",
        "point",
        "training grad evals",
        "+ base + analysis",
        "total grad evals",
        "clean",
        "worst-case robust",
        "gate",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, pts in curves(as_points(points)).items():
        for i, p in enumerate(pts):
            share = p.param_share
            tp = f"{p.trainable_params:,} ({100 * share:.1f}%)" if p.trainable_params and share is not None else "–"
            lines.append(
                "| "
                + " | ".join(
                    [
                        name if i == 0 else "",
                        tp if i == 0 else "",
                        "final" if p.step is None else f"step {p.step}",
                        f"{p.train_grad_evals:,}",
                        f"{p.base_grad_evals + p.analysis_grad_evals:,}",
                        f"{p.total_grad_evals:,}",
                        f"{100 * p.clean_acc:.2f}%",
                        f"{100 * p.robust_acc:.2f}%",
                        "SUSPECT" if p.suspect else "passed",
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


# The adversarial-training references measured on this project's frontiers (docs/RESULTS.md; the numbers are
# read from docs/results/frontier-*.json): adversarial training from scratch, its plateau (best worst-case
# robust accuracy, APGD-CE + APGD-T on the first 1000 test images) and the gradient evaluations it needed to
# get within a point of it. `method` names the training (PGD-AT where it was run; fast AT where only that
# was); `plateau: False` marks a curve still rising at the end of its schedule (a lower bound on what AT
# gives). harden compares its own cost with them when it runs the same setting; an entry measured with another
# protocol says so in `protocol`. `full_ft`, where the frontier ran it: the tuned full-network fine-tuning control
# of a standard model (the other baseline a user weighs a selective patch against), its curve as (gradient
# evaluations after the standard model, robust accuracy); `full_ft_longer`, where the frontier also ran a longer
# control: the one quoted when harden spent past `full_ft`'s last point (e.g. --epochs 4). A setting where only the
# control was measured (no AT from scratch) has `full_ft` alone, from a test-split evaluation record (.jsonl, its
# `variant` the record's `arm`). tests/test_harden.py checks every entry against its record.
AT_REFERENCE_PROTOCOL = "APGD-CE + APGD-T, without Square"
AT_REFERENCES = {
    ("mnist", "small-cnn", "linf", 0.3): {
        "method": "PGD-AT",
        "robust_acc": 0.893,
        "plateau_grad_evals": 3_630_000,
        "source": "docs/results/frontier-mnist-eps0.3.json (PGD-10, 10 epochs on 55k images)",
        "full_ft": {
            "source": "docs/results/frontier-mnist-eps0.3-spread.json",
            "variant": "full-ft-b64-ema-w15",
            "recipe": "its recipe tuned on this setting, round 4",
            "curve": ((180_096, 0.342), (359_952, 0.65), (540_048, 0.765), (719_904, 0.818), (900_000, 0.855)),
        },
    },
    ("mnist", "small-cnn", "linf", 0.1): {
        "method": "PGD-AT",
        "robust_acc": 0.949,
        "plateau_grad_evals": 2_420_000,
        "plateau": False,
        "source": "docs/results/frontier-mnist-eps0.1.json (PGD-10, 5 epochs on 55k images; still rising)",
    },
    ("cifar10", "vgg-cifar", "linf", 8 / 255): {
        "method": "PGD-AT",
        "robust_acc": 0.259,
        "plateau_grad_evals": 180_000,
        "source": "docs/results/frontier-cifar10.json (PGD-5, 6 epochs on 10k images)",
    },
    ("cifar10", "preact-resnet20", "linf", 8 / 255): {
        "method": "PGD-AT",
        "robust_acc": 0.349,
        "plateau_grad_evals": 2_160_000,
        "plateau": False,
        "source": "docs/results/frontier-cifar10-resnet-base901.json (PGD-5, 10 epochs of SGD on 45k images; best "
        "at its last epoch, within a point of it from 2.16M; "
        "fast AT (FGSM-RS, 15 epochs) reaches 36.3% for 1,421,680 on the same frontier)",
        "full_ft": {
            "source": "docs/results/frontier-cifar10-resnet-base901.json",
            "variant": "full-ft-lr3e-3-noaug",
            "recipe": "its recipe tuned on this network, rounds 9 and 28",
            "curve": ((180_096, 0.312), (360_240, 0.321), (540_000, 0.344)),
        },
        "full_ft_longer": {  # for twice harden's default budget (--epochs 4): round 25's run, with crop-flip
            "source": "docs/results/frontier-cifar10-resnet-long.json",
            "variant": "full-ft-lr3e-3",
            "recipe": "the tuned rate with crop-flip batches, round 25",
            "curve": ((270_000, 0.282), (540_000, 0.34), (810_000, 0.333), (1_080_000, 0.365)),
        },
    },
    ("cifar10", "preact-resnet20-w2", "linf", 8 / 255): {  # no AT from scratch on the wider network (yet)
        "full_ft": {
            "source": "docs/results/test-cifar10-resnet-w2-round34.jsonl",
            "variant": "tuned full fine-tuning, seed 0",
            "recipe": "preact-resnet20's tuned recipe, round 31",
            "curve": ((540_000, 0.367),),
        },
    },
    ("mnist", "small-cnn", "linf", 0.2): {
        "method": "PGD-AT",
        "robust_acc": 0.920,
        "plateau_grad_evals": 3_630_000,
        "plateau": False,
        "source": "docs/results/frontier-mnist-eps0.2.json (PGD-10, 6 epochs on 55k images; best at its last epoch)",
        "full_ft": {
            "source": "docs/results/frontier-mnist-eps0.2.json",
            "variant": "full-ft-tuned",
            "recipe": "the recipe tuned at eps 0.3",
            "curve": ((200_064, 0.788), (400_272, 0.838), (600_336, 0.867)),
        },
    },
    ("mnist", "madry-mnist", "linf", 0.3): {
        "method": "PGD-AT",
        "robust_acc": 0.901,
        "plateau_grad_evals": 3_025_000,
        "source": "docs/results/frontier-mnist-madry-eps0.3.json (PGD-10, 8 epochs on 55k images)",
        "full_ft": {
            "source": "docs/results/frontier-mnist-madry-eps0.3.json",
            "variant": "full-ft",
            "recipe": "small-cnn's tuned recipe",
            "curve": ((300_288, 0.702), (599_952, 0.872), (900_000, 0.893)),
        },
    },
}


def at_reference(dataset: str | None, architecture: str | None, norm: str, eps: float) -> dict | None:
    """The frontier's PGD-AT reference for this setting, if one was measured."""
    for (d, a, n, e), ref in AT_REFERENCES.items():
        if d == dataset and a == architecture and n == norm and abs(e - eps) < 1e-9:
            return {"protocol": AT_REFERENCE_PROTOCOL, **ref}
    return None
