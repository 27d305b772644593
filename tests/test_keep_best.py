"""Keeping the best checkpoint on held-out data (#21 item 7): the best point's weights come back, not
the last; a resumed run keeps what it measured before; finetune refuses --keep-best without --val."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from advtune.cost import CostMeter
from advtune.data import TensorData
from advtune.errors import AdvtuneError
from advtune.train.keep_best import CURVE, WEIGHTS, KeepBest


class Scripted:
    """An 'attack' whose robust accuracy is scripted per call: it returns x unchanged, and the model's
    single weight decides the prediction."""

    def grad_evals(self):
        return 10

    def __call__(self, model, x, y, generator=None):
        return x


def setup(folder=None, steps=(2, 4, 6)):
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2, bias=False))
    x = torch.zeros(4, 1, 1, 1, dtype=torch.uint8) + 255
    data = TensorData(x, torch.tensor([0, 0, 0, 0]))
    return model, KeepBest(data, Scripted(), list(steps), label="scripted", folder=folder, batch_size=4)


def set_correct(model, correct: bool, tag: float):
    with torch.no_grad():  # class 0 wins when correct; `tag` marks the weights
        model[1].weight.copy_(torch.tensor([[tag], [-tag]]) * (1 if correct else -1))


def test_the_best_point_comes_back_not_the_last(tmp_path):
    model, keep = setup(tmp_path)
    for step, correct in ((1, True), (2, False), (4, True), (6, False)):
        set_correct(model, correct, float(step))
        keep(model, step)
    assert [p["step"] for p in keep.curve] == [2, 4, 6] and [p["robust_acc"] for p in keep.curve] == [0, 1, 0]
    assert keep.restore(model) == 4 and model[1].weight[0, 0].item() == 4.0
    rec = json.loads((tmp_path / CURVE).read_text())
    assert rec["chosen_step"] == 4 and rec["grad_evals"] == 3 * 4 * 10 and rec["attack"] == "scripted"
    assert (tmp_path / WEIGHTS).is_file()


def test_each_point_records_what_measuring_it_cost(tmp_path):
    # the run's meter stops while a point is measured, so the choice's wall time and FLOPs are kept here
    model, keep = setup(tmp_path)
    meter = CostMeter(flops_forward=3.0, flops_attack_step=7.0)
    for step in (2, 4):
        set_correct(model, True, float(step))
        keep(model, step, meter)
    rec = json.loads((tmp_path / CURVE).read_text())
    assert [p["flops"] for p in rec["curve"]] == [4 * (10 * 7.0 + 2 * 3.0)] * 2 and rec["flops"] == 2 * 4 * 76.0
    assert all(p["wall_s"] >= 0 for p in rec["curve"])
    assert rec["wall_s"] == pytest.approx(sum(p["wall_s"] for p in rec["curve"]), abs=2e-3)
    keep(model, 6)  # no meter (a caller without one): its time still counts, its FLOPs cannot
    assert "flops" not in keep.curve[-1] and keep.record()["flops"] == 2 * 4 * 76.0


def test_a_resumed_run_keeps_the_best_measured_before(tmp_path):
    model, keep = setup(tmp_path)
    set_correct(model, True, 2.0)
    keep(model, 2)  # the best, measured before the interruption
    model2, resumed = setup(tmp_path)  # a new process: only the folder remembers
    set_correct(model2, False, 4.0)
    resumed(model2, 4)
    assert resumed.restore(model2) == 2 and model2[1].weight[0, 0].item() == 2.0


def test_a_damaged_keep_best_file_is_one_line_naming_the_file(tmp_path):
    """A truncated keep-best.safetensors raised safetensors' own error with a traceback on resume; a curve that is
    not one failed on a missing key."""
    model, keep = setup(tmp_path)
    set_correct(model, True, 2.0)
    keep(model, 2)
    weights = tmp_path / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:20])
    model2, resumed = setup(tmp_path)
    with pytest.raises(AdvtuneError, match=r"keep-best\.safetensors is truncated or corrupt .*rerun with --resume"):
        resumed.restore(model2)
    (tmp_path / CURVE).write_text(json.dumps({"curve": [{"step": 2}]}))
    with pytest.raises(AdvtuneError, match=r"keep-best\.json is not a checkpoint curve; delete keep-best\.\*"):
        setup(tmp_path)


def test_a_moving_masks_best_point_keeps_its_mask_also_across_a_resume(tmp_path):
    """--regrow: the mask the best point trained with comes back with its weights (the run records it), from memory
    and from the folder after a resume; a weights file without a mask is refused for such a run."""
    live = {"w": torch.tensor([True, False])}
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2, bias=False))
    x = torch.zeros(4, 1, 1, 1, dtype=torch.uint8) + 255
    data = TensorData(x, torch.tensor([0, 0, 0, 0]))

    def keeper():
        return KeepBest(data, Scripted(), [2, 4], folder=tmp_path, batch_size=4, masks=lambda: live)

    keep = keeper()
    set_correct(model, True, 2.0)
    keep(model, 2)  # the best point, with the mask of its time
    live["w"] = torch.tensor([False, True])  # the mask moves, the later point is worse
    set_correct(model, False, 4.0)
    keep(model, 4)
    assert keep.restore(model) == 2 and torch.equal(keep.kept_masks["w"], torch.tensor([True, False]))
    assert model[1].weight[0, 0].item() == 2.0
    resumed = keeper()  # a new process: only the folder remembers
    assert resumed.restore(model) == 2 and torch.equal(resumed.kept_masks["w"], torch.tensor([True, False]))
    (tmp_path / WEIGHTS).unlink()
    _, old = setup(tmp_path / "old")
    set_correct(model, True, 2.0)
    old(model, 2)  # written without a mask
    moving = KeepBest(data, Scripted(), [2], folder=tmp_path / "old", batch_size=4, masks=lambda: live)
    with pytest.raises(AdvtuneError, match="no mask"):
        moving.restore(model)


def test_ties_keep_the_later_point():
    model, keep = setup()
    for step in (2, 4):
        set_correct(model, True, float(step))
        keep(model, step)
    assert keep.restore(model) == 4


def test_finetune_keep_best_needs_held_out_data(tmp_path, capsys):
    from advtune.cli import main
    from cli_helpers import train_argv

    base = tmp_path / "std"
    assert main(train_argv(base, limit=100, limit_test=20)) == 0
    out = tmp_path / "ft"
    argv = ["finetune", str(base), "--eps", "0.1", "--keep-best", "3", "--out", str(out), "--quiet"]
    assert main(argv) == 2
    assert "--keep-best chooses on held-out training examples: give --val N" in capsys.readouterr().err
    assert not out.exists()
    assert (
        main(
            [
                *argv[:-3],
                "--val",
                "30",
                "--limit",
                "100",
                "--batch-size",
                "16",
                "--attack",
                "pgd:steps=1",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    k = json.loads((out / "summary.json").read_text())["checkpoints"]
    assert k["examples"] == 30 and len(k["curve"]) == len({p["step"] for p in k["curve"]}) == 3
    # an audit: neither the printout nor info said which point was kept, nor what choosing it cost
    printed = capsys.readouterr().out
    assert f"of 3 held-out points (choosing cost {k['grad_evals']:,} gradient evaluations)" in printed
    assert main(["info", str(out)]) == 0
    assert f"held-out images), choosing cost {k['grad_evals']:,} gradient evaluations" in capsys.readouterr().out
    from safetensors.torch import load_file

    kept, saved = load_file(str(out / WEIGHTS)), load_file(str(out / "model.safetensors"))
    assert kept.keys() == saved.keys() and all(torch.equal(kept[n], saved[n]) for n in kept)  # the kept point


@pytest.mark.parametrize("holdout,match", [(5000, "--holdout 5000 leaves no training data"), (-1, "--holdout must be")])
def test_harden_refuses_a_holdout_that_does_not_fit(holdout, match, tmp_path, capsys):
    from advtune.cli import main
    from cli_helpers import train_argv

    base = tmp_path / "std"
    assert main(train_argv(base, limit=100, limit_test=20)) == 0
    out = tmp_path / "h"
    assert main(["harden", str(base), "--eps", "0.1", "--holdout", str(holdout), "--out", str(out), "--quiet"]) == 2
    assert match in capsys.readouterr().err and not out.exists()


def test_weight_average_ends_the_run_and_keeps_selective_training_exact(tmp_path):
    """--ema: the model ends with the average (not the live weights), unselected entries stay bit for
    bit, and a run interrupted mid-way resumes to the same averaged weights."""
    from advtune.attacks import PGD
    from advtune.components import Selection
    from advtune.data import synthetic_blobs
    from advtune.threat import ThreatModel
    from advtune.train import TrainConfig, adversarial, fit
    from test_selective import bn_net

    x, y = synthetic_blobs(256, generator=torch.Generator().manual_seed(3))
    data = TensorData((x * 255).round().to(torch.uint8), y)
    objective = adversarial(PGD(ThreatModel("linf", 0.1), steps=1))
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.01, seed=1, ema=0.9, checkpoint_every=3)
    units = ["net.conv1[2]", "net.fc[1]"]

    def run(cfg, model=None, objective=objective, **kw):
        model = model if model is not None else bn_net()
        fit(model, data, objective, cfg, selection=Selection.of(model, units), **kw)
        return model

    before = bn_net().state_dict()
    averaged = run(cfg)
    live = run(TrainConfig(epochs=2, batch_size=32, lr=0.01, seed=1, checkpoint_every=3))
    masks = Selection.of(bn_net(), units).masks(bn_net())
    for name, p in averaged.named_parameters():
        m = masks.get(name, torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(p.detach()[~m], before[name][~m]), f"{name}: an unselected entry moved"
    w = "net.fc.weight"
    assert not torch.equal(averaged.state_dict()[w], live.state_dict()[w]), "the run must end with the average"
    assert not torch.equal(averaged.state_dict()[w], before[w]), "the average must have moved"

    calls = {"n": 0}

    def crash(model, x, y, *, generator=None):
        calls["n"] += 1
        if calls["n"] == 12:  # mid epoch 2 (8 steps per epoch), after the checkpoint at step 3 of it
            raise KeyboardInterrupt
        return objective(model, x, y, generator=generator)

    crash.attack_grad_evals = objective.attack_grad_evals
    with pytest.raises(KeyboardInterrupt):
        run(cfg, objective=crash, checkpoint_dir=tmp_path)
    resumed = run(cfg, bn_net(seed=7), checkpoint_dir=tmp_path, resume=True)
    for (k, a), b in zip(averaged.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_ema_out_of_range_is_refused():
    from advtune.errors import AdvtuneError
    from advtune.train import TrainConfig

    for bad in (1.0, -0.1, True):
        with pytest.raises(AdvtuneError, match="ema must be a decay in"):
            TrainConfig(ema=bad)


def test_hardens_held_out_split_is_training_data_kept_apart_never_the_test_split():
    """harden chooses its checkpoint on `with_holdout`'s split: a tenth of the training data (at most 1000), none of
    it left in what is analysed and fine-tuned, and not the test split (a harden choosing on test passed every
    test, both splits having 60 images there)."""
    from advtune.data import load_dataset
    from advtune.runs.configs import HardenRun
    from advtune.runs.harden_plan import with_holdout

    ds = load_dataset("synthetic", limit=600, limit_test=60)
    held = with_holdout(ds, HardenRun(base="b", out="o", eps=0.1))
    assert len(held.val) == 60 and len(held.train) == 540 and held.test is ds.test

    def rows(part):
        return sorted(map(bytes, part.x.reshape(len(part), -1).numpy()))

    assert sorted(rows(held.train) + rows(held.val)) == rows(ds.train)  # the training data, split, nothing lost
    assert rows(held.val) != rows(ds.test)
    assert not set(rows(held.val)) & set(rows(held.train))  # disjoint
    assert with_holdout(ds, HardenRun(base="b", out="o", eps=0.1, keep_best=0)).val is None  # no choice, no split
