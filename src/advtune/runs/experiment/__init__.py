"""Run a YAML experiment: one base model, one evaluation protocol, a list of variants side by side.

    name: mnist-claim
    base: {dataset: mnist, model: small-cnn, train: {epochs: 2}}        # or base: {pretrained: runs/x}
    threat: {norm: linf, eps: 0.3}                                       # eps may be a list (a sweep)
    evaluation: {attacks: "apgd-ce,apgd-t", limit: 1000}                 # or suite: standard
    analysis: {attack: "pgd:steps=20", limit: 2000, curve_limit: 1000}
    variants:
      - {name: standard, kind: standard}
      - {name: pgd-at, kind: train, attack: "pgd:steps=10", train: {epochs: 3}}
      - {name: full-ft, kind: finetune, select: all, attack: "pgd:steps=10"}
      - {name: sel, kind: finetune, select: top, share: [0.05, 0.1, 0.2]}   # list -> one variant each
      - {name: random, kind: finetune, select: random, share: 0.1}
      - {name: harden, kind: harden}                                    # `advtune harden`, its defaults

Every variant is recorded under `<out>/<variant>/` (a normal run folder plus `eval-protocol.json`);
a finished variant is skipped when the experiment is run again, an interrupted one resumes from its
checkpoint. `<out>/results.json` and `results.csv` hold one row per variant.

A key a variant does not set takes the job's declared default (the CLI's: `advtune finetune
--help`), except `select`, which names what a fine-tuning variant trains (default: `top`, the
experiment's analysis). Layout: config.py (keys, validation), variants.py (sweeps, recipes, each
variant's numbers), rerun.py (what a re-run must match), runner.py (the jobs), results.py (rows,
frontier points, results files).
"""

from __future__ import annotations

from .config import load_config, validate_config
from .results import (
    collect_results,
    experiment_info,
    format_experiment_info,
    format_results,
    frontier_csv,
    frontier_points,
)
from .runner import run
from .variants import expand_variants, train_config

__all__ = [
    "collect_results",
    "expand_variants",
    "experiment_info",
    "format_experiment_info",
    "format_results",
    "frontier_csv",
    "frontier_points",
    "load_config",
    "run",
    "train_config",
    "validate_config",
]
