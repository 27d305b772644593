"""`advtune demo`: the main job end to end on MNIST, sized for a few minutes on 2 CPU cores.

standard model -> its collapse under FGSM/PGD/APGD -> vulnerability map and concentration curve ->
`advtune harden`'s recipe (a whole-network probe for the first 20% of the budget, then only the entries it moved
most within every layer's share of 10% by its score, plus the output layer whole; selective adversarial fine-tuning)
next to the same budget spent on all parameters, on random entries as many as the mask, and on
adversarial training from scratch, each as a curve of snapshots -> evaluation -> report with the
frontier (HTML + Markdown). `--full` runs the same job at the MNIST frontier's sizes (docs/RESULTS.md: the full
training set, 900k gradient evaluations per curve, the strong protocol on 1000 test images, adversarial training
from scratch to its plateau as the reference): hours on a CPU, into its own folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

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
DEMO_OUT, FULL_OUT = "runs/demo", "runs/demo-full"


FULL_NOTE = (
    "Full sizes (hours on a CPU): standard small-cnn trained 2 epochs on 55k MNIST images; analysis on 2000 "
    "training images; every fine-tuning curve = 900k training gradient evaluations with 5 snapshots; PGD-10 "
    "adversarial training from scratch for 10 epochs as the reference; evaluation on the first 1000 test images with "
    "APGD-CE + APGD-T (and FGSM, PGD-20 for the collapse), the frontier's sizes (docs/RESULTS.md)."
)


def demo_config(data_dir: str | None = None, seed: int = 0, full: bool = False) -> dict:
    """standard -> harden (advtune harden's recipe) next to full-network fine-tuning, a random selection
    with as many trainable parameters, and adversarial training from scratch, all at the same budget.
    `full`: the same job at the MNIST frontier's sizes, with adversarial training run to its plateau."""
    limit = 55000 if full else 20000
    curve = {"budget": 900_000 if full else BUDGET, "points": 5 if full else 3, "limit": limit}
    attacks = "fgsm,pgd:steps=20,apgd-ce,apgd-t:n_target_classes=3" if full else "fgsm,pgd:steps=20,apgd-ce:steps=50"
    return {
        "name": "advtune-demo-full" if full else "advtune-demo",
        "seed": seed,
        "notes": FULL_NOTE if full else DEMO_NOTE,
        "data_dir": data_dir,
        "base": {
            "dataset": "mnist",
            "model": "small-cnn",
            "limit": limit,
            "train": {"epochs": 2 if full else 1, "batch_size": 128, "optimizer": "adam", "lr": 0.001},
        },
        "threat": {"norm": "linf", "eps": 0.3},
        "evaluation": {"attacks": attacks, "limit_test": 1000 if full else 500, "batch_size": 500},
        "analysis": {
            "attack": "pgd:steps=20" if full else "pgd:steps=10",
            "criteria": ["activation-shift", "taylor"],
            "limit": 2000 if full else 500,
            "curve_limit": 1000 if full else 500,
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
            *(  # the frontier's reference: PGD-10 adversarial training from scratch until it plateaus
                [
                    {
                        "name": "pgd-at",
                        "kind": "train",
                        "attack": "pgd:steps=10",
                        "reference": True,
                        "eps_warmup": 0.1,
                        "train": {"epochs": 10},
                        "points": 10,
                        "limit": limit,
                    }
                ]
                if full
                else []
            ),
        ],
    }


def run(cfg: DemoConfig) -> list[dict]:

    out = Path(cfg.out if cfg.out is not None else FULL_OUT if cfg.full else DEMO_OUT)  # their own folders
    config = demo_config(cfg.data_dir, cfg.seed, full=cfg.full)
    print(f"advtune demo -> {out}  ({FULL_NOTE if cfg.full else DEMO_NOTE})")
    rows = experiment_job.run(config, out, device=None if cfg.device == "auto" else cfg.device)
    std = next((r for r in rows if r["kind"] == "standard"), None)
    if std:
        per = ", ".join(f"{k[4:-1]} {100 * v:.1f}%" for k, v in std.items() if k.startswith("acc["))
        print(
            f"\nThe standard model: clean {100 * std['clean_acc']:.2f}%; under attack at eps={std['eps']:g}: {per} "
            "(each attack on what the ones before it left)."
        )
    print("\n" + format_results(rows) + "\n")
    for line in headline(rows):
        print("* " + line.replace("**", ""))
    paths = write_report(out)
    print(f"\nreport: {paths['html']} (open in a browser) and {paths['md']}")
    return rows
