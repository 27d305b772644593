"""The catastrophic-overfitting guard (fast AT): stop when PGD accuracy on a fixed subset collapses."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..cost import CostMeter
from ..data import TensorData
from ..metrics import robust_accuracy_quick

log = logging.getLogger(__name__)


class OverfitGuard:
    """Catastrophic-overfitting guard for single-step (FGSM) training (Wong et al. 2020): after each
    epoch, PGD accuracy on a fixed training subset; if it falls more than `drop` below the best seen,
    the best weights are restored and training stops."""

    name = "overfit-guard"

    def __init__(
        self,
        attack,
        x: torch.Tensor,
        y: torch.Tensor,
        drop: float = 0.2,
        seed: int | None = 0,
        meter: CostMeter | None = None,
    ):
        self.attack, self.x, self.y, self.drop, self.seed, self.meter = attack, x, y, drop, seed, meter
        self.best_acc = -1.0
        self.best_state: dict | None = None
        self.tripped_at: int | None = None

    def checkpoint_state(self) -> dict:
        """What the guard remembers between epochs, kept in the training checkpoint: a resumed run compares with the
        same best and restores the same weights as an uninterrupted one."""
        return {"best_acc": self.best_acc, "best_state": self.best_state}

    def restore_checkpoint_state(self, state: dict) -> None:
        self.best_acc = float(state["best_acc"])
        self.best_state = state.get("best_state")

    def __call__(self, model: nn.Module, record: dict) -> str | None:
        data = TensorData(self.x, self.y)
        acc = robust_accuracy_quick(model, data, self.attack, 256, self.seed, self.meter)
        record["guard_pgd_acc"] = acc
        if acc >= self.best_acc:
            self.best_acc = acc
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return None
        if acc < self.best_acc - self.drop:
            log.warning(
                "catastrophic overfitting: PGD accuracy on the guard subset fell from %.3f to %.3f; "
                "restoring the best weights and stopping",
                self.best_acc,
                acc,
            )
            model.load_state_dict(self.best_state)
            record["guard_reverted_to_acc"] = self.best_acc
            self.tripped_at = record.get("epoch")
            return "restored"  # these weights are the run's end (--ema's average would lay the collapse over them)
        return None
