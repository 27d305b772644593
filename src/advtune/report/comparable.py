"""What a report may compare: rows measured alike (the same attacks on the same number of test images), and the
frontier's findings only where they were, with their cost shares called lower bounds where the base model's training
cost is not recorded."""

from __future__ import annotations

from ..frontier import as_points
from ..frontier import findings as frontier_findings
from .costs import base_unrecorded


def frontier_notes(points: list, rows: list[dict]) -> list[str]:
    """The frontier's findings for an experiment's rows: none at an eps whose rows were measured differently, and
    the cost shares called lower bounds where the base model's training cost is not recorded."""
    mixed = mixed_protocols(rows)
    notes = frontier_findings([p for p in as_points(points) if p.eps not in mixed])
    if notes and any(base_unrecorded(r) for r in rows):
        notes.append(
            "The base model's training cost is not recorded (weights brought in, or a fine-tuned base): the "
            "fine-tuning curves' costs leave it out, so their shares of the reference's cost are lower bounds."
        )
    return notes


def protocol_of(r: dict) -> tuple:
    """What measured a row: its attacks and number of test images (from its evaluation record)."""
    return (r.get("eval_attacks"), r.get("eval_examples"))


def mixed_protocols(rows: list[dict]) -> set[float]:
    """The eps values whose rows were not all measured the same way (a folder from before experiments refused a
    changed evaluation): nothing there is compared."""
    seen: dict[float, set[tuple]] = {}
    for r in rows:
        seen.setdefault(r["eps"], set()).add(protocol_of(r))
    return {eps for eps, protocols in seen.items() if len(protocols) > 1}
