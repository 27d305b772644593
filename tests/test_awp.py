"""Adversarial weight perturbation (`awp[:gamma=..]`, #21 round 26): the update's loss and gradient are taken at the
weights pushed uphill by gamma ||w|| g/||g|| per weight tensor that trains, the model's weights and BatchNorm
statistics are left as they were by the pass that finds the push (gamma 0 trains as PGD does, step for step), the
extra pass is paid for, a bad spec is refused in one line, and it trains through the selective path end to end."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

from advtune.errors import AdvtuneError
from advtune.threat import ThreatModel
from advtune.train import TrainConfig, build_objective, cost_per_example, fit
from advtune.train.awp import weight_perturbation


def mlp(seed: int = 0, norm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(12, 16)] + ([nn.BatchNorm1d(16)] if norm else []) + [nn.ReLU(), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def data(n: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 3, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("norm", [False, True])
def test_the_loss_and_its_gradient_are_taken_at_the_weights_pushed_uphill(norm):
    model, (x, y) = mlp(norm=norm), data()
    threat = ThreatModel("linf", 0.1)
    obj = build_objective("awp:gamma=0.05,steps=2", threat)
    start = copy.deepcopy(model)
    out = obj(model, x, y, generator=torch.Generator().manual_seed(0))
    x_adv = out["x_adv"]
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6 and 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
    assert all(torch.equal(p, q) for p, q in zip(start.parameters(), model.parameters()))  # nothing moved in place
    # by hand (in training mode, BatchNorm on the batch's statistics, on a copy whose statistics may move): each
    # linear weight pushed by gamma ||w|| g / ||g||, the biases and the norm's scale and shift left
    twin = copy.deepcopy(start)
    loss_w = nn.functional.cross_entropy(twin(x_adv), y)
    linears = [m for m in twin if isinstance(m, nn.Linear)]
    grads = torch.autograd.grad(loss_w, [m.weight for m in linears])
    pushed = copy.deepcopy(start)
    with torch.no_grad():
        for w, g, layer in zip(linears, grads, [m for m in pushed if isinstance(m, nn.Linear)]):
            layer.weight.add_(0.05 * w.weight.norm() / g.norm() * g)
    want = nn.functional.cross_entropy(pushed(x_adv), y)
    # the statistics moved once, by the update's forward at the pushed point (the push's own pass left them)
    assert all(torch.allclose(a, b) for a, b in zip(model.buffers(), pushed.buffers()))
    assert torch.allclose(out["loss"], want, atol=1e-6) and float(out["loss"].detach()) > float(loss_w.detach())
    # the update's gradient is the pushed point's, landing on the model's own weights
    out["loss"].backward()
    want.backward()
    for a, b in zip(model.parameters(), pushed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)
    # the attack, the pass that finds the push and the update: PGD-2 + 1 + 1 per example
    assert obj.attack_grad_evals() == 3 and cost_per_example(obj) == 4.0
    assert cost_per_example(build_objective("pgd:steps=2", threat)) == 3.0
    assert obj.describe()["gamma"] == 0.05 and obj.describe()["objective"] == "awp"
    ramped = build_objective("awp", threat, "eval", 0.5)
    assert abs(ramped.at(0.25).attack.threat.eps - 0.05) < 1e-9 and ramped.at(0.25).gamma == ramped.gamma
    assert ramped.at(0.5) is ramped and ramped.attack.steps == 5  # harden's PGD-5 by default


def test_every_conv_and_linear_weight_is_pushed_frozen_or_adapted_and_nothing_moves():
    from advtune.train.lowrank import LowRank

    model, (x, y) = mlp(norm=True), data()
    model[1].weight.requires_grad_(False)  # a frozen layer is pushed too (Wu et al. push every weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pushed = weight_perturbation(model, x, y, 0.01)
    assert set(pushed) == {"1.weight", "4.weight"}
    for name, w in (("1.weight", model[1].weight), ("4.weight", model[4].weight)):
        assert abs(float(((pushed[name] - w).norm() / w.norm()).detach()) - 0.01) < 1e-5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # BatchNorm statistics included
    assert weight_perturbation(model, x, y, 0) == {}
    # a low-rank adapted layer: its base weight is pushed (the adapters start at zero and would push nothing)
    adapted = mlp()
    LowRank({"1": 2}).adapt(adapted)
    pushed = weight_perturbation(adapted, x, y, 0.01)
    assert set(pushed) == {"1.parametrizations.weight.original", "3.weight"}
    base = adapted[1].parametrizations.weight.original
    moved = (pushed["1.parametrizations.weight.original"] - base).norm() / base.norm()
    assert abs(float(moved.detach()) - 0.01) < 1e-5


def test_gamma_zero_trains_as_pgd_step_for_step_and_a_compiled_step_as_the_eager_one(monkeypatch):
    x, y = data(64)
    threat = ThreatModel("linf", 0.1)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.01, seed=3)
    runs = {}
    for spec in ("pgd:steps=2", "awp:gamma=0,steps=2", "awp:gamma=0.05,steps=2"):
        model = mlp(norm=True)
        fit(model, (x, y), build_objective(spec, threat), cfg)
        runs[spec] = model.state_dict()
    plain, zero, pushed = runs.values()
    assert build_objective("awp:gamma=0,steps=2", threat).attack_grad_evals() == 2  # no push, no pass to pay
    for k in plain:
        assert torch.equal(plain[k], zero[k]), k
    assert not torch.allclose(plain["1.weight"], pushed["1.weight"], atol=1e-4)
    # --compile: the step runs torch.compile(model) (here its eager backend), the push found through the wrapper
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend="eager", **kw))
    model = mlp(norm=True)
    fit(model, (x, y), build_objective("awp:gamma=0.05,steps=2", threat), dataclasses.replace(cfg, compile=True))
    for k, v in model.state_dict().items():
        assert torch.allclose(v.float(), pushed[k].float(), atol=1e-5), k


def test_a_bad_awp_spec_is_refused_in_one_line():
    threat = ThreatModel("linf", 0.1)
    for spec, match in (
        ("awp:gamma=-0.1", "gamma"),
        ("awp:gamma=1", "gamma"),
        ("awp:gamma=nan", "gamma"),
        ("awp:steps=0", "steps"),
        ("awp:step_size=0", "step_size"),
        ("awp:beta=3", "unknown AWP parameter"),
    ):
        with pytest.raises(AdvtuneError, match=match) as e:
            build_objective(spec, threat)
        assert "\n" not in str(e.value), str(e.value)
    with pytest.raises(AdvtuneError, match="attack-mode train"):
        build_objective("awp", threat, "train")


@pytest.mark.parametrize(
    "spec, name, size, extra",
    [("awp:gamma=0.01,steps=1", "awp", "gamma", 1), ("rwp:sigma=0.01,steps=1", "rwp", "sigma", 0)],
)
def test_the_probe_rule_trains_with_a_weight_perturbation_and_pays_for_it(tmp_path, spec, name, size, extra):
    from advtune.cli import main
    from cli_helpers import check_sparse_harden, train_argv

    base = tmp_path / "base"
    assert main(train_argv(base, limit=200, limit_test=40)) == 0
    out = tmp_path / "h"
    argv = ["harden", str(base), "--eps", "0.2", "--attack", spec, "--budget", "4000"]
    argv += ["--limit", "300", "--limit-test", "40", "--evaluation", "pgd:steps=5", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    ft = out / "finetune"
    objective = json.loads((ft / "config.json").read_text())["objective"]
    assert objective["objective"] == name and objective[size] == 0.01
    # the masked stage pays PGD-1 + the push (awp; rwp's noise is free) + the update per example
    epochs = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()]
    paid = [(b["grad_evals"] - a["grad_evals"], b["examples"]) for a, b in zip(epochs, epochs[1:])]
    assert paid and all(g == (2 + extra) * n for g, n in paid), paid
    summary = json.loads((out / "summary.json").read_text())
    assert summary["selection"]["kind"] == "sparse"  # harden's default rule, the probe's entries
    check_sparse_harden(base, out, summary["trainable_params"])


def test_rwp_takes_the_loss_at_weights_with_each_filters_noise_sigma_times_its_norm_and_costs_what_pgd_costs():
    """rwp (round 42): the update's loss at w + n, n Gaussian per output filter with norm sigma ||w_filter||, drawn
    from the step's generator after the attack; biases and norms untouched, nothing moved in place."""
    from torch.func import functional_call

    from advtune.train.awp import random_perturbation

    model, (x, y) = mlp(norm=True), data()
    model[1].weight.requires_grad_(False)  # frozen weights get noise too (the whole network, as Flat-LoRA)
    threat = ThreatModel("linf", 0.1)
    obj = build_objective("rwp:sigma=0.1,steps=2", threat)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = obj(model, x, y, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())  # (the statistics move, as in PGD)
    # by hand, the same generator's stream: the attack's draws, then the noise
    g = torch.Generator().manual_seed(5)
    twin = copy.deepcopy(mlp(norm=True))
    twin.load_state_dict(before)
    twin.eval()
    x_adv = obj.attack(twin, x, y, generator=g)
    twin.train()
    noisy = random_perturbation(twin, 0.1, g)
    assert set(noisy) == {"1.weight", "4.weight"} and torch.equal(x_adv, out["x_adv"])
    for name in noisy:
        w = before[name]
        rel = (noisy[name] - w).norm(dim=1) / w.norm(dim=1)
        assert torch.allclose(rel, torch.full_like(rel, 0.1), atol=1e-5), name  # each filter's own size
    want = nn.functional.cross_entropy(functional_call(twin, noisy, (x_adv,)), y)
    assert torch.allclose(out["loss"], want, atol=1e-6)
    assert float((out["loss"] - nn.functional.cross_entropy(model(x_adv), y)).abs().detach()) > 1e-6  # noise matters
    # another generator, other noise; no pass finds it: PGD-2 + the update, as PGD training
    other = obj(model, x, y, generator=torch.Generator().manual_seed(6))
    assert not torch.allclose(other["loss"], out["loss"])
    assert obj.attack_grad_evals() == 2 and cost_per_example(obj) == cost_per_example(
        build_objective("pgd:steps=2", threat)
    )
    assert obj.describe()["sigma"] == 0.1 and obj.describe()["objective"] == "rwp"
    assert build_objective("rwp", threat, "eval", 0.5).at(0.25).attack.threat.eps == pytest.approx(0.05)


def test_rwp_sigma_zero_trains_as_pgd_step_for_step_and_a_bad_spec_is_one_line():
    x, y = data(64)
    threat = ThreatModel("linf", 0.1)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.01, seed=3)
    runs = []
    for spec in ("pgd:steps=2", "rwp:sigma=0,steps=2", "rwp:sigma=0.05,steps=2"):
        model = mlp(norm=True)
        fit(model, (x, y), build_objective(spec, threat), cfg)
        runs.append(model.state_dict())
    plain, zero, noisy = runs
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert not torch.allclose(plain["1.weight"], noisy["1.weight"], atol=1e-4)
    for spec, match in (
        ("rwp:sigma=-0.1", "sigma"),
        ("rwp:sigma=1", "sigma"),
        ("rwp:sigma=nan", "sigma"),
        ("rwp:steps=0", "steps"),
        ("rwp:gamma=0.1", "unknown RWP parameter"),
    ):
        with pytest.raises(AdvtuneError, match=match) as e:
            build_objective(spec, threat)
        assert "\n" not in str(e.value), str(e.value)
    with pytest.raises(AdvtuneError, match="attack-mode train"):
        build_objective("rwp", threat, "train")
