"""ONE training loop for standard, adversarial and selective training.

`fit(model, train, objective, config, selection=...)`: the objective decides what a step optimises
(clean CE, adversarial CE on any attack, TRADES); the selection decides which parameters may move.
Every step is a pure function of (seed, epoch, step), so a run killed at any point resumes from its
last checkpoint to bit-identical final weights.

Layout: config.py (TrainConfig, schedules), objectives.py, loop.py (fit), selection.py (what may
move), checkpoint.py (exact resume), budget.py (steps for a compute budget), guard.py.
"""

from .budget import cost_per_example, steps_for_budget
from .checkpoint import RESUMABLE_CHANGES, History, check_resume, config_changes, load_checkpoint, save_checkpoint
from .config import SCHEDULES, TrainConfig, epochs_for, lr_at, total_steps
from .guard import OverfitGuard
from .loop import EpochCallback, StepCallback, fit
from .objectives import (
    Adversarial,
    Clean,
    LocalFeature,
    Objective,
    Trades,
    adversarial,
    build_objective,
    clean,
    forward_to,
    local_feature,
    trades,
)
from .selection import Trainable

__all__ = [
    "Adversarial",
    "Clean",
    "EpochCallback",
    "History",
    "LocalFeature",
    "Objective",
    "OverfitGuard",
    "RESUMABLE_CHANGES",
    "SCHEDULES",
    "StepCallback",
    "Trades",
    "TrainConfig",
    "Trainable",
    "adversarial",
    "build_objective",
    "check_resume",
    "clean",
    "config_changes",
    "cost_per_example",
    "epochs_for",
    "fit",
    "forward_to",
    "load_checkpoint",
    "local_feature",
    "lr_at",
    "save_checkpoint",
    "steps_for_budget",
    "total_steps",
    "trades",
]
