"""The one training loop: learning, schedules, costs, checkpoints and exact resume."""

from __future__ import annotations

import pytest
import torch

from advtune import filenames as files
from advtune.cost import CostMeter
from advtune.data import TensorData, load_dataset
from advtune.errors import AdvtuneError
from advtune.metrics import accuracy
from advtune.models import model_for
from advtune.storage import atomic_write_bytes
from advtune.train import TrainConfig, adversarial, clean, fit, lr_at


@pytest.fixture(scope="module")
def synth():
    return load_dataset("synthetic", limit=600, limit_test=200)


def fresh(ds, seed=0):
    torch.manual_seed(seed)
    return model_for(ds, "small-cnn")


def test_fit_learns_and_counts_costs(synth):
    model = fresh(synth)
    meter = CostMeter()
    cfg = TrainConfig(epochs=2, batch_size=64, lr=2e-3)
    hist = fit(model, synth.train, clean(), cfg, val=synth.test, meter=meter)
    assert accuracy(model, synth.test) > 0.95
    assert [r["epoch"] for r in hist.epochs] == [1, 2] and "val_acc" in hist.last
    assert meter.update_grad_evals == 2 * 600 and meter.attack_grad_evals == 0 and meter.examples == 1200
    assert meter.trainable_params == sum(p.numel() for p in model.parameters())
    assert meter.flops_update_step > meter.flops_attack_step > meter.flops_forward > 0
    assert meter.wall_s > 0 and meter.peak_memory_bytes > 0


class CountingAttack:
    """A stand-in attack (adds a fixed shift) that reports 3 gradient evaluations per example."""

    spec = "counting"

    def __call__(self, model, x, y, *, generator=None):
        return (x + 0.01).clamp(0, 1)

    def grad_evals(self) -> int:
        return 3


def test_adversarial_cost_is_attack_plus_update(synth):
    meter = CostMeter()
    fit(
        fresh(synth),
        synth.train.take(128),
        adversarial(CountingAttack()),
        TrainConfig(epochs=2, batch_size=64),
        meter=meter,
    )
    # CostMeter counts exactly steps x (attack.grad_evals() + 1) per example
    assert meter.grad_evals == 2 * 128 * (3 + 1)


def test_fit_leaves_requires_grad_as_found(synth):
    model = fresh(synth)
    model.net.conv1.weight.requires_grad_(False)
    fit(model, synth.train.take(64), clean(), TrainConfig(epochs=1, batch_size=32))
    assert not model.net.conv1.weight.requires_grad and model.net.conv2.weight.requires_grad


@pytest.mark.parametrize("schedule", ["constant", "cosine", "step", "onecycle"])
def test_lr_schedules(schedule):
    cfg = TrainConfig(epochs=4, lr=0.1, schedule=schedule, warmup_epochs=1 if schedule == "cosine" else 0)
    lrs = [lr_at(cfg, s, 100) for s in range(100)]
    assert max(lrs) <= 0.1 + 1e-12 and min(lrs) >= 0
    if schedule == "constant":
        assert set(lrs) == {0.1}
    if schedule == "cosine":
        assert lrs[0] < lrs[24] and lrs[-1] < 0.01  # warm-up then decay
    if schedule == "step":
        assert lrs[0] == 0.1 and abs(lrs[60] - 0.01) < 1e-12 and abs(lrs[90] - 0.001) < 1e-12
    if schedule == "onecycle":
        assert lrs[0] < lrs[39] and lrs[99] < lrs[60]
        assert min(lrs) > 0  # every step pays its cost: none at rate 0 (the first was, before)
        assert max(lrs) == lrs[39] or max(lrs) == lrs[40]  # the peak at 40%


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"epochs": -1}, "epochs must be a non-negative"),
        ({"lr": -0.1}, "learning rate must be positive"),
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"optimizer": "lbfgs"}, "unknown optimizer"),
        ({"schedule": "exp"}, "unknown schedule"),
        ({"schedule": "onecycle", "warmup_epochs": 1}, "does not combine with schedule onecycle"),
        ({"weight_decay": -1.0}, r"weight_decay must be >= 0 .*got -1.0"),  # one line named both, whichever
        ({"optimizer": "sgd", "momentum": 1.5}, r"momentum must lie in \[0, 1\) .*got 1.5"),
    ],
)
def test_bad_train_config(kwargs, match):
    with pytest.raises(AdvtuneError, match=match):
        TrainConfig(**kwargs)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("augment", ["none", "crop-flip"])
