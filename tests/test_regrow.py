"""A mask that moves within its budget (--regrow, train/regrow.py): every weight keeps its count of entries, the
mask really moves (drops the entries that moved least, grows where the gradient is largest), every entry outside the
final mask is the base's bit for bit (weight average included), the final mask is what the selection records, a
resume is exact, and bad settings are one-line errors before any work."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from advtune.attacks import PGD
from advtune.data import TensorData
from advtune.errors import AdvtuneError
from advtune.threat import ThreatModel
from advtune.train import TrainConfig, adversarial, fit
from advtune.train.config import REGROW_END
from advtune.train.regrow import regrow_share
from advtune.train.sparse import SparseEntries
from test_selective import bn_net

THREAT = ThreatModel("linf", 0.1)
MOVING = ("net.conv1.weight", "net.conv2.weight", "net.fc.weight")


@pytest.fixture(scope="module")
def data():
    from advtune.data import synthetic_blobs

    x, y = synthetic_blobs(256, generator=torch.Generator().manual_seed(3))
    return TensorData((x * 255).round().to(torch.uint8), y)


def random_mask(model, share=0.2, seed=0) -> SparseEntries:
    g = torch.Generator().manual_seed(seed)
    entries = {n: torch.rand(p.shape, generator=g) < share for n, p in model.named_parameters() if n in MOVING}
    entries["net.conv2.bias"] = torch.ones(16, dtype=torch.bool)  # a whole parameter: never moves
    return SparseEntries(entries)


def cfg(**kw) -> TrainConfig:
    return TrainConfig(
        **{"epochs": 3, "batch_size": 32, "lr": 0.01, "seed": 1, "regrow": 0.5, "regrow_every": 2, "ema": 0.9, **kw}
    )


def train_step(model, trainable, regrowth, opt, data, i: int, plain: dict | None = None) -> None:
    """One step in fit's order on batch i: backward, the regrowth's sums, the mask, the optimizer, the frozen entries
    back, the grown entries' rate. `plain`: filled with the moving weights after the optimizer's own step."""
    x, y = data.to_float(data.x[32 * i : 32 * i + 32]), data.y[32 * i : 32 * i + 32]
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    regrowth.observe(i)
    trainable.mask_grads()
    regrowth.update_started()
    opt.step()
    trainable.restore_frozen()
    if plain is not None:
        plain.update({n: p.detach().clone() for n, p in model.named_parameters() if n in MOVING})
    regrowth.update_done()


def test_the_schedule_decays_to_nothing_at_three_quarters_of_the_run():
    assert regrow_share(0.4, 0, 100) == pytest.approx(0.4)
    assert regrow_share(0.4, 37.5, 100) == pytest.approx(0.2)
    assert regrow_share(0.4, int(REGROW_END * 100), 100) == 0.0 and regrow_share(0.4, 99, 100) == 0.0
    # --regrow-end: the same cosine, stretched or squeezed to end there
    assert regrow_share(0.4, 45, 100, 0.9) == pytest.approx(0.2) and regrow_share(0.4, 90, 100, 0.9) == 0.0
    assert regrow_share(0.4, 99, 100, 1.0) > 0 and regrow_share(0.4, 25, 100, 0.25) == 0.0


@pytest.mark.parametrize("end", [0.25, 1.0])
def test_the_mask_moves_until_regrow_end_of_the_run_and_never_after(data, end, monkeypatch, caplog):
    """--regrow-end: the moves (and the window's sums) stop at that share of the run's steps; the last mask trains
    on. 3 epochs of 8 steps, a move every 2 steps: the last move is the last even step before end * 24."""
    from advtune.train.regrow import Regrowth

    moves, sums_after = [], []
    step, observe = Regrowth.step, Regrowth.observe

    def counted(self, done, opt, average=None):
        want = sum(self.drop_counts(regrow_share(self.share, done, self.total, end)))  # the share at `end`'s cosine
        swapped = step(self, done, opt, average)
        if swapped:
            moves.append(done)
            assert swapped == want, (done, swapped, want)
        return swapped

    def watched(self, done):
        before = [s.clone() for s in self.sums]
        observe(self, done)
        if any(not torch.equal(a, b) for a, b in zip(before, self.sums)):
            sums_after.append(done)

    monkeypatch.setattr(Regrowth, "step", counted)
    monkeypatch.setattr(Regrowth, "observe", watched)
    net = bn_net()
    fit(net, data, adversarial(PGD(THREAT, steps=1)), cfg(regrow_end=end), selection=random_mask(net))
    last = max(d for d in range(2, 24, 2) if d < end * 24)
    assert moves and max(moves) == last and max(sums_after) < end * 24
    for bad in (0, -0.5, 1.5, math.nan, True):
        with pytest.raises(AdvtuneError, match="regrow_end"):
            TrainConfig(regrow=0.3, regrow_end=bad)
    # an end before the first move: the mask stays put, and the log says so
    from advtune.train.selection import Trainable

    with caplog.at_level("WARNING", logger="advtune.train.regrow"):
        Regrowth(net, Trainable(net, random_mask(net)), 0.5, 2, 24, end=0.05)
    assert "before its first move" in caplog.text


def test_the_mask_moves_within_each_weights_count_and_everything_outside_it_is_the_base(data):
    model = bn_net()
    base = copy.deepcopy(model.state_dict())
    sel = random_mask(model)
    first = {n: m.clone() for n, m in sel.entries.items()}
    fit(model, data, adversarial(PGD(THREAT, steps=1)), cfg(), selection=sel)
    after = model.state_dict()
    moved_any = False
    for name in MOVING:
        m0, m1 = first[name], sel.entries[name]
        assert int(m1.sum()) == int(m0.sum()), name  # the weight's quota kept
        moved_any |= not torch.equal(m0, m1)
        assert torch.equal(after[name][~m1], base[name][~m1]), name  # dropped or never chosen: the base, bit-exact
        assert int((after[name] != base[name]).sum()) <= int(m1.sum())  # never more changes than the budget
    assert moved_any and torch.equal(sel.entries["net.conv2.bias"], first["net.conv2.bias"])
    for name in ("net.conv1.bias", "net.fc.bias", "net.bn2.weight"):  # outside the selection: untouched
        assert torch.equal(after[name], base[name]), name
    back = SparseEntries.from_json(sel.to_json())  # what selection.json records is the final mask
    assert all(torch.equal(back.entries[n], sel.entries[n]) for n in MOVING)


def test_a_conv1d_weights_mask_moves_like_the_others(data):
    """The sparse rule masks Conv1d/Conv3d weights too (lowrank.ADAPTABLE): their masks must move like a Conv2d's,
    not stay fixed while the docs say every weight's mask moves."""

    class RowConv(nn.Module):  # the image's rows as a sequence
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(16, 12, 3)
            self.fc = nn.Linear(12 * 14, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x.flatten(1, 2))).flatten(1))

    torch.manual_seed(0)
    model = RowConv()
    base = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(0)
    weights = {n: p for n, p in model.named_parameters() if "weight" in n}
    sel = SparseEntries({n: torch.rand(p.shape, generator=g) < 0.2 for n, p in weights.items()})
    first = sel.entries["conv.weight"].clone()
    fit(model, data, adversarial(PGD(THREAT, steps=1)), cfg(), selection=sel)
    moved = sel.entries["conv.weight"]
    assert int(moved.sum()) == int(first.sum()) and not torch.equal(moved, first)
    assert torch.equal(model.state_dict()["conv.weight"][~moved], base["conv.weight"][~moved])


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])  # channels_last: fit's amp on CUDA
def test_grown_entries_are_where_the_gradient_was_largest_and_drops_the_least_moved(data, layout):
    """One update, checked by hand: the entries that left moved least; those that came had the largest sums."""
    from advtune.train.regrow import Regrowth
    from advtune.train.selection import Trainable

    model = bn_net().to(memory_format=layout)
    start = copy.deepcopy(model.state_dict())
    sel = random_mask(model, share=0.3)
    trainable = Trainable(model, sel)
    regrowth = Regrowth(model, trainable, 0.5, 1, 100, score="fisher")
    opt = torch.optim.Adam(trainable.params(), lr=0.01)
    x, y = data.to_float(data.x[:64]), data.y[:64]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    regrowth.observe(0)
    fisher = {n: p.grad.double().square() for n, p in model.named_parameters() if n in MOVING}
    assert all(torch.equal(f, fisher[n]) for (n, *_), f in zip(regrowth.moving, regrowth.squares))
    trainable.mask_grads()
    opt.step()
    trainable.restore_frozen()
    before = {n: m.clone() for n, m in regrowth.masks().items()}
    params = dict(model.named_parameters())
    moved = {n: (params[n].detach() - start[n]).abs() for n in MOVING}
    assert regrowth.step(1, opt) > 0
    for name, m1 in regrowth.masks().items():
        m0 = before[name]
        left, came = m0 & ~m1, m1 & ~m0
        assert int(left.sum()) == int(came.sum()) == int(regrow_share(0.5, 1, 100) * int(m0.sum())) > 0
        assert float(fisher[name][came].min()) >= float(fisher[name][~m0 & ~came].max())
        assert float(moved[name][left].max()) <= float(moved[name][m0 & m1].min())
        assert torch.equal(params[name].detach()[left], start[name][left])  # dropped: back to the start, bit-exact
        for key in ("exp_avg", "exp_avg_sq"):  # both ends start without moments
            buf = opt.state[params[name]][key]
            assert not bool(buf[left].any()) and not bool(buf[came].any())


