"""The public API (advtune.evaluate/analyze/harden/fit, exports) and its one input adapter:
tensors, DataLoaders and advtune splits give the same answers; bad input is one line."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import advtune
from advtune import AdvtuneError, ThreatModel
from advtune.data import TensorData
from advtune.recipe import PROTOCOL
from conftest import TinyCNN


def test_import_advtune_does_not_load_torch():
    code = "import sys, advtune; assert 'torch' not in sys.modules, 'torch loaded'; print(len(advtune.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 30


def test_every_export_resolves_and_functions_are_not_shadowed_by_modules():
    import advtune.evaluation  # noqa: F401  (a module import must not replace the function)
    import advtune.runs.harden  # noqa: F401

    for name in advtune.__all__:
        assert getattr(advtune, name) is not None, name
    assert callable(advtune.evaluate) and advtune.evaluate.__module__ == "advtune.api"
    assert callable(advtune.harden) and advtune.harden.__module__ == "advtune.api"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        advtune.nope  # noqa: B018


def test_threat_model_shorthands():
    assert ThreatModel.linf(8 / 255) == ThreatModel("linf", 8 / 255)
    assert ThreatModel.l2(0.5).norm == "l2"
    with pytest.raises(AdvtuneError, match="write 8/255, not 8"):
        ThreatModel.linf(8)


def test_evaluate_gives_the_same_answer_for_tensors_a_dataloader_and_a_split(tiny_model, blobs):
    _, _, xt, yt = blobs
    kw = dict(eps=0.15, attacks="fgsm,pgd:steps=10", limit=120, batch_size=60, seed=3)
    a = advtune.evaluate(tiny_model, (xt, yt), **kw)
    b = advtune.evaluate(tiny_model, DataLoader(TensorDataset(xt, yt), batch_size=60), **kw)
    c = advtune.evaluate(tiny_model, TensorData(xt, yt), **kw)
    assert a.n == b.n == c.n == 120
    assert torch.equal(a.robust, b.robust) and torch.equal(a.robust, c.robust)
    assert 0 < a.worst_case_accuracy < a.clean_accuracy  # eps 0.15 breaks some, not all


def test_fit_monitors_a_datasets_validation_split_never_its_test_split_unasked(monkeypatch):
    """`fit(model, ds, val=ds)` monitored the test split under the name val_acc."""
    from advtune.models import model_for

    ds = advtune.load_dataset("synthetic", limit=300, limit_test=50, val=100)
    seen = []
    import advtune.api as api

    real = api._fit
    monkeypatch.setattr(api, "_fit", lambda *a, val=None, **k: seen.append(val) or real(*a, val=val, **k))
    advtune.fit(model_for(ds, "small-cnn"), ds, config=advtune.TrainConfig(epochs=1, batch_size=100), val=ds)
    assert seen[0] is ds.val and len(ds.val) == 100
    no_val = advtune.load_dataset("synthetic", limit=300, limit_test=50)
    with pytest.raises(AdvtuneError, match=r"val= got a Dataset without a validation split; .* pass ds\.test"):
        advtune.fit(model_for(ds, "small-cnn"), no_val, val=no_val)


def test_fit_from_a_dataloader_equals_fit_from_tensors(blobs):
    x, y, _, _ = blobs
    cfg = advtune.TrainConfig(epochs=1, batch_size=50, lr=3e-3, seed=1)
    torch.manual_seed(0)
    m1 = TinyCNN()
    m2 = copy.deepcopy(m1)
    advtune.fit(m1, (x[:300], y[:300]), config=cfg)
    advtune.fit(m2, DataLoader(TensorDataset(x[:300], y[:300]), batch_size=64, shuffle=False), config=cfg)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


def test_analyze_select_and_random_control(tiny_model, blobs):
    x, y, _, _ = blobs
    vmap = advtune.analyze(tiny_model, DataLoader(TensorDataset(x, y), batch_size=100), eps=0.2, limit=300)
    assert vmap.n_examples == 300 and vmap.adversarial_accuracy < vmap.clean_accuracy
    assert vmap.grad_evals >= 300 * 10  # the PGD-10 attack's gradient evaluations were counted
    ranked = vmap.ranked()
    assert len(ranked) == 8 + 16 and ranked[0][1] >= ranked[-1][1]
    sel = vmap.select(params=0.1)
    n_params = sum(p.numel() for p in tiny_model.parameters())
    assert 0 < sel.trainable_params(tiny_model) <= 0.1 * n_params
    ctrl = vmap.random_like(sel, seed=2)
    assert ctrl != sel and abs(ctrl.trainable_params(tiny_model) - sel.trainable_params(tiny_model)) <= 150
    assert len(vmap.select(share=0.25)) == 6
    # a selection holding more entries than the model (adapters near full rank): the control takes the whole count
    big = type("Big", (), {"trainable_params": lambda self, model, example=None: n_params + 1000})()
    assert len(vmap.random_like(big, seed=2)) == 8 + 16  # every unit of the pool, not a refusal
    with pytest.raises(AdvtuneError, match="more than the model's"):
        vmap.select(params=n_params + 1)
    with pytest.raises(AdvtuneError, match="share must be below 1"):  # 1.0 is not one entry in disguise
        vmap.select(params=1.0)
    assert vmap.curve is not None and vmap.curve.errors_repaired_at(1.0) > 0.9
    with pytest.raises(AdvtuneError, match="exactly one of share"):
        vmap.select(share=0.1, params=100)
    with pytest.raises(AdvtuneError, match="granularity='layer' selects within a parameter budget"):
        vmap.select(share=0.1, granularity="layer")
    quota = vmap.select(params=300, granularity="quota")
    assert {c.module for c in quota.components} == {"conv1", "conv2"}  # units in every scored layer
    assert quota.trainable_params(tiny_model) <= 300


def test_a_whole_dataset_resolves_to_the_right_split():
    ds = advtune.load_dataset("synthetic")
    model = advtune.build_model("small-cnn", ds.input_shape, ds.num_classes, ds.mean, ds.std)
    r = advtune.evaluate(model, ds, eps=0.1, attacks="fgsm", limit=50, gate=False)
    assert r.n == 50 and torch.equal(r.labels, ds.test.y[:50])
    from advtune.inputs import batches

    with pytest.raises(AdvtuneError, match="pass one split of the dataset"):
        list(batches(ds, 10))


def _bad(model, data, match):
    with pytest.raises(AdvtuneError, match=match) as e:
        advtune.evaluate(model, data, eps=0.1, attacks="fgsm", gate=False)
    assert "\n" not in str(e.value)


class _BatchMean(nn.Module):
    """A forward that averages over the batch: one row of logits whatever N is."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).mean(0, keepdim=True)


