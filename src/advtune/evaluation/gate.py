"""The gradient-masking gate (AutoAttack's checks, extended): run after every evaluation, it records
what looks wrong in `EvalResult.suspect`, with a loud log warning."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..attacks import FGSM, PGD, Attack, margin
from ..devices import eval_mode
from ..errors import AdvtuneError
from ..metrics import correct
from ..threat import ThreatModel
from .results import EvalResult

log = logging.getLogger(__name__)


GATE_SAMPLES = 64  # size of the probe subset the gate attacks itself (cheap: ~32 grads/sample)


TOL_FGSM = 0.05  # an iterative attack may leave this much more accuracy than FGSM on the probe


TOL_BLACK_BOX = 0.01  # share of clean-correct samples only a black-box attack broke


TOL_EPS_RISE = 0.05  # accuracy may rise this much with eps on the probe (noise), eps_curve uses 0.02


LARGE_EPS_MAX_ACC = 0.10  # accuracy allowed at linf eps = the full pixel range (should be ~0)


PROB_ATOL = 1e-5  # outputs within this of a probability simplex are flagged


ZERO_CE_SHARE = 0.01  # share of probe samples with an exactly-zero cross-entropy gradient (saturated softmax)


def above_noise(tol: float, n: int) -> float:
    """A tolerance on a share of `n` examples, never under two examples' worth (eps_curve's floor): on a small test
    set one image must not call a model suspect."""
    return max(tol, 2 / max(n, 1))


def spec_of(a) -> str:
    return getattr(a, "spec", None) or type(a).__name__


def is_black_box(a) -> bool:
    return bool(getattr(a, "black_box", False))


def passed_line(specs: Sequence[str], probed: bool = True) -> str:
    """ "masking gate: passed", saying so when its black-box check had nothing to run on (no black-box attack in the
    list: Square is linf-only, so an l2 evaluation has none unless a transfer attack is given; or no gradient attack
    to compare it with), and "not run" where no example was classified correctly (`probed` off: no probe to check)."""
    from ..attacks.registry import attack_class, parse_spec

    def black_box(spec: str) -> bool:
        try:
            return bool(getattr(attack_class(parse_spec(spec, "attack")[0]), "black_box", False))
        except AdvtuneError:
            return False

    if not probed:
        return "masking gate: not run (no test example is classified correctly, so there was nothing to check)"
    kinds = [black_box(s) for s in specs]
    if any(kinds) and not all(kinds):
        return "masking gate: passed"
    if kinds and all(kinds):
        return (
            "masking gate: passed, without its black-box check (no gradient attack ran to compare the black-box "
            "one with)"
        )
    return (
        "masking gate: passed, without its black-box check (no black-box attack ran: add square under linf, or "
        "transfer:source=RUN)"
    )


def gate_word(
    suspect: Sequence[str] | None, specs: Sequence[str] | str | None, probed: bool = True, norm: str = "linf"
) -> str:
    """The gate's verdict in a table cell, as `passed_line` says it: "SUSPECT", "not run", "passed (no black-box
    check)" where no black-box attack ran, "passed (black-box attacks only)" where no gradient attack ran to compare
    them with, else "passed". `specs`: the attacks that measured the model (a list, one comma-separated string, or a
    suite's name under `norm`)."""
    if suspect:
        return "SUSPECT"
    suites = {"standard": ["apgd-ce", "apgd-t"] + (["square"] if norm == "linf" else []), "quick": ["fgsm", "pgd"]}
    if isinstance(specs, str):
        from ..attacks import split_attack_list

        specs = suites.get(specs.strip().lower()) or split_attack_list(specs)
    line = passed_line(list(specs or []), probed)
    if "not run" in line:
        return "not run"
    if "no gradient attack ran" in line:
        return "passed (black-box attacks only)"
    return "passed (no black-box check)" if "without its black-box check" in line else "passed"


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
    linf eps = the full range; (d) zero or non-finite input gradients (of the margin and of the cross-entropy);
    (e) probability-like outputs; (f) a randomized forward (two identical calls differ).
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
            # (f) a randomized forward (noise, dropout left on): the evaluation saw one random draw (AutoAttack's check)
            with torch.no_grad():
                again = model(x)
            changed = (again.argmax(1) != out.argmax(1)).float().mean().item()
            if changed or not torch.allclose(again.float(), out.float(), rtol=2e-2, atol=2e-2):  # bf16: ~1e-2 apart
                flag(
                    f"randomized-outputs: two identical forwards differ ({changed:.0%} of probe predictions changed); "
                    "the attacks saw one random draw: evaluate with averaged gradients (EOT) or a deterministic forward"
                )
            # (d) input gradients of the (non-saturating) margin loss, and of the cross-entropy FGSM, PGD and APGD-CE
            # follow: logits scaled up saturate the softmax, so its gradient is exactly zero where the margin's is not
            with torch.enable_grad():
                xv = x.detach().requires_grad_(True)
                logits = model(xv)
                (g,) = torch.autograd.grad(-margin(logits, y).sum(), [xv], retain_graph=True)
                ce = nn.functional.cross_entropy(logits, y, reduction="sum")  # (fp16: zero past a gap of ~17, as
                # the attacks' gradients: flagged alike, and only where no attack of the list can go on)
                (g_ce,) = torch.autograd.grad(ce, [xv])
            zero_ce = (g_ce.flatten(1).abs().sum(1) == 0).float().mean().item()
            # a list with a scale-invariant attack (a DLR or margin loss, a black-box one) measured those examples
            covered = any(
                is_black_box(a) or getattr(a, "loss", "ce") != "ce" or "apgd-t" in spec_of(a) for a in attacks
            )
            if zero_ce > above_noise(ZERO_CE_SHARE, len(x)) and covered:
                log.warning(
                    "%.0f%% of probe samples have an all-zero cross-entropy gradient (a saturated softmax); "
                    "the list's DLR / margin / black-box attacks measured them",
                    100 * zero_ce,
                )
            elif zero_ce > above_noise(ZERO_CE_SHARE, len(x)):  # no attack of the list could go on there
                flag(
                    f"zero-ce-gradients: {zero_ce:.0%} of probe samples have an all-zero cross-entropy input gradient "
                    "(a saturated softmax: logits too large), and no attack of the list has a loss that does not "
                    "saturate: FGSM, PGD and APGD-CE cannot move them; add apgd-t or square (the standard suite)"
                )
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
                if a1 > a0 + above_noise(TOL_EPS_RISE, len(x)):
                    flag(f"accuracy-rises-with-eps: PGD-10 accuracy {a0:.2f} at {e0} but {a1:.2f} at {e1}")
            if curve[-1][1] > above_noise(LARGE_EPS_MAX_ACC, len(x)):
                flag(
                    f"large-eps-not-broken: PGD-10 accuracy {curve[-1][1]:.2f} at {curve[-1][0]} (the whole "
                    "pixel box) should be ~0"
                )
            acc_fgsm = _acc(model, FGSM(threat)(model, x, y, generator=generator), y)
            iterative = {"gate pgd-10": curve[0][1]}
            if result is not None and probe_idx is not None:
                for a in attacks:
                    s = spec_of(a)
                    st = result.broken[s][probe_idx.to(result.broken[s].device)]  # records stay on the CPU
                    if is_black_box(a) or a.grad_evals() <= 1 or (st < 0).any():
                        continue  # single-step, black-box, or not run on the whole probe (cascade)
                    iterative[s] = 1 - st.float().mean().item()
            for s, acc in iterative.items():
                if acc > acc_fgsm + above_noise(TOL_FGSM, len(x)):
                    flag(
                        f"iterative-weaker-than-fgsm: {s} leaves accuracy {acc:.2f} > FGSM {acc_fgsm:.2f} "
                        f"on {len(x)} probe samples"
                    )
        # (b) black-box beats white-box, on all evaluated samples
        if result is not None and result.n_clean_correct:
            white = [spec_of(a) for a in attacks if not is_black_box(a)]
            for a in attacks:
                if not is_black_box(a) or not white:
                    continue
                s = spec_of(a)
                only = result.broken[s] == 1
                for w in white:
                    only &= result.broken[w] != 1
                share = only.sum().item() / result.n_clean_correct
                if share > above_noise(TOL_BLACK_BOX, result.n_clean_correct):
                    flag(
                        f"black-box-stronger: {s} broke {share:.1%} of clean-correct samples that "
                        f"{', '.join(white)} did not"
                    )
    return suspect
