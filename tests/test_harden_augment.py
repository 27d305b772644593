"""harden's --augment (#21, round 28): no augmentation of the fine-tuning batches by default, even for a base trained
with crop-flip (the residual CIFAR-10 network gained +2.1 / +2.3 validation points without it); crop-flip on request,
carried to both stages; bad input refused in one line before anything is written; older records resume."""

from __future__ import annotations

import json

import pytest

from advtune.cli import main
from advtune.errors import AdvtuneError
from advtune.recipe import PROTOCOL, Recipe
from cli_helpers import train_argv


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("harden-augment")
    assert main(train_argv(root / "base", limit=300, extra=("--augment", "crop-flip"))) == 0
    return root / "base"


def planned(monkeypatch, argv):
    """The plan and run `advtune harden ARGV` would work with (the work itself stubbed out)."""
    seen = {}

    def stop(model, meta, ds, run, *, plan, **kw):
        seen.update(plan=plan, run=run)
        raise SystemExit(0)

    monkeypatch.setattr("advtune.runs.harden.harden_model", stop)
    with pytest.raises(SystemExit):
        main(["harden", *argv, "--quiet"])
    return seen["plan"], seen["run"]


def argv_of(base):
    return [str(base), "--eps", "0.2", "--limit", "300", "--budget", "20000", "--evaluation", PROTOCOL]


def test_none_by_default_even_for_a_base_trained_with_crop_flip(base, tmp_path, monkeypatch):
    assert json.loads((base / "config.json").read_text())["run"]["train"]["augment"] == "crop-flip"
    plan, run = planned(monkeypatch, [*argv_of(base), "--out", str(tmp_path / "default")])
    assert plan.train.augment == "none" and run.recipe.augment == "none"
    assert json.loads((tmp_path / "default" / "config.json").read_text())["run"]["recipe"]["augment"] == "none"


def test_crop_flip_on_request_reaches_the_fine_tuning_and_the_probe(base, tmp_path, monkeypatch):
    plan, run = planned(monkeypatch, [*argv_of(base), "--augment", "crop-flip", "--out", str(tmp_path / "cf")])
    assert plan.train.augment == "crop-flip"
    saved = json.loads((tmp_path / "cf" / "config.json").read_text())["run"]["recipe"]
    assert saved["augment"] == "crop-flip"  # recorded, so that a resume compares what ran
    from advtune.runs.harden_plan import finetune_settings
    from advtune.runs.probe import probe_settings

    ft = finetune_settings(run, plan, None)
    assert ft.train.augment == "crop-flip" and probe_settings(ft, None).train.augment == "crop-flip"


def test_an_unknown_augmentation_is_refused_in_one_line_before_anything_is_written(base, tmp_path, capsys):
    argv = ["harden", *argv_of(base), "--augment", "mixup", "--out", str(tmp_path / "x"), "--quiet"]
    with pytest.raises(SystemExit):
        main(argv)
    assert "invalid choice: 'mixup'" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(AdvtuneError, match="unknown augmentation 'mixup'; valid: none, crop-flip"):
        Recipe(augment="mixup")  # the API's and an experiment's recipe
    from advtune.runs.experiment.variants import harden_recipe

    assert harden_recipe({"name": "h", "train": {"augment": "crop-flip"}}, {}, "variant h").augment == "crop-flip"
    with pytest.raises(AdvtuneError, match="unknown augmentation 'mixup'"):
        harden_recipe({"name": "h", "train": {"augment": "mixup"}}, {}, "variant h")


def test_the_recipes_augmentations_are_the_training_loops():
    """recipe.py imports nothing torch-side, so it names the augmentations itself: they must be train/config.py's."""
    from dataclasses import fields

    from advtune.train.config import AUGMENTS

    assert next(f for f in fields(Recipe) if f.name == "augment").metadata["choices"] == AUGMENTS


def test_resuming_a_run_recorded_before_the_setting_compares_it_as_none(base, tmp_path, monkeypatch, capsys):
    """A harden run recorded before --augment existed fine-tuned without augmentation: resumed with the default it is
    the same run; with --augment crop-flip, one line that names the saved setting."""
    out = tmp_path / "old"
    planned(monkeypatch, [*argv_of(base), "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    del config["run"]["recipe"]["augment"]
    (out / "config.json").write_text(json.dumps(config))
    planned(monkeypatch, [*argv_of(base), "--out", str(out), "--resume"])  # the same run: no complaint
    assert main(["harden", *argv_of(base), "--augment", "crop-flip", "--out", str(out), "--resume", "--quiet"]) == 2
    assert "recipe, saved as --augment none" in capsys.readouterr().err


def test_the_report_names_the_augmentation():
    from advtune.report.narrative import harden_recipe

    summary = {"budget": 20000, "recipe": {"granularity": "probe", "params": 0.1}}
    assert "no augmentation" in harden_recipe(summary)  # a record from before the setting: none
    assert "no augmentation" in harden_recipe({**summary, "recipe": {**summary["recipe"], "augment": "none"}})
    assert "crop-flip augmentation" in harden_recipe(
        {**summary, "recipe": {**summary["recipe"], "augment": "crop-flip"}}
    )
