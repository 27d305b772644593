"""Settings declared once: each job's config dataclass is the schema of its flags and YAML keys."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from advtune.cli import build_parser
from advtune.errors import AdvtuneError
from advtune.recipe import Recipe
from advtune.runs.analyze import AnalyzeRun
from advtune.runs.demo import DemoConfig
from advtune.runs.evaluate import EvaluateRun
from advtune.runs.finetune import FinetuneRun
from advtune.runs.harden import HardenRun
from advtune.runs.train import TrainRun
from advtune.settings import check_keys, from_args, keys
from advtune.train import TrainConfig

COMMON = {"help", "config", "device", "seed", "quiet", "verbose", "dist_backend"}
JOBS = {
    "train": (TrainRun, TrainConfig),
    "finetune": (FinetuneRun, TrainConfig),
    "analyze": (AnalyzeRun,),
    "evaluate": (EvaluateRun,),
    "harden": (HardenRun, Recipe),
    "demo": (DemoConfig,),
}


# fields a command leaves out on purpose (their jobs never read them): training from scratch has no adapters
# for --adapter-lr-ratio and no mask for --regrow to move
NOT_FLAGS = {
    "train": {
        "adapter_lr_ratio",
        "regrow",
        "regrow_every",
        "regrow_score",
        "regrow_moments",
        "regrow_rate",
        "regrow_pool",
        "regrow_drop",
        "regrow_end",
    },
    "finetune": {"val_attack_limit"},
}


def _subparser(command):
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices[command]


@pytest.mark.parametrize("command", sorted(JOBS))
def test_every_flag_is_a_field_and_every_field_a_flag(command):
    # a hidden flag (help suppressed) only points at a renamed one, e.g. evaluate --limit -> --limit-test
    dests = {a.dest for a in _subparser(command)._actions if a.help != argparse.SUPPRESS} - COMMON
    fields = {
        f.name
        for cls in JOBS[command]
        for f in dataclasses.fields(cls)
        if f.metadata.get("cli", True) and "help" in f.metadata
    } - NOT_FLAGS.get(command, set())
    assert dests == fields


@pytest.mark.parametrize("command", sorted(JOBS))
def test_every_optional_flag_says_its_default(command):
    for a in _subparser(command)._actions:
        if (
            a.option_strings
            and not a.required
            and a.dest not in COMMON
            and a.nargs != 0
            and a.help != argparse.SUPPRESS
        ):
            # "(default", not "default": a help text that merely uses the word once hid harden's --granularity default
            assert "(default" in (a.help or ""), f"{command} {a.option_strings[0]}: {a.help}"


def test_flags_build_the_config_with_nested_training_settings():
    from advtune.cli import _default, _train_config  # the helpers run_train uses

    args = build_parser().parse_args(
        [
            "train",
            "--dataset",
            "synthetic",
            "--model",
            "small-cnn",
            "--out",
            "x",
            "--epochs",
            "3",
            "--lr",
            "8/255",
            "--eps",
            "0.3",
            "--adversarial",
            "pgd",
            "--seed",
            "5",
        ]
    )
    run = from_args(TrainRun, args, train=_train_config(args, _default(TrainRun)))
    assert run.train == TrainConfig(epochs=3, lr=8 / 255, seed=5)
    assert (run.eps, run.adversarial, run.out, run.norm) == (0.3, "pgd", "x", "linf")
    ft = build_parser().parse_args(["finetune", "base", "--out", "y", "--eps", "0.1"])
    assert ft.epochs == 1  # finetune's own default (FinetuneRun.train) shows in its flags
    ev = build_parser().parse_args(["evaluate", "r", "--eps", "0.1,8/255", "--suite", "quick"])
    assert from_args(EvaluateRun, ev).eps == (0.1, 8 / 255)


def test_yaml_keys_come_from_the_fields():
    assert keys(TrainConfig, exclude={"seed"}) == {f.name for f in dataclasses.fields(TrainConfig)} - {"seed"}
    with pytest.raises(AdvtuneError, match="has no field"):
        keys(AnalyzeRun, only={"limit", "curve_limt"})
    with pytest.raises(AdvtuneError, match="unknown key 'epohcs'; did you mean 'epochs'"):
        check_keys({"epohcs": 2}, keys(TrainConfig), "base.train")


def test_limit_means_training_examples_and_limit_test_test_examples_everywhere(capsys):
    for command in ("train", "finetune", "analyze", "harden"):
        helps = {a.dest: a.help for a in _subparser(command)._actions}
        assert "training examples" in helps["limit"], command
        if "limit_test" in helps:
            assert "test examples" in helps["limit_test"], command
    ev = {a.dest: a.help for a in _subparser("evaluate")._actions}
    assert "test examples" in ev["limit_test"] and ev["limit"] == argparse.SUPPRESS
    from advtune.cli import main

    assert main(["evaluate", "runs/x", "--eps", "0.1", "--suite", "quick", "--limit", "50"]) == 2
    err = capsys.readouterr().err
    assert "use --limit-test 50" in err and err.count("\n") == 1


def test_a_gradient_evaluation_budget_is_written_the_usual_ways():
    """--budget 5.4e5 was refused as "invalid int value"; a share or a fraction is not a budget."""
    import argparse

    from advtune.settings import grad_evals_number

    assert grad_evals_number("5.4e5") == grad_evals_number("540_000") == grad_evals_number("540000") == 540_000
    for bad in ("0", "1.5", "-3", "inf", "1/2"):
        with pytest.raises(argparse.ArgumentTypeError, match="whole positive number of gradient evaluations"):
            grad_evals_number(bad)