def test_bad_input_is_one_line(tiny_model, blobs):
    _, _, xt, yt = blobs
    x, y = xt[:20], yt[:20]
    _bad(tiny_model, ((x * 255).to(torch.uint8), y), r"uint8.*x.float\(\) / 255")
    _bad(tiny_model, (x * 2 - 1, y), r"must lie in \[0, 1\].*undo the normalisation")
    _bad(tiny_model, (torch.where(x > 0.5, float("nan"), x), y), "NaN")
    _bad(tiny_model, (x, y.float()), r"integer class indices.*y.long\(\)")
    _bad(tiny_model, (x, y[:10]), "x has 20 examples but y has 10")
    _bad(tiny_model, (x, y + 4), r"labels must be in \[0, 3\]")
    _bad(tiny_model, (x, -y - 1), "labels must be class indices >= 0")
    _bad(tiny_model, [{"x": x, "y": y}], r"each batch must be an \(x, y\) pair")
    _bad(tiny_model, "data.npz", "must be an \\(x, y\\) pair of tensors, an iterable")
    _bad(tiny_model, (x[:, :, :8], y), "cannot take inputs of shape")
    _bad(nn.Sequential(nn.Conv2d(1, 2, 3)), (x, y), r"logits of shape \(N, classes\)")
    _bad(_BatchMean(tiny_model), (x, y), r"one row per input, got \(1, 4\) for 2 inputs")  # was a 0.0 worst case
    with pytest.raises(AdvtuneError, match="built for linf eps=0.3"):
        advtune.evaluate(tiny_model, (x, y), eps=0.1, attacks=[advtune.PGD(ThreatModel.linf(0.3))])
    with pytest.raises(AdvtuneError, match="x.unsqueeze\\(1\\)"):
        advtune.fit(TinyCNN(), (x[:, 0], y))
    for kw, said in (({"seed": "a"}, "seed must be an integer"), ({"batch_size": 0}, "batch_size must be a positive")):
        with pytest.raises(AdvtuneError, match=said):  # were a ValueError from deep inside, or named --batch-size
            advtune.analyze(tiny_model, (x, y), eps=0.1, **kw)
    # an advtune.TensorData skipped these checks (normalised images trained, float labels were truncated)
    with pytest.raises(AdvtuneError, match=r"must lie in \[0, 1\]"):
        advtune.fit(TinyCNN(), advtune.TensorData(x * 2 - 1, y))
    with pytest.raises(AdvtuneError, match="integer class indices"):
        advtune.TensorData(x, y.float() + 0.5)
    with pytest.raises(AdvtuneError, match=r"x.unsqueeze\(1\)"):  # was "cannot take inputs of shape (4, 4)"
        advtune.analyze(tiny_model, (x[:, 0], y), eps=0.1)
    with pytest.raises(AdvtuneError, match="batches have different image shapes"):  # was torch.cat's error
        advtune.analyze(tiny_model, [(x[:4], y[:4]), (x[:4, :, :6, :6], y[:4])], eps=0.1)