def test_window_moments_start_a_grown_entry_as_if_it_had_trained_through_the_window(data):
    """--regrow-moments window: Adam reads a grown entry's moments through its bias correction 1 - beta^t (t: the
    weight's steps), so they are set to the window's mean gradient and mean squared gradient times that factor; zero
    (round 39's runs) leaves them at 0. SGD's momentum starts at 0 either way."""
    from advtune.train.regrow import Regrowth
    from advtune.train.selection import Trainable

    model = bn_net()
    trainable = Trainable(model, random_mask(model, share=0.3))
    regrowth = Regrowth(model, trainable, 0.5, 2, 100, score="movement", moments="window")
    opt = torch.optim.Adam(trainable.params(), lr=0.01, betas=(0.8, 0.95))
    for i in range(3):  # one step before the window (its sums cleared): the weight's t = 3, the window's length 2
        train_step(model, trainable, regrowth, opt, data, i)
        if i == 0:
            for t in regrowth.sums + regrowth.squares:
                t.zero_()
    sums = {n: (s.clone(), q.clone()) for (n, *_), s, q in zip(regrowth.moving, regrowth.sums, regrowth.squares)}
    before = {n: m.clone() for n, m in regrowth.masks().items()}
    assert regrowth.step(2, opt) > 0
    params = dict(model.named_parameters())
    assert all(float(opt.state[params[n]]["step"]) == 3 for n in MOVING)
    for name, m1 in regrowth.masks().items():
        came, left = m1 & ~before[name], before[name] & ~m1
        state = opt.state[params[name]]
        s, q = sums[name]
        assert torch.allclose(state["exp_avg"][came].double() / (1 - 0.8**3), s[came] / 2, rtol=1e-5, atol=1e-12)
        assert torch.allclose(state["exp_avg_sq"][came].double() / (1 - 0.95**3), q[came] / 2, rtol=1e-5, atol=1e-15)
        assert bool(state["exp_avg_sq"][came].gt(0).any())  # (a grown entry had a gradient)
        assert not bool(state["exp_avg"][left].any()) and not bool(state["exp_avg_sq"][left].any())
    with pytest.raises(AdvtuneError, match="regrow_moments"):
        TrainConfig(regrow=0.3, regrow_moments="ones")
    with pytest.raises(AdvtuneError, match="with optimizer sgd use zero"):
        TrainConfig(regrow=0.3, regrow_moments="window", optimizer="sgd")
    # through fit: the setting reaches the regrowth (another start of the grown entries: other weights)
    nets = [bn_net(), bn_net()]
    for net, moments in zip(nets, ("zero", "window")):
        fit(net, data, adversarial(PGD(THREAT, steps=1)), cfg(regrow_moments=moments), selection=random_mask(net))
    assert any(not torch.equal(a, b) for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()))


