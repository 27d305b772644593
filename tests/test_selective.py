"""Selective training inside the one loop: bit-exact freezing, BN statistics, the everything==full
identity, the overfitting guard, TRADES, and the finetune job."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from advtune.attacks import FGSM, PGD
from advtune.components import Component, Selection
from advtune.cost import CostMeter
from advtune.data import TensorData
from advtune.errors import AdvtuneError
from advtune.models import Normalize
from advtune.threat import ThreatModel
from advtune.train import OverfitGuard, TrainConfig, adversarial, clean, fit, trades
from cli_helpers import train_argv

THREAT = ThreatModel("linf", 0.1)


def bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            normalize=Normalize([0.2], [0.3]),
            net=nn.Sequential(
                OrderedDict(
                    conv1=nn.Conv2d(1, 8, 3, padding=1),
                    bn1=nn.BatchNorm2d(8),
                    relu1=nn.ReLU(),
                    pool1=nn.MaxPool2d(2),
                    conv2=nn.Conv2d(8, 16, 3, padding=1),
                    bn2=nn.BatchNorm2d(16),
                    relu2=nn.ReLU(),
                    pool2=nn.MaxPool2d(2),
                    flatten=nn.Flatten(),
                    fc=nn.Linear(16 * 4 * 4, 4),
                )
            ),
        )
    )


@pytest.fixture(scope="module")
def train_data():
    from advtune.data import synthetic_blobs

    x, y = synthetic_blobs(256, generator=torch.Generator().manual_seed(3))
    return TensorData((x * 255).round().to(torch.uint8), y)


SGD = TrainConfig(epochs=2, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, seed=1)


def test_unselected_slices_are_bitwise_unchanged(train_data):
    model = bn_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sel = Selection.of(model, ["net.conv1[2]", "net.conv1[5]", "net.fc[1]"])
    masks = sel.masks(model)
    fit(model, train_data, adversarial(FGSM(THREAT)), SGD, selection=sel)  # 16 steps, momentum + weight decay
    after = model.state_dict()
    for name, p in model.named_parameters():
        m = masks.get(name, torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(after[name][~m], before[name][~m]), f"{name}: an unselected entry moved"
        if m.any():
            assert not torch.equal(after[name][m], before[name][m]), f"{name}: selected entries did not train"
    # BN of conv2 has no selected channel: its running statistics must not move at all
    assert torch.equal(after["net.bn2.running_mean"], before["net.bn2.running_mean"])
    assert torch.equal(after["net.bn2.running_var"], before["net.bn2.running_var"])
    # BN of conv1 follows selected channels 2 and 5: only those statistics move
    keep = torch.ones(8, dtype=torch.bool)
    keep[[2, 5]] = False
    assert torch.equal(after["net.bn1.running_mean"][keep], before["net.bn1.running_mean"][keep])
    assert not torch.equal(after["net.bn1.running_mean"][~keep], before["net.bn1.running_mean"][~keep])
    assert all(p.requires_grad for p in model.parameters()), "fit must restore requires_grad"


def test_frozen_tensors_stay_out_of_the_optimizer(train_data):
    model = bn_net()
    sel = Selection.of(model, [Component("net.fc", None)])
    meter = CostMeter()
    fit(model, train_data, clean(), TrainConfig(epochs=1, batch_size=64), selection=sel, meter=meter)
    assert (
        meter.trainable_params == model.net.fc.weight.numel() + model.net.fc.bias.numel() == sel.trainable_params(model)
    )
    # selective training pays the same attack backward, but a smaller update step
    full = CostMeter()
    full.measure_model(bn_net(), (1, 16, 16))
    assert meter.flops_attack_step == full.flops_attack_step and meter.flops_update_step < full.flops_update_step


def test_selecting_everything_is_exactly_full_training(train_data):
    a, b = bn_net(seed=5), bn_net(seed=5)
    objective = adversarial(PGD(THREAT, steps=3))
    fit(a, train_data, objective, SGD)
    fit(b, train_data, objective, SGD, selection=Selection.everything(b))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_overfit_guard_restores_best_weights_and_stops(tiny_model, blobs):
    import copy

    x, y, _, _ = blobs
    model = copy.deepcopy(tiny_model)

    class Identity:  # "attack" that returns x: the guard then tracks clean accuracy, which we can break
        def __call__(self, model, x, y, *, generator=None):
            return x

        def grad_evals(self):
            return 0

    guard = OverfitGuard(Identity(), x[:200], y[:200], drop=0.2)
    assert guard(model, {"epoch": 1}) is None and guard.best_acc > 0.95
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.fc.weight.mul_(-1)  # a collapse
    record = {"epoch": 2}
    assert guard(model, record) == "restored" and record["guard_reverted_to_acc"] > 0.95
    assert all(torch.equal(good[k], v) for k, v in model.state_dict().items())


def test_each_epochs_record_counts_what_the_guard_spent_that_epoch(train_data):
    """The epoch record read the meter before the callbacks ran: the guard's PGD cost showed up one epoch late and
    the last epoch's record disagreed with cost.json."""
    model, meter = bn_net(), CostMeter()
    x, y = train_data.tensors()
    guard = OverfitGuard(PGD(THREAT, steps=2), x[:40], y[:40], meter=meter)
    history = fit(model, train_data, clean(), SGD, callbacks=[guard], meter=meter)
    per_epoch = len(train_data)  # clean training: one gradient evaluation per example
    assert [r["grad_evals"] for r in history.epochs] == [per_epoch + 80, 2 * (per_epoch + 80)]
    assert history.epochs[-1]["grad_evals"] == meter.grad_evals


