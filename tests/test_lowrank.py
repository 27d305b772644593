"""Low-rank adapters on every layer (#21): only the adapters train, the merged model keeps its
architecture, each weight moves by a matrix of rank <= r, a resumed run is exact, the budget rule
fits its budget, and bad ranks or budgets are refused in one line."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from advtune import filenames as files
from advtune.attacks import PGD
from advtune.data import TensorData
from advtune.errors import AdvtuneError
from advtune.threat import ThreatModel
from advtune.train import TrainConfig, adversarial, fit
from advtune.train.lowrank import LowRank, adapter_factors, adapter_size, budget_ranks, uniform_ranks
from cli_helpers import train_argv
from test_selective import bn_net

THREAT = ThreatModel("linf", 0.1)
CFG = TrainConfig(epochs=2, batch_size=32, optimizer="adam", lr=0.01, seed=1, checkpoint_every=3)


@pytest.fixture(scope="module")
def data():
    from advtune.data import synthetic_blobs

    x, y = synthetic_blobs(256, generator=torch.Generator().manual_seed(3))
    return TensorData((x * 255).round().to(torch.uint8), y)


def test_adapters_train_and_merge_into_a_low_rank_change(data):
    model = bn_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sel = LowRank(uniform_ranks(model, 2))
    assert sel.ranks == {"net.conv1": 2, "net.conv2": 2, "net.fc": 2}
    fit(model, data, adversarial(PGD(THREAT, steps=2)), CFG, selection=sel)
    after = model.state_dict()
    assert list(after) == list(before), "the merged model must have the original state_dict keys"
    for layer in ("net.conv1", "net.conv2", "net.fc"):
        delta = (after[layer + ".weight"] - before[layer + ".weight"]).flatten(1)
        assert delta.abs().max() > 0, f"{layer}: the adapter did not train"
        assert int(torch.linalg.matrix_rank(delta.double(), rtol=1e-6)) <= 2, f"{layer}: change of rank > 2"
        assert torch.equal(after[layer + ".bias"], before[layer + ".bias"]), f"{layer}: a bias moved"
    for bn in ("net.bn1", "net.bn2"):  # every original parameter is frozen, so BN statistics stay
        for k in ("weight", "running_mean", "running_var"):
            assert torch.equal(after[f"{bn}.{k}"], before[f"{bn}.{k}"]), f"{bn}.{k} moved"
    assert all(p.requires_grad for p in model.parameters()) and len(list(model.parameters())) == 10


def test_trainable_count_is_the_adapters(data):
    model = bn_net()
    sel = LowRank({"net.conv2": 3, "net.fc": 1})
    from advtune.cost import CostMeter

    meter = CostMeter()
    fit(
        model,
        data,
        adversarial(PGD(THREAT, steps=1)),
        TrainConfig(epochs=1, batch_size=64, seed=0),
        selection=sel,
        meter=meter,
    )
    assert meter.trainable_params == 3 * (16 + 8 * 9) + 1 * (4 + 256) == sel.trainable_params(model)


class Interrupt(Exception):
    pass


def test_resume_with_adapters_is_exact(data, tmp_path):
    objective = adversarial(PGD(THREAT, steps=2))

    cfg = dataclasses.replace(CFG, adapter_lr_ratio=4.0)  # two optimizer groups (LoRA+) resume as well

    def adapted_fit(model, objective=objective, **kw):
        fit(model, data, objective, cfg, selection=LowRank(uniform_ranks(model, 2), seed=4), **kw)
        return model

    full = adapted_fit(bn_net())

    calls = {"n": 0}

    def crash(model, x, y, *, generator=None):
        calls["n"] += 1
        if calls["n"] == 13:  # epoch 2's 5th step (8 steps per epoch): resumes from its step-3 checkpoint
            raise Interrupt()
        return objective(model, x, y, generator=generator)

    crash.attack_grad_evals = objective.attack_grad_evals
    interrupted = bn_net()
    with pytest.raises(Interrupt):
        adapted_fit(interrupted, crash, checkpoint_dir=tmp_path)
    assert list(interrupted.state_dict()) == list(full.state_dict()), "an interrupted fit must still merge"
    resumed = adapted_fit(bn_net(seed=9), checkpoint_dir=tmp_path, resume=True)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_budget_ranks_fill_the_budget_by_scores():
    model = bn_net()
    one = {n: adapter_size(model.get_submodule(n).weight, 1) for n in ("net.conv1", "net.conv2", "net.fc")}
    budget = 3000
    ranks = budget_ranks(model, budget, {"net.conv1": 0.1, "net.conv2": 5.0, "net.fc": 1.0})
    spent = sum(r * one[n] for n, r in ranks.items())
    assert set(ranks) == set(one) and min(ranks.values()) >= 1 and spent <= budget
    assert budget - spent < max(one.values()) or all(
        r == min(model.get_submodule(n).weight.shape[0], model.get_submodule(n).weight[0].numel())
        for n, r in ranks.items()
    ), "budget left that a layer could still use"
    assert (
        ranks["net.conv2"] * one["net.conv2"] > ranks["net.conv1"] * one["net.conv1"]
    )  # the vulnerable layer gets more
    with pytest.raises(AdvtuneError, match="does not fit rank 1 on every layer"):
        budget_ranks(model, sum(one.values()) - 1)


@pytest.mark.parametrize(
    "ranks,match",
    [
        ({"net.conv1": 10}, "rank 10 does not fit net.conv1"),
        ({"net.bn1": 1}, "not a conv or linear layer"),
        ({"net.fc": 0}, "rank 0"),
    ],
)
def test_bad_rank_is_one_line_and_changes_nothing(ranks, match):
    model = bn_net()
    before = list(model.state_dict())
    with pytest.raises(AdvtuneError, match=match):
        LowRank(ranks).adapt(model)
    assert list(model.state_dict()) == before


def test_finetune_lowrank_end_to_end(tmp_path, capsys):
    from advtune.cli import main
    from advtune.models import load_model

    base = tmp_path / "std"
    assert main(train_argv(base, limit=200, limit_test=60)) == 0
    common = ["--eps", "0.1", "--epochs", "1", "--limit", "200", "--limit-test", "60", "--attack", "pgd:steps=2"]
    out = tmp_path / "ft"
    argv = ["finetune", str(base), "--select", "lowrank:rank=2", "--points", "2", "--out", str(out), "--quiet"]
    assert main([*argv, *common]) == 0
    selection = json.loads((out / "config.json").read_text())["selection"]
    summary = json.loads((out / "summary.json").read_text())
    assert selection["kind"] == "lowrank" and set(selection["ranks"].values()) == {2}
    assert summary["cost"]["trainable_params"] == selection["trainable_params"] < selection["changed_params"]
    base_model, _ = load_model(base, torch.device("cpu"))
    tuned, _ = load_model(out, torch.device("cpu"))  # the plain architecture: loads without adapters
    for (k, a), b in zip(base_model.state_dict().items(), tuned.state_dict().values()):
        assert torch.equal(a, b) == (not k.endswith("weight")), k  # weights moved, nothing else did
    # the patch stores the adapters' factors, not the dense weights they change, and rebuilds them exactly
    from advtune.patch import apply_patch, patch_info

    info = patch_info(out / "patch.safetensors")
    assert int(info["stored_entries"]) < int(info["changed_entries"]) / 4
    rebuilt = apply_patch(load_model(base, torch.device("cpu"))[0], out / "patch.safetensors")
    for (k, a), b in zip(tuned.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), k
    snaps = sorted((out / files.SNAPSHOTS).iterdir())
    assert len(snaps) == 2 and load_model(snaps[0], torch.device("cpu"))[0] is not None
    # bad specs: one line each, nothing written
    for spec, match in (("lowrank:rank=0", "lowrank:rank=<a positive integer>"), ("lowrank", "needs a rank")):
        bad = tmp_path / spec.replace(":", "_").replace("=", "_")
        assert main(["finetune", str(base), "--select", spec, "--out", str(bad), "--quiet", *common]) == 2
        assert match in capsys.readouterr().err and not bad.exists()
    # a LoRA+ rate on a selection without adapters, or a ratio that is no rate: refused before any folder
    for select, ratio, match in (("all", "4", "this selection trains none"), ("lowrank:rank=2", "0", "positive")):
        bad = tmp_path / f"ratio-{select}-{ratio}".replace(":", "_").replace("=", "_")
        argv = ["finetune", str(base), "--select", select, "--adapter-lr-ratio", ratio, "--out", str(bad), "--quiet"]
        assert main([*argv, *common]) == 2
        assert match in capsys.readouterr().err and not bad.exists()


@pytest.mark.parametrize("ratio", [1.0, 8.0])
def test_adapter_lr_ratio_scales_only_the_up_factors_rate(data, ratio):
    """LoRA+: Adam's first step moves each entry it trains by the rate itself (its gradient's sign): the
    adapters' up factors (zero at the start) by lr * ratio, a whole layer and a BatchNorm's scale by lr; the
    down factors get no gradient while the up factors are zero, so one step leaves them as drawn."""
    ranks = {"net.conv1": 2, "net.conv2": 2}
    drawn = bn_net()
    LowRank(ranks, seed=4).adapt(drawn)  # the same seed draws the same down factors
    model = bn_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sel = LowRank(ranks, seed=4, whole=("net.fc",), norms=("net.bn1",))
    cfg = TrainConfig(batch_size=32, lr=0.01, weight_decay=0.0, seed=1, steps=1, adapter_lr_ratio=ratio)
    fit(model, data, None, cfg, selection=sel)

    def moved_by(delta: torch.Tensor, rate: float, name: str) -> None:
        nonzero = delta[delta != 0].abs()
        assert nonzero.numel() > delta.numel() // 2, name
        assert torch.allclose(nonzero, torch.full_like(nonzero, rate), rtol=1e-3), name

    for name, (zero, down) in adapter_factors(drawn).items():
        up, trained_down = sel.factors[name]
        assert not zero.any() and torch.equal(trained_down, down), name
        moved_by(up, 0.01 * ratio, name)
    after = model.state_dict()
    for name in ("net.fc.weight", "net.bn1.weight"):  # whole layers and norms keep the base rate
        moved_by(after[name] - before[name], 0.01, name)


def test_hybrid_trains_whole_layers_and_adapters_within_the_budget(data):
    """granularity=hybrid: the best whole layers by score, then adapters on the others with the
    budget they leave; the whole layer moves freely, the adapted one by a low-rank change."""
    from advtune.components import Component
    from advtune.runs.selecting import select_from_table
    from advtune.vulnerability import ScoreTable

    model = bn_net()
    comps = [Component("net.conv1", i) for i in range(8)] + [Component("net.conv2", i) for i in range(16)]
    comps += [Component("net.fc", i) for i in range(4)]
    scores = [0.1] * 8 + [1.0] * 16 + [0.5] * 4  # conv2 ranks first
    table = ScoreTable("taylor", tuple(comps), tuple(scores))
    conv2 = 16 * 8 * 9 + 16 + 32  # its weight and bias; its BN's two affine vectors count with its units
    budget = conv2 + 2 * adapter_size(model.net.fc.weight, 1) + 3 * adapter_size(model.net.conv1.weight, 1)
    sel = select_from_table(table, model, 0.1, False, params=budget, granularity="hybrid", seed=0)
    # whole layers greedily by score while they fit (conv2, then the small conv1), adapters with the rest
    assert sel.whole == ("net.conv1", "net.conv2") and set(sel.ranks) == {"net.fc"}
    assert sel.trainable_params(model) <= budget
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, data, adversarial(PGD(THREAT, steps=1)), TrainConfig(epochs=1, batch_size=32, seed=0), selection=sel)
    after = model.state_dict()
    whole = (after["net.conv2.weight"] - before["net.conv2.weight"]).flatten(1)
    assert int(torch.linalg.matrix_rank(whole.double(), rtol=1e-6)) > max(sel.ranks.values()), "whole layer"
    assert not torch.equal(after["net.conv2.bias"], before["net.conv2.bias"])
    fc = (after["net.fc.weight"] - before["net.fc.weight"]).flatten(1)
    assert 0 < int(torch.linalg.matrix_rank(fc.double(), rtol=1e-4)) <= sel.ranks["net.fc"]  # float32 merge noise
    assert torch.equal(after["net.fc.bias"], before["net.fc.bias"])
    with pytest.raises(AdvtuneError, match="needs a parameter budget"):
        select_from_table(table, model, 0.1, False, params=None, granularity="hybrid")


def test_harden_hybrid_end_to_end(tmp_path, capsys):
    """`advtune harden --granularity hybrid`: whole layers + adapters, the checkpoint kept on held-out
    data, a report, and a patch with the adapters' factors that `apply` turns into the same weights."""
    from advtune.cli import main
    from advtune.models import load_model
    from advtune.patch import apply_patch, patch_info

    base = tmp_path / "base"
    assert main(train_argv(base, limit=400, limit_test=40)) == 0
    out = tmp_path / "hard"
    argv = ["harden", str(base), "--eps", "0.2", "--granularity", "hybrid", "--params", "0.1", "--limit", "400"]
    argv += ["--limit-test", "40", "--budget", "12000", "--evaluation", "fgsm", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    sel = s["selection"]
    assert sel["kind"] == "hybrid" and sel["whole"] and sel["ranks"] and s["checkpoints"]["chosen_step"]
    assert sel["trainable_params"] <= 0.1 * sum(p.numel() for p in load_model(base)[0].parameters()) + 1
    assert (out / "report.html").is_file()
    info = patch_info(out / "patch.safetensors")
    assert int(info["stored_entries"]) < int(info["changed_entries"])
    said = capsys.readouterr().out  # the factors train, the merged layers' entries change: both said
    assert f"changing {sel['changed_params']:,} entries of the weights" in said and sel["changed_params"] > 0
    rebuilt = apply_patch(load_model(base)[0], out / "patch.safetensors")
    for (k, a), b in zip(load_model(out)[0].state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), k


def test_norms_extra_trains_scale_shift_and_statistics_within_the_budget(data):
    """--norms (#21, item 1): next to the adapters, every BatchNorm's scale and shift train and its running
    statistics follow the adversarial batches (as in full fine-tuning); the extra is paid out of the
    parameter budget, counted in the trainable parameters, and survives selection.json."""
    from advtune.runs.selecting import describe_selection, make_selection
    from advtune.train.lowrank import norm_layers, norm_params, selection_from_json

    model = bn_net()
    assert norm_layers(model) == ["net.bn1", "net.bn2"] and norm_params(model) == 2 * (8 + 16)
    budget = 1500
    plain = make_selection(model, "lowrank", 0.1, "taylor", False, 0, params=budget)
    sel = make_selection(model, "lowrank", 0.1, "taylor", False, 0, params=budget, norms=True)
    assert sel.norms == ("net.bn1", "net.bn2") and not plain.norms
    info = describe_selection(sel, model)
    assert info["trainable_params"] <= budget and info["norms"] == ["net.bn1", "net.bn2"]
    assert sel.trainable_params(model) == sum(
        adapter_size(model.get_submodule(n).weight, r) for n, r in sel.ranks.items()
    ) + norm_params(model)
    assert selection_from_json(json.loads(json.dumps(sel.to_json())), model).norms == sel.norms
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from advtune.cost import CostMeter

    meter = CostMeter()
    fit(model, data, adversarial(PGD(THREAT, steps=1)), CFG, selection=sel, meter=meter)
    assert meter.trainable_params == sel.trainable_params(model)
    after = model.state_dict()
    for bn in ("net.bn1", "net.bn2"):
        for k in ("weight", "bias", "running_mean", "running_var"):
            assert not torch.equal(after[f"{bn}.{k}"], before[f"{bn}.{k}"]), f"{bn}.{k} did not move"
    for layer in ("net.conv1", "net.conv2", "net.fc"):  # biases are not part of the extra
        assert torch.equal(after[layer + ".bias"], before[layer + ".bias"]), f"{layer}.bias moved"
    # bad input, one line each: a unit selection, a model without normalization, a budget the norms fill
    with pytest.raises(AdvtuneError, match="use it with --granularity lowrank, hybrid, shares"):
        make_selection(bn_net(), "random", 0.1, "taylor", False, 0, params=budget, norms=True)
    with pytest.raises(AdvtuneError, match="raise --params"):
        make_selection(bn_net(), "lowrank", 0.1, "taylor", False, 0, params=40, norms=True)
    plain_net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    with pytest.raises(AdvtuneError, match="no normalization layer"):
        make_selection(plain_net, "lowrank", 0.1, "taylor", False, 0, params=0.5, norms=True)


def test_norms_recipe_is_refused_with_a_unit_selection_before_any_work():
    from advtune.recipe import Recipe

    assert Recipe().norms is None and Recipe(granularity="quota").norms is None  # auto: off where it cannot apply
    with pytest.raises(AdvtuneError, match="lowrank, hybrid, shares, sparse, probe, not quota"):
        Recipe(granularity="quota", norms=True)


def test_records_from_before_norms_existed_still_resume():
    """A finetune or harden run (or an experiment's variant) recorded before --norms existed has no such key:
    its resume must read the absence as off, not as a changed setting (and an explicit change is refused)."""
    from advtune.runs.common import check_same_run
    from advtune.runs.configs import FinetuneRun
    from advtune.runs.experiment.rerun import same_settings as _same_settings
    from advtune.runs.harden_plan import RECIPE_DEFAULTS

    now = FinetuneRun(base="b", out="o", eps=0.1).to_json()
    old = {k: v for k, v in now.items() if k != "norms"}
    check_same_run(old, now)
    with pytest.raises(AdvtuneError, match="norms: False -> True"):
        check_same_run(old, {**now, "norms": True})
    assert RECIPE_DEFAULTS["norms"] is False
    variant = {"name": "harden", "kind": "finetune", "granularity": "hybrid"}
    assert _same_settings(variant, {**variant, "norms": False}) and _same_settings({**variant, "norms": False}, variant)
    assert not _same_settings(variant, {**variant, "norms": True})
    # an experiment written before auto (its harden-recipe variants without the key) resumes as recorded
    assert _same_settings(variant, {**variant, "norms": None})


def test_norms_auto_is_on_for_adapters_on_a_model_with_cheap_normalization_layers():
    """Harden's --norms default (auto, round 7): on exactly where it applies and costs at most a quarter of
    the budget; a model without normalization layers, a unit/random/all selection, or a budget the norms
    would eat keep it off; an explicit choice always wins."""
    from advtune.runs.selecting import resolve_norms
    from advtune.vulnerability import ScoreTable

    model, table = bn_net(), ScoreTable("taylor", (), ())
    assert resolve_norms(model, None, table, "hybrid", 1500) is True  # 48 norm entries <= 1500 / 4
    assert resolve_norms(model, None, "lowrank", "unit", 1500) is True
    assert resolve_norms(model, None, "runs/analysis", "shares", 1500) is True
    assert resolve_norms(model, None, table, "hybrid", 150) is False  # 48 > 150 / 4: the budget's job
    assert resolve_norms(model, None, table, "unit", 1500) is False
    assert resolve_norms(model, None, "random", "hybrid", 1500) is False
    assert resolve_norms(model, None, "all", "hybrid", 1500) is False
    assert resolve_norms(model, None, table, "hybrid", None) is False
    assert (
        resolve_norms(model, False, table, "hybrid", 1500) is False
        and resolve_norms(model, True, "x", "unit", 1) is True
    )
    plain_net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    assert resolve_norms(plain_net, None, table, "hybrid", 0.5) is False


def test_harden_decides_norms_auto_for_the_model_and_records_the_decision(data):
    """`advtune.harden` with the default recipe on a BatchNorm model trains the normalization layers (and
    records norms: true, so a resume compares what ran); with --no-norms it does not."""
    import advtune
    from advtune.recipe import Recipe

    x, y = data.tensors()
    on = advtune.harden(bn_net(), (x, y), eps=0.1, budget=3000, recipe=Recipe(analysis_limit=64))
    assert on.selection.norms == ("net.bn1", "net.bn2") and on.summary()["recipe"]["norms"] is True
    off = advtune.harden(bn_net(), (x, y), eps=0.1, budget=3000, recipe=Recipe(analysis_limit=64, norms=False))
    assert off.selection.norms == () and off.summary()["recipe"]["norms"] is False


def test_shares_rule_pays_whole_layers_from_their_score_share_and_adapts_the_rest():
    """granularity=shares (#21): each layer is owed budget x its score share; a layer the share pays for
    trains whole and its surplus goes back to the others; the rest get adapters. Unlike hybrid, a big,
    most-vulnerable layer that cannot be taken whole still gets the largest adapter, not nothing."""
    from advtune.components import Component
    from advtune.runs.selecting import select_from_table
    from advtune.train.lowrank import share_ranks
    from advtune.vulnerability import ScoreTable

    model = bn_net()  # conv1 80 entries, conv2 1168, fc 1028
    one = {n: adapter_size(model.get_submodule(n).weight, 1) for n in ("net.conv1", "net.conv2", "net.fc")}
    # conv2 most vulnerable but too big for a small budget; conv1 small and its share pays for it
    scores = {"net.conv1": 1.0, "net.conv2": 3.0, "net.fc": 1.0}
    whole, ranks = share_ranks(model, 900, scores)
    assert whole == ["net.conv1"] and set(ranks) == {"net.conv2", "net.fc"}
    assert ranks["net.conv2"] * one["net.conv2"] > ranks["net.fc"] * one["net.fc"]  # by score
    assert 80 + sum(r * one[n] for n, r in ranks.items()) <= 900
    # hybrid on the same budget takes the best whole layer that fits (conv1, after skipping conv2)
    # and gives conv2, the most vulnerable, only what is left
    comps = [Component("net.conv1", i) for i in range(8)] + [Component("net.conv2", i) for i in range(16)]
    comps += [Component("net.fc", i) for i in range(4)]
    table = ScoreTable("taylor", tuple(comps), tuple([1.0 / 8] * 8 + [3.0 / 16] * 16 + [1.0 / 4] * 4))
    sel = select_from_table(table, model, 0.1, False, params=900, granularity="shares", seed=0)
    assert sel.whole == ("net.conv1",) and sel.ranks == ranks and sel.trainable_params(model) <= 900
    # a budget that pays every share in full: everything whole, no adapter
    whole, ranks = share_ranks(model, 10_000, scores)
    assert whole == ["net.conv1", "net.conv2", "net.fc"] and ranks == {}
    # a budget below one rank everywhere: refused in one line (as lowrank)
    with pytest.raises(AdvtuneError, match="raise --params"):
        select_from_table(table, model, 0.1, False, params=50, granularity="shares", seed=0)


def test_head_trains_the_unscored_output_layer_whole_out_of_the_same_budget(data):
    """--head (#21, round 10): the analysis scores no output layer, so shares and hybrid give the classifier
    the smallest adapter; with --head it trains whole, paid first out of --params, and the other layers share
    what is left. Refused in one line where it cannot apply or the head alone costs the budget."""
    import advtune
    from advtune.components import Component
    from advtune.recipe import Recipe
    from advtune.runs.selecting import make_selection, select_from_table
    from advtune.vulnerability import ScoreTable

    model = bn_net()  # conv1 80 entries, conv2 1168, fc (the output layer) 1028
    comps = [Component("net.conv1", i) for i in range(8)] + [Component("net.conv2", i) for i in range(16)]
    table = ScoreTable("taylor", tuple(comps), tuple([1.0 / 8] * 8 + [3.0 / 16] * 16))  # as analyses: no fc
    plain = select_from_table(table, model, 0.1, False, params=2000, granularity="shares", seed=0)
    assert "net.fc" not in plain.whole and plain.ranks["net.fc"] <= 2  # unscored: only what the others leave
    rank1 = adapter_size(model.get_submodule("net.conv2").weight, 1)
    scored_head = ScoreTable(  # an analysis that scored the output layer too: hybrid may rank it, not twice
        "taylor", (*comps, *[Component("net.fc", i) for i in range(4)]), (*table.scores, *[1.0] * 4)
    )
    for granularity, t in (("shares", table), ("hybrid", table), ("hybrid", scored_head)):
        sel = select_from_table(t, model, 0.1, False, params=2000, granularity=granularity, seed=0, head=True)
        assert sel.whole.count("net.fc") == 1 and "net.fc" not in sel.ranks
        # the head and the rest within one budget, spent up to less than one more rank-1 adapter
        assert 2000 - rank1 < sel.trainable_params(model) <= 2000
    with pytest.raises(AdvtuneError, match="--head: the output layer net.fc has 1,028 parameters.*raise --params"):
        select_from_table(table, model, 0.1, False, params=900, granularity="shares", seed=0, head=True)
    with pytest.raises(AdvtuneError, match="--head: the output layer net.fc leaves no budget.*raise --params"):
        select_from_table(table, model, 0.1, False, params=1060, granularity="shares", seed=0, head=True)
    with pytest.raises(AdvtuneError, match="--head trains the output layer whole.*hybrid, shares"):
        make_selection(model, table, 0.1, "taylor", False, 0, 2000, "lowrank", None, False, True)
    with pytest.raises(AdvtuneError, match="--head trains the output layer whole.*hybrid, shares"):
        make_selection(model, "random", 0.1, "taylor", False, 0, 2000, "shares", None, False, True)
    with pytest.raises(AdvtuneError, match="^head trains the output layer whole.*not unit"):
        Recipe(granularity="unit", head=True)
    with pytest.raises(AdvtuneError, match="head with probe_quotas=False.*drop head, or keep the quotas"):
        Recipe(head=True, probe_quotas=False)  # the probe's global ranking: the output layer's entries compete
    assert Recipe(head=True).head  # the default rule (probe with its quotas) gives the output layer nothing alone
    x, y = data.tensors()
    run = advtune.harden(
        bn_net(),
        (x, y),
        eps=0.1,
        budget=3000,
        recipe=Recipe(granularity="shares", analysis_limit=64, params=2000, head=True),
    )
    assert "net.fc" in run.selection.whole and run.summary()["recipe"]["head"] is True


def test_a_resume_names_the_recorded_switches_as_flags_that_exist():
    """harden --resume with other settings says what the run was saved with, as flags: --norms and (auto since
    round 21) --head have a --no- form; a plain switch (off by default) would read `without --flag`."""
    from advtune.runs.harden_plan import flag_words

    assert flag_words("norms", False) == "--no-norms" and flag_words("norms", True) == "--norms"
    assert flag_words("head", False) == "--no-head" and flag_words("head", True) == "--head"
    assert flag_words("quiet", False) == "without --quiet"  # not a recipe switch: no --no- form
    assert flag_words("lr", 0.003) == "--lr 0.003"


def test_training_from_scratch_refuses_an_adapter_rate_before_any_folder(tmp_path):
    from advtune.runs import train as train_job
    from advtune.runs.configs import TrainRun

    out = tmp_path / "t"
    run = TrainRun(dataset="synthetic", model="small-cnn", out=str(out), train=TrainConfig(adapter_lr_ratio=4.0))
    with pytest.raises(AdvtuneError, match="applies to fine-tuning with low-rank adapters"):
        train_job.run(run)
    assert not out.exists()


def test_a_parametrized_weight_is_refused_by_every_selective_rule():
    """An audit: on a layer with spectral_norm (a torch parametrization) the low-rank merge crashed after training
    (it took the user's parametrization for an adapter), and the unit and sparse rules silently trained its bias
    only (the weight lives at parametrizations.weight.original). Refused in one line; everything still trains."""
    from torch import nn
    from torch.nn.utils.parametrizations import spectral_norm

    from advtune.components import Component, Selection
    from advtune.runs.selecting import make_selection
    from advtune.train.lowrank import refuse_parametrized
    from advtune.train.selection import Trainable
    from advtune.train.sparse import SparseEntries

    def net():
        torch.manual_seed(0)
        return nn.Sequential(spectral_norm(nn.Conv2d(1, 4, 3)), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))

    model = net()
    names = dict(model.named_parameters())
    for selection in (
        LowRank({"3": 1}),  # the plain layer only: the merge still met the parametrized one
        Selection.of(model, [Component("0", 1)]),
        SparseEntries({"3.weight": torch.ones_like(names["3.weight"], dtype=torch.bool)}),
    ):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with pytest.raises(AdvtuneError, match=r"layer '0' has a computed weight .*remove_parametrizations"):
            Trainable(model, selection)
        assert all(p.requires_grad for p in model.parameters())  # refused before anything was frozen or adapted
        assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(AdvtuneError, match="has a computed weight"):  # the CLI's paths: before any folder
        make_selection(model, "random", 0.1, "taylor", False, 0)
    assert make_selection(model, "all", 0.1, "taylor", False, 0) is None  # every parameter: trains as it is
    Trainable(model, None).close()
    from torch.nn.utils import spectral_norm as hooked_spectral_norm  # the older kind: hooks over weight_orig

    hooked = nn.Sequential(nn.Flatten(), hooked_spectral_norm(nn.Linear(64, 3)))
    with pytest.raises(AdvtuneError, match="layer '1' has a computed weight"):
        Trainable(hooked, Selection.of(hooked, [Component("1", 0)]))
    adapted = net()
    adapted[0] = nn.Conv2d(1, 4, 3)  # plain layers only: our own adapters on them are not refused
    trainable = Trainable(adapted, LowRank({"0": 1, "3": 1}))
    refuse_parametrized(adapted)  # (while they are on the model)
    trainable.close()
