"""Flags that one combination would ignore without a word are refused in one line, before the base or the data
are read: --params with --select all trained every parameter, --momentum with Adam did nothing, --plot with one eps
drew nothing, --resume with --overwrite picked one of them silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from advtune.cli import main
from advtune.errors import AdvtuneError
from advtune.threat import ThreatModel

MISSING = "no-such-base"  # never read: every case is refused first


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["finetune", MISSING, "--eps", "0.3", "--params", "0.05"], "--select all trains every parameter"),
        (["finetune", MISSING, "--eps", "0.3", "--granularity", "sparse", "--params", "0.05"], "--select all"),
        (["finetune", MISSING, "--eps", "0.3", "--select", "layers:net.conv1", "--params", "0.1"], "--params budgets"),
        (["finetune", MISSING, "--eps", "0.3", "--select", "lowrank:rank=4", "--params", "0.1"], "--params budgets"),
        (["finetune", MISSING, "--eps", "0.3", "--select", "all", "--granularity", "layer"], "drop --granularity"),
        (["finetune", MISSING, "--eps", "0.3", "--select", "random", "--granularity", "quota"], "ranks an analysis"),
        (["finetune", MISSING, "--eps", "0.3", "--select", "lowrank", "--granularity", "sparse"], "no --granularity"),
        (["finetune", MISSING, "--eps", "0.3", "--momentum", "0.5"], "--momentum is SGD's"),
        (["finetune", MISSING, "--eps", "0.3", "--select", "random", "--params", "0.1", "--per-layer"], "--params"),
        (["finetune", MISSING, "--eps", "0.3", "--per-layer"], "--select all takes no share"),
        (["finetune", MISSING, "--eps", "0.3", "--select", "random", "--criterion", "restoration"], "reads none"),
        (
            ["finetune", MISSING, "--eps", "0.3", "--select", "an", "--granularity", "probe", "--params", ".1"]
            + ["--budget", "9000", "--criterion", "restoration"],
            "only with --probe-quotas",
        ),
        (["finetune", MISSING, "--eps", "0.3", "--per-layer", "--share", "0.2"], "--per-layer and --share"),
        (["finetune", MISSING, "--eps", "0.3", "--select", "lowrank", "--params", ".1", "--share", ".2"], "--share"),
        (["finetune", MISSING, "--eps", "0.3", "--select", "layers:net.conv1", "--share", "0.2"], "drop --share"),
        (["finetune", MISSING, "--eps", "0.3", "--resume", "--overwrite"], "not both"),
        (["harden", MISSING, "--eps", "0.3", "--resume", "--overwrite"], "not both"),
        (["train", "--dataset", "mnist", "--model", "small-cnn", "--resume", "--overwrite"], "not both"),
        (["train", "--dataset", "mnist", "--model", "small-cnn", "--norm", "l2"], "without --adversarial (--norm)"),
        (["train", "--dataset", "mnist", "--model", "small-cnn", "--no-guard"], "(--guard/--no-guard)"),
        (["train", "--dataset", "mnist", "--model", "small-cnn", "--eps-warmup", "0.2"], "(--eps-warmup)"),
        (["train", "--dataset", "mnist", "--model", "small-cnn", "--attack-mode", "train"], "(--attack-mode)"),
        (["train", "--dataset", "mnist", "--model", "small-cnn", "--weights-key", "model"], "give --weights"),
        (["train", "--dataset", "mnist", "--model", "small-cnn", "--optimizer", "adam", "--momentum", "0"], "SGD's"),
        (["evaluate", MISSING, "--eps", "0.3", "--suite", "standard", "--plot"], "give several --eps"),
        (["evaluate", MISSING, "--eps", "0.3", "--attacks", "apgd-ce", "--compile"], "--compile decides"),
        (["evaluate", MISSING, "--eps", "0.3", "--attacks", "apgd-ce", "--no-compile"], "--no-compile decides"),
        (["evaluate", MISSING, "--eps", "0.5", "--norm", "l2", "--suite", "standard", "--compile"], "linf-only"),
        (["analyze", MISSING, "--eps", "0.3", "--curve-limit", "0", "--shares", "0.1,0.2"], "--curve-limit 0 skips"),
        (["analyze", MISSING, "--eps", "0.3", "--curve-limit", "0", "--random-seeds", "5"], "--random-seeds shape"),
        (["harden", MISSING, "--eps", "0.3", "--keep-best", "0", "--holdout", "500"], "drop --holdout"),
        (["evaluate", MISSING, "--eps", "0.3", "--suite", "standard", "--attacks", "fgsm"], "not both"),
        (["evaluate", MISSING, "--eps", "0.3,8", "--attacks", "fgsm"], "write 8/255, not 8"),
        (["evaluate", MISSING, "--eps", "0.3", "--attacks", "pgd:stepz=3"], "stepz"),
    ],
)
def test_a_flag_the_combination_would_ignore_is_refused_in_one_line_before_anything_is_read(
    tmp_path, monkeypatch, capsys, argv, match
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADVTUNE_DATA", str(tmp_path / "no-data"))  # a data read would fail with another message
    out = [] if argv[0] == "evaluate" else ["--out", "out"]
    assert main([*argv, *out, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_finetune_has_no_attacked_validation_flag(capsys):
    """A fine-tuning runs no attacked validation after each epoch (--keep-best has its own): the flag is not offered."""
    with pytest.raises(SystemExit) as e:
        main(["finetune", MISSING, "--eps", "0.3", "--val-attack-limit", "100", "--out", "out"])
    assert e.value.code == 2 and "--val-attack-limit" in capsys.readouterr().err


def test_probe_rule_with_its_own_share_passes_the_checks_of_both_stages():
    """--probe 0.3 with the probe rule: its probe stage (granularity unit, the share kept) is not refused."""
    from advtune.runs.configs import FinetuneRun
    from advtune.runs.finetune import check_finetune
    from advtune.runs.probe import probe_settings

    ft = FinetuneRun(base="b", out="o", eps=0.3, granularity="probe", params=0.1, budget=10000, probe=0.3)
    stage = probe_settings(check_finetune(ft), None)
    assert stage.granularity == "unit" and stage.probe == 0.3
    check_finetune(stage)


def test_an_experiment_variant_with_an_ignored_granularity_is_refused_before_any_variant_runs():
    from advtune.runs.experiment.config import load_config, validate_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "synthetic-smoke.yaml")
    random = next(v for v in cfg["variants"] if v.get("select") == "random")
    random["granularity"] = "layer"  # what three frontier configs had: random units ran, not layers
    with pytest.raises(AdvtuneError, match="variant random: --select random is the control of the unit rule"):
        validate_config(cfg)


@pytest.mark.parametrize("spec", ["trades", "local:layer=net.conv1"])
def test_objectives_that_attack_in_eval_mode_refuse_attack_mode_train(spec):
    from advtune.train import build_objective

    with pytest.raises(AdvtuneError, match="drop --attack-mode train"):
        build_objective(spec, ThreatModel("linf", 0.1), attack_mode="train", model=None)


def test_layer_granularity_needs_a_parameter_budget():
    """--granularity layer without --params picked the top share of units instead: refused."""
    import torch

    from advtune.components import Component
    from advtune.runs.selecting import select_from_table
    from advtune.vulnerability import ScoreTable
    from test_selective import bn_net

    model = bn_net()
    table = ScoreTable("taylor", tuple(Component("net.conv1", i) for i in range(8)), tuple(float(i) for i in range(8)))
    with pytest.raises(AdvtuneError, match="--granularity layer needs a parameter budget"):
        select_from_table(
            table, model, 0.1, False, params=None, granularity="layer", example_input=torch.zeros(1, 1, 8, 8)
        )


def test_an_experiment_analysis_that_would_skip_its_curve_settings_is_refused_when_loaded():
    from advtune.runs.experiment.config import load_config, validate_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "synthetic-smoke.yaml")
    cfg["analysis"] = {**(cfg.get("analysis") or {}), "curve_limit": 0, "shares": [0.1, 0.2]}
    with pytest.raises(AdvtuneError, match="analysis: --shares shapes the concentration curve"):
        validate_config(cfg)
    cfg["analysis"]["shares"] = 0.1  # not a list: one line, not a TypeError
    with pytest.raises(AdvtuneError, match="--shares must be a list"):
        validate_config(cfg)


def test_an_experiment_random_variant_with_a_criterion_of_its_own_is_refused_when_loaded():
    from advtune.runs.experiment.config import load_config, validate_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "synthetic-smoke.yaml")
    random = next(v for v in cfg["variants"] if v.get("select") == "random")
    random["criterion"] = "taylor"  # the default restated: accepted
    validate_config(cfg)
    random["criterion"] = "restoration"
    with pytest.raises(AdvtuneError, match="variant random: --criterion chooses"):
        validate_config(cfg)


def test_api_analyze_refuses_shares_without_the_curve():
    from advtune import api

    with pytest.raises(AdvtuneError, match="curve=False skips"):
        api.analyze(None, None, eps=0.3, curve=False, shares=[0.1])


def test_a_run_started_with_a_now_refused_flag_resumes_without_it(tmp_path, capsys):
    """A fine-tuning started before --share with --params was refused recorded a share that did nothing: resumed
    without it, it is not a changed setting. A share that did select still has to match."""
    import json

    base = tmp_path / "std"
    train = ["train", "--dataset", "synthetic", "--model", "small-cnn", "--epochs", "1", "--limit", "100"]
    assert main(train + ["--limit-test", "20", "--out", str(base), "--quiet"]) == 0
    args = ["finetune", str(base), "--eps", "0.1", "--attack", "pgd:steps=1", "--limit", "64", "--monitor-test", "0"]
    args += ["--quiet", "--select", "random"]

    def record_share(out: Path, share: float) -> None:  # what the older version wrote
        config = json.loads((out / "config.json").read_text())
        config["run"]["share"] = share
        (out / "config.json").write_text(json.dumps(config))

    budgeted = tmp_path / "budgeted"
    assert main(args + ["--params", "0.1", "--out", str(budgeted)]) == 0
    record_share(budgeted, 0.5)
    assert main(args + ["--params", "0.1", "--out", str(budgeted), "--resume"]) == 0, capsys.readouterr().err

    shared = tmp_path / "shared"
    assert main(args + ["--out", str(shared)]) == 0
    record_share(shared, 0.5)  # without --params the share chose the units: a real change
    assert main(args + ["--out", str(shared), "--resume"]) == 2
    assert "different settings (share: 0.5 -> 0.1)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("recorded", "inert"),
    [
        ({"select": "random", "params": 0.1, "share": 0.5, "per_layer": True}, {"share", "per_layer"}),
        ({"select": "random", "share": 0.5}, set()),  # the share chose the units
        ({"select": "all", "criterion": "restoration"}, {"criterion"}),
        ({"select": "an", "granularity": "probe", "params": 0.1, "criterion": "restoration"}, {"criterion"}),
        ({"select": "an", "granularity": "probe", "params": 0.1, "probe_quotas": True, "criterion": "gradient"}, set()),
        ({"select": "an", "granularity": "layer", "share": 0.5}, set()),  # refused for another reason (no --params)
        (
            {"select": "all", "probe": 0.3, "share": 0.5, "criterion": "gradient"},
            {"share", "criterion"},
        ),  # a probe stage
    ],
)
def test_the_settings_a_recorded_run_ignored(recorded, inert):
    from advtune.runs.selecting import inert_selection_settings

    assert inert_selection_settings(recorded) == inert