def test_trades_objective_trains_within_the_ball(train_data):
    model = bn_net()
    objective = trades(THREAT, steps=3, beta=6.0)
    x, y = train_data.tensors()
    out = objective(model, x[:16], y[:16], generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and (out["x_adv"] - x[:16]).abs().max() <= 0.1 + 1e-6
    meter = CostMeter()
    fit(model, train_data, objective, TrainConfig(epochs=1, batch_size=64), meter=meter)
    assert meter.grad_evals == 256 * (3 + 1 + 1)
    assert meter.forward_evals == 256  # the clean prediction: FLOPs, not a gradient evaluation


def test_finetune_job_select_random_all_layers(tmp_path):
    from advtune.cli import main

    base = tmp_path / "std"
    assert main(train_argv(base, limit=300, limit_test=100)) == 0
    common = [
        "--eps",
        "0.1",
        "--epochs",
        "1",
        "--limit",
        "200",
        "--limit-test",
        "60",
        "--attack",
        "pgd:steps=2",
        "--quiet",
    ]
    for select, extra in (("random", ["--share", "0.2"]), ("all", []), ("layers:net.conv2,net.fc2", [])):
        out = tmp_path / select.replace(":", "_").replace(",", "_")
        assert main(["finetune", str(base), "--select", select, "--out", str(out), *common, *extra]) == 0
        import json

        summary = json.loads((out / "summary.json").read_text())
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["objective"]["attack"].startswith("pgd") and "pgd10_acc_quick" in summary
        if select == "all":
            assert cfg["selection"] is None and summary["cost"]["trainable_params"] == summary["cost"]["total_params"]
        else:
            assert 0 < summary["cost"]["trainable_params"] < summary["cost"]["total_params"]
            assert summary["cost"]["trainable_params"] == cfg["selection"]["trainable_params"]
        # PGD-2 + the update: 3 gradient evaluations per example
        assert summary["cost"]["update_grad_evals"] == 200 and summary["cost"]["attack_grad_evals"] >= 200 * 2


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--select", "random", "--share", "0"], "share"),
        (["--select", "random", "--share", "1.5"], "share"),
        (["--select", "nowhere/at/all"], "not all, random, layers"),
        (["--attack", "trades:gamma=3"], "unknown TRADES parameter"),
        (["--attack", "trades:beta=0"], "TRADES needs beta > 0"),
        (["--attack", "trades:steps=0"], "TRADES needs steps > 0"),
    ],
)
def test_finetune_bad_input(argv, match, tmp_path, capsys):
    from advtune.cli import main

    base = tmp_path / "std"
    assert (
        main(
            [
                "train",
                "--dataset",
                "synthetic",
                "--model",
                "small-cnn",
                "--epochs",
                "1",
                "--limit",
                "100",
                "--limit-test",
                "20",
                "--out",
                str(base),
                "--quiet",
            ]
        )
        == 0
    )
    rc = main(["finetune", str(base), "--eps", "0.1", "--out", str(tmp_path / "ft"), "--quiet", *argv])
    assert rc == 2 and match in capsys.readouterr().err


def test_eps_warmup_ramps_the_attack_then_holds():
    objective = adversarial(PGD(ThreatModel("linf", 0.3), steps=2), eps_warmup=0.5)
    eps = [objective.at(t).attack.threat.eps for t in (0.0, 0.1, 0.25, 0.5, 0.9)]
    assert eps[0] > 0 and eps[1] == pytest.approx(0.06) and eps[2] == pytest.approx(0.15) and eps[3:] == [0.3, 0.3]
    assert objective.at(0.9) is objective
    with pytest.raises(AdvtuneError, match="eps_warmup must be a share"):
        adversarial(PGD(THREAT), eps_warmup=1.5)


