"""A user's own, unusual nn.Module through the API: tied weights, running statistics outside BatchNorm, a frozen
backbone, spectral norm, a meta model, a forward that needs more than x, a call under no_grad. Each either works
without touching what it must not, or is refused in one line before any work."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm  # the parametrization: reading .weight computes it

import advtune
from advtune.components import unit_params
from advtune.errors import AdvtuneError


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


class Tied(nn.Module):
    """Two conv layers sharing one weight Parameter (not one module reused: two modules, one tensor)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3.weight = self.c2.weight
        self.fc = nn.Linear(8 * 16 * 16, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))).flatten(1))


@pytest.mark.parametrize("granularity", ["probe", "sparse", "unit", "lowrank"])
def test_tied_weights_are_refused_by_the_selective_rules_before_any_work(granularity, tmp_path):
    x, y = _data()
    with pytest.raises(AdvtuneError, match=r"'c2' and 'c3' share one parameter tensor \(tied weights\)") as e:
        advtune.harden(
            Tied(), (x, y), eps=0.1, test=(x, y), budget=2000, recipe=advtune.Recipe(granularity=granularity)
        )
    assert "\n" not in str(e.value)


def test_tied_weights_are_analysed_and_train_whole_but_not_selectively():
    """The unit rule trained the units chosen in the first layer and never the second's (one tensor, one name)."""
    x, y = _data()
    model = Tied()
    vmap = advtune.analyze(model, (x, y), eps=0.1, limit=16, curve=False)
    with pytest.raises(AdvtuneError, match="tied weights.*--select all"):
        advtune.fit(model, (x, y), selection=vmap.select(share=0.2))
    before = _state(model)
    advtune.fit(model, (x, y), config=advtune.TrainConfig(epochs=1, batch_size=16))
    assert torch.equal(model.c2.weight, model.c3.weight) and not torch.equal(before["c2.weight"], model.c2.weight)


def _instance_norm_net():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 256, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def test_a_selective_fit_leaves_an_unselected_instance_norm_statistics_alone():
    x, y = _data()
    model = _instance_norm_net()
    before = _state(model)
    advtune.fit(model, (x, y), selection=advtune.Selection.of(model, ["4[0]"]), config=advtune.TrainConfig(epochs=1))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"4.weight", "4.bias"}


def test_attacks_leave_an_instance_norm_statistics_alone_in_train_mode():
    x, y = _data()
    model = _instance_norm_net().train()
    before = _state(model)
    advtune.PGD(advtune.ThreatModel.linf(0.1), steps=2)(model, x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_full_fit_keeps_a_frozen_eval_mode_batchnorm_as_it_was():
    """The usual frozen backbone: parameters frozen and the norm in eval mode; full training trains the rest."""
    x, y = _data()
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(2048, 4))
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)
    model.train()
    model[1].eval()
    before = _state(model)
    advtune.fit(model, (x, y), config=advtune.TrainConfig(epochs=1, batch_size=16))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"4.weight", "4.bias"}
    assert model.training and not model[1].training  # the caller's modes given back


def test_an_unfrozen_batchnorm_still_updates_its_statistics_under_full_fit():
    x, y = _data()
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(2048, 4))
    before = _state(model)
    advtune.fit(model, (x, y), config=advtune.TrainConfig(epochs=1, batch_size=16))
    assert not torch.equal(before["1.running_mean"], model.state_dict()["1.running_mean"])


def test_counting_units_does_not_run_spectral_norm_power_iteration():
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), spectral_norm(nn.Linear(2048, 16)), nn.ReLU()
    )
    model.append(nn.Linear(16, 4)).train()
    before = _state(model)
    counts = unit_params(model)
    assert counts == {"0": 9 + 1, "3": 2048 + 1, "5": 16 + 1}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_grouped_conv_units_are_counted_by_their_own_inputs():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4, bias=False), nn.Flatten(), nn.Linear(8 * 14 * 14, 4))
    assert unit_params(model)["0"] == 1 * 9 == model[0].weight[0].numel()


@pytest.mark.parametrize("call", ["analyze", "fit", "harden", "save_model"])
def test_a_meta_model_is_one_line_for_every_entry_point(call, tmp_path):
    x, y = _data()
    with torch.device("meta"):
        model = nn.Sequential(nn.Flatten(), nn.Linear(256, 4))
    calls = {
        "analyze": lambda: advtune.analyze(model, (x, y), eps=0.1, limit=8, curve=False),
        "fit": lambda: advtune.fit(model, (x, y)),
        "harden": lambda: advtune.harden(model, (x, y), eps=0.1, budget=100),
        "save_model": lambda: advtune.save_model(model, tmp_path / "m"),
    }
    with pytest.raises(AdvtuneError, match="meta tensors hold no values.*to_empty") as e:
        calls[call]()
    assert "\n" not in str(e.value)
    assert not (tmp_path / "m").exists()


class NeedsMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(256, 4)

    def forward(self, x, mask):
        return self.fc(x.flatten(1) * mask)


def test_a_forward_that_needs_more_than_x_is_one_line():
    x, y = _data()
    with pytest.raises(AdvtuneError, match=r"the model's forward needs more than the inputs .*mask.*wrap it"):
        advtune.evaluate(NeedsMask(), (x, y), eps=0.1, attacks="fgsm")


def test_analyze_works_when_called_under_no_grad():
    x, y = _data()
    with torch.no_grad():
        vmap = advtune.analyze(
            nn.Sequential(nn.Flatten(), nn.Linear(256, 8), nn.ReLU(), nn.Linear(8, 4)),
            (x, y),
            eps=0.1,
            limit=8,
            curve=False,
        )
    assert len(vmap.ranked()) == 8


def test_a_lazy_model_not_built_yet_is_one_line_for_evaluate_and_works_for_fit():
    """evaluate blamed the input shape ("Inference tensors cannot be saved for backward"); fit builds it itself."""
    x, y = _data()
    model = nn.Sequential(nn.LazyConv2d(8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    with pytest.raises(AdvtuneError, match=r"layer '0' is a lazy module not built yet: run one forward pass first"):
        advtune.evaluate(model, (x, y), eps=0.1, attacks="fgsm")
    advtune.fit(model, (x, y), config=advtune.TrainConfig(epochs=1, batch_size=16))
    assert advtune.evaluate(model, (x, y), eps=0.1, attacks="fgsm").n == len(x)
