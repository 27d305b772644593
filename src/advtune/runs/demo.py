"""`advtune demo`: the main job end to end on MNIST, sized for a few minutes on 2 CPU cores.

standard model -> its collapse under FGSM/PGD/APGD -> vulnerability map and concentration curve ->
`advtune harden`'s recipe (a whole-network probe for the first 20% of the budget, then only the entries it moved
most within every layer's share of 10% by its score, plus the output layer whole; selective adversarial fine-tuning)
next to the same budget spent on all parameters, on random entries as many as the mask, and on
adversarial training from scratch, each as a curve of snapshots -> evaluation -> report with the
frontier (HTML + Markdown). `--full` runs configs/frontier-mnist-eps0.3.yaml instead (real sizes:
hours on a CPU).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import AdvtuneError
from ..report import headline, write_report
from . import experiment as experiment_job
from .configs import DemoConfig
from .experiment import format_results

log = logging.getLogger(__name__)

DEMO_NOTE = (
    "Demo sizes (CPU, a few minutes): standard small-cnn trained 1 epoch on 20k MNIST images; analysis on 500 "
    "training images; every curve = 150k training gradient evaluations with 3 snapshots; evaluation on the first "
    "500 test images. The measured frontier at real sizes, with adversarial training run to its plateau, is in "
    "docs/RESULTS.md (bench/frontier.py)."
)
BUDGET = 150_000


def demo_config(data_dir: str | None = None, seed: int = 0) -> dict:
    """standard -> harden (advtune harden's recipe) next to full-network fine-tuning, a random selection
    with as many trainable parameters, and adversarial training from scratch, all at the same budget."""
    curve = {"budget": BUDGET, "points": 3, "limit": 20000}
    return {
        "name": "advtune-demo",
        "seed": seed,
        "notes": DEMO_NOTE,
        "data_dir": data_dir,
        "base": {
            "dataset": "mnist",
            "model": "small-cnn",
            "limit": 20000,
            "train": {"epochs": 1, "batch_size": 128, "optimizer": "adam", "lr": 0.001},
        },
        "threat": {"norm": "linf", "eps": 0.3},
        "evaluation": {"attacks": "fgsm,pgd:steps=20,apgd-ce:steps=50", "limit_test": 500, "batch_size": 500},
        "analysis": {
            "attack": "pgd:steps=10",
            "criteria": ["activation-shift", "taylor"],
            "limit": 500,
            "curve_limit": 500,
        },
        "variants": [
            {"name": "standard", "kind": "standard"},
            {"name": "harden", "recipe": "harden", **curve},
            {"name": "random-same-params", "recipe": "harden", "select": "random", "params_like": "harden", **curve},
            {
                "name": "full-ft",
                "kind": "finetune",
                "select": "all",
                "attack": "pgd:steps=5",
                "eps_warmup": 0.3,
                **curve,
            },
            {
                "name": "pgd-at-same-budget",
                "kind": "train",
                "attack": "pgd:steps=5",
                "eps_warmup": 0.3,
                "reference": False,
                **curve,
            },
        ],
    }


FULL_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "frontier-mnist-eps0.3.yaml"  # the checkout's


def full_config(data_dir: str | None, seed: int) -> dict:
    """`--full`: the MNIST frontier's own config, with the demo's --seed and --data-dir (which it would ignore)."""
    from .experiment.config import load_config

    if not FULL_CONFIG.is_file():
        raise AdvtuneError(f"--full needs {FULL_CONFIG} (it ships with the source checkout, not the wheel)")
    return {**load_config(FULL_CONFIG), "seed": seed, "data_dir": data_dir}


def run(cfg: DemoConfig) -> list[dict]:

    out = Path(cfg.out)
    if cfg.full:
        config = full_config(cfg.data_dir, cfg.seed)
    else:
        config = demo_config(cfg.data_dir, cfg.seed)
    print(f"advtune demo -> {out}  ({'full sizes' if cfg.full else DEMO_NOTE})")
    source = str(FULL_CONFIG) if cfg.full else None
    rows = experiment_job.run(config, out, device=None if cfg.device == "auto" else cfg.device, source=source)
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