def test_warmup_training_is_resume_exact(train_data, tmp_path):
    """The ramp is a function of the global step, so an interrupted run resumes bit-exactly."""
    cfg = TrainConfig(epochs=2, batch_size=64, seed=2, checkpoint_every=2)
    objective = adversarial(PGD(THREAT, steps=2), eps_warmup=0.6)
    ref = bn_net()
    fit(ref, train_data, objective, cfg)

    class Stop(Exception):
        pass

    def crash_after_epoch_one(model, record):
        raise Stop

    with pytest.raises(Stop):
        fit(bn_net(), train_data, objective, cfg, checkpoint_dir=tmp_path, callbacks=[crash_after_epoch_one])
    resumed = bn_net(seed=9)
    fit(resumed, train_data, objective, cfg, checkpoint_dir=tmp_path, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()))


def test_everything_on_preact_resnet_freezes_nothing():
    """(d) holds on a pre-activation ResNet too, whose BNs do not all follow a conv."""
    from advtune.models import build_model
    from advtune.train import Trainable

    model = build_model("preact-resnet18", (3, 16, 16), 10)
    t = Trainable(model, Selection.everything(model), torch.rand(1, 3, 16, 16))
    try:
        assert all(p.requires_grad for p in model.parameters()) and not t.partial and not t.frozen_bns
    finally:
        t.close()


def test_finetune_refuses_resume_with_other_settings_and_writing_into_base(tmp_path, capsys):
    from advtune.cli import main

    base = tmp_path / "std"
    assert (
        main(
            [
                "train",
                "--dataset",
                "synthetic",
                "--model",
                "small-cnn",
                "--epochs",
                "1",
                "--limit",
                "100",
                "--limit-test",
                "20",
                "--out",
                str(base),
                "--quiet",
            ]
        )
        == 0
    )
    args = [
        "finetune",
        str(base),
        "--eps",
        "0.1",
        "--attack",
        "pgd:steps=1",
        "--limit",
        "64",
        "--monitor-test",
        "0",
        "--quiet",
    ]
    assert main(args + ["--select", "random", "--share", "0.2", "--out", str(tmp_path / "ft")]) == 0
    assert main(args + ["--select", "random", "--share", "0.5", "--out", str(tmp_path / "ft"), "--resume"]) == 2
    assert "different settings (share: 0.2 -> 0.5)" in capsys.readouterr().err
    assert main(args + ["--out", str(base), "--overwrite"]) == 2
    assert "is the base run itself" in capsys.readouterr().err and (base / "model.safetensors").is_file()


def test_selected_units_of_a_residual_network_train_and_nothing_else_moves(train_data):
    """preact-resnet20 (batch norm before every conv, skip connections): units in two residual blocks
    and the head train; every other parameter entry stays bit for bit, as on the plain CNNs."""
    from advtune.models import build_model

    torch.manual_seed(0)
    model = build_model("preact-resnet20", (1, 16, 16), 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sel = Selection.of(model, ["net.layer1.1.conv2[3]", "net.layer2.0.conv1[7]", "net.linear[2]"])
    masks = sel.masks(model)
    fit(model, train_data, adversarial(FGSM(THREAT)), SGD, selection=sel)
    after = model.state_dict()
    for name, p in model.named_parameters():
        m = masks.get(name, torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(after[name][~m], before[name][~m]), f"{name}: an unselected entry moved"
    moved = [name for name, m in masks.items() if not torch.equal(after[name][m], before[name][m])]
    assert {"net.layer1.1.conv2.weight", "net.layer2.0.conv1.weight", "net.linear.weight"} <= set(moved)
    assert 250_000 < sum(p.numel() for p in model.parameters()) < 300_000  # ResNet-20-sized


def test_trades_eps_ramps_when_asked():
    objective = trades(ThreatModel("linf", 0.3), steps=2, eps_warmup=0.5)
    eps = [objective.at(t).threat.eps for t in (0.0, 0.25, 0.5, 0.9)]
    assert eps[0] > 0 and eps[1] == pytest.approx(0.15) and eps[2:] == [0.3, 0.3]
    assert trades(ThreatModel("linf", 0.3)).at(0.0).threat.eps == 0.3  # no ramp unless asked