def test_regrow_rate_multiplies_the_steps_of_the_grown_entries_and_of_no_other(data, monkeypatch):
    """--regrow-rate R: after a move, an entry the move grew takes R times the optimizer's step; the entries the
    mask started with, the dropped ones and everything outside the mask take what the optimizer gives."""
    from advtune.train.regrow import Regrowth
    from advtune.train.selection import Trainable

    model = bn_net()
    trainable = Trainable(model, random_mask(model, share=0.3))
    regrowth = Regrowth(model, trainable, 0.5, 1, 100, rate=3.0)
    opt = torch.optim.Adam(trainable.params(), lr=0.01)
    params = dict(model.named_parameters())

    def step(i, plain=None):  # plain: the optimizer's own step, before the rate
        train_step(model, trainable, regrowth, opt, data, i, plain)

    step(0)
    first = {n: m.clone() for n, m in regrowth.masks().items()}
    assert regrowth.step(1, opt) > 0
    before, plain = {n: params[n].detach().clone() for n in MOVING}, {}
    step(1, plain)
    for (name, *_), late in zip(regrowth.moving, regrowth.late):
        m = regrowth.masks()[name]
        assert torch.equal(late, m & ~first[name]) and bool(late.any())  # exactly the grown entries
        now, was, own = params[name].detach(), before[name], plain[name]
        assert torch.allclose(now[late], was[late] + 3 * (own[late] - was[late]), atol=1e-7)
        assert bool((own[late] != was[late]).any())  # (they did move)
        assert torch.equal(now[~late], own[~late])
    for i in range(2, 6):  # more moves: a dropped late entry is no longer late; late entries stay inside the mask
        was = {n: m.clone() for n, m in regrowth.masks().items()}
        assert regrowth.step(i, opt) > 0
        for (name, *_), late in zip(regrowth.moving, regrowth.late):
            m = regrowth.masks()[name]
            assert not bool((late & ~m).any()) and torch.equal(late & ~was[name], m & ~was[name])
        step(i)
    state = regrowth.state_dict()  # a checkpoint keeps which entries are late (an exact resume)
    again = Regrowth(model, Trainable(model, random_mask(model, share=0.3)), 0.5, 1, 100, rate=3.0)
    again.load_state_dict(state, "checkpoint")
    assert all(torch.equal(a, b) for a, b in zip(again.late, regrowth.late))
    again.load_state_dict({k: v for k, v in state.items() if k != "late"}, "checkpoint")  # older: none late
    assert not any(bool(t.any()) for t in again.late)
    for bad in (0, -1.0, math.inf, True, 1000.0):
        with pytest.raises(AdvtuneError, match="regrow_rate"):
            TrainConfig(regrow=0.3, regrow_rate=bad)
    # through fit: the rate reaches the run (other weights), and rate 1 is the run without the hooks
    nets = [bn_net(), bn_net(), bn_net()]
    for net, rate in zip(nets, (1.0, 2.0, None)):
        with monkeypatch.context() as patch:
            if rate is None:
                patch.setattr(Regrowth, "update_started", lambda self: None)
                patch.setattr(Regrowth, "update_done", lambda self: None)
            fit(net, data, adversarial(PGD(THREAT, steps=1)), cfg(regrow_rate=rate or 1.0), selection=random_mask(net))
    states = [n.state_dict() for n in nets]
    assert any(not torch.equal(a, b) for a, b in zip(states[0].values(), states[1].values()))
    assert all(torch.equal(a, b) for a, b in zip(states[0].values(), states[2].values()))


