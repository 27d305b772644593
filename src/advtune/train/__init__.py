"""ONE training loop for standard, adversarial and selective training.

`fit(model, train, objective, config, selection=...)`: the objective decides what a step optimises (clean CE,
adversarial CE on any attack, TRADES, distillation, adversarial or random weight perturbation); the selection
decides which parameters may move.
Every step is a pure function of (seed, epoch, step), so a run killed at any point resumes from its
last checkpoint to bit-identical final weights.

Layout: config.py (TrainConfig, schedules), objectives.py (distill.py, awp.py), loop.py (fit), selection.py (what may
move), checkpoint.py (exact resume), budget.py (steps for a compute budget), guard.py.
"""

from __future__ import annotations

from ..lazy import lazy_exports

# public names by the submodule that defines them. Loaded on first use, so config.py (TrainConfig: no
# torch) can be imported on its own, e.g. by the CLI's help.
_MODULES = {
    "config": ("SCHEDULES", "TrainConfig", "epochs_for", "lr_at", "total_steps"),
    "objectives": (
        "Adversarial",
        "Clean",
        "LocalFeature",
        "Objective",
        "Trades",
        "adversarial",
        "build_objective",
        "check_objective",
        "clean",
        "forward_to",
        "local_feature",
        "trades",
    ),
    "distill": ("Distill", "probe_stage_attack", "with_probe_teacher"),
    "loop": ("EpochCallback", "StepCallback", "fit"),
    "selection": ("Trainable",),
    "checkpoint": (
        "History",
        "RESUMABLE_CHANGES",
        "check_resume",
        "config_changes",
        "load_checkpoint",
        "save_checkpoint",
    ),
    "budget": ("cost_per_example", "steps_for_budget"),
    "guard": ("OverfitGuard",),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
