"""The report's one cost basis: every number of cost in the lead, the table and every figure counts
a final model from scratch (its own training, the base model's training, the analysis behind it)."""

from __future__ import annotations

COST_BASIS = (
    "Costs (lead, table and every figure alike): gradient evaluations = forward+backward passes of one example "
    "(attack steps plus the update); a fine-tuned model's cost includes the base model's training and the "
    "analysis behind its selection, so every variant is counted from scratch."
)


def total_cost(r: dict) -> int:
    """Every gradient evaluation behind a final model: its own training and, for fine-tuning, the base
    model's training and the analysis behind its selection (the frontier counts its curves the same way)."""
    return sum(int(r.get(k) or 0) for k in ("grad_evals", "analysis_grad_evals", "base_grad_evals"))


def total_wall(r: dict) -> float:
    """Wall seconds on the same basis as `total_cost`."""
    return sum(float(r.get(k) or 0.0) for k in ("wall_s", "analysis_wall_s", "base_wall_s"))