def test_a_global_pool_regrows_where_the_movement_score_is_largest_over_all_layers(data):
    """--regrow-pool global: each weight drops its share of least moved entries, and as many entries in all grow
    wherever the unit-free movement score is largest, whatever the layer: the total count is kept, the layers' counts
    move. Fisher's summed squared gradient has each layer's units: refused with a global pool."""
    from advtune.train.regrow import Regrowth
    from advtune.train.selection import Trainable

    model = bn_net()
    trainable = Trainable(model, random_mask(model, share=0.3))
    regrowth = Regrowth(model, trainable, 0.5, 3, 100, pool="global")
    opt = torch.optim.Adam(trainable.params(), lr=0.01)
    for i in range(3):  # a window of three steps: the movement scores spread over [0, sqrt(3)]
        train_step(model, trainable, regrowth, opt, data, i)
    before = {n: m.clone() for n, m in regrowth.masks().items()}
    scores = {n: regrowth.scores(j).clone() for j, (n, *_) in enumerate(regrowth.moving)}
    swapped = regrowth.step(3, opt)
    after = regrowth.masks()
    share = regrow_share(0.5, 3, 100)
    assert swapped == sum(int(share * int(m.sum())) for m in before.values()) > 0
    assert sum(int(m.sum()) for m in after.values()) == sum(int(m.sum()) for m in before.values())
    assert any(int(after[n].sum()) != int(before[n].sum()) for n in MOVING)  # the layers' counts moved
    came = torch.cat([scores[n][after[n] & ~before[n]] for n in MOVING])
    stayed_out = torch.cat([scores[n][~after[n] & ~before[n]] for n in MOVING])
    assert float(came.min()) >= float(stayed_out.max())  # the largest scores of all layers together
    for n in MOVING:  # each weight dropped its own share
        assert int((before[n] & ~after[n]).sum()) == int(share * int(before[n].sum()))
    # a weight whose free entries all score highest takes all of them but one (a whole weight would no longer move);
    # the total count is kept
    model = bn_net()
    trainable = Trainable(model, random_mask(model, share=0.3))
    regrowth = Regrowth(model, trainable, 0.5, 3, 100, pool="global")
    small = min(range(len(MOVING)), key=lambda j: int((~regrowth.masks()[regrowth.moving[j][0]]).sum()))
    for j, (s_, q) in enumerate(zip(regrowth.sums, regrowth.squares)):
        s_.fill_(100.0 if j == small else 1.0)
        q.fill_(100.0 if j == small else 1.0)
    before = {n: m.clone() for n, m in regrowth.masks().items()}
    free_small = int((~before[regrowth.moving[small][0]]).sum())
    assert sum(regrowth.drop_counts(0.45)) > free_small
    regrowth.step(3, opt)
    after = regrowth.masks()
    name = regrowth.moving[small][0]
    left = int((before[name] & ~after[name]).sum())  # its own drops are free again (they regrow at a later move)
    assert int((~after[name] & ~before[name]).sum()) == 1 and int((~after[name]).sum()) == 1 + left
    assert sum(int(m.sum()) for m in after.values()) == sum(int(m.sum()) for m in before.values())
    # a mask that nearly fills its weights: fewer drops, so that the free entries can take them all (each weight
    # keeping one free); the count is kept
    trainable = Trainable(model, random_mask(model, share=0.95))
    regrowth = Regrowth(model, trainable, 0.5, 3, 100, pool="global")
    before = {n: m.clone() for n, m in regrowth.masks().items()}
    room = sum(int((~m).sum()) - 1 for m in before.values())
    share = regrow_share(0.5, 3, 100)
    assert sum(int(share * int(m.sum())) for m in before.values()) > room  # (the case: more drops than room)
    ks = regrowth.drop_counts(share)
    assert 0 < sum(ks) <= room
    for s_, q in zip(regrowth.sums, regrowth.squares):
        s_.fill_(1.0)
        q.fill_(1.0)
    assert regrowth.step(3, opt) == sum(ks)
    after = regrowth.masks()
    assert sum(int(m.sum()) for m in after.values()) == sum(int(m.sum()) for m in before.values())
    assert all(int((~after[n]).sum()) >= 1 for n in after)  # none became whole
    with pytest.raises(AdvtuneError, match="regrow_score movement"):
        TrainConfig(regrow=0.3, regrow_pool="global", regrow_score="fisher")
    with pytest.raises(AdvtuneError, match="regrow_pool"):
        TrainConfig(regrow=0.3, regrow_pool="all")
    # through fit: the entries outside the final mask are the base's, the count is the start's, the mask differs
    nets, sels = [bn_net(), bn_net()], []
    for net, pool in zip(nets, ("layer", "global")):
        base = copy.deepcopy(net.state_dict())
        sels.append(random_mask(net))
        start = sum(int(sels[-1].entries[n].sum()) for n in MOVING)
        fit(net, data, adversarial(PGD(THREAT, steps=1)), cfg(regrow_pool=pool), selection=sels[-1])
        assert sum(int(sels[-1].entries[n].sum()) for n in MOVING) == start
        for n in MOVING:
            m = sels[-1].entries[n]
            assert torch.equal(net.state_dict()[n][~m], base[n][~m]), n
    assert any(int(sels[0].entries[n].sum()) != int(sels[1].entries[n].sum()) for n in MOVING)


