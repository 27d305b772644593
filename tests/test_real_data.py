"""Checks on the real MNIST files beside the checkout (../shared/data), sized to stay quick on a CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from advtune.attacks import FGSM, PGD
from advtune.data import load_dataset
from advtune.evaluation import robust_accuracy
from advtune.metrics import accuracy
from advtune.models import model_for
from advtune.threat import ThreatModel
from advtune.train import TrainConfig, clean, fit

# $ADVTUNE_DATA when set (load_dataset looks there first), else the data beside the checkout
SHARED = Path(os.environ.get("ADVTUNE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data") / "mnist"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present")]


@pytest.fixture(scope="module")
def mnist_std():
    """small-cnn, one epoch on the first 20k MNIST images (about 96-98% on the first 1000 test images)."""
    ds = load_dataset("mnist", limit=20000, limit_test=1000)
    torch.manual_seed(0)
    model = model_for(ds, "small-cnn")
    fit(model, ds.train, clean(), TrainConfig(epochs=1, batch_size=128, lr=1e-3))
    return model.eval(), ds


def test_standard_mnist_model_learns(mnist_std):
    model, ds = mnist_std
    assert accuracy(model, ds.test) > 0.95


def test_pgd40_collapses_the_standard_mnist_model(mnist_std):
    """The issue's bar: PGD-40 at eps=0.3 drives a standard MNIST small-cnn below 2%."""
    model, ds = mnist_std
    x, y = ds.test.take(300).tensors()
    threat = ThreatModel("linf", 0.3)
    res = robust_accuracy(
        model, (x, y), [FGSM(threat), PGD(threat, steps=40)], generator=torch.Generator().manual_seed(0)
    )
    acc = res.accuracy
    assert acc["pgd:steps=40"] < 0.02 and acc["pgd:steps=40"] <= acc["fgsm"]
    assert res.max_perturbation["pgd:steps=40"] <= 0.3 + 1e-6 and not res.suspect
