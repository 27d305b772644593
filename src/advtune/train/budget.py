"""Training to a compute budget: gradient evaluations per example of an objective, and the optimizer
steps a budget buys."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..errors import AdvtuneError

log = logging.getLogger(__name__)


def cost_per_example(objective, model: nn.Module | None = None, example: torch.Tensor | None = None) -> float:
    """Gradient evaluations one training example costs under `objective`: attack steps + the update,
    or for a local objective its block passes weighted by the block's FLOPs share."""
    if hasattr(objective, "block_fraction"):
        if model is None or example is None:
            raise AdvtuneError("the cost of a local objective needs the model and an example input")
        return (objective.attack_grad_evals() + objective.update_passes()) * objective.block_fraction(model, example)
    return float(int(objective.attack_grad_evals()) + 1)


def steps_for_budget(
    budget: int, objective, batch_size: int, n_train: int | None = None, per_example: float | None = None
) -> int:
    """Optimizer steps that spend at least `budget` training gradient evaluations: a step costs its
    batch x (the attack's gradient evaluations + 1 for the update); the last batch of an epoch of
    `n_train` examples is smaller. At least one step."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise AdvtuneError(f"budget must be a positive number of gradient evaluations, got {budget!r}")
    per_example = per_example if per_example is not None else cost_per_example(objective)
    if not n_train:
        return max(1, math.ceil(budget / (per_example * batch_size)))
    sizes = [min(batch_size, n_train - i) for i in range(0, n_train, batch_size)]
    per_epoch = per_example * n_train
    epochs, rest = divmod(budget, per_epoch)
    steps = int(epochs) * len(sizes)
    for size in sizes:
        if rest <= 0:
            break
        rest -= per_example * size
        steps += 1
    return max(1, steps)