def test_a_per_step_drop_ranks_an_entry_by_its_change_per_step_since_it_joined(data):
    """--regrow-drop per-step: an entry that joined at a move has had fewer steps to move than those the mask started
    with; it leaves by its |change from the base| divided by its steps in the mask, and a checkpoint keeps when each
    entry joined."""
    from advtune.train.regrow import Regrowth
    from advtune.train.selection import Trainable

    model = bn_net()
    start = copy.deepcopy(model.state_dict())
    trainable = Trainable(model, random_mask(model, share=0.3))
    regrowth = Regrowth(model, trainable, 0.5, 1, 100, drop="per-step")
    opt = torch.optim.Adam(trainable.params(), lr=0.01)
    params = dict(model.named_parameters())
    for i in range(4):
        train_step(model, trainable, regrowth, opt, data, i)
        if i == 0:
            assert regrowth.step(1, opt) > 0  # entries join at step 1
            assert all(bool((j[late] == 1).all()) for j, late in zip(regrowth.joined, regrowth.late))
    before = {n: m.clone() for n, m in regrowth.masks().items()}
    joined = [t.clone() for t in regrowth.joined]
    per_step = {
        n: (params[n].detach() - start[n]).abs() / (4 - joined[j]).clamp(min=1).float()
        for j, (n, *_) in enumerate(regrowth.moving)
    }
    assert regrowth.step(4, opt) > 0
    for j, (name, *_) in enumerate(regrowth.moving):
        m0, m1 = before[name], regrowth.masks()[name]
        left = m0 & ~m1
        assert bool(left.any()) and float(per_step[name][left].max()) <= float(per_step[name][m0 & m1].min())
        assert bool((regrowth.joined[j][m1 & ~m0] == 4).all())
    again = Regrowth(model, Trainable(model, random_mask(model, share=0.3)), 0.5, 1, 100, drop="per-step")
    again.load_state_dict(regrowth.state_dict(), "checkpoint")
    assert all(torch.equal(a, b) for a, b in zip(again.joined, regrowth.joined))
    assert all(torch.equal(a, b) for a, b in zip(again.origin, regrowth.origin)) and again.has_late == regrowth.has_late
    # a checkpoint without origins (written before them): the late entries joined at the base, the others at the start
    shifted = {n: p.detach() - 1.0 for n, p in model.named_parameters()}  # a base the weights are not (the probe rule)
    old = Regrowth(
        model, Trainable(model, random_mask(model, share=0.3)), 0.5, 1, 100, reference=shifted, drop="per-step"
    )
    old.load_state_dict({k: v for k, v in regrowth.state_dict().items() if k != "origin"}, "checkpoint")
    for (*_, p, base), j, o in zip(old.moving, old.joined, old.origin):
        assert torch.equal(o, torch.where(j > 0, base, p.detach())) and bool((j > 0).any())
        assert not torch.equal(o, p.detach())
    assert Regrowth(model, trainable, 0.5, 1, 100).origin == []  # the total-change rule keeps no copy
    # by hand: the starting entries changed by ~2 in 10 steps (0.2 a step), entries that joined at step 8 by 1 (0.5 a
    # step): per-step drops starting entries only; the total change would drop the late ones first
    for rule in ("per-step", "moved"):
        model = bn_net()
        trainable = Trainable(model, random_mask(model, share=0.3))
        regrowth = Regrowth(model, trainable, 0.2, 10, 100, drop=rule)
        late = {}
        with torch.no_grad():
            for j, (name, i, p, base) in enumerate(regrowth.moving):
                m = trainable.partial[i][1]
                late[name] = m & (torch.rand(m.shape, generator=torch.Generator().manual_seed(j)) < 0.2)
                regrowth.joined[j][late[name]] = 8
                change = 2.0 + 0.01 * torch.rand(m.shape, generator=torch.Generator().manual_seed(9 + j))
                p.add_(torch.where(late[name], torch.ones_like(p), change) * m)
        before = {n: m.clone() for n, m in regrowth.masks().items()}
        assert regrowth.step(10, opt=torch.optim.Adam(trainable.params())) > 0
        for name, m in regrowth.masks().items():
            left = before[name] & ~m
            assert int(left.sum()) < int((before[name] & ~late[name]).sum())  # room for the late ones to stay
            assert bool((left & late[name]).any()) == (rule == "moved"), (rule, name)
    # the probe rule starts from weights that are not the base: the change counted is this stage's (from the start,
    # not from the base): entries A changed by 2 in this stage and 12 from the base, entries B by 3 and 3
    model = bn_net()
    trainable = Trainable(model, random_mask(model, share=0.3))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(5)) < 0.5 for n, p in start.items()}
    base = {n: p - 10.0 * groups[n] for n, p in start.items()}  # the probe moved A by 10
    regrowth = Regrowth(model, trainable, 0.2, 10, 100, reference=base, drop="per-step")
    with torch.no_grad():
        for name, i, p, _ in regrowth.moving:
            p.add_(torch.where(groups[name], 2.0, 3.0) * trainable.partial[i][1])
    before = {n: m.clone() for n, m in regrowth.masks().items()}
    assert regrowth.step(10, opt=torch.optim.Adam(trainable.params())) > 0
    assert all(not bool((before[n] & ~m & ~groups[n]).any()) for n, m in regrowth.masks().items())  # only A left
    with pytest.raises(AdvtuneError, match="regrow_drop"):
        TrainConfig(regrow=0.3, regrow_drop="oldest")
    # through fit: the rule reaches the run (another mask)
    sels = []
    for rule in ("moved", "per-step"):
        net = bn_net()
        sels.append(random_mask(net))
        fit(net, data, adversarial(PGD(THREAT, steps=1)), cfg(regrow_drop=rule), selection=sels[-1])
    assert any(not torch.equal(sels[0].entries[n], sels[1].entries[n]) for n in MOVING)


