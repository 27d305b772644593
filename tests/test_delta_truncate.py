"""bench/delta_truncate.py (issue 21's diagnostic): each truncation of a fine-tuning's change keeps at most its
budget of entries, keeps the best part of its shape, and the patched model is the base plus that part."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import delta_truncate as dt  # noqa: E402


def _models():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    tuned = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        tuned[0].weight.add_(0.1 * torch.randn_like(tuned[0].weight))
        tuned[4].weight.add_(torch.outer(torch.randn(10), torch.randn(128)))  # a rank-1 change
        tuned[1].weight.add_(1.0)  # a normalization change, kept by every arm
    return base, tuned


def test_truncations_keep_their_budget_and_the_best_of_their_shape():
    base, tuned = _models()
    weights = dt.weight_deltas(base, tuned)
    deltas = {n: d for n, (_, d) in weights.items()}
    # the linear layer's change is rank 1: one direction (10 + 128 entries) holds all of it
    part, kept = dt.lowrank_part({"4": deltas["4"]}, 138)
    assert kept == 138 and torch.allclose(part["4"], deltas["4"], atol=1e-5)
    part, kept = dt.lowrank_part(deltas, 100)  # too little for that direction: the conv's first directions
    assert kept <= 100 and part["4"].abs().max() == 0 and part["0"].abs().max() > 0
    part, kept = dt.sparse_part(deltas, 50)
    assert kept == 50 == sum(int((p != 0).sum()) for p in part.values())
    smallest_kept = min(p[p != 0].abs().min() for p in part.values() if (p != 0).any())
    largest_dropped = max((d - p).abs().max() for d, p in zip(deltas.values(), part.values()))
    assert smallest_kept >= largest_dropped
    part, kept = dt.layers_part(deltas, 300)  # the conv (216 entries) fits, the linear (1280) does not
    assert kept == 216 and torch.equal(part["0"], deltas["0"]) and part["4"].abs().max() == 0
    model = dt.patched(tuned, weights, part)
    assert torch.equal(model[0].weight, tuned[0].weight) and torch.equal(model[4].weight, base[4].weight)
    assert torch.equal(model[1].weight, tuned[1].weight)  # normalization layers from the tuned model


def test_models_that_do_not_match_are_refused():
    base, _ = _models()
    other = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(SystemExit, match="the tuned model has no Conv2d '0' of shape"):
        dt.weight_deltas(base, other)


def test_recalibrate_reestimates_the_statistics_on_the_attacks_examples():
    """The tuned statistics belong to the tuned weights: each arm gets statistics of its own, the average of the
    per-batch statistics of what the attack returns, and the layer's momentum is left as it was."""
    base, _ = _models()
    base[1].running_mean.fill_(5.0)
    x, y = torch.rand(96, 3, 6, 6), torch.randint(0, 10, (96,))

    class Shift:  # an "attack" whose examples are known: every pixel + 0.5
        spec = "shift"

        def __call__(self, model, x, y, *, generator=None):
            return x + 0.5

    dt.recalibrate(base, x, y, Shift(), batch=32)
    with torch.no_grad():
        per_batch = [base[0](x[i : i + 32] + 0.5).mean((0, 2, 3)) for i in range(0, 96, 32)]
    assert torch.allclose(base[1].running_mean, torch.stack(per_batch).mean(0), atol=1e-5)
    assert base[1].momentum == 0.1 and not base.training


def _tuned_run(monkeypatch, **fields) -> tuple[nn.Module, dict]:
    """A base with a BatchNorm and a tuned run's config (PGD-2 on 256 synthetic images, the weight average on, as the
    real runs), `dataset_of` answering with those images."""
    from advtune.data.synthetic import synthetic_dataset
    from advtune.runs.configs import FinetuneRun
    from advtune.train.config import TrainConfig

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 4))
    monkeypatch.setattr(dt, "dataset_of", lambda *a, limit=None, **k: synthetic_dataset(n_train=256, n_test=16))
    train = TrainConfig(batch_size=64, lr=0.01, seed=0, ema=0.99)
    run = FinetuneRun(
        base="unused", out="", eps=0.1, select="all", attack="pgd:steps=2", limit=256, train=train, **fields
    )
    return base, {"run": run.to_json()}


def test_retraining_within_a_mask_moves_only_the_mask_and_the_norms(monkeypatch):
    """The oracle-mask arm trains the base again by the tuned run's recipe: the masked weight entries and the
    normalization layers and biases move, every other weight entry keeps the base's value bit for bit."""
    base, tuned_cfg = _tuned_run(monkeypatch, budget=3 * 256)
    mask = {"0": torch.zeros(4, 1, 3, 3), "4": torch.zeros(4, 784)}
    mask["0"][0, 0, 1, 1] = 1.0
    mask["4"][:, :10] = 1.0
    model, record = dt.retrain_within(base, tuned_cfg, (None, None), mask)
    assert record["seeds"] == [0] and record["train_loss"] > 0
    for name, m in (("0", model[0]), ("4", model[4])):
        frozen = mask[name] == 0
        assert torch.equal(m.weight[frozen], dict(base.named_modules())[name].weight[frozen])
        assert not torch.equal(m.weight[~frozen], dict(base.named_modules())[name].weight[~frozen])
    assert not torch.equal(model[1].weight, base[1].weight) and not torch.equal(model[4].bias, base[4].bias)
    assert not model.training


def test_the_probe_arm_changes_only_its_budget_of_weight_entries_at_the_tuned_runs_cost(monkeypatch):
    """The probe recipe: the whole network for a share of the budget, then the mask from that change, the rest put
    back to the base and trained within the mask: the output differs from the base in at most the budget's weight
    entries, and the two stages together spend the tuned run's budget (equal compute)."""
    base, tuned_cfg = _tuned_run(monkeypatch, budget=12 * 256, eps_warmup=0.3)
    model, kept, spent, record = dt.probe_then_mask(base, tuned_cfg, (None, None), 0.5, 100)
    assert record["seeds"] == [0, 1]  # the continuation does not replay the probe's batches
    changed = sum(int((m.weight != b.weight).sum()) for m, b in ((model[0], base[0]), (model[4], base[4])))
    assert kept == 100 and 0 < changed <= 100
    assert abs(spent - 12 * 256) <= 3 * 64  # the budget, to within one step of the last batch
    assert not torch.equal(model[1].weight, base[1].weight)  # the norms train in both stages
    with pytest.raises(SystemExit, match="must be larger than --eps-warmup"):
        dt.probe_then_mask(base, tuned_cfg, (None, None), 0.3, 100)  # the ramp would end after it
