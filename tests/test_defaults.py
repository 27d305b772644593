"""Safe defaults: adversarial training and fine-tuning ramp eps unless told otherwise (and say so);
adversarial training stuck at chance is reported."""

from __future__ import annotations

import json
import logging

from advtune.cli import main
from advtune.train.loop import warn_if_at_chance
from cli_helpers import train_argv


def _train(out, *extra):
    return train_argv(out, limit=200, limit_test=50, extra=extra)


def test_adversarial_training_ramps_eps_by_default_and_says_so(tmp_path, capsys):
    loud = [a for a in _train(tmp_path / "at", "--adversarial", "pgd:steps=2", "--eps", "0.2") if a != "--quiet"]
    assert main(loud) == 0  # the CLI logs to stderr
    cfg = json.loads((tmp_path / "at" / "config.json").read_text())
    assert cfg["run"]["eps_warmup"] == 0.3 and cfg["objective"]["eps_warmup"] == 0.3
    assert "eps ramps up from 0 over the first 30% of training (the default" in capsys.readouterr().err
    assert main(_train(tmp_path / "off", "--adversarial", "pgd:steps=2", "--eps", "0.2", "--eps-warmup", "0")) == 0
    assert json.loads((tmp_path / "off" / "config.json").read_text())["run"]["eps_warmup"] == 0.0
    assert main(_train(tmp_path / "trades", "--adversarial", "trades:steps=2", "--eps", "0.2")) == 0
    assert json.loads((tmp_path / "trades" / "config.json").read_text())["run"]["eps_warmup"] == 0.0
    assert (
        main(
            [
                "finetune",
                str(tmp_path / "at"),
                "--eps",
                "0.2",
                "--out",
                str(tmp_path / "ft"),
                "--limit",
                "100",
                "--monitor-test",
                "0",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["run"]["eps_warmup"] == 0.3


def test_training_at_chance_under_attack_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="advtune"):
        assert warn_if_at_chance({"epoch": 3, "train_acc": 0.11}, 10, attack_grad_evals=10)
        assert not warn_if_at_chance({"epoch": 3, "train_acc": 0.11}, 10, attack_grad_evals=0)  # clean training
        assert not warn_if_at_chance({"epoch": 3, "train_acc": 0.60}, 10, attack_grad_evals=10)
    assert [r.getMessage() for r in caplog.records if "chance for 10 classes" in r.getMessage()]


def test_harden_recipe_defaults_are_the_measured_ones():
    """The recipe's measured defaults (docs/RESULTS.md rounds 3 and 4): a change must be a decision."""
    from advtune.recipe import GRANULARITY_WORDS, Recipe

    r = Recipe()
    # the probe rule with the analysis' layer quotas since round 20 (shares from round 7)
    assert (r.granularity, r.params, r.attack, r.lr, r.batch_size) == ("probe", 0.1, "pgd:steps=5", 3e-3, 64)
    assert r.probe == 0.2 and r.probe_quotas is None and r.quotas  # auto: the quotas on with the probe rule
    assert not Recipe(granularity="shares").quotas and not Recipe(probe_quotas=False).quotas
    assert r.ema == 0.99 and r.eps_warmup == 0.15
    assert set(GRANULARITY_WORDS) == {"layer", "unit", "lowrank", "hybrid", "shares", "quota", "sparse", "probe"}
    assert r.norms is None  # auto: on for a model with normalization layers (round 7), decided per model