def test_a_step_with_gradients_that_are_not_finite_adds_nothing_to_the_sums(data):
    """fp16's gradient scaler skips a step whose gradients overflowed; the regrowth's sums skip it too (NaN and inf
    would otherwise rank first)."""
    from advtune.train.regrow import Regrowth
    from advtune.train.selection import Trainable

    model = bn_net()
    sel = random_mask(model)
    regrowth = Regrowth(model, Trainable(model, sel), 0.3, 10, 100)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    dict(model.named_parameters())["net.fc.weight"].grad[0, 0] = math.inf
    regrowth.observe(0)
    assert not any(bool(f.any()) for f in regrowth.squares + regrowth.sums)
    dict(model.named_parameters())["net.fc.weight"].grad[0, 0] = 1.0
    regrowth.observe(0)
    assert all(bool((f == 1).all()) for f in regrowth.squares)
    regrowth.observe(75)  # past three quarters of the run the mask is fixed: nothing more to sum
    assert all(bool((f == 1).all()) for f in regrowth.squares)


def test_the_probe_rules_moving_mask_returns_dropped_entries_to_the_base_not_the_probe(tmp_path, capsys, monkeypatch):
    """advtune finetune --granularity probe --regrow: the masked stage starts from the probe's weights; every entry
    outside the final mask is the base's, the final mask is what selection.json records, and a second run of the same
    command gives the same weights."""
    from advtune.cli import main
    from advtune.models import load_model
    from advtune.train.sparse import SparseEntries
    from cli_helpers import train_argv

    base = tmp_path / "base"
    assert main(train_argv(base, limit=200, limit_test=20)) == 0
    argv = ["finetune", str(base), "--eps", "0.2", "--granularity", "probe", "--attack", "pgd:steps=1", "--quiet"]
    argv += ["--limit", "200", "--limit-test", "20", "--monitor-test", "0", "--params", "0.1", "--budget", "8000"]
    argv += ["--regrow", "0.5", "--regrow-every", "2", "--ema", "0.9"]
    assert main([*argv, "--out", str(tmp_path / "ft")]) == 0
    assert "entries moved" not in capsys.readouterr().err  # --quiet
    was = load_model(base)[0].state_dict()
    now = load_model(tmp_path / "ft")[0].state_dict()
    probed = load_model(tmp_path / "ft.probe")[0].state_dict()
    mask = SparseEntries.from_json(json.loads((tmp_path / "ft" / "selection.json").read_text())).entries
    weights = [n for n in mask if n.endswith("weight") and not bool(mask[n].all())]
    assert weights
    for name in weights:
        m = mask[name]
        assert torch.equal(now[name][~m], was[name][~m]), name  # the base's, bit for bit
        assert not torch.equal(probed[name][~m], was[name][~m]), name  # where the probe had moved them
    # a global pool moves the layers' counts: the records say the final mask's
    assert main([*argv, "--regrow-pool", "global", "--out", str(tmp_path / "global")]) == 0
    final = SparseEntries.from_json(json.loads((tmp_path / "global" / "selection.json").read_text()))
    recorded = json.loads((tmp_path / "global" / "summary.json").read_text())["selection"]
    assert recorded["params_by_layer"] == final.params_by_layer(load_model(base)[0])
    assert (
        recorded["params_by_layer"]
        != json.loads((tmp_path / "ft" / "summary.json").read_text())["selection"]["params_by_layer"]
    )
    assert main([*argv, "--out", str(tmp_path / "again")]) == 0
    for (k, a), b in zip(now.items(), load_model(tmp_path / "again")[0].state_dict().values()):
        assert torch.equal(a, b), k
    # --keep-best: the point kept comes with the mask it trained with; the first point is made the best (the held-out
    # accuracy scripted to fall), so the mask moved on after it
    import advtune.train.keep_best as keep_best

    scripted = iter([0.9, 0.5, 0.4, 0.3])
    monkeypatch.setattr(keep_best, "robust_accuracy_quick", lambda *a, **k: next(scripted))
    assert main([*argv, "--val", "64", "--keep-best", "4", "--out", str(tmp_path / "kept")]) == 0
    kept = load_model(tmp_path / "kept")[0].state_dict()
    mask = SparseEntries.from_json(json.loads((tmp_path / "kept" / "selection.json").read_text())).entries
    for name in weights:
        assert torch.equal(kept[name][~mask[name]], was[name][~mask[name]]), name
    curve = json.loads((tmp_path / "kept" / "summary.json").read_text())["checkpoints"]
    assert curve["chosen_step"] == curve["curve"][0]["step"] < 0.75 * curve["curve"][-1]["step"]