def test_resume_mid_epoch_equals_uninterrupted(synth, tmp_path, augment):
    cfg = TrainConfig(
        epochs=3,
        batch_size=64,
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
        checkpoint_every=4,
        augment=augment,  # crop-flip: each step's crops come back the same after a resume
    )
    full = fresh(synth)
    h_full = fit(full, synth.train, clean(), cfg)

    class Crash:
        """The clean objective, until the 15th step (mid epoch 2: 10 steps per epoch)."""

        name = "clean"

        def __init__(self):
            self.calls = 0

        def __call__(self, model, x, y, *, generator=None):
            self.calls += 1
            if self.calls == 15:
                raise Interrupt()
            return clean()(model, x, y, generator=generator)

        def attack_grad_evals(self):
            return 0

    with pytest.raises(Interrupt):
        fit(fresh(synth), synth.train, Crash(), cfg, checkpoint_dir=tmp_path)
    assert (tmp_path / files.CHECKPOINT).is_file()
    resumed = fresh(synth, seed=99)  # different init: everything must come from the checkpoint
    h_res = fit(resumed, synth.train, clean(), cfg, checkpoint_dir=tmp_path, resume=True)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r["train_loss"] for r in h_full.epochs] == [r["train_loss"] for r in h_res.epochs]


def test_resume_with_other_config_is_refused(synth, tmp_path):
    fit(fresh(synth), synth.train.take(64), clean(), TrainConfig(epochs=1, batch_size=32), checkpoint_dir=tmp_path)
    with pytest.raises(AdvtuneError, match="different config .*lr"):
        fit(
            fresh(synth),
            synth.train.take(64),
            clean(),
            TrainConfig(epochs=2, batch_size=32, lr=0.5),
            checkpoint_dir=tmp_path,
            resume=True,
        )


def test_truncated_checkpoint_is_refused(synth, tmp_path):
    fit(fresh(synth), synth.train.take(64), clean(), TrainConfig(epochs=1, batch_size=32), checkpoint_dir=tmp_path)
    p = tmp_path / files.CHECKPOINT
    p.write_bytes(p.read_bytes()[:500])
    with pytest.raises(AdvtuneError, match="truncated or corrupt"):
        fit(
            fresh(synth),
            synth.train.take(64),
            clean(),
            TrainConfig(epochs=2, batch_size=32),
            checkpoint_dir=tmp_path,
            resume=True,
        )


def test_atomic_write_never_leaves_a_half_file(tmp_path, monkeypatch):
    p = tmp_path / "ckpt.bin"
    atomic_write_bytes(p, b"old complete checkpoint")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("advtune.storage.os.replace", broken_replace)
    with pytest.raises(AdvtuneError, match="cannot write .*ckpt.bin.*disk full.*free disk space"):
        atomic_write_bytes(p, b"new" * 1000)
    assert p.read_bytes() == b"old complete checkpoint" and [q.name for q in tmp_path.iterdir()] == ["ckpt.bin"]


