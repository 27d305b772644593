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

Layout: protocol.py (robust_accuracy, suites), gate.py (the masking gate), curve.py (eps_curve),
results.py (EvalResult, EpsCurve).
"""

from .curve import eps_curve
from .gate import (
    GATE_SAMPLES,
    LARGE_EPS_MAX_ACC,
    PROB_ATOL,
    TOL_BLACK_BOX,
    TOL_EPS_RISE,
    TOL_FGSM,
    is_black_box,
    masking_gate,
    sanity_check_large_eps,
    spec_of,
)
from .protocol import SUITES, robust_accuracy, suite
from .results import EpsCurve, EvalResult

__all__ = [
    "EpsCurve",
    "EvalResult",
    "GATE_SAMPLES",
    "LARGE_EPS_MAX_ACC",
    "PROB_ATOL",
    "SUITES",
    "TOL_BLACK_BOX",
    "TOL_EPS_RISE",
    "TOL_FGSM",
    "eps_curve",
    "is_black_box",
    "masking_gate",
    "robust_accuracy",
    "sanity_check_large_eps",
    "spec_of",
    "suite",
]
