"""The vulnerability analysis' sentences in a report: what restoring the top components repairs against the
random control, and each criterion's rank agreement with the restoration ground truth."""

from __future__ import annotations

from typing import Mapping


def concentration_notes(analysis: str, curves: Mapping[str, dict]) -> list[str]:
    """What restoring the top 1%, 5% and 10% of components repairs, against the random control."""
    notes = []
    for name, c in curves.items():
        pts = {round(s, 4): (r, m) for s, r, m in zip(c["shares"], c["repaired"], c["random_mean"])}
        for share in (0.01, 0.05, 0.1):
            if share in pts and pts[share][0] is not None:
                rnd = pts[share][1]  # None where no random seed ran: not "repaired nothing"
                notes.append(
                    f"{analysis}: restoring the top {100 * share:g}% of components by {name} repairs "
                    f"{100 * pts[share][0]:.1f}% of {c['n_errors']} adversarial errors "
                    + (f"(random {100 * rnd:.1f}%)." if rnd is not None else "(random: not measured).")
                )
    return notes


def agreement_notes(analysis: str, agreement: Mapping[str, float | None]) -> list[str]:
    """Each criterion's rank agreement with the restoration ground truth."""
    return [
        f"{analysis}: rank agreement (Spearman) of {k} with the restoration ground truth: {agreement_words(v)}."
        for k, v in agreement.items()
    ]


def agreement_words(v: float | None) -> str:
    """A Spearman value, or why there is none (a criterion whose scores are all equal ranks nothing)."""
    return "undefined (one criterion's scores are all equal)" if v is None or v != v else f"{v:.3f}"