def test_harden_on_a_user_model_leaves_it_untouched(tiny_model, blobs):
    x, y, xt, yt = blobs
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    res = advtune.harden(
        tiny_model,
        DataLoader(TensorDataset(x[:400], y[:400]), batch_size=100),
        eps=0.2,
        test=(xt[:60], yt[:60]),
        budget=12000,
        limit_test=60,
        evaluation=PROTOCOL,  # harden's default adds Square: tests/test_harden.py runs it
    )
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in before.items())
    assert res.after.worst_case_accuracy > res.before.worst_case_accuracy
    changed = [k for k, v in res.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and len(changed) < len(before)  # only the selected layers moved
    # without test data: the same fine-tuning, no evaluation
    alone = advtune.harden(tiny_model, (x[:400], y[:400]), eps=0.2, budget=12000)
    assert alone.before is None and alone.after is None and alone.summary()["after"] is None
    assert all(torch.equal(v, res.model.state_dict()[k]) for k, v in alone.model.state_dict().items())


def test_the_api_leaves_the_callers_random_state_and_modes_and_refuses_a_wrong_model_in_one_line(blobs):
    """A review found analyze and harden reseeding the caller's global generators (their loops' shuffles and
    dropout repeated), fit leaving the model in train mode, a model or labels that do not fit ending in a
    traceback from inside analyze/fit/harden, int32 labels refused by the attacks, and harden recording a zoo
    model as "Sequential" (so its frontier references were lost)."""
    import random

    import numpy as np

    x, y, xt, yt = blobs
    model = TinyCNN().eval()
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    expected = torch.rand(1), random.random(), np.random.rand()
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    advtune.analyze(model, (x[:32], y[:32]), eps=0.1, attack="fgsm", limit=32, curve=False, seed=0)
    assert (torch.rand(1), random.random(), np.random.rand()) == expected
    advtune.fit(model, (x[:64], y[:64]), config=advtune.TrainConfig(epochs=1, batch_size=32))
    assert not model.training  # given in eval mode, left in eval mode
    three_channels = torch.rand(4, 3, 16, 16)
    for call in (
        lambda: advtune.analyze(model, (three_channels, y[:4]), eps=0.1, attack="fgsm", curve=False),
        lambda: advtune.fit(model, (three_channels, y[:4]), config=advtune.TrainConfig(epochs=1)),
        lambda: advtune.harden(model, (three_channels, y[:4]), eps=0.1, budget=1000),
    ):
        with pytest.raises(AdvtuneError, match="cannot take inputs of shape") as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(AdvtuneError, match=r"labels must be in \[0, 3\]"):
        advtune.fit(model, (x[:64], y[:64] + 3), config=advtune.TrainConfig(epochs=1))
    with pytest.raises(AdvtuneError, match="wrap an attack"):
        advtune.fit(model, (x[:64], y[:64]), advtune.PGD(ThreatModel.linf(0.1)))
    adv = advtune.PGD(ThreatModel.linf(0.1), steps=2)(model, xt[:8], yt[:8].int())
    assert (adv - xt[:8]).abs().max() <= 0.1 + 1e-6
    zoo = advtune.build_model("small-cnn", (1, 16, 16), 4)
    summary = advtune.harden(zoo, (x[:200], y[:200]), eps=0.1, budget=2000).summary()
    assert summary["architecture"] == "small-cnn"


def test_a_float64_model_is_analysed_and_refused_for_training_in_one_line_and_harden_reads_test_only_to_its_limit(
    blobs, monkeypatch
):
    """A review found a float64 model failing deep inside analyze (the cost probe fed it float32), fit and harden
    (the data pipeline feeds float32 batches), and harden reading a whole test DataLoader before taking
    limit_test of it."""
    x, y, xt, yt = blobs
    model = copy.deepcopy(TinyCNN()).double().eval()
    vmap = advtune.analyze(model, (x[:32], y[:32]), eps=0.1, attack="fgsm", limit=32, curve=False)
    assert vmap.n_examples == 32 and len(vmap.table.components) > 0
    mixed = TinyCNN()
    mixed.fc.double()  # one layer in float64: the first parameter alone does not tell
    for call in (
        lambda: advtune.fit(model, (x[:64], y[:64]), config=advtune.TrainConfig(epochs=1)),
        lambda: advtune.harden(model, (x[:64], y[:64]), eps=0.1, budget=1000),
        lambda: advtune.fit(mixed, (x[:64], y[:64]), config=advtune.TrainConfig(epochs=1)),
    ):
        with pytest.raises(
            AdvtuneError, match=r"float32 weights, but the model has torch.float64 ones: call model.float\(\)"
        ) as e:
            call()
        assert "\n" not in str(e.value)

    class CountedBatches:  # an iterable test set that says how far it was read
        def __init__(self) -> None:
            self.read = 0

        def __iter__(self):
            for i in range(0, len(yt), 20):
                self.read += 1
                yield xt[i : i + 20], yt[i : i + 20]

    seen = {}
    monkeypatch.setattr(advtune.api, "harden_model", lambda model, meta, ds, run: seen.setdefault("ds", ds))
    test = CountedBatches()
    advtune.harden(TinyCNN(), (x[:64], y[:64]), eps=0.1, budget=1000, test=test, limit_test=30)
    assert test.read == 2 and len(seen["ds"].test) == 30 and torch.equal(seen["ds"].test.y, yt[:30])
    import numpy as np

    seen.clear()
    advtune.harden(TinyCNN(), (x[:64], y[:64]), eps=0.1, budget=1000, test=CountedBatches(), limit_test=np.int64(25))
    assert len(seen["ds"].test) == 25
    with pytest.raises(AdvtuneError, match="^limit_test must be a positive integer"):  # its keyword, named
        advtune.harden(TinyCNN(), (x[:64], y[:64]), eps=0.1, budget=1000, test=CountedBatches(), limit_test=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_evaluated(tiny_model, blobs, dtype):
    """Its inputs are rounded to the model's dtype: the eps-ball check said "the attack is broken (a bug)"."""
    _, _, xt, yt = blobs
    model = copy.deepcopy(tiny_model).to(dtype)
    r = advtune.evaluate(model, (xt[:20], yt[:20]), eps=0.3, attacks="pgd:steps=3", gate=False)
    assert 0.0 <= r.worst_case_accuracy < r.clean_accuracy <= 1.0  # the attack broke some: it ran, in that dtype
    assert 0.0 < r.max_perturbation["pgd:steps=3"] <= 0.3 + 1e-3  # within the ball, up to the dtype's rounding


def test_a_selection_trains_parameters_the_caller_froze_and_gives_the_flags_back(tiny_model, blobs):
    """A model frozen for inference trained nothing of its selection (or failed blaming an empty selection)."""
    x, y, _, _ = blobs
    model = copy.deepcopy(tiny_model)
    vmap = advtune.analyze(model, (x[:64], y[:64]), eps=0.1, limit=32)
    selection = vmap.select(share=0.5)
    for p in model.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    advtune.fit(model, (x[:64], y[:64]), config=advtune.TrainConfig(epochs=1), selection=selection)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed != set(before)  # the selection moved, the rest stayed
    assert not any(p.requires_grad for p in model.parameters())  # the caller's flags, given back
    with pytest.raises(AdvtuneError, match=r"got VulnerabilityMap; call its .select\(share=...\) first"):
        advtune.fit(model, (x[:64], y[:64]), selection=vmap)


def test_fit_with_dropout_repeats_from_its_seed_and_leaves_the_global_stream(blobs):
    """Dropout drew from the caller's global stream: TrainConfig(seed=) did not repeat a run, and fit moved it."""
    x, y, _, _ = blobs

    def trained():
        torch.manual_seed(len(torch.get_rng_state()) + torch.randint(1000, ()).item())  # any caller state
        model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(x[0].numel(), 4))
        model.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})
        state = torch.get_rng_state()
        advtune.fit(model, (x[:64], y[:64]), config=advtune.TrainConfig(epochs=1, batch_size=16, seed=3))
        assert torch.equal(torch.get_rng_state(), state)
        return model[2].weight.detach().clone()

    assert torch.equal(trained(), trained())


