"""Honest robustness evaluation: clean and robust accuracy, worst case per sample, eps curves, masking gate.

How the numbers are made (see docs/attacks.md):
- Every attack runs on *all* clean-correct samples (default `cascade=False`), so the per-attack
  accuracies are comparable with each other; the worst case per sample is then exact and free: a
  sample is robust only if no attack broke it. `cascade=True` runs each attack only on the samples
  still robust after the previous ones (AutoAttack's order, cheaper); the worst case is the same
  but the per-attack numbers become cumulative.
- After each attack the eps bound and the pixel box are asserted (a violation is a bug: it raises).
- Costs are counted, not assumed: a forward pre-hook counts every example that goes through the
  model with gradients on (a gradient evaluation) or off (a forward pass / query).
- The masking gate runs after every evaluation (AutoAttack checks.py, extended) and records what
  looks wrong in `EvalResult.suspect`, with a loud log warning.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .attacks import APGD, APGDT, FGSM, PGD, Attack, Square, logits_of, margin
from .cost import PassCounter
from .errors import AdvtuneError
from .inputs import batches
from .metrics import correct
from .threat import ThreatModel
from .utils import eval_mode, model_device, model_dtype, progress

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ masking-gate thresholds
GATE_SAMPLES = 64  # size of the probe subset the gate attacks itself (cheap: ~32 grads/sample)
TOL_FGSM = 0.05  # an iterative attack may leave this much more accuracy than FGSM on the probe
TOL_BLACK_BOX = 0.01  # share of clean-correct samples only a black-box attack broke
TOL_EPS_RISE = 0.05  # accuracy may rise this much with eps on the probe (noise), eps_curve uses 0.02
LARGE_EPS_MAX_ACC = 0.10  # accuracy allowed at linf eps = the full pixel range (should be ~0)
PROB_ATOL = 1e-5  # outputs within this of a probability simplex are flagged


# ------------------------------------------------------------------ results


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


# ------------------------------------------------------------------ suites


def suite(name: str, threat: ThreatModel) -> list[Attack]:
    """Named attack lists. standard: APGD-CE, APGD-T, Square (AutoAttack without FAB; Square is linf
    only, so the l2 suite has no black-box attack). quick: FGSM and PGD-20."""
    if name == "standard":
        attacks: list[Attack] = [APGD(threat, loss="ce"), APGDT(threat)]
        if threat.norm == "linf":
            attacks.append(Square(threat))
        else:
            log.info("standard suite for %s: Square is linf-only, running APGD-CE and APGD-T", threat.norm)
        return attacks
    if name == "quick":
        return [FGSM(threat), PGD(threat, steps=20)]
    raise AdvtuneError(f"unknown suite {name!r}; valid suites: {', '.join(SUITES)}")


SUITES = ("standard", "quick")


# ------------------------------------------------------------------ cost counting


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # honest wall times on asynchronous devices
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ input handling


def _num_classes(model: nn.Module, x: Tensor) -> int:
    """First forward on a tiny batch: shape errors become a message a person can act on."""
    with torch.no_grad():
        return logits_of(model, x[:2]).shape[1]


def _check_attacks(attacks) -> list[Attack]:
    if not isinstance(attacks, (list, tuple)):
        attacks = [attacks]
    if not attacks:
        raise AdvtuneError("no attacks given; pass e.g. suite('standard', threat) or [build_attack('pgd', threat)]")
    for a in attacks:
        if not callable(a) or not isinstance(getattr(a, "threat", None), ThreatModel) or not hasattr(a, "grad_evals"):
            raise AdvtuneError(f"{a!r} is not an attack; build one with build_attack('pgd', threat)")
    threats = {a.threat for a in attacks}
    if len(threats) > 1:
        raise AdvtuneError(
            f"all attacks must share one threat model, got {', '.join(map(str, threats))}; "
            "evaluate each threat model separately (or use eps_curve)"
        )
    specs = [_spec(a) for a in attacks]
    dup = {s for s in specs if specs.count(s) > 1}
    if dup:
        raise AdvtuneError(f"attack {sorted(dup)[0]!r} appears twice in the list; remove the duplicate")
    return list(attacks)


def _spec(a) -> str:
    return getattr(a, "spec", None) or type(a).__name__


def _is_black_box(a) -> bool:
    return bool(getattr(a, "black_box", False))


# ------------------------------------------------------------------ robust accuracy


@dataclass
class _Tally:
    """One attack's running totals over the batches."""

    grads: int = 0
    fwds: int = 0
    seconds: float = 0.0
    max_pert: float = 0.0
    status: list[Tensor] = field(default_factory=list)  # per batch, int8 per example


