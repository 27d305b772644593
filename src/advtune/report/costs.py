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


def base_unrecorded(r: dict) -> bool:
    """A fine-tuned row whose base model's training cost is not recorded (None: weights brought in, a fine-tuned
    base): its total leaves that out, so it is no total."""
    return r["kind"] in ("finetune", "harden") and "base_grad_evals" in r and r["base_grad_evals"] is None


UNRECORDED_BASE = (
    " Where the base model's training cost is not recorded (weights brought in, or a fine-tuned base; marked >= in "
    "the table and the figure's legend), a fine-tuned variant's total leaves it out: a lower bound."
)


def cost_basis(rows: list[dict]) -> str:
    """`COST_BASIS`, and where a row's base cost is unrecorded, that its total is a lower bound."""
    return COST_BASIS + (UNRECORDED_BASE if any(base_unrecorded(r) for r in rows) else "")


def total_words(r: dict) -> str:
    """A row's `total_cost` for a table or a legend: ">=N" where the base's cost is not in it."""
    if r["kind"] == "standard" and r.get("base_recorded") is False:  # weights brought in: not a cost of 0
        return "not recorded"
    return (">=" if base_unrecorded(r) else "") + f"{total_cost(r):,}"
