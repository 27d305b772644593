"""An exponential moving average of the trained weights (`--ema DECAY`).

Averaging the weights along adversarial training adds robust accuracy at no training cost (Gowal et
al. 2020, "Uncovering the limits of adversarial training"). Only the trainable tensors are averaged;
entries a selection freezes never move, and the average of a constant is that constant bit for bit
(lerp adds (1 - decay) * 0), so selective fine-tuning stays exact. The decay warms up as
min(decay, (1 + t) / (10 + t)) over the first updates, so the start is not overweighted. Snapshots,
the per-epoch validation, keep-best and the end of `fit` see the averaged weights; training steps and
the epoch callbacks (the overfitting guard judges the model being trained) see the live ones.
BatchNorm statistics are not averaged (the live ones are used). With low-rank adapters the trained
tensors are the factors, so the result is W + avg(U) avg(D), an approximation of the average of the
merged weights.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import AdvtuneError


class WeightAverage:
    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params = list(params)
        self.decay = float(decay)
        self.updates = 0
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @contextmanager
    def swapped(self):
        """The averaged weights in the model for the duration (the live ones put back after)."""
        live = [p.detach().clone() for p in self.params]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live):
                    p.copy_(v)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict | None, where: str) -> None:
        if not state or len(state.get("shadow", ())) != len(self.shadow):
            raise AdvtuneError(f"{where} has no weight average for this run (--ema); start a new run")
        self.updates = int(state["updates"])
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v.to(s.device))
