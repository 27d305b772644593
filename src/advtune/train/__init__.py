"""ONE training loop for standard, adversarial and selective training.

`fit(model, train, objective, config, selection=...)`: the objective decides what a step optimises
(clean CE, adversarial CE on any attack, TRADES); the selection decides which parameters may move.
Every step is a pure function of (seed, epoch, step), so a run killed at any point resumes from its
last checkpoint to bit-identical final weights.

Layout: config.py (TrainConfig, schedules), objectives.py, loop.py (fit), selection.py (what may
move), checkpoint.py (exact resume), budget.py (steps for a compute budget), guard.py.
"""

from __future__ import annotations

from ..lazy import lazy_exports

# public name -> the submodule that defines it. Loaded on first use, so config.py (TrainConfig: no
# torch) can be imported on its own, e.g. by the CLI's help.
_EXPORTS = {
    "Adversarial": "objectives",
    "Clean": "objectives",
    "EpochCallback": "loop",
    "History": "checkpoint",
    "LocalFeature": "objectives",
    "Objective": "objectives",
    "OverfitGuard": "guard",
    "RESUMABLE_CHANGES": "checkpoint",
    "SCHEDULES": "config",
    "StepCallback": "loop",
    "Trades": "objectives",
    "TrainConfig": "config",
    "Trainable": "selection",
    "adversarial": "objectives",
    "build_objective": "objectives",
    "check_resume": "checkpoint",
    "clean": "objectives",
    "config_changes": "checkpoint",
    "cost_per_example": "budget",
    "epochs_for": "config",
    "fit": "loop",
    "forward_to": "objectives",
    "load_checkpoint": "checkpoint",
    "local_feature": "objectives",
    "lr_at": "config",
    "save_checkpoint": "checkpoint",
    "steps_for_budget": "budget",
    "total_steps": "config",
    "trades": "objectives",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
