"""harden fine-tunes on the batches its base model was trained on (--augment auto, #21 round 28): every CIFAR-10
frontier variant fine-tuned with crop-flip, while `advtune harden` itself used none."""

from __future__ import annotations

import json
import shutil

import pytest

from advtune.cli import main
from advtune.data import load_dataset
from advtune.errors import AdvtuneError
from advtune.models import load_model
from advtune.recipe import PROTOCOL, Recipe
from cli_helpers import train_argv


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("harden-augment")
    assert main(train_argv(root / "base", limit=300, extra=("--augment", "crop-flip"))) == 0
    return root / "base"


def planned(monkeypatch, argv):
    """The plan and recipe `advtune harden ARGV` would run with (the work itself stubbed out)."""
    seen = {}

    def stop(model, meta, ds, run, *, plan, **kw):
        seen.update(plan=plan, run=run)
        raise SystemExit(0)

    monkeypatch.setattr("advtune.runs.harden.harden_model", stop)
    with pytest.raises(SystemExit):
        main(["harden", *argv, "--quiet"])
    return seen["plan"], seen["run"]


def test_auto_takes_the_base_runs_augmentation_and_records_it(base, tmp_path, monkeypatch):
    argv = [str(base), "--eps", "0.2", "--limit", "300", "--budget", "20000", "--evaluation", PROTOCOL]
    plan, run = planned(monkeypatch, [*argv, "--out", str(tmp_path / "auto")])
    assert plan.train.augment == "crop-flip" and run.recipe.augment == "crop-flip"
    saved = json.loads((tmp_path / "auto" / "config.json").read_text())["run"]["recipe"]
    assert saved["augment"] == "crop-flip"  # as decided, so that a resume compares what ran
    # the fine-tuning stage (and the probe, which takes its training settings) gets it
    from advtune.runs.harden import finetune_settings

    assert finetune_settings(run, plan, None).train.augment == "crop-flip"
    plan, run = planned(monkeypatch, [*argv, "--augment", "none", "--out", str(tmp_path / "none")])
    assert plan.train.augment == "none" and run.recipe.augment == "none"


def test_a_base_trained_without_augmentation_or_without_a_record_gets_none(base, tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    shutil.copytree(base, plain)
    config = json.loads((plain / "config.json").read_text())
    del config["run"]["train"]["augment"]  # a run written before the setting existed
    (plain / "config.json").write_text(json.dumps(config))
    argv = [str(plain), "--eps", "0.2", "--limit", "300", "--budget", "20000", "--evaluation", PROTOCOL]
    plan, _ = planned(monkeypatch, [*argv, "--out", str(tmp_path / "h")])
    assert plan.train.augment == "none"
    plan, _ = planned(monkeypatch, [*argv, "--augment", "crop-flip", "--out", str(tmp_path / "h2")])
    assert plan.train.augment == "crop-flip"


def test_trained_augment_reads_only_a_known_augmentation():
    from advtune.runs.harden_plan import trained_augment

    assert trained_augment({"run": {"train": {"augment": "crop-flip"}}}) == "crop-flip"
    assert trained_augment({"run": {"train": {"augment": "none"}}}) == "none"
    assert trained_augment({"run": {"train": {"augment": "mixup"}}}) is None
    assert trained_augment({}) is None and trained_augment({"run": {"train": None}}) is None


def test_an_unknown_augmentation_is_refused_in_one_line_before_anything_is_written(base, tmp_path, capsys):
    argv = ["harden", str(base), "--eps", "0.2", "--augment", "mixup", "--out", str(tmp_path / "x"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown augmentation 'mixup'; valid: none, crop-flip" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    from advtune.api import harden

    with pytest.raises(AdvtuneError, match="unknown augmentation 'mixup'"):  # the API: refused before any work
        harden(load_model(base)[0], load_dataset("synthetic", limit=100), eps=0.2, recipe=Recipe(augment="mixup"))


def test_resuming_a_run_recorded_before_the_setting_compares_it_as_none(base, tmp_path, monkeypatch, capsys):
    """A harden run recorded before --augment existed fine-tuned without augmentation: resumed on a base that
    records none it is the same run; on a crop-flip base, one line that names the saved setting."""
    argv = [str(base), "--eps", "0.2", "--limit", "300", "--budget", "20000", "--evaluation", PROTOCOL]
    out = tmp_path / "old"
    planned(monkeypatch, [*argv, "--augment", "none", "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    del config["run"]["recipe"]["augment"]
    (out / "config.json").write_text(json.dumps(config))
    planned(monkeypatch, [*argv, "--augment", "none", "--out", str(out), "--resume"])  # the same run: no complaint
    assert main(["harden", *argv, "--out", str(out), "--resume", "--quiet"]) == 2  # auto = crop-flip here
    assert "recipe, saved as --augment none" in capsys.readouterr().err