def test_empty_training_split_is_refused(synth):
    empty = TensorData(torch.zeros(0, 1, 16, 16, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(AdvtuneError, match="training split is empty"):
        fit(fresh(synth), empty, clean(), TrainConfig(epochs=1))


def test_steps_ends_mid_epoch_and_on_step_sees_every_step(synth):
    """steps stops training after that many optimizer steps (the schedule spans them), and
    on_step is called after each step with the cost so far (the frontier's snapshots hang there)."""
    seen = []
    meter = CostMeter()
    cfg = TrainConfig(epochs=5, batch_size=60, steps=13, schedule="ssfd", lr=1e-2)
    hist = fit(
        fresh(synth),
        synth.train,
        clean(),
        cfg,
        meter=meter,
        on_step=lambda m, step, mt: seen.append((step, mt.grad_evals, m.training)),
    )
    assert [s for s, _, _ in seen] == list(range(1, 14))
    assert [g for _, g, _ in seen] == [60 * s for s in range(1, 14)]
    assert all(training for _, _, training in seen)
    assert meter.update_grad_evals == 13 * 60 and len(hist.epochs) == 2  # 10 steps per epoch: 10 + 3
    # slow start, fast decay: linear rise over the first 10% of steps, then linear decay to 0
    lrs = [lr_at(cfg, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2) and lrs[99] == pytest.approx(1e-2 / 90)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_steps_resume_is_exact(synth, tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=64, steps=17, checkpoint_every=4, schedule="ssfd", lr=1e-2)
    ref = fresh(synth)
    fit(ref, synth.train, clean(), cfg)

    class Kill(Exception):
        pass

    def die(model, step, meter):
        if step == 14:
            raise Kill

    half = fresh(synth)
    with pytest.raises(Kill):
        fit(half, synth.train, clean(), cfg, checkpoint_dir=tmp_path, on_step=die)
    resumed = fresh(synth, seed=5)
    fit(resumed, synth.train, clean(), cfg, checkpoint_dir=tmp_path, resume=True)
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_local_objective_runs_only_the_block_and_counts_partial_passes(synth):
    """The local objective's attack and update back-propagate through the early block only: later
    layers never run, the cost is counted in FLOPs-weighted block passes, and training pulls the
    block's features on attacked inputs toward the original features on clean inputs."""
    from advtune.components import Selection
    from advtune.threat import ThreatModel
    from advtune.train import forward_to, local_feature

    model = fresh(synth)
    fit(model, synth.train, clean(), TrainConfig(epochs=1, batch_size=64, lr=2e-3))
    x, y = synth.train.take(64).tensors()
    ran = []
    hook = model.net.fc1.register_forward_hook(lambda *a: ran.append(1))
    feats = forward_to(model, "net.pool1", x)
    hook.remove()
    assert not ran and feats.shape == (64, 32, 8, 8)  # fc1 never ran
    threat = ThreatModel("linf", 0.2)
    obj = local_feature(model, "net.pool1", threat, steps=3)
    frac = obj.block_fraction(model, x[:1])
    assert 0 < frac < 0.5  # conv1 is a small share of small-cnn's FLOPs

    def gap(m):
        out = obj(m, x, y, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return float(
                (forward_to(m, "net.pool1", out["x_adv"]) - forward_to(obj.reference, "net.pool1", x)).pow(2).mean()
            )

    before = gap(model)
    meter = CostMeter()
    sel = Selection.of(model, ["net.conv1"])
    hist = fit(model, synth.train, obj, TrainConfig(epochs=2, batch_size=64, lr=3e-3), selection=sel, meter=meter)
    assert gap(model) < 0.85 * before  # (one conv layer can only do so much)
    n = 2 * 600
    assert meter.attack_grad_evals == 0 and meter.update_grad_evals == 0
    assert meter.partial_passes == n * (3 + 2)  # 3 attack steps + adversarial and clean terms
    assert meter.grad_evals == round(n * 5 * frac) < n * 5
    assert hist.last["train_acc"] is None  # no logits: no accuracy to report


def test_progress_in_a_log_prints_lines_with_done_total_and_time_left(synth, caplog, monkeypatch):
    import logging

    import advtune.progress as progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # every step, for the test (30 s in real runs)
    monkeypatch.setattr(progress, "_progress_disabled", False)  # an earlier CLI test may have run with --quiet
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    with caplog.at_level(logging.INFO, logger="advtune.progress"):
        fit(fresh(synth), synth.train.take(256), clean(), TrainConfig(epochs=1, batch_size=64))
    lines = [r.getMessage() for r in caplog.records if r.name == "advtune.progress"]
    assert lines and lines[0].startswith("train 1/1: 1/4 (25%)") and "s left" in lines[0]
    assert lines[-2].startswith("train 1/1: 4/4 (100%)") and lines[-1].startswith("train 1/1: 4/4 done in ")


def test_a_compile_that_fails_here_trains_eagerly_with_a_warning(synth, monkeypatch, caplog):
    """torch.compile is lazy: a machine that cannot compile (no C compiler) failed inside the first step, a
    traceback after the run folder was made. Now one eval-mode forward finds out first and training goes on."""

    class Broken(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            raise RuntimeError("InductorError: no C compiler found\nmore lines")

    monkeypatch.setattr(torch, "compile", lambda model: Broken(model))
    model = fresh(synth)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level("WARNING"):
        fit(model, synth.train, cfg=TrainConfig(epochs=1, batch_size=64, compile=True))
    said = "torch.compile failed on this machine (InductorError: no C compiler found); training without it"
    assert said in caplog.text
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained


class _RollBack:
    """An epoch callback like the overfitting guard: remembers epoch 1's weights, puts them back after epoch 2 and
    ends the run ("restored"); what it remembers goes into the checkpoint."""

    name = "roll-back"

    def __init__(self):
        self.kept = None

    def __call__(self, model, record):
        if self.kept is None:
            self.kept = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return None
        model.load_state_dict(self.kept)
        return "restored"

    def checkpoint_state(self):
        return {"kept": self.kept}

    def restore_checkpoint_state(self, state):
        self.kept = state["kept"]


def test_weights_a_callback_restored_are_not_overwritten_by_the_weight_average(synth, tmp_path):
    """--ema laid its average (the collapsed epoch included) over the overfitting guard's rollback: the run ended
    with neither. And the guard's memory was not in the checkpoint, so a resumed run compared with nothing."""
    cfg = TrainConfig(epochs=3, batch_size=64, ema=0.9)
    roll = _RollBack()
    history = fit(fresh(synth), synth.train.take(256), clean(), cfg, callbacks=[roll], checkpoint_dir=tmp_path / "a")
    assert history.stopped == "stopped by roll-back after epoch 2" and history.restored
    model = fresh(synth)
    fit(model, synth.train.take(256), clean(), cfg, callbacks=[_RollBack()])
    assert all(torch.equal(roll.kept[k], v) for k, v in model.state_dict().items())  # the rollback, as it was
    # resumed after epoch 1 (the checkpoint holds what the callback remembered): the same end, bit for bit
    one = _RollBack()
    fit(
        fresh(synth),
        synth.train.take(256),
        clean(),
        TrainConfig(epochs=1, batch_size=64, ema=0.9),
        callbacks=[one],
        checkpoint_dir=tmp_path / "b",
    )
    again, resumed = _RollBack(), fresh(synth)
    fit(resumed, synth.train.take(256), clean(), cfg, callbacks=[again], checkpoint_dir=tmp_path / "b", resume=True)
    assert again.kept is not None and all(torch.equal(roll.kept[k], v) for k, v in resumed.state_dict().items())


class _Payload:
    """A pickle that would run a command when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_training_checkpoint_never_runs_code_and_a_foreign_one_is_named(synth, tmp_path):
    """--resume reads checkpoint.pt with weights_only: a file carrying code is refused, the code never runs (only
    weights files had a test of this); a checkpoint of another program is named as such."""
    from advtune.train.checkpoint import check_resume

    marker = tmp_path / "pwned"
    torch.save({"format": "advtune-checkpoint-1", "hook": _Payload(marker)}, tmp_path / files.CHECKPOINT)
    cfg = TrainConfig(epochs=1, batch_size=32)
    with pytest.raises(AdvtuneError, match=r"truncated or corrupt \(Weights only load failed\); delete it"):
        check_resume(tmp_path, cfg)  # torch's reason to its first sentence (it was cut mid-word: "... If yo")
    with pytest.raises(AdvtuneError, match="truncated or corrupt"):
        fit(fresh(synth), synth.train.take(64), clean(), cfg, checkpoint_dir=tmp_path, resume=True)
    assert not marker.exists()
    torch.save({"epoch": 3, "weights": {}}, tmp_path / files.CHECKPOINT)  # plain tensors and numbers, not ours
    with pytest.raises(AdvtuneError, match="is not an advtune training checkpoint"):
        fit(fresh(synth), synth.train.take(64), clean(), cfg, checkpoint_dir=tmp_path, resume=True)


def test_a_checkpoint_carries_the_cuda_generator_when_cuda_is_in_use(tmp_path, monkeypatch):
    """An audit: only the CPU generator was saved, so a resumed CUDA run with dropout re-drew the masks of its
    first steps (the device generator re-seeded). Faked CUDA calls: the state goes into the file and back."""
    from advtune.train import checkpoint
    from advtune.train.checkpoint import load_checkpoint, save_checkpoint
    from advtune.train.loop import History

    cuda_state, gpu = torch.arange(16, dtype=torch.uint8), torch.device("cuda", 1)  # the model's device, not cuda:0
    asked, restored = [], []
    model = torch.nn.Linear(2, 2)
    assert checkpoint.cuda_device_of(model) is None  # a CPU model: no device generator
    monkeypatch.setattr(checkpoint, "cuda_device_of", lambda m: gpu)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: asked.append(d) or cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: restored.append((s.clone(), d)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = TrainConfig(epochs=1)
    save_checkpoint(tmp_path / "c.pt", model, opt, CostMeter(), History(), cfg, 0, 3, torch.zeros(3))
    load_checkpoint(tmp_path / "c.pt", model, opt, CostMeter(), History(), cfg, "cpu")
    assert asked == [gpu] and len(restored) == 1
    assert torch.equal(restored[0][0], cuda_state) and restored[0][1] == gpu
    monkeypatch.setattr(checkpoint, "cuda_device_of", lambda m: None)  # a CPU run writes none and restores none
    save_checkpoint(tmp_path / "d.pt", model, opt, CostMeter(), History(), cfg, 0, 3, torch.zeros(3))
    assert "cuda_rng" not in torch.load(tmp_path / "d.pt", weights_only=True)


def test_a_long_item_gets_a_heartbeat_line_and_the_loop_its_last(caplog, monkeypatch):
    """An epoch (or Square's queries on a batch) that runs for minutes left the log silent until it ended: a log read
    later could not tell a slow job from a stalled one. A heartbeat says where it is; the end is said too."""
    import logging
    import time

    import advtune.progress as progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.15)
    monkeypatch.setattr(progress, "_progress_disabled", False)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    with caplog.at_level(logging.INFO, logger="advtune.progress"):
        bar = progress.progress(range(2), desc="work")
        for i in bar:
            bar.set_postfix(refresh=False, running=f"item {i}")
            time.sleep(0.5)  # one item, several heartbeats long
    lines = [r.getMessage() for r in caplog.records if r.name == "advtune.progress"]
    assert any(line.startswith("work: 0/2 (0%)") and "[running=item 0]" in line for line in lines), lines
    assert lines[-1].startswith("work: 2/2 done in "), lines
    time.sleep(0.3)
    assert len([r for r in caplog.records if r.name == "advtune.progress"]) == len(lines)  # the heartbeat stopped
    with caplog.at_level(logging.INFO, logger="advtune.progress"):
        for _ in progress.progress(range(3), desc="short"):
            pass
    assert not [r for r in caplog.records if r.getMessage().startswith("short")]  # a short loop stays silent
    with caplog.at_level(logging.INFO, logger="advtune.progress"):
        for i in progress.progress(range(5), desc="budgeted"):  # a budget's last epoch ends in a break
            time.sleep(0.2)
            if i == 2:
                break
    ended = [r.getMessage() for r in caplog.records if r.getMessage().startswith("budgeted")]
    assert ended[-1].startswith("budgeted: 2/5 done in "), ended
