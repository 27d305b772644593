"""The transfer attack (#21 item 6's check): examples crafted on a source run, inside the eps-ball,
identical to the white-box attack when the source is the model itself; bad specs are one line."""

from __future__ import annotations

import pytest
import torch

from advtune.attacks import build_attack
from advtune.errors import AdvtuneError
from advtune.evaluation import robust_accuracy
from advtune.models import load_model
from advtune.threat import ThreatModel
from cli_helpers import train_argv

THREAT = ThreatModel("linf", 0.1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from advtune.cli import main

    root = tmp_path_factory.mktemp("transfer")
    for name, epochs in (("a", 1), ("b", 2)):
        assert main(train_argv(root / name, limit=200, limit_test=40, epochs=epochs)) == 0
    return root


def test_transfer_from_the_model_itself_is_the_white_box_attack(runs):
    model, _ = load_model(runs / "a")
    from advtune.data import load_dataset

    x, y = load_dataset("synthetic").test.take(40).tensors(torch.device("cpu"))
    attack = build_attack(f"transfer:source={runs / 'a'},attack=pgd", THREAT)
    assert attack.black_box and attack.spec.startswith("transfer:source=")
    x_t = attack(model, x, y, generator=torch.Generator().manual_seed(1))
    x_w = build_attack("pgd", THREAT)(model, x, y, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x_t, x_w)
    other, _ = load_model(runs / "b")  # crafted on a, tried on b: the examples are a's, whatever b is
    assert torch.equal(attack(other, x, y, generator=torch.Generator().manual_seed(1)), x_w)
    result = robust_accuracy(other, (x, y), [attack, build_attack("apgd-ce", THREAT)], gate=True)
    assert list(result.accuracy)[-1].startswith("transfer")  # black-box: last in the cascade


def test_transfer_crafts_apgd_to_its_highest_loss_on_the_source(runs):
    """APGD evaluates with early stopping (a sample leaves at its first success): a transfer attack must not, as
    that point sits just across the source's boundary. Crafted on the model itself, the transfer's points are
    APGD-CE's without early stopping: a loss at least that of the early-stopped points on every image."""
    model, _ = load_model(runs / "a")
    from advtune.data import load_dataset

    x, y = load_dataset("synthetic").test.take(40).tensors(torch.device("cpu"))
    x_t = build_attack(f"transfer:source={runs / 'a'}", THREAT)(model, x, y, generator=torch.Generator().manual_seed(1))
    full = build_attack("apgd-ce:early_stop=false", THREAT)(model, x, y, generator=torch.Generator().manual_seed(1))
    first = build_attack("apgd-ce", THREAT)(model, x, y, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x_t, full)
    with torch.no_grad():
        loss = [torch.nn.functional.cross_entropy(model(p), y, reduction="none") for p in (x_t, first)]
    fooled = model(first).argmax(1) != y
    assert fooled.any() and (loss[0][fooled] > loss[1][fooled]).all()
    assert (x_t - x).abs().max() <= THREAT.eps + 1e-6 and x_t.min() >= 0 and x_t.max() <= 1


@pytest.mark.parametrize(
    "spec,match",
    [
        ("transfer", "transfer needs source="),
        ("transfer:source=nowhere/at/all", "is not a run folder with a saved model"),
        ("transfer:source=x,attack=square", "must be a white-box attack"),
        ("transfer:source=x,attack=nope", "unknown attack"),
    ],
)
def test_bad_transfer_specs_are_one_line(spec, match, runs):
    spec = spec.replace("source=x", f"source={runs / 'a'}")
    with pytest.raises(AdvtuneError, match=match):  # when the attack list is built, before any work
        build_attack(spec, THREAT)
