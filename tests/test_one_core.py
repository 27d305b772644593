"""One implementation per job: the same harden through the CLI, the Python API and an experiment
variant gives bit-identical weights and the same records; an experiment variant that sets nothing
runs with the CLI's defaults (the eps ramp that variants once silently dropped)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import advtune
from advtune.cli import main
from advtune.data import load_dataset
from advtune.models import load_model
from advtune.runs import experiment
from advtune.runs.configs import FinetuneRun
from advtune.settings import default
from cli_helpers import train_argv

SETTINGS = ["--eps", "0.2", "--limit", "300", "--limit-test", "40", "--budget", "8000", "--evaluation", "pgd:steps=5"]


@pytest.fixture(scope="module")
def three_ways(tmp_path_factory):
    root = tmp_path_factory.mktemp("core")
    assert main(train_argv(root / "base", limit=300, limit_test=40)) == 0
    # 1. the command
    assert main(["harden", str(root / "base"), *SETTINGS, "--out", str(root / "cli"), "--quiet"]) == 0
    # 2. the Python API, on the same model and data in memory
    model = advtune.load_model(root / "base")
    api = advtune.harden(
        model,
        load_dataset("synthetic", limit=300, limit_test=40),
        eps=0.2,
        budget=8000,
        limit_test=40,
        evaluation="pgd:steps=5",
    )
    # 3. an experiment variant, next to a fine-tuning variant that sets nothing but its selection
    cfg = {
        "name": "core",
        "base": {"pretrained": str(root / "base"), "limit": 300, "limit_test": 40},
        "threat": {"eps": 0.2},
        "evaluation": {"attacks": "pgd:steps=5", "limit_test": 40},
        "analysis": {"limit": 200, "curve_limit": 0, "criteria": ["taylor"]},
        "variants": [
            {"name": "hard", "kind": "harden", "budget": 8000},
            {"name": "plain", "kind": "finetune", "select": "all", "budget": 1000},
        ],
    }
    (root / "exp.yaml").write_text(yaml.safe_dump(cfg))
    experiment.run(root / "exp.yaml", root / "exp")
    return root, api


def _weights(model) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def test_cli_api_and_experiment_give_bit_identical_weights(three_ways):
    root, api = three_ways
    cli, _ = load_model(root / "cli")
    exp, _ = load_model(root / "exp" / "hard")
    base, _ = load_model(root / "base")
    w_cli, w_api, w_exp = _weights(cli), _weights(api.model), _weights(exp)
    assert w_cli.keys() == w_api.keys() == w_exp.keys()
    assert all(torch.equal(w_cli[k], w_api[k]) and torch.equal(w_cli[k], w_exp[k]) for k in w_cli)
    assert any(not torch.equal(w_cli[k], v) for k, v in _weights(base).items())  # it did train


def _comparable(summary: dict) -> dict:
    """A harden record without what names the run's place or its wall-clock times."""
    s = {k: v for k, v in summary.items() if k not in ("base", "report", "architecture")}
    s["cost"] = {k: v for k, v in s["cost"].items() if not k.endswith("wall_s") and k != "base_training_grad_evals"}
    if s["selection"].get("probe"):  # the probe rule (harden's default): its folder and wall time
        probe = {k: v for k, v in s["selection"]["probe"].items() if k not in ("folder", "wall_s")}
        s["selection"] = {**s["selection"], "probe": probe}
    if s.get("checkpoints"):  # the checkpoint choice's time, per point and in all
        k = s["checkpoints"]
        curve = [{f: v for f, v in point.items() if f != "wall_s"} for point in k["curve"]]
        s["checkpoints"] = {**{f: v for f, v in k.items() if f != "wall_s"}, "curve": curve}
    return s


def test_the_records_are_equal(three_ways):
    root, api = three_ways
    cli = json.loads((root / "cli" / "summary.json").read_text())
    exp = json.loads((root / "exp" / "hard" / "summary.json").read_text())
    assert _comparable(cli) == _comparable(exp)
    assert cli["cost"]["base_training_grad_evals"] == exp["cost"]["base_training_grad_evals"] > 0
    assert _comparable(json.loads(json.dumps(api.summary()))) == _comparable(cli)
    # the experiment's row for the variant is read from those same records
    row = next(r for r in json.loads((root / "exp" / "results.json").read_text())["rows"] if r["variant"] == "hard")
    assert row["robust_acc"] == cli["after"]["robust_acc"] and row["analysis_grad_evals"] > 0


def test_a_variant_that_sets_nothing_runs_with_the_cli_defaults(three_ways):
    root, _ = three_ways
    ran = json.loads((root / "exp" / "plain" / "config.json").read_text())["run"]
    assert ran["eps_warmup"] == 0.3  # the CLI's ramp; variants used to get 0.0
    for key in ("share", "criterion", "attack", "attack_mode", "granularity", "per_layer", "guard"):
        assert ran[key] == default(FinetuneRun, key), key
    row = next(r for r in json.loads((root / "exp" / "results.json").read_text())["rows"] if r["variant"] == "plain")
    assert row["eps_warmup"] == 0.3 and row["select"] == "all"