def test_the_movement_score_ranks_where_adam_would_have_moved_an_entry_not_how_loud_its_gradient_is():
    """--regrow-score movement: |sum g| / sqrt(sum g^2) over the window: a small steady gradient (Adam moves it every
    step) outranks a large one that changes sign (Adam's steps cancel); the fisher score ranks them the other way."""
    from advtune.train.regrow import Regrowth
    from advtune.train.selection import Trainable

    model = bn_net()
    regrowth = Regrowth(model, Trainable(model, random_mask(model)), 0.3, 10, 100, score="movement")
    fc = dict(model.named_parameters())["net.fc.weight"]
    j = [n for n, *_ in regrowth.moving].index("net.fc.weight")
    for sign in (1.0, -1.0):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        fc.grad[0, 0], fc.grad[0, 1] = 0.01, 10.0 * sign  # steady and small; large, changing sign
        regrowth.observe(0)
    movement = regrowth.scores(j)
    assert float(movement[0, 0]) == pytest.approx(2**0.5) and float(movement[0, 1]) == 0.0
    regrowth.score = "fisher"
    assert float(regrowth.scores(j)[0, 1]) > float(regrowth.scores(j)[0, 0])
    with pytest.raises(AdvtuneError, match="regrow_score"):
        TrainConfig(regrow=0.3, regrow_score="loudest")
    for p in model.parameters():  # a gradient whose square underflows float32 scores no more than a steady one
        p.grad = torch.full_like(p, 1e-23)
    regrowth.sums[j].zero_(), regrowth.squares[j].zero_()
    regrowth.score = "movement"
    regrowth.observe(0), regrowth.observe(0)
    assert float(regrowth.scores(j).max()) == pytest.approx(2**0.5)


def test_a_loaded_mask_is_the_selections_at_once():
    """After a resume the selection holds the checkpoint's mask before any move (keep-best records it)."""
    from advtune.train.regrow import Regrowth
    from advtune.train.selection import Trainable

    model = bn_net()
    first, other = random_mask(model, seed=0), random_mask(model, seed=1)
    state = Regrowth(model, Trainable(model, other), 0.3, 10, 100).state_dict()
    regrowth = Regrowth(model, Trainable(model, first), 0.3, 10, 100)
    regrowth.load_state_dict(state, "checkpoint")
    assert all(torch.equal(first.entries[n], other.entries[n]) for n in MOVING)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("rate", [1.0, 2.0])
def test_an_interrupted_run_resumes_to_the_same_mask_and_weights(data, tmp_path, rate):
    config = cfg(checkpoint_every=3, regrow_rate=rate)
    objective = adversarial(PGD(THREAT, steps=1))
    full, sel_full = bn_net(), random_mask(bn_net())
    fit(full, data, objective, config, selection=sel_full)

    def crash(model, step, meter):
        if step == 13:  # after a mid-epoch checkpoint (epoch 2, step 3) and several moves of the mask
            raise Interrupt()

    with pytest.raises(Interrupt):
        fit(bn_net(), data, objective, config, selection=random_mask(bn_net()), checkpoint_dir=tmp_path, on_step=crash)
    resumed, sel_res = bn_net(), random_mask(bn_net())  # the selection as it started: the checkpoint moves it
    fit(resumed, data, objective, config, selection=sel_res, checkpoint_dir=tmp_path, resume=True)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(torch.equal(sel_full.entries[n], sel_res.entries[n]) for n in MOVING)


def test_bad_regrow_settings_and_selections_it_cannot_move_are_one_line_errors(data):
    for bad in ({"regrow": 1.0}, {"regrow": -0.1}, {"regrow_every": 0}, {"regrow": True}):
        with pytest.raises(AdvtuneError, match=r"^regrow(_every)? must be"):  # TrainConfig(...) names its keywords
            TrainConfig(**bad)
    from advtune.components import Component, Selection

    units = Selection((Component("net.conv2", 0),))  # whole units: no single entries to move
    with pytest.raises(AdvtuneError, match="--granularity probe or sparse"):  # the training loop's own words
        fit(bn_net(), data, adversarial(PGD(THREAT, steps=1)), cfg(), selection=units)