def test_a_maps_budget_prices_units_as_fit_trains_them(blobs):
    """A pre-activation block: the stem conv's BatchNorm sits inside the next block, not beside it. The map's budget
    priced the stem's channels without it (the static rule), fit traces and trains it: a selection over budget,
    and a random control with another count than it said."""
    from advtune.train.selection import Trainable

    class PreAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3, padding=1)
            self.block = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
            self.fc = nn.Linear(8 * 16 * 16, 4)

        def forward(self, x):
            return self.fc(self.block(self.stem(x)).flatten(1))

    x, y, _, _ = blobs
    torch.manual_seed(0)
    model = PreAct().eval()
    vmap = advtune.analyze(model, (x[:32], y[:32]), eps=0.1, attack="fgsm", limit=32, curve=False)
    for sel in (vmap.select(params=200), vmap.select(params=200, granularity="quota")):
        trained = Trainable(model, sel, example_input=x[:1]).count()  # what fit trains: the traced rule
        assert trained <= 200 and trained == sel.trainable_params(model, x[:1])
        control = vmap.random_like(sel)
        assert Trainable(model, control, example_input=x[:1]).count() <= trained


def test_analyze_measures_the_curve_on_as_many_examples_as_the_command(tiny_model, blobs):
    """A docs audit: advtune.analyze "takes advtune analyze's defaults", yet drew its curve on every scored example
    (the command: the first 1000, --curve-limit), so the two gave different curves and costs."""
    x, y, xt, yt = blobs
    data = DataLoader(TensorDataset(torch.cat([x, xt]), torch.cat([y, yt])), batch_size=400)
    vmap = advtune.analyze(tiny_model, data, eps=0.2, limit=1100, attack="pgd:steps=2")
    assert vmap.n_examples == 1100 and vmap.curve.n_samples == 1000


