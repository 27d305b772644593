"""Components, BatchNorm followers, selections and their parameter masks."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

from advtune.components import (
    Component,
    Selection,
    enumerate_components,
    fingerprint,
    followers,
    layers,
    output_layer,
    trace,
)
from advtune.errors import AdvtuneError
from conftest import TinyCNN


class Normalize(nn.Module):
    """Stands in for advtune.models.Normalize (skipped by class name). The 1x1 conv inside must be
    skipped too, so it proves the whole subtree is ignored."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Conv2d(3, 3, 1, bias=False)
        nn.init.dirac_(self.scale.weight)

    def forward(self, x):
        return self.scale(x)


def conv_bn_model() -> nn.Module:
    """normalize -> conv(3->4) bn relu -> conv(4->6) bn relu -> pool -> linear(6->5)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )
    return nn.Sequential(OrderedDict(normalize=Normalize(), net=net)).eval()


class BnRegisteredFirst(nn.Module):
    """The BN is registered before its conv but runs after it: only the traced rule sees it."""

    def __init__(self):
        super().__init__()
        self.pre = nn.BatchNorm2d(3)  # applied to the input: follows nothing
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(self.pre(x))))
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------- Component


def test_component_string_round_trip_and_order():
    c = Component("net.conv1", 17)
    assert str(c) == "net.conv1[17]"
    assert Component.parse("net.conv1[17]") == c
    assert Component.parse("net.layer2.0.conv1") == Component("net.layer2.0.conv1", None)
    assert str(Component("fc")) == "fc"
    assert sorted([Component("b", 0), Component("a", 3), Component("a", None), Component("a", 1)]) == [
        Component("a", None),
        Component("a", 1),
        Component("a", 3),
        Component("b", 0),
    ]
    assert len({Component("a", 1), Component("a", 1)}) == 1


@pytest.mark.parametrize("bad", ["net.conv1[x]", "a[1]b", "a[-1]", "a[[1]]"])
def test_component_parse_errors(bad):
    with pytest.raises(AdvtuneError, match="cannot parse component"):
        Component.parse(bad)


@pytest.mark.parametrize("unit", [-1, 1.5, True, "3"])
def test_component_bad_unit(unit):
    with pytest.raises(AdvtuneError, match="non-negative int"):
        Component("conv", unit)


# ---------------------------------------------------------------- enumeration


def test_enumerate_tiny_cnn():
    model = TinyCNN()
    assert [n for n, _ in layers(model)] == ["conv1", "conv2", "fc"]
    units = enumerate_components(model)
    assert len(units) == 8 + 16 + 4
    assert units[0] == Component("conv1", 0) and units[-1] == Component("fc", 3)
    assert enumerate_components(model, "channel") == units
    assert enumerate_components(model, "layer") == [Component("conv1"), Component("conv2"), Component("fc")]
    assert len(enumerate_components(model, include_output=False)) == 24
    assert output_layer(model) == "fc"
    assert output_layer(model, torch.rand(1, 1, 16, 16)) == "fc"
    assert fingerprint(model) == [("conv1", 8), ("conv2", 16), ("fc", 4)]


def test_normalize_subtree_skipped():
    model = conv_bn_model()
    assert [n for n, _ in layers(model)] == ["net.0", "net.3", "net.8"]
    assert trace(model, torch.rand(2, 3, 8, 8)).layer_order == ("net.0", "net.3", "net.8")


def test_unknown_granularity():
    with pytest.raises(AdvtuneError, match="granularity"):
        enumerate_components(TinyCNN(), "neuron")


def test_model_without_layers_is_refused():
    model = nn.Sequential(nn.ReLU(), nn.Flatten())
    with pytest.raises(AdvtuneError, match="no Conv2d or Linear"):
        enumerate_components(model)
    with pytest.raises(AdvtuneError, match="no Conv2d or Linear"):
        layers(model)
    with pytest.raises(AdvtuneError, match="no Conv2d or Linear"):
        Selection.everything(model)


# ---------------------------------------------------------------- BatchNorm followers


def test_followers_static_and_traced_agree_on_sequential():
    model = conv_bn_model()
    expected = {"net.0": "net.1", "net.3": "net.4"}
    assert followers(model) == expected
    assert followers(model, torch.rand(2, 3, 8, 8)) == expected


def test_followers_traced_rule_finds_bn_registered_first():
    model = BnRegisteredFirst().eval()
    assert followers(model) == {}  # static rule: next sibling of conv is fc
    assert followers(model, torch.rand(2, 3, 6, 6)) == {"conv": "bn"}  # `pre` consumes the input
    masks = Selection.of(model, [Component("conv", 1)]).masks(model, torch.rand(2, 3, 6, 6))
    assert set(masks) == {"conv.weight", "conv.bias", "bn.weight", "bn.bias"}


# ---------------------------------------------------------------- masks


def test_masks_cover_exactly_the_selected_slices():
    model = conv_bn_model()
    sel = Selection.of(
        model, [Component("net.0", 1), Component("net.0", 3), Component("net.3", 2), Component("net.8", 0)]
    )
    masks = sel.masks(model)
    params = dict(model.named_parameters())
    assert set(masks) == {
        "net.0.weight",
        "net.0.bias",
        "net.1.weight",
        "net.1.bias",
        "net.3.weight",
        "net.3.bias",
        "net.4.weight",
        "net.4.bias",
        "net.8.weight",
        "net.8.bias",
    }
    for name, m in masks.items():
        assert m.dtype == torch.bool and m.shape == params[name].shape
    rows = {"net.0": [1, 3], "net.1": [1, 3], "net.3": [2], "net.4": [2], "net.8": [0]}
    for name, m in masks.items():
        module = name.rsplit(".", 1)[0]
        expected = torch.zeros_like(m)
        expected[rows[module]] = True
        assert torch.equal(m, expected), name
    # the traced rule gives the same masks here
    traced = sel.masks(model, torch.rand(2, 3, 8, 8))
    assert set(traced) == set(masks) and all(torch.equal(traced[k], masks[k]) for k in masks)
    assert sel.trainable_params(model) == int(sum(m.sum() for m in masks.values()))
    assert sel.trainable_params(model) == 2 * (27 + 1 + 2) + (36 + 1 + 2) + (6 + 1)


def test_whole_layer_component_expands():
    model = conv_bn_model()
    sel = Selection.of(model, [Component("net.3")])
    masks = sel.masks(model)
    assert set(masks) == {"net.3.weight", "net.3.bias", "net.4.weight", "net.4.bias"}
    assert all(bool(m.all()) for m in masks.values())
    assert len(sel) == 1 and sel.n_units(model) == 6
    assert sel.expand(model) == Selection(frozenset(Component("net.3", u) for u in range(6)))
    assert sel.by_layer(model) == {"net.0": (0, 4), "net.3": (6, 6), "net.8": (0, 5)}


def test_everything_covers_every_conv_linear_param():
    model = conv_bn_model()
    sel = Selection.everything(model)
    masks = sel.masks(model)
    params = dict(model.named_parameters())
    covered = {n for n, p in params.items() if not n.startswith("normalize.")}
    assert set(masks) == covered  # conv, linear and the BNs that follow convs
    assert all(bool(m.all()) for m in masks.values())
    assert sel.is_everything(model)
    assert sel.trainable_params(model) == sum(p.numel() for n, p in params.items() if n in covered)
    assert Selection.everything(model, "unit").masks(model).keys() == masks.keys()
    assert not Selection.of(model, [Component("net.0", 0)]).is_everything(model)


def test_user_module_with_tiny_cnn():
    model = TinyCNN()
    masks = Selection.of(model, ["conv2[5]"]).masks(model)
    assert set(masks) == {"conv2.weight", "conv2.bias"}
    assert masks["conv2.weight"].sum() == 8 * 9 and bool(masks["conv2.weight"][5].all())


# ---------------------------------------------------------------- serialisation and validation


def test_json_round_trip():
    model = conv_bn_model()
    sel = Selection.of(model, [Component("net.0", 1), Component("net.8")])
    data = json.loads(json.dumps(sel.to_json()))
    back = Selection.from_json(data, model)
    assert back == sel
    assert back.fingerprint == sel.fingerprint == tuple(fingerprint(model))
    assert data["components"] == ["net.0[1]", "net.8"]


def test_selection_for_another_model_is_refused():
    sel = Selection.of(conv_bn_model(), [Component("net.0", 1)])
    other = TinyCNN()
    with pytest.raises(AdvtuneError, match="selection was made for a different model"):
        Selection.from_json(sel.to_json(), other)
    with pytest.raises(AdvtuneError, match="selection was made for a different model"):
        sel.masks(other)
    # same layer names, different widths
    wider = TinyCNN()
    wider.conv2 = nn.Conv2d(8, 32, 3, padding=1)
    with pytest.raises(AdvtuneError, match="selection was made for a different model"):
        Selection.of(TinyCNN(), ["conv2[1]"]).validate(wider)


def test_selection_without_fingerprint_still_checks_names_and_units():
    model = TinyCNN()
    with pytest.raises(AdvtuneError, match="not a Conv2d/Linear layer"):
        Selection(frozenset([Component("conv9", 0)])).validate(model)
    with pytest.raises(AdvtuneError, match="has only 8 units"):
        Selection(frozenset([Component("conv1", 8)])).masks(model)


def test_from_json_rejects_other_documents():
    with pytest.raises(AdvtuneError, match="not an advtune selection"):
        Selection.from_json({"components": []})
    with pytest.raises(AdvtuneError, match="collection of Component"):
        Selection(Component("conv1", 0))