def test_finetune_refuses_regrow_without_a_mask_of_entries_before_the_base_is_read(tmp_path, capsys):
    from advtune.cli import main

    missing = tmp_path / "no-such-base"  # never read: the settings are refused first
    for extra, match in (
        (["--regrow", "0.3"], "use it with --granularity probe or sparse"),  # unit granularity
        (["--granularity", "sparse", "--select", "all", "--regrow", "0.3"], "--select all trains every parameter"),
        (["--granularity", "sparse", "--params", "0.1", "--regrow", "1.5"], "--regrow must be a share"),
        (
            ["--granularity", "sparse", "--select", "random", "--params", "0.1", "--regrow", "0.3", "--attack", "fgsm"],
            "give --no-guard",
        ),
        # how a mask moves, given to a mask that stays put (no --regrow): it would be ignored
        (["--granularity", "sparse", "--params", "0.1", "--regrow-end", "0.9"], "--regrow-end sets how --regrow's"),
        (["--granularity", "sparse", "--params", "0.1", "--regrow-drop", "per-step"], "--regrow-drop sets how"),
    ):
        assert main(["finetune", str(missing), "--eps", "0.2", *extra, "--out", str(tmp_path / "ft"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "ft").exists()
    from advtune.runs.configs import FinetuneRun
    from advtune.runs.finetune import check_finetune

    probe = FinetuneRun(base="b", out="o", eps=0.2, granularity="probe", params=0.1, budget=10**5, train=cfg())
    assert check_finetune(probe).train.regrow == 0.5  # the probe rule's mask never comes from --select: accepted
    from dataclasses import replace

    from advtune.runs.probe import probe_settings

    moving = replace(
        probe,
        train=cfg(
            regrow_every=7,
            regrow_moments="window",
            regrow_rate=2.0,
            regrow_pool="global",
            regrow_drop="per-step",
            regrow_end=0.9,
        ),
    )
    fixed = replace(probe, train=cfg(regrow=0.0, regrow_every=100))  # (how a mask moves: refused on a fixed one)
    # the probe stage is the same run whatever the masked stage's --regrow settings: one probe serves both arms
    assert (
        probe_settings(check_finetune(moving), None).to_json() == probe_settings(check_finetune(fixed), None).to_json()
    )
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--regrow" not in capsys.readouterr().out  # training from scratch has no mask to move


def test_how_a_mask_would_move_is_no_change_on_resume_where_it_does_not_move():
    """A fixed mask's regrow_every / regrow_score had no effect: a record with other values (or an older default)
    resumes; where the mask moves they are compared."""
    from advtune.train.checkpoint import config_changes

    now = TrainConfig(seed=1).to_json()
    assert config_changes({**now, "regrow_score": "fisher", "regrow_every": 7, "regrow_moments": "window"}, now) == []
    moving = cfg().to_json()
    assert [k for k, *_ in config_changes({**moving, "regrow_score": "fisher"}, moving)] == ["regrow_score"]
    assert [k for k, *_ in config_changes({**moving, "regrow_moments": "window"}, moving)] == ["regrow_moments"]
    old = {k: v for k, v in moving.items() if k != "regrow_moments"}  # a record from before the setting: zero
    assert config_changes(old, moving) == []
    assert [k for k, *_ in config_changes({**moving, "regrow_rate": 2.0}, moving)] == ["regrow_rate"]
    assert [k for k, *_ in config_changes({**moving, "regrow_pool": "global"}, moving)] == ["regrow_pool"]
    assert [k for k, *_ in config_changes({**moving, "regrow_drop": "per-step"}, moving)] == ["regrow_drop"]
    assert [k for k, *_ in config_changes({**moving, "regrow_end": 0.9}, moving)] == ["regrow_end"]
    assert config_changes({k: v for k, v in moving.items() if k != "regrow_end"}, moving) == []  # older: 0.75
    assert config_changes({**now, "regrow_rate": 2.0}, now) == []  # a fixed mask has no grown entries


def test_a_resume_may_not_stretch_a_run_whose_mask_moves_on_its_length(data, tmp_path):
    from advtune.train.checkpoint import check_resume

    config = cfg(epochs=1)
    fit(
        bn_net(),
        data,
        adversarial(PGD(THREAT, steps=1)),
        config,
        selection=random_mask(bn_net()),
        checkpoint_dir=tmp_path,
    )
    check_resume(tmp_path, config)  # the same length: accepted
    with pytest.raises(AdvtuneError, match="--regrow schedule"):
        check_resume(tmp_path, cfg(epochs=2))


def test_harden_regrow_moves_the_probe_rules_mask_within_the_budget_and_the_api_gives_the_same_weights(
    tmp_path, capsys
):
    """advtune harden --regrow (an option of the recipe): the hardened model changed only its recorded final mask's
    entries, at most the budget, the patch rebuilds it, the Python API gives the same weights; a rule without single
    entries is refused before any work."""
    import advtune
    from advtune.cli import main
    from advtune.data import load_dataset
    from advtune.models import load_model
    from advtune.recipe import Recipe
    from cli_helpers import check_sparse_harden, train_argv

    base = tmp_path / "base"
    assert main(train_argv(base, limit=400, limit_test=40)) == 0
    out = tmp_path / "hard"
    argv = ["harden", str(base), "--eps", "0.2", "--params", "0.1", "--limit", "400", "--limit-test", "40"]
    argv += ["--budget", "12000", "--evaluation", "fgsm", "--quiet", "--out", str(out)]
    assert main([*argv, "--granularity", "unit", "--regrow", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "--regrow moves a mask of single weight entries" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main([*argv, "--regrow", "0.5"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "finetune" / "config.json").read_text())["stage"]["train"]["regrow"] == 0.5
    hardened = check_sparse_harden(base, out, s["selection"]["trainable_params"])
    from advtune.report.narrative import harden_recipe

    assert "the mask moving (--regrow 0.5" in harden_recipe(s)  # the report says the mask moved
    ds = load_dataset("synthetic", limit=400, limit_test=40)
    api = advtune.harden(load_model(base)[0], ds, eps=0.2, budget=12000, recipe=Recipe(regrow=0.5), evaluation="fgsm")
    for (k, a), b in zip(hardened.state_dict().items(), api.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("setting", [{"regrow": 0.3}, {"regrow_end": 0.9}, {"regrow_drop": "per-step"}])
def test_training_from_scratch_refuses_a_moving_masks_settings_before_any_folder(tmp_path, setting):
    """train has no mask: --regrow and how a mask moves (the API's and an experiment's way in; the CLI has no flags)."""
    from advtune.runs import train as train_job
    from advtune.runs.configs import TrainRun

    out = tmp_path / "t"
    run = TrainRun(dataset="synthetic", model="small-cnn", out=str(out), train=TrainConfig(**setting))
    with pytest.raises(AdvtuneError, match=f"^{next(iter(setting))} moves a fine-tuning's mask"):
        train_job.run(run)
    assert not out.exists()
