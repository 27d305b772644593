"""`advtune demo`: the main job end to end on MNIST, sized for a few minutes on 2 CPU cores.

standard model -> its collapse under FGSM/PGD/APGD -> vulnerability map and concentration curve ->
selective adversarial fine-tuning of the top 10% -> the same budget on all parameters and on a random
10% for comparison -> strong evaluation of each -> report (HTML + Markdown). `--full` runs
configs/mnist-claim.yaml instead (real sizes: tens of minutes on a CPU).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_NOTE = ("Demo sizes (CPU, a few minutes): standard small-cnn trained 1 epoch on 20k MNIST images; analysis on 500 "
             "training images; each fine-tuning = PGD-10 on 6k images for 1 epoch; evaluation on the first 500 test "
             "images. `advtune demo --full` runs the real sizes (configs/mnist-claim.yaml).")


def demo_config(data_dir: str | None = None, seed: int = 0) -> dict:
    return {
        "name": "advtune-demo", "seed": seed, "notes": DEMO_NOTE, "data_dir": data_dir,
        "base": {"dataset": "mnist", "model": "small-cnn", "limit": 20000,
                 "train": {"epochs": 1, "batch_size": 128, "optimizer": "adam", "lr": 0.001}},
        "threat": {"norm": "linf", "eps": 0.3},
        "evaluation": {"attacks": "fgsm,pgd:steps=20,apgd-ce:steps=50", "limit": 500, "batch_size": 500},
        "analysis": {"attack": "pgd:steps=10", "criteria": ["activation-shift", "taylor"], "limit": 500, "curve_limit": 500},
        "variants": [
            {"name": "standard", "kind": "standard"},
            {"name": "selective-10", "kind": "finetune", "select": "top", "criterion": "taylor", "share": 0.1,
             "attack": "pgd:steps=10", "eps_warmup": 0.2, "limit": 6000},
            {"name": "full-ft", "kind": "finetune", "select": "all", "attack": "pgd:steps=10", "eps_warmup": 0.2, "limit": 6000},
            {"name": "random-10", "kind": "finetune", "select": "random", "share": 0.1, "attack": "pgd:steps=10", "eps_warmup": 0.2, "limit": 6000},
        ],
    }


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    full: bool = False
    data_dir: str | None = None
    seed: int = 0
    device: str = "auto"


def run_demo(cfg: DemoConfig) -> list[dict]:
    from .experiment import format_results, run_experiment
    from .report import headline, write_report

    out = Path(cfg.out)
    if cfg.full:
        config = str(Path(__file__).resolve().parents[2] / "configs" / "mnist-claim.yaml")
        if not Path(config).is_file():
            from .errors import AdvtuneError

            raise AdvtuneError(f"--full needs {config} (it ships with the source checkout)")
    else:
        config = demo_config(cfg.data_dir, cfg.seed)
    print(f"advtune demo -> {out}  ({'full sizes' if cfg.full else DEMO_NOTE})")
    rows = run_experiment(config, out, device=None if cfg.device == "auto" else cfg.device)
    std = next((r for r in rows if r["kind"] == "standard"), None)
    if std:
        per = ", ".join(f"{k[4:-1]} {100 * v:.1f}%" for k, v in std.items() if k.startswith("acc["))
        print(f"\nThe standard model: clean {100 * std['clean_acc']:.2f}%; under attack at eps={std['eps']:g}: {per}.")
    print("\n" + format_results(rows) + "\n")
    for line in headline(rows):
        print("* " + line.replace("**", ""))
    paths = write_report(out)
    print(f"\nreport: {paths['html']} (open in a browser) and {paths['md']}")
    return rows
