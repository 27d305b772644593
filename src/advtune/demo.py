"""`advtune demo`: the main job end to end (grows with the method: attack, analyse, fine-tune, report)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    full: bool = False
    data_dir: str | None = None
    seed: int = 0
    device: str = "auto"


def run_demo(cfg: DemoConfig) -> dict:
    from .jobs import TrainRun, train_run
    from .train import TrainConfig

    out = Path(cfg.out)
    std = out / "standard"
    run = TrainRun(dataset="mnist", model="small-cnn", out=str(std), data_dir=cfg.data_dir,
                   limit=None if cfg.full else 20000, device=cfg.device, overwrite=True,
                   train=TrainConfig(epochs=2 if cfg.full else 1, batch_size=128, lr=1e-3, seed=cfg.seed))
    summary = train_run(run)
    print(f"standard small-cnn on MNIST: clean test accuracy {100 * summary['test_acc']:.2f}%  ({std})")
    return summary