def _attack_once(
    model: nn.Module,
    attack: Attack,
    spec: str,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    generator,
    counter: PassCounter,
    tally: _Tally,
) -> Tensor:
    """Run one attack on (x, y), check its output against the threat model, return which it broke."""
    device = x.device
    _sync(device)
    t0 = time.perf_counter()
    x_adv = attack(model, x, y, generator=generator)
    _sync(device)
    tally.seconds += time.perf_counter() - t0
    g, f = counter.take()
    tally.grads, tally.fwds = tally.grads + g, tally.fwds + f
    if not isinstance(x_adv, Tensor):
        raise AdvtuneError(f"attack {spec} returned {type(x_adv).__name__}, not a tensor")
    threat.check(x_adv, x, what=f"{spec} output")  # a violation is a bug in the attack: raise
    tally.max_pert = max(tally.max_pert, threat.distance(x_adv, x).max().item())
    with torch.no_grad():
        hit = model(x_adv).argmax(1) != y
    counter.take()  # the verification forward is not the attack's cost
    return hit


def robust_accuracy(
    model: nn.Module,
    data,
    attacks: Sequence[Attack] | Attack,
    *,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    limit: int | None = None,
    cascade: bool = False,
    gate: bool = True,
) -> EvalResult:
    """Clean, per-attack and worst-case robust accuracy of `model` on `data`, with costs and the masking gate.

    data: an (x, y) tensor pair (float in [0, 1]) or any iterable of (x, y) batches.
    attacks: attacks sharing one threat model (e.g. `suite("standard", threat)`).
    limit: evaluate at most this many examples. The model runs in eval mode (restored afterwards).
    cascade: run each attack only on the examples still robust (cheaper; per-attack numbers cumulative).
    gate: run `masking_gate` afterwards and record its findings in `EvalResult.suspect`.
    """
    attacks = _check_attacks(attacks)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise AdvtuneError(f"generator must be a torch.Generator (or None), got {type(generator).__name__}")
    threat = attacks[0].threat
    specs = [_spec(a) for a in attacks]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AdvtuneError(f"batch_size must be a positive integer, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise AdvtuneError(f"limit must be a positive integer or None, got {limit!r}")
    device, dtype = model_device(model), model_dtype(model)
    counter = PassCounter()
    tallies = {s: _Tally() for s in specs}
    n, classes = 0, None
    clean_parts, label_parts, sum_parts = [], [], []
    probe_x, probe_y, probe_idx = [], [], []

    with eval_mode(model), counter.attached(model):
        for xb, yb in progress(batches(data, batch_size, lower=threat.lower, upper=threat.upper), desc="evaluate"):
            if limit is not None:
                if n >= limit:
                    break
                xb, yb = xb[: limit - n], yb[: limit - n]
            if len(xb) == 0:
                continue
            xb, yb = xb.to(device=device, dtype=dtype), yb.to(device=device, dtype=torch.long)
            if classes is None:
                classes = _num_classes(model, xb)
            if yb.min().item() < 0 or yb.max().item() >= classes:
                raise AdvtuneError(
                    f"labels must be in [0, {classes - 1}] for a model with {classes} outputs, got "
                    f"values in [{yb.min().item()}, {yb.max().item()}]"
                )
            with torch.no_grad():
                correct = model(xb).argmax(1) == yb
            counter.take()
            idx_c = correct.nonzero().flatten()
            xc, yc = xb[idx_c], yb[idx_c]
            need = GATE_SAMPLES - sum(len(p) for p in probe_y)  # the gate's probe: first clean-correct examples
            if need > 0 and len(idx_c):
                probe_x.append(xc[:need])
                probe_y.append(yc[:need])
                probe_idx.append((idx_c[:need] + n).cpu())
            alive = torch.ones(len(xc), dtype=torch.bool, device=device)
            for a, s in zip(attacks, specs):
                status = torch.full((len(xb),), -1, dtype=torch.int8)  # -1: not attacked
                run = alive.nonzero().flatten() if cascade else torch.arange(len(xc), device=device)
                if len(run):
                    hit = _attack_once(model, a, s, xc[run], yc[run], threat, generator, counter, tallies[s])
                    alive[run[hit]] = False
                    status[idx_c[run].cpu()] = hit.to(torch.int8).cpu()
                tallies[s].status.append(status)
            clean_parts.append(correct.cpu())
            label_parts.append(yb.cpu())
            sum_parts.append(xb.flatten(1).double().sum(1).cpu())
            n += len(xb)

        if n == 0:
            raise AdvtuneError("no examples to evaluate (empty data); check the dataset split or the limit")
        result = _summarise(
            threat,
            specs,
            tallies,
            torch.cat(clean_parts),
            torch.cat(label_parts),
            torch.cat(sum_parts),
            generator,
            cascade,
        )
        log.info(
            "clean %.4f, worst case %.4f over %s (n=%d, %s)",
            result.clean_accuracy,
            result.worst_case_accuracy,
            ", ".join(specs),
            n,
            threat,
        )
        if gate:
            cat = lambda parts: torch.cat(parts) if parts else None  # noqa: E731
            result.suspect = masking_gate(
                model,
                cat(probe_x),
                cat(probe_y),
                threat,
                result,
                attacks=attacks,
                probe_idx=cat(probe_idx),
                generator=generator,
            )
            result.gate_grad_evals = counter.take()[0]
    return result


def _summarise(
    threat: ThreatModel,
    specs: list[str],
    tallies: dict[str, _Tally],
    clean: Tensor,
    labels: Tensor,
    checksum: Tensor,
    generator,
    cascade: bool,
) -> EvalResult:
    broken = {s: torch.cat(tallies[s].status) for s in specs}
    n_correct = int(clean.sum())
    robust, n_robust = clean.clone(), {}
    for s in specs:
        robust &= broken[s] != 1
        # cascade: cumulative (robust to this attack and every earlier one); full: this attack alone
        n_robust[s] = int(robust.sum()) if cascade else n_correct - int((broken[s] == 1).sum())
    return EvalResult(
        threat=threat,
        attacks=specs,
        n=len(clean),
        n_clean_correct=n_correct,
        n_robust=n_robust,
        n_robust_worst=int(robust.sum()),
        grad_evals={s: t.grads for s, t in tallies.items()},
        forward_evals={s: t.fwds for s, t in tallies.items()},
        wall_time_s={s: t.seconds for s, t in tallies.items()},
        max_perturbation={s: t.max_pert for s, t in tallies.items()},
        seed=None if generator is None else generator.initial_seed(),
        cascade=cascade,
        robust=robust,
        broken=broken,
        labels=labels,
        checksum=checksum,
    )


# ------------------------------------------------------------------ gradient-masking gate


def _acc(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return correct(model, x, y, len(x)).float().mean().item()


def sanity_check_large_eps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    generator: torch.Generator | None = None,
    steps: int = 10,
) -> list[tuple[str, float]]:
    """PGD-`steps` accuracy on (x, y) at eps, 4*eps (same norm) and linf eps = the whole pixel range.

    The balls are nested (the last one is the whole box), so accuracy must not rise along the list,
    and at the last one any input can be turned into any other: accuracy should be ~0.
    """
    out = []
    cap = (threat.upper - threat.lower) if threat.norm == "linf" else math.inf
    for t in (
        threat,
        threat.with_eps(min(4 * threat.eps, cap)),
        ThreatModel("linf", threat.upper - threat.lower, threat.lower, threat.upper),
    ):
        x_adv = PGD(t, steps=steps)(model, x, y, generator=generator)
        out.append((str(t), _acc(model, x_adv, y)))
    return out


def masking_gate(
    model: nn.Module,
    x: Tensor | None,
    y: Tensor | None,
    threat: ThreatModel,
    result: EvalResult | None = None,
    *,
    attacks: Sequence[Attack] = (),
    probe_idx: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Checks that an evaluation is not fooled by gradient masking; returns short `suspect` strings.

    (a) an iterative attack leaves more accuracy than single-step FGSM; (b) a black-box attack breaks
    samples the white-box ones did not; (c) accuracy rises with eps or stays well above 0 at
    linf eps = the full range; (d) zero or non-finite input gradients; (e) probability-like outputs.
    (x, y) is a small probe of clean-correct samples (`probe_idx`: their positions in `result`).
    """
    suspect: list[str] = []

    def flag(msg: str) -> None:
        log.warning("evaluation may be unreliable (gradient masking?): %s", msg)
        suspect.append(msg)

    with eval_mode(model):
        if x is not None and len(x):
            with torch.no_grad():
                out = model(x)
            # (e) probabilities instead of logits: attacks on softmax outputs see vanishing gradients
            if out.min() > -PROB_ATOL and out.max() < 1 + PROB_ATOL and ((out.sum(1) - 1).abs() < PROB_ATOL).all():
                flag(
                    "probability-outputs: the model returns probabilities (rows in [0,1] sum to 1); "
                    "attack the logits (remove the final softmax)"
                )
            # (d) input gradients of the (non-saturating) margin loss
            with torch.enable_grad():
                xv = x.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(-margin(model(xv), y).sum(), [xv])
            g = g.flatten(1)
            nonfinite = (~torch.isfinite(g)).any(1)
            zero = (g.abs().sum(1) == 0) & ~nonfinite
            if nonfinite.any():
                flag(
                    f"nonfinite-gradients: {nonfinite.float().mean().item():.0%} of probe samples have NaN/inf "
                    "input gradients"
                )
            if zero.any():
                flag(
                    f"zero-gradients: {zero.float().mean().item():.0%} of probe samples have an all-zero input "
                    "gradient; gradient attacks cannot work there (non-differentiable or saturated layer)"
                )
            # (c) eps sanity and (a) FGSM vs iterative, on the probe
            curve = sanity_check_large_eps(model, x, y, threat, generator=generator)
            for (e0, a0), (e1, a1) in zip(curve, curve[1:]):
                if a1 > a0 + TOL_EPS_RISE:
                    flag(f"accuracy-rises-with-eps: PGD-10 accuracy {a0:.2f} at {e0} but {a1:.2f} at {e1}")
            if curve[-1][1] > LARGE_EPS_MAX_ACC:
                flag(
                    f"large-eps-not-broken: PGD-10 accuracy {curve[-1][1]:.2f} at {curve[-1][0]} (the whole "
                    "pixel box) should be ~0"
                )
            acc_fgsm = _acc(model, FGSM(threat)(model, x, y, generator=generator), y)
            iterative = {"gate pgd-10": curve[0][1]}
            if result is not None and probe_idx is not None:
                for a in attacks:
                    s = _spec(a)
                    st = result.broken[s][probe_idx]
                    if _is_black_box(a) or a.grad_evals() <= 1 or (st < 0).any():
                        continue  # single-step, black-box, or not run on the whole probe (cascade)
                    iterative[s] = 1 - st.float().mean().item()
            for s, acc in iterative.items():
                if acc > acc_fgsm + TOL_FGSM:
                    flag(
                        f"iterative-weaker-than-fgsm: {s} leaves accuracy {acc:.2f} > FGSM {acc_fgsm:.2f} "
                        f"on {len(x)} probe samples"
                    )
        # (b) black-box beats white-box, on all evaluated samples
        if result is not None and result.n_clean_correct:
            white = [_spec(a) for a in attacks if not _is_black_box(a)]
            for a in attacks:
                if not _is_black_box(a) or not white:
                    continue
                s = _spec(a)
                only = result.broken[s] == 1
                for w in white:
                    only &= result.broken[w] != 1
                share = only.sum().item() / result.n_clean_correct
                if share > TOL_BLACK_BOX:
                    flag(
                        f"black-box-stronger: {s} broke {share:.1%} of clean-correct samples that "
                        f"{', '.join(white)} did not"
                    )
    return suspect


# ------------------------------------------------------------------ eps curve


def eps_curve(
    model: nn.Module,
    data,
    attack_factory: Callable[[float], Sequence[Attack] | Attack],
    eps_list: Sequence[float],
    *,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    limit: int | None = None,
    gate: bool = True,
) -> EpsCurve:
    """Robust accuracy at each eps (ascending), monotone by construction.

    An example broken at eps_i is broken at every eps_j > eps_i (its adversarial is feasible there),
    so the curve reports robust_j = AND_{i<=j} robust_i. The raw per-eps accuracies are kept; if
    they rise with eps beyond noise the attacks are unreliable and it is flagged in `suspect`.
    eps = 0 gives the clean accuracy. The gate runs once, with the smallest positive eps.
    """
    eps_sorted = sorted({float(e) for e in eps_list})
    if not eps_sorted or any(not math.isfinite(e) or e < 0 for e in eps_sorted):
        raise AdvtuneError(f"eps_list must be non-empty finite numbers >= 0, got {list(eps_list)}")
    positive = [e for e in eps_sorted if e > 0]
    if len(positive) > 1 and isinstance(data, Iterator):
        raise AdvtuneError(
            "eps_curve evaluates the data once per eps: pass an (x, y) pair or a list/DataLoader, "
            "not a one-shot iterator"
        )
    if not positive:
        raise AdvtuneError("eps_list needs at least one eps > 0")
    results: list[EvalResult] = []
    for i, e in enumerate(positive):
        attacks = attack_factory(e)
        attacks = list(attacks) if isinstance(attacks, (list, tuple)) else [attacks]
        for a in attacks:
            if not isinstance(getattr(a, "threat", None), ThreatModel) or not math.isclose(a.threat.eps, e):
                raise AdvtuneError(
                    f"attack_factory({e}) returned {_spec(a)} for "
                    f"eps={getattr(getattr(a, 'threat', None), 'eps', None)}; build the attacks with "
                    "ThreatModel(norm, eps) from the eps it is given"
                )
        r = robust_accuracy(
            model, data, attacks, batch_size=batch_size, generator=generator, limit=limit, gate=gate and i == 0
        )
        if results and (
            r.n != results[0].n
            or not torch.equal(r.labels, results[0].labels)
            or not torch.equal(r.checksum, results[0].checksum)
        ):
            raise AdvtuneError(
                "the data came in a different order or size on a second pass; eps_curve needs the "
                "same examples in the same order for every eps (no shuffling)"
            )
        results.append(r)
    first = results[0]
    n = first.n
    cum = first.robust.clone()
    by_eps = {0.0: (first.n_clean_correct / n, first.n_clean_correct / n)}
    prev = first.clean_accuracy
    suspect = list(first.suspect)
    for e, r in zip(positive, results):
        cum &= r.robust
        raw = r.worst_case_accuracy
        if raw > prev + max(0.02, 2 / n):
            msg = f"accuracy-rises-with-eps: {prev:.3f} -> {raw:.3f} at eps={e:g} (raw, before monotone repair)"
            log.warning("evaluation may be unreliable: %s", msg)
            suspect.append(msg)
        prev = raw
        by_eps[e] = (cum.sum().item() / n, raw)
    eps_out = eps_sorted
    return EpsCurve(
        eps=eps_out,
        accuracy=[by_eps[e][0] for e in eps_out],
        raw_accuracy=[by_eps[e][1] for e in eps_out],
        clean_accuracy=first.clean_accuracy,
        n=n,
        attacks=[r.attacks for r in results],
        results=results,
        suspect=suspect,
    )


__all__ = [
    "EvalResult",
    "EpsCurve",
    "robust_accuracy",
    "eps_curve",
    "masking_gate",
    "sanity_check_large_eps",
    "suite",
    "SUITES",
    "GATE_SAMPLES",
]
