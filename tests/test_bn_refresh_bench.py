"""bench/bn_refresh.py (#21, round 26-27): BatchNorm statistics re-estimated for averaged weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advtune.data.splits import TensorData
from advtune.errors import AdvtuneError


@pytest.fixture
def bn_refresh(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import bn_refresh

    return bn_refresh


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    )


def _train(n=64):
    g = torch.Generator().manual_seed(1)
    # a bright square in the middle of dark images: zero-padded crops move it and add black borders
    x = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
    x[:, :, 2:6, 2:6] = torch.randint(150, 255, (n, 3, 4, 4), generator=g, dtype=torch.uint8)
    return TensorData(x, torch.randint(0, 3, (n,), generator=g))


def test_the_refresh_is_the_cumulative_average_and_keeps_the_momentum(bn_refresh):
    model, train = _model(), _train()
    bn = model[1]
    bn.running_mean.fill_(5.0)
    cost = bn_refresh.refresh_statistics(model, train, limit=64, eps=0.1, batches=2, batch_size=32)
    assert cost == 64 * 6
    assert bn.momentum == 0.1 and not model.training
    assert bn.num_batches_tracked.item() == 2
    assert bn.running_mean.abs().max() < 1.0  # the old statistics are gone, not blended in


def test_augmented_batches_give_other_statistics_and_unknown_kinds_are_refused(bn_refresh):
    plain, augmented = _model(), _model()
    train = _train()
    bn_refresh.refresh_statistics(plain, train, limit=64, eps=0.1, batches=2, batch_size=32)
    bn_refresh.refresh_statistics(augmented, train, limit=64, eps=0.1, batches=2, batch_size=32, kind="crop-flip")
    assert not torch.allclose(plain[1].running_var, augmented[1].running_var)
    with pytest.raises(AdvtuneError, match="unknown augmentation"):
        bn_refresh.refresh_statistics(_model(), train, limit=64, eps=0.1, batches=1, batch_size=32, kind="blur")
