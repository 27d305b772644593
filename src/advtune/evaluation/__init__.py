"""Honest robustness evaluation: clean and robust accuracy, worst case per sample, eps curves, masking gate.

How the numbers are made (see docs/attacks.md):
- By default each attack runs only on the examples still robust after the previous ones, cheapest
  first and black-box attacks last (`cascade=True`: AutoAttack's protocol; once no example survives,
  no further attack runs). The worst case per example is exact: an example is robust only if no
  attack broke it; the per-attack numbers are cumulative along the list. `cascade=False` runs every
  attack on *all* clean-correct examples, so the per-attack accuracies are comparable with each
  other (what eps curves and attack comparisons use), at the cost of attacking broken examples.
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
    passed_line,
    sanity_check_large_eps,
    spec_of,
)
from .protocol import SUITES, check_attacks, compiled_queries, robust_accuracy, suite, with_compile
from .results import EpsCurve, EvalResult
from .transfer import Transfer  # registers the `transfer` attack

__all__ = [
    "EpsCurve",
    "Transfer",
    "EvalResult",
    "GATE_SAMPLES",
    "LARGE_EPS_MAX_ACC",
    "PROB_ATOL",
    "SUITES",
    "check_attacks",
    "TOL_BLACK_BOX",
    "TOL_EPS_RISE",
    "TOL_FGSM",
    "compiled_queries",
    "eps_curve",
    "is_black_box",
    "masking_gate",
    "passed_line",
    "robust_accuracy",
    "sanity_check_large_eps",
    "spec_of",
    "suite",
    "with_compile",
]