def test_harden_takes_attack_objects_refuses_a_dict_recipe_and_ignores_the_callers_frozen_flags(tiny_model, blobs):
    """A new-user walk: `evaluation=[PGD(...)]` crashed on `.split`, `recipe={...}` on `.epochs`, and a model with
    frozen parameters hardened differently (the probe left them out; the masked stage trained them)."""
    x, y, xt, yt = blobs
    pgd = advtune.PGD(advtune.ThreatModel.linf(0.2), steps=2)
    kw = {"eps": 0.2, "test": (xt[:30], yt[:30]), "budget": 3000, "limit_test": 30}
    res = advtune.harden(tiny_model, (x[:200], y[:200]), evaluation=[pgd], **kw)
    assert list(res.after.accuracy) == [pgd.spec]
    with pytest.raises(AdvtuneError, match="recipe must be an advtune.Recipe"):
        advtune.harden(tiny_model, (x[:200], y[:200]), recipe={"params": 0.2}, **kw)
    with pytest.raises(AdvtuneError, match="was built for"):
        advtune.harden(tiny_model, (x[:200], y[:200]), evaluation=[advtune.PGD(advtune.ThreatModel.linf(0.1))], **kw)
    head = list(tiny_model.parameters())[-1]
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    head.requires_grad_(True)
    try:
        frozen = advtune.harden(tiny_model, (x[:200], y[:200]), evaluation=[pgd], **kw)
        assert [p.requires_grad for p in tiny_model.parameters()][-2:] == [False, True]  # the caller's flags back
    finally:
        tiny_model.requires_grad_(True)
    assert all(torch.equal(a, b) for a, b in zip(frozen.model.state_dict().values(), res.model.state_dict().values()))


