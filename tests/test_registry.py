"""The one registry (advtune.registry) behind attacks, criteria, models, objectives and datasets, the
one spec parser, and a plug-in attack that the CLI picks up without an edit."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from advtune.attacks import REGISTRY, build_attack, list_attacks, register_attack, split_attack_list
from advtune.attacks._common import AttackConfig, ce_loss, check_int, check_threat, loss_and_grad
from advtune.attacks.registry import unregister_attack
from advtune.errors import AdvtuneError
from advtune.registry import Registry, convert_params, parse_spec
from advtune.threat import ThreatModel  # module level: the registry resolves field annotations here
from cli_helpers import train_argv

THREAT = ThreatModel("linf", 0.1)


# ------------------------------------------------------------------ Registry


def test_registry_registers_looks_up_and_refuses_in_one_line():
    widgets = Registry("widget")
    assert widgets.register("a", 1) == 1

    @widgets.register("b", size=3)
    def b():
        return "b"

    assert b() == "b" and widgets.get("b") is b and widgets.fixed("b") == {"size": 3} and widgets.fixed("a") == {}
    assert widgets.names() == ["a", "b"] and list(widgets) == ["a", "b"] and "a" in widgets and len(widgets) == 2
    with pytest.raises(AdvtuneError, match=r"^widget name 'a' is already registered; pick another name$"):
        widgets.register("a", 2)
    with pytest.raises(AdvtuneError, match=r"^unknown widget 'c'; valid: a, b$"):
        widgets.get("c")
    with pytest.raises(AdvtuneError, match="non-empty name"):
        widgets.register(" ", 3)
    assert widgets.get("c", None) is None
    widgets.unregister("a")
    widgets.unregister("a")  # absent: nothing to do
    assert widgets.names() == ["b"]
    widgets["c"] = 5  # still a mapping (tests monkeypatch entries)
    assert widgets.pop("c") == 5 and widgets.names() == ["b"]


def test_every_kind_of_plug_in_is_a_registry():
    from advtune.data import SPECS, list_datasets
    from advtune.models import ARCHITECTURES, list_models
    from advtune.train.objectives import OBJECTIVES
    from advtune.vulnerability import CRITERIA, list_criteria

    for registry in (REGISTRY, CRITERIA, ARCHITECTURES, OBJECTIVES, SPECS):
        assert isinstance(registry, Registry)
    assert list_attacks() == REGISTRY.names() and list_criteria() == CRITERIA.names()
    assert list_models() == ARCHITECTURES.names() and OBJECTIVES.names() == ["trades", "local", "distill", "awp", "rwp"]
    assert list_datasets()[:4] == ["mnist", "fashion-mnist", "cifar10", "synthetic"]


def test_a_registered_model_is_buildable_and_factory_specs_still_work():
    from advtune.models import ARCHITECTURES, build_model, is_factory_spec

    ARCHITECTURES.register("tiny-mlp", lambda c, h, w, k: nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, k)))
    try:
        model = build_model("tiny-mlp", (1, 8, 8), 3)
        assert model(torch.rand(2, 1, 8, 8)).shape == (2, 3) and not is_factory_spec("tiny-mlp")
    finally:
        ARCHITECTURES.unregister("tiny-mlp")
    assert is_factory_spec("path/to/file.py:factory") and is_factory_spec("pkg.module:make")
    with pytest.raises(AdvtuneError, match="unknown model 'tiny-mlp'; valid: small-cnn"):
        build_model("tiny-mlp", (1, 8, 8), 3)


# ------------------------------------------------------------------ the one spec parser


def test_parse_spec_grammar():
    assert parse_spec("fgsm", "attack") == ("fgsm", {})
    assert parse_spec(" PGD: Steps=40, step=2/255, restarts=5,", "attack") == (
        "pgd",
        {"steps": "40", "step_size": "2/255", "restarts": "5"},
    )
    assert parse_spec("local:layer=net.Pool2", "objective") == ("local", {"layer": "net.Pool2"})  # values keep case


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "attack spec must be a non-empty string"),
        (":steps=3", "attack spec ':steps=3' has no name"),
        ("pgd:steps", "pgd: parameter 'steps' needs a value, like steps=10"),
        ("pgd:steps= ", "needs a value"),
        ("pgd:=3", "pgd: parameter '=3' has no name"),
        ("pgd:steps=3,steps=4", "pgd: parameter 'steps' given twice in 'pgd:steps=3,steps=4'"),
        ("pgd:step=0.1,step_size=0.2", "parameter 'step_size' given twice"),
    ],
)
def test_parse_spec_errors_are_one_line(text, match):
    with pytest.raises(AdvtuneError, match=re.escape(match)) as e:
        parse_spec(text, "attack")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["trades:steps", "pgd:steps=3,steps=4", "local:=3", "fgsm:step=1,step_size=2"])
def test_an_objective_spec_and_an_attack_spec_share_one_parser(text):
    from advtune.train import build_objective

    errors = []
    for build in (lambda: build_attack(text, THREAT), lambda: build_objective(text, THREAT)):
        with pytest.raises(AdvtuneError) as e:
            build()
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "\n" not in errors[0]
    with pytest.raises(AdvtuneError, match=f"^{re.escape(errors[0])}$"):
        parse_spec(text, "spec")


def test_convert_params_by_annotation_and_default():
    def builder(threat, /, *, steps: int = 10, step_size: float | None = None, fast: bool = False, mode="Eval"):
        return None

    raw = {"steps": "3", "step_size": "2/255", "fast": "yes", "mode": "Train"}
    assert convert_params("b", raw, builder) == {"steps": 3, "step_size": 2 / 255, "fast": True, "mode": "Train"}
    assert convert_params("b", {"step_size": "None", "mode": "Train"}, builder, fold_case=True) == {
        "step_size": None,
        "mode": "train",
    }
    with pytest.raises(AdvtuneError, match=r"^b: steps='x' is not a valid int; e\.g\. steps=10$"):
        convert_params("b", {"steps": "x"}, builder)
    with pytest.raises(AdvtuneError, match=r"^b: unknown parameter 'beta'; valid parameters: steps, step_size"):
        convert_params("b", {"beta": "1"}, builder)
    with pytest.raises(AdvtuneError, match=r"^unknown B parameter 'beta'; valid parameters: steps, step_size"):
        convert_params("b", {"beta": "1"}, builder, title="B")


def test_split_attack_list_keeps_its_behaviour():
    assert split_attack_list("fgsm, pgd:steps=40,restarts=2,,apgd-ce") == ["fgsm", "pgd:steps=40,restarts=2", "apgd-ce"]
    with pytest.raises(AdvtuneError, match="starts with a parameter"):
        split_attack_list("steps=3,pgd")


def test_a_registered_objective_is_built_from_its_spec():
    from advtune.train import build_objective
    from advtune.train.objectives import OBJECTIVES, trades

    @OBJECTIVES.register("gentle-trades")
    def gentle(threat, model, attack_mode, eps_warmup, /, *, steps: int = 2):
        return trades(threat, steps, None, 1.0)

    try:
        assert build_objective("Gentle-Trades:steps=3", THREAT).steps == 3
        with pytest.raises(AdvtuneError, match="unknown gentle-trades parameter 'beta'; valid parameters: steps"):
            build_objective("gentle-trades:beta=2", THREAT)
    finally:
        OBJECTIVES.unregister("gentle-trades")
    assert "gentle-trades" not in OBJECTIVES


# ------------------------------------------------------------------ a plug-in attack, through the CLI


def sign_steps(model, x, y, threat, *, steps, target=None, generator=None):
    """`steps` signed-gradient steps of eps/steps on the cross-entropy, projected."""
    x_adv = x.detach()
    for _ in range(steps):
        _, _, grad = loss_and_grad(model, x_adv, y, target, ce_loss)
        x_adv = threat.project(x_adv + threat.steepest_step(grad, threat.eps / steps), x)
    return x_adv.detach()


@dataclass(frozen=True)
class SignSteps(AttackConfig):
    threat: ThreatModel
    steps: int = 1
    name = "signsteps"
    function = staticmethod(sign_steps)

    def __post_init__(self) -> None:
        check_threat(self.threat, self.name, self.norms)
        check_int(f"{self.name} steps", self.steps)

    def grad_evals(self) -> int:
        return self.steps


@pytest.fixture
def signsteps():
    """The attack registered for one test only, so the registry-wide attack tests never see it."""
    register_attack("signsteps", SignSteps)
    yield SignSteps
    unregister_attack("signsteps")
    assert "signsteps" not in list_attacks()


def test_a_new_attack_runs_through_the_cli_without_an_edit(signsteps, tmp_path, capsys):
    from advtune.cli import main

    assert build_attack("signsteps:steps=2", THREAT) == SignSteps(THREAT, steps=2)
    out = tmp_path / "run"
    assert main(train_argv(out, limit=200, limit_test=40)) == 0
    argv = ["evaluate", str(out), "--eps", "0.1", "--attacks", "signsteps:steps=2", "--limit-test", "40", "--quiet"]
    assert main(argv) == 0
    assert "signsteps:steps=2" in capsys.readouterr().out
    (path,) = out.glob("eval-*.json")
    record = json.loads(path.read_text())
    assert record["attacks"] == ["signsteps:steps=2"] and "signsteps" in path.name
    assert record["max_perturbation"]["signsteps:steps=2"] <= 0.1 + 1e-6


def test_a_step_size_over_the_pixel_range_is_read_as_the_typo_it_is(tmp_path, capsys):
    """A new-user walk: `pgd:step=2` (meant: steps=2) ran to the end with a step size of 2 on [0, 1] pixels, recorded
    as given. Refused under linf, for evaluation and for training alike; a step size in range is taken."""
    from advtune.attacks import build_attack
    from advtune.cli import main
    from advtune.errors import AdvtuneError
    from advtune.threat import ThreatModel

    with pytest.raises(AdvtuneError, match="step size 2 spans the whole pixel range .* write steps=2"):
        build_attack("pgd:step=2", ThreatModel("linf", 0.3))
    assert build_attack("pgd:step=2/255", ThreatModel("linf", 8 / 255)).step_size == pytest.approx(2 / 255)
    assert build_attack("pgd:step=2", ThreatModel("l2", 3.0)).step_size == 2  # an l2 step may be that large
    assert build_attack("pgd:step=2", ThreatModel("linf", 8, 0, 255)).step_size == 2  # pixels in [0, 255]: in range
    with pytest.raises(
        AdvtuneError,
        match=r"step size 2 spans the whole pixel range \[0, 1\] \(eps 0.3\); `step` is the step size \(e.g. "
        r"step=2/255\)$",
    ):
        build_attack("fgsm:step=2", ThreatModel("linf", 0.3))  # FGSM has no steps: no "write steps=" hint
    argv = ["train", "--dataset", "synthetic", "--model", "small-cnn", "--adversarial", "pgd:step=2", "--eps", "0.1"]
    assert main([*argv, "--out", str(tmp_path / "t"), "--quiet"]) == 2
    assert "write steps=2" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