def test_per_layer_with_a_parameter_budget_is_refused(tiny_model, blobs):
    """A new-user walk: select(params=0.1, per_layer=True) returned the same selection as without per_layer."""
    x, y, _, _ = blobs
    vmap = advtune.analyze(tiny_model, (x[:100], y[:100]), eps=0.2, limit=100, curve=False, attack="pgd:steps=2")
    with pytest.raises(AdvtuneError, match="per_layer=True takes the top share of each layer: give share="):
        vmap.select(params=0.1, per_layer=True)
    assert len(vmap.select(share=0.25, per_layer=True)) > 0


def test_wrong_types_and_values_given_to_the_api_are_one_line_before_any_work(tiny_model, blobs, tmp_path):
    """An audit: each of these crashed with a TypeError/AttributeError/RuntimeError from inside python or torch (or,
    the last ones, was taken without a word: a string switch, a budget of 1.5 read as 1, val=-1 holding out none)."""
    from advtune.train import TrainConfig

    x, y, xt, yt = blobs
    x, y = x[:40], y[:40]
    threat = ThreatModel.linf(0.1)
    cases = [
        (lambda: advtune.harden(tiny_model, (x, y), test=(xt[:8, :, :6, :6], yt[:8]), eps=0.1), "cannot take inputs"),
        (lambda: advtune.fit(TinyCNN(), (x, y), val=(xt[:8, :, :6, :6], yt[:8])), "cannot take inputs"),
        (lambda: advtune.fit(TinyCNN(), (x, y), advtune.adversarial("pgd")), r"takes an attack object.*build_attack"),
        (lambda: advtune.fit(TinyCNN(), (x, y), advtune.trades(0.1)), "trades\\(\\) takes a ThreatModel"),
        (lambda: advtune.analyze(tiny_model, (x, y), eps=0.1, attack=5), "attack must be a spec"),
        (lambda: advtune.analyze(tiny_model, (x, y), eps=0.1, shares=0.5), "shares must be a list"),
        (lambda: advtune.Recipe(eps_warmup="0.1"), "eps_warmup must be a number"),
        (lambda: advtune.Recipe(epochs="2"), "epochs must be a number"),
        (lambda: advtune.Recipe(ema=1.5), "ema must be a decay"),
        (lambda: advtune.load_dataset("synthetic", limit=2.5), "limit .* positive number of examples, got 2.5"),
        (lambda: advtune.load_dataset("synthetic", limit="5"), "limit .* positive number of examples, got '5'"),
        (lambda: advtune.load_dataset("synthetic", val=-1), "val .* count of examples or a share"),
        (lambda: advtune.load_dataset("synthetic", val="5"), "val .* count of examples or a share"),
        (lambda: advtune.load_dataset("synthetic", val=10, seed="a"), "seed must be an integer"),
        (lambda: advtune.build_model("small-cnn", input_shape=28), "input_shape must be"),
        (lambda: advtune.build_model("small-cnn", num_classes=0), "num_classes must be"),
        (lambda: advtune.build_attack("pgd", 0.1), "needs a ThreatModel"),
        (lambda: advtune.save_model("x", tmp_path / "m"), "an nn.Module and a dict"),
        (lambda: advtune.save_model(tiny_model, tmp_path / "m", [1]), "an nn.Module and a dict"),
        (lambda: TrainConfig(compile="yes"), "compile is a switch: True or False"),
    ]
    amap = advtune.analyze(tiny_model, (x, y), eps=0.1, attack=advtune.FGSM(threat), curve=False)
    cases += [
        (lambda: amap.random_like("x"), "random_like takes a Selection"),
        (lambda: amap.random_like(amap.select(0.5), seed="a"), "seed must be an integer"),
        (lambda: amap.select(params=1.5), "above 1 is a count of entries"),
    ]
    for call, said in cases:
        with pytest.raises(AdvtuneError, match=said) as e:
            call()
        assert "\n" not in str(e.value)
    assert not (tmp_path / "m").exists()


def test_review_fixes_of_the_api_checks(tiny_model, blobs):
    """A review of the new checks: fit read a shuffled val DataLoader before seeding (the caller's random state
    changed), val=inf and val=nan crashed, a numpy seed or numpy shares/input_shape were refused or crashed, and the
    keyword rewrite lost an error's subclass."""
    import numpy as np

    from advtune.keywords import keyword_errors

    x, y, xt, yt = blobs
    model, loader = TinyCNN(), DataLoader(TensorDataset(xt[:32], yt[:32]), shuffle=True)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    advtune.fit(model, (x[:64], y[:64]), val=loader)
    assert torch.equal(torch.get_rng_state(), state)
    for val in (float("inf"), float("nan")):
        with pytest.raises(AdvtuneError, match="val must be a count of examples or a share"):
            advtune.load_dataset("synthetic", val=val)
    assert len(advtune.load_dataset("synthetic", val=10, seed=np.int64(3)).val) == 10
    assert advtune.build_model("small-cnn", input_shape=np.array([1, 28, 28]), num_classes=10) is not None
    amap = advtune.analyze(tiny_model, (x[:40], y[:40]), eps=0.1, attack="fgsm", shares=np.array([0.1, 1.0]))
    assert amap.curve is not None

    class Mine(AdvtuneError):
        pass

    @keyword_errors()
    def call(eps_warmup=None):
        raise Mine("--eps-warmup must be a share")

    with pytest.raises(Mine, match="^eps_warmup must be a share"):
        call()


class _Pair(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x), x.flatten(1)  # (logits, features)


def test_a_new_api_users_mistakes_are_one_line_in_the_callers_words(tiny_model, blobs, tmp_path):
    """A new-user walk of docs/api.md: each of these was a traceback from inside the library (a state_dict for the
    model, a one-output model), advice in the command's words (attacks="", the l2 hint said ThreatModel.linf), a
    value Recipe took and harden refused in other words, or a message that named no keyword."""
    from advtune.train import TrainConfig

    x, y, _, _ = blobs
    x, y = x[:20], y[:20]
    one = nn.Sequential(nn.Flatten(), nn.Linear(256, 1))
    cases = [
        (lambda: advtune.evaluate(tiny_model.state_dict(), (x, y), eps=0.1), r"nn.Module, got OrderedDict \(a state_"),
        (lambda: advtune.fit(lambda z: z, (x, y)), "model must be an nn.Module, got function"),
        (lambda: advtune.evaluate(one, (x, y), eps=0.1), "returns 1 output per example; .* at least 2 classes"),
        (lambda: advtune.fit(one, (x, y)), "returns 1 output per example"),
        (lambda: advtune.evaluate(_Pair(tiny_model), (x, y), eps=0.1), "return the logits tensor alone"),
        (
            lambda: advtune.evaluate(tiny_model, (x, y), eps=0.1, attacks=""),
            "attacks is empty: give attacks='standard'",
        ),
        (
            lambda: advtune.evaluate(
                tiny_model, (x, y), eps=0.5, norm="l2", attacks=[advtune.PGD(ThreatModel.linf(0.5))]
            ),
            r"ThreatModel.l2\(eps\)",
        ),
        (lambda: advtune.evaluate(tiny_model, (x.numpy(), y.numpy()), eps=0.1), r"torch.as_tensor\(x\)"),
        (lambda: advtune.Recipe(batch_size=0), "^batch_size must be a positive number"),
        (lambda: advtune.Recipe(optimizer="adamw"), "^unknown optimizer 'adamw'"),
        (lambda: advtune.Recipe(attack=advtune.PGD(ThreatModel.linf(0.1))), "^attack is a spec such as"),
        (lambda: advtune.harden(tiny_model, (x, y), eps=0.1, limit_test=0), "^limit_test must be a positive integer"),
        (lambda: TrainConfig(checkpoint_every=-1), "^checkpoint_every must be >= 0, got -1"),
        (lambda: TrainConfig(lr=0.0), "^lr: the learning rate must be positive"),
    ]
    cases += [  # taken without a word: resume with nothing to resume from, curve="no" as true, a zero std
        (lambda: advtune.fit(TinyCNN(), (x, y), resume=True), "resume=True continues .* pass checkpoint_dir"),
        (lambda: advtune.analyze(tiny_model, (x, y), eps=0.1, curve="no"), "curve must be True or False"),
        (lambda: advtune.build_model("small-cnn", (1, 28, 28), 10, mean=(0.5,), std=(0.0,)), "std must be positive"),
    ]
    advtune.save_model(tiny_model, tmp_path / "m")
    cases.append((lambda: advtune.load_model(tmp_path / "m" / "model.safetensors"), "is a file: pass its folder"))
    for call, said in cases:
        with pytest.raises(AdvtuneError, match=said) as e:
            call()
        assert "\n" not in str(e.value) and "--" not in str(e.value), str(e.value)
