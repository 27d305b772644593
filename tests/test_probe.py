"""The probe rule (#21, round 18): a whole-network probe for a first share of the budget, then only the entries it
moved most. The mask holds exactly those entries (biases and normalization layers whole, all within --params), every
other entry goes back to the base bit for bit, the probe is paid out of the budget and counted, a finished probe is
read back on --resume, and the command and the Python API give the same weights."""

from __future__ import annotations

import json

import pytest
import torch

from advtune.errors import AdvtuneError
from advtune.recipe import Recipe
from advtune.train.probe import movement_mask, start_weights, weight_changes
from test_selective import bn_net


def moved_copy(base, seed: int = 1):
    """`base` with every parameter moved by a different random amount."""
    moved = bn_net()
    moved.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    return moved


def test_movement_mask_takes_the_largest_moves_over_all_layers_with_biases_and_norms_whole():
    base = bn_net()
    moved = moved_copy(base)
    params = dict(base.named_parameters())
    norms = ("net.bn1", "net.bn2")
    whole = [n for n in params if n.endswith("bias") or ".bn" in n]
    paid = sum(params[n].numel() for n in whole)
    mask, k = movement_mask(base, moved, paid + 300, norms)
    assert k == 300 and mask.trainable_params() == paid + 300 and mask.norms == norms
    masks = mask.masks(base)
    for n in whole:
        assert bool(masks[n].all()), n
    changes = weight_changes(base, moved)
    assert set(changes) == {"net.conv1.weight", "net.conv2.weight", "net.fc.weight"}
    chosen = torch.cat([changes[n].abs()[masks[n]] for n in changes])
    left = torch.cat([changes[n].abs()[~masks[n]] for n in changes])
    assert len(chosen) == 300 and float(chosen.min()) >= float(left.max())  # the largest moves, across layers
    # without the norms their entries are no part of the mask, and what they paid goes to weight entries
    plain, k = movement_mask(base, moved, paid + 300)
    biases = sum(params[n].numel() for n in whole if ".bn" not in n)
    assert "net.bn1.weight" not in plain.masks(base) and k == paid + 300 - biases == plain.trainable_params() - biases
    with pytest.raises(AdvtuneError, match="raise --params"):
        movement_mask(base, moved, paid, norms)


def test_start_weights_put_every_entry_outside_the_mask_back_to_the_base():
    base = bn_net()
    moved = moved_copy(base)
    mask, _ = movement_mask(base, moved, 2000, ("net.bn1", "net.bn2"))
    want = {n: p.detach().clone() for n, p in moved.named_parameters()}
    start = start_weights(moved, {n: t.clone() for n, t in base.state_dict().items()}, mask)
    masks = mask.masks(base)
    for name, p in start.named_parameters():
        m = masks.get(name, torch.zeros(p.shape, dtype=torch.bool))
        assert torch.equal(p[m], want[name][m]) and torch.equal(p[~m], dict(base.named_parameters())[name][~m]), name


def test_start_weights_give_a_frozen_normalization_layer_the_base_statistics_and_keep_a_trained_ones():
    base = bn_net()
    moved = moved_copy(base)
    with torch.no_grad():
        for m in moved.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(1.0)
    base_state = {n: t.clone() for n, t in base.state_dict().items()}
    mask, _ = movement_mask(base, moved, 2000, ("net.bn1",))  # bn2 frozen: its scale, shift and statistics
    start = start_weights(moved, base_state, mask).state_dict()
    assert torch.equal(start["net.bn2.running_mean"], base_state["net.bn2.running_mean"])
    assert torch.equal(start["net.bn2.weight"], base_state["net.bn2.weight"])
    assert torch.equal(start["net.bn1.running_mean"], base_state["net.bn1.running_mean"] + 1.0)


def test_recipe_refuses_a_probe_that_ends_inside_the_eps_ramp_or_is_no_share():
    with pytest.raises(AdvtuneError, match="larger than eps_warmup"):
        Recipe(granularity="probe", probe=0.1, eps_warmup=0.15)
    with pytest.raises(AdvtuneError, match=r"share of the budget in \(0, 1\)"):
        Recipe(granularity="probe", probe=1.0)
    assert Recipe(granularity="probe", probe=0.3).probe == 0.3


def test_harden_probe_end_to_end_pays_the_probe_trains_only_its_mask_resumes_and_matches_the_api(tmp_path, capsys):
    import advtune
    from advtune.cli import main
    from advtune.data import load_dataset
    from advtune.models import load_model
    from cli_helpers import check_sparse_harden, train_argv

    base = tmp_path / "base"
    assert main(train_argv(base, limit=400, limit_test=40)) == 0
    out = tmp_path / "hard"
    argv = ["harden", str(base), "--eps", "0.2", "--granularity", "probe", "--params", "0.1", "--limit", "400"]
    argv += ["--limit-test", "40", "--budget", "12000", "--evaluation", "fgsm", "--out", str(out), "--quiet"]
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "probe: the whole network for 20% of the budget" in printed and "probe moved most" in printed
    s = json.loads((out / "summary.json").read_text())
    sel, cost = s["selection"], s["cost"]
    base_model = load_model(base)[0]
    total = sum(p.numel() for p in base_model.parameters())
    assert sel["kind"] == "sparse" and 0 < sel["trainable_params"] <= 0.1 * total
    probe = json.loads((out / "probe" / "cost.json").read_text())["grad_evals"]
    step = 6 * 64  # one optimizer step of PGD-5 on a batch of 64: each stage rounds its budget up to whole steps
    assert sel["probe"]["grad_evals"] == probe and 0.15 * 12000 < probe <= 0.2 * 12000 + step
    # the probe is paid out of the budget: the fine-tuning's cost is both stages' (the rest: what the probe left)
    assert 12000 - step < cost["finetune_grad_evals"] <= 12000 + step
    ft_cfg = json.loads((out / "finetune" / "config.json").read_text())
    assert ft_cfg["run"]["budget"] == 12000 and ft_cfg["run"]["eps_warmup"] == 0.15  # as asked; the stage as it ran
    stage = ft_cfg["stage"]
    assert stage["eps_warmup"] == 0.0 and stage["budget"] == 12000 - probe and stage["train"]["seed"] == 1
    probe_cfg = json.loads((out / "probe" / "config.json").read_text())["run"]
    assert probe_cfg["select"] == "all" and probe_cfg["eps_warmup"] == pytest.approx(0.15 / 0.2)
    # only the mask moved from the base; the patch rebuilds the hardened weights bit for bit
    hardened = check_sparse_harden(base, out, sel["trainable_params"])
    # --resume after the probe: the probe is read back (not trained again) and gives the same mask and weights
    import shutil

    for name in ("finetune", "summary.json", "model.safetensors", "eval-protocol.json"):
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    probe_weights = (out / "probe" / "model.safetensors").read_bytes()
    assert main([*argv, "--resume"]) == 0
    assert "probe: the whole network" not in capsys.readouterr().out
    assert (out / "probe" / "model.safetensors").read_bytes() == probe_weights
    again = load_model(out)[0]
    for (k, a), b in zip(hardened.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    # the Python API runs the same two stages in memory: the same weights
    ds = load_dataset("synthetic", limit=400, limit_test=40)
    api = advtune.harden(
        load_model(base)[0], ds, eps=0.2, budget=12000, recipe=Recipe(granularity="probe"), evaluation="fgsm"
    )
    assert api.record.selection["probe"]["grad_evals"] == probe
    for (k, a), b in zip(hardened.state_dict().items(), api.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_finetune_probe_keeps_its_probe_next_to_out_refuses_bad_input_before_work_and_overwrites_both(tmp_path, capsys):
    from advtune.cli import main
    from advtune.models import load_model
    from cli_helpers import train_argv

    base = tmp_path / "base"
    assert main(train_argv(base, limit=200, limit_test=20)) == 0
    ft = tmp_path / "ft"
    argv = ["finetune", str(base), "--eps", "0.2", "--granularity", "probe", "--attack", "pgd:steps=1", "--quiet"]
    argv += ["--limit", "200", "--limit-test", "20", "--monitor-test", "0", "--out", str(ft)]
    for extra, match in (
        (["--budget", "4000"], "needs a parameter budget"),
        (["--params", "0.1"], "give --budget"),
        (["--params", "0.1", "--budget", "4000", "--probe", "0.1", "--eps-warmup", "0.2"], "larger than --eps-warmup"),
        (["--params", "0.1", "--budget", "4000", "--select", "random"], "use --granularity sparse --select random"),
    ):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1, err
        assert not ft.exists() and not (tmp_path / "ft.probe").exists()
    good = [*argv, "--params", "0.1", "--budget", "4000"]
    assert main(good) == 0
    s = json.loads((ft / "summary.json").read_text())
    probe = json.loads((tmp_path / "ft.probe" / "cost.json").read_text())["grad_evals"]
    assert s["selection"]["kind"] == "sparse" and s["selection"]["probe"]["grad_evals"] == probe > 0
    step = 2 * 64  # PGD-1 on a batch of 64: each stage rounds its budget up to whole steps
    assert 4000 - step < s["cost"]["grad_evals"] <= 4000 + step  # the probe counted once, with the rest
    assert json.loads((ft / "cost.json").read_text())["grad_evals"] == s["cost"]["grad_evals"]
    assert json.loads((ft / "config.json").read_text())["run"]["eps_warmup"] == 0.15  # the rule's ramp by default
    assert main(good) == 2 and "already exists" in capsys.readouterr().err  # nothing lost: refused
    done = load_model(ft)[0].state_dict()
    assert main([*good, "--resume"]) == 0  # a finished run resumed: compared as asked, nothing trained again
    for (k, a), b in zip(done.items(), load_model(ft)[0].state_dict().values()):
        assert torch.equal(a, b), k
    probe_done = tmp_path / "ft.probe" / "summary.json"
    # a crash after the probe: refused without --resume, then the finished probe read back, not trained again
    import shutil

    first = load_model(ft)[0].state_dict()
    shutil.rmtree(ft)
    when = probe_done.stat().st_mtime_ns
    assert main(good) == 2 and "ft.probe already exists" in capsys.readouterr().err
    assert main([*good, "--resume", "--probe", "0.3"]) == 2  # its settings changed: refused, nothing lost
    assert "--resume with different settings" in capsys.readouterr().err and probe_done.stat().st_mtime_ns == when
    assert main([*good, "--resume"]) == 0 and probe_done.stat().st_mtime_ns == when
    for (k, a), b in zip(first.items(), load_model(ft)[0].state_dict().values()):
        assert torch.equal(a, b), k
    assert main([*good, "--overwrite"]) == 0 and probe_done.stat().st_mtime_ns > when  # the probe trained again
    for (k, a), b in zip(first.items(), load_model(ft)[0].state_dict().values()):
        assert torch.equal(a, b), k  # the same seeds: the same weights


def test_probe_quotas_share_the_mask_out_by_the_analysis_and_rank_by_movement_within_each_layer(
    tmp_path, capsys, monkeypatch
):
    """--probe-quotas: each layer gets the sparse rule's quota of the budget by the analysis' layer scores, and within
    it the entries the probe moved most; refused without an analysis, before the probe trains."""
    import advtune
    from advtune.cli import main
    from advtune.data import load_dataset
    from advtune.models import load_model
    from advtune.train.lowrank import own_params
    from advtune.train.sparse import layer_quotas
    from advtune.vulnerability import rank_layers
    from cli_helpers import train_argv

    base = tmp_path / "base"
    assert main(train_argv(base, limit=400, limit_test=40)) == 0
    model = load_model(base)[0]
    ds = load_dataset("synthetic", limit=400, limit_test=40)
    recipe = Recipe(granularity="probe", probe_quotas=True, head=False, analysis_limit=200)  # the quotas alone
    res = advtune.harden(model, ds, eps=0.2, budget=8000, recipe=recipe, evaluation="fgsm")
    sel = res.record.selection
    assert sel["probe"]["quotas"] and sel["kind"] == "sparse"
    scores = dict(rank_layers(res.table))
    sizes = {n: own_params(model.get_submodule(n)) for n in scores}
    total = sum(p.numel() for p in model.parameters())
    want = {n: k for n, k in layer_quotas(sizes, scores, int(round(0.1 * total))).items() if k}
    assert sel["params_by_layer"] == want  # small-cnn has no normalization layer: the whole budget in the quotas
    with pytest.raises(AdvtuneError, match="use it with granularity probe"):
        Recipe(granularity="shares", probe_quotas=True)
    assert Recipe().quotas and not Recipe(probe_quotas=False).quotas  # auto: on with the probe rule (the default)
    assert Recipe().trains_head and not Recipe(probe_quotas=False).trains_head  # --head auto: on with the quotas
    assert not Recipe(granularity="shares").trains_head and not Recipe(head=False).trains_head
    ft = tmp_path / "ft"
    argv = ["finetune", str(base), "--eps", "0.2", "--granularity", "probe", "--probe-quotas", "--params", "0.1"]
    assert main([*argv, "--budget", "4000", "--limit", "200", "--out", str(ft), "--quiet"]) == 2
    assert "give --select <analyze folder>" in capsys.readouterr().err and not (tmp_path / "ft.probe").exists()
    # an analysis that scores none of the model's layers: refused before the probe trains, not after
    analysis = tmp_path / "analysis"
    argv_a = ["analyze", str(base), "--eps", "0.2", "--attack", "pgd:steps=2", "--limit", "100", "--curve-limit", "0"]
    assert main([*argv_a, "--out", str(analysis), "--quiet"]) == 0
    monkeypatch.setattr("advtune.runs.probe.rank_layers", lambda table: [("net.nope", 1.0)])
    selected = ["--select", str(analysis), "--budget", "4000", "--limit", "200", "--out", str(ft), "--quiet"]
    assert main([*argv, *selected]) == 2
    assert "none of the model's layers has one" in capsys.readouterr().err and not (tmp_path / "ft.probe").exists()
    argv[argv.index("probe")] = "sparse"
    assert main([*argv, "--budget", "4000", "--limit", "200", "--out", str(ft), "--quiet"]) == 2
    assert "use it with --granularity probe" in capsys.readouterr().err and not ft.exists()


PROBE_EXPERIMENT = {  # the smallest experiment a probe-rule variant runs in (synthetic data, small-cnn)
    "name": "tiny-probe",
    "seed": 0,
    "base": {
        "dataset": "synthetic",
        "model": "small-cnn",
        "limit": 200,
        "limit_test": 40,
        "train": {"epochs": 1, "batch_size": 64},
    },
    "threat": {"norm": "linf", "eps": 0.25},
    "evaluation": {"attacks": "pgd:steps=2", "limit": 40},
    "analysis": {"attack": "pgd:steps=2", "criteria": ["taylor"], "limit": 64, "curve_limit": 0},
}


def test_an_experiment_variant_on_hardens_recipe_gets_the_probe_quotas_and_its_random_control_random_entries():
    """`recipe: harden` follows harden's default (round 20: the probe rule with the analysis' quotas); a
    `select: random` control that names no rule gets random single entries (the probe's mask never depends on
    --select), and a variant that names its rule or its quotas keeps them."""
    from advtune.runs.experiment.variants import with_recipe

    v = with_recipe({"name": "h", "recipe": "harden"})
    assert (v["select"], v["granularity"], v["probe_quotas"]) == ("top", "probe", True)
    r = with_recipe({"name": "r", "recipe": "harden", "select": "random", "params_like": "h"})
    assert (r["select"], r["granularity"]) == ("random", "sparse") and "probe_quotas" not in r
    assert "probe_quotas" not in with_recipe({"name": "s", "recipe": "harden", "granularity": "shares"})
    assert with_recipe({"name": "h", "recipe": "harden", "head": True})["probe_quotas"] is True  # head: quotas on
    assert v["head"] is None and "head" not in r  # harden's auto, decided by the fine-tuning on the model
    assert "head" not in with_recipe({"name": "g", "recipe": "harden", "probe_quotas": False})
    assert with_recipe({"name": "n", "recipe": "harden", "head": False})["head"] is False
    assert with_recipe({"name": "g", "recipe": "harden", "probe_quotas": False})["probe_quotas"] is False
    # harden's augmentation (none, round 28) unless the variant's train: names one
    assert v["train"]["augment"] == "none"
    assert (
        with_recipe({"name": "c", "recipe": "harden", "train": {"augment": "crop-flip"}})["train"]["augment"]
        == "crop-flip"
    )
    # the report says what each row drew: the probe's quotas, and random single entries (not units) for its control
    from advtune.report.narrative import describe, headline

    common = {"kind": "finetune", "eps": 0.3, "attack": "pgd:steps=5", "grad_evals": 9000, "trainable_params": 500}
    sel = {**common, "variant": "h", "select": "top", "granularity": "probe", "probe_quotas": True}
    sel["criterion"] = "taylor"
    ctrl = {**common, "variant": "r", "select": "random", "granularity": "sparse", "params_like": "h"}
    assert "moved most, quotas by taylor" in describe(sel)
    rows = [{**sel, "robust_acc": 0.8, "clean_acc": 0.9}, {**ctrl, "robust_acc": 0.1, "clean_acc": 0.9}]
    said = " ".join(headline(rows))
    assert "random single entries with as many" in said and "random units" not in said


def test_head_auto_is_decided_alike_by_harden_and_an_experiment_variant_and_a_finished_variant_still_matches():
    """--head auto (None) has one home (runs/selecting.resolve_head): on with the probe's quotas where the output layer
    costs at most a quarter of the budget the norms leave. harden's recipe and a fine-tuning whose head is None (an
    experiment's `recipe: harden` variant) decide it alike, so a tiny budget gets the quotas alone instead of a
    refusal; a variant recorded with head: true before the fine-tuning decided it still matches its settings."""
    from dataclasses import replace

    from advtune.components import output_layer
    from advtune.data import load_dataset
    from advtune.models import model_for
    from advtune.runs.configs import FinetuneRun
    from advtune.runs.experiment.rerun import same_settings as _same_settings
    from advtune.runs.finetune import decided
    from advtune.runs.harden_plan import resolve_recipe
    from advtune.runs.selecting import HEAD_AUTO_SHARE, resolve_head
    from advtune.train.lowrank import own_params

    ds = load_dataset("synthetic", limit=64, limit_test=8)
    model = model_for(ds, "small-cnn")
    example = ds.train.to_float(ds.train.x[:1])
    cost = own_params(model.get_submodule(output_layer(model, example)))
    roomy = 0.1  # 10% of the model: the output layer is far under a quarter of it
    tight = int(cost / HEAD_AUTO_SHARE) - 1  # one entry too few for auto to take the output layer
    assert cost < tight  # with --head on, the output layer would still fit: auto says no, not a refusal
    assert resolve_head(model, None, True, roomy, False, example) is True
    assert resolve_head(model, None, True, tight, False, example) is False
    assert resolve_head(model, None, True, int(cost / HEAD_AUTO_SHARE), False, example) is True  # at the line
    assert resolve_head(model, None, False, roomy, False, example) is False  # without the quotas: off
    assert resolve_head(model, True, False, tight, False, example) is True  # given: as given
    assert resolve_head(model, False, True, roomy, False, example) is False
    for params, want in ((roomy, True), (tight, False)):
        recipe = resolve_recipe(model, Recipe(params=params), example)
        run = FinetuneRun(base="b", out="o", eps=0.3, select="a", granularity="probe", probe_quotas=True, head=None)
        assert recipe.head is want and decided(model, ds, replace(run, params=params), "a").head is want
    plain = FinetuneRun(base="b", out="o", eps=0.3, select="a", granularity="sparse", params=roomy, head=None)
    assert decided(model, ds, plain, "a").head is False  # auto is on with the probe's quotas only
    variant = {"name": "h", "recipe": "harden", "granularity": "probe", "probe_quotas": True, "params": 0.1}
    on, off, auto = ({**variant, "head": h} for h in (True, False, None))
    assert _same_settings(on, auto, decided_head=True)  # round 21 filled head: true before the fine-tuning decided
    assert not _same_settings(on, auto, decided_head=False) and not _same_settings(off, auto, decided_head=False)
    assert _same_settings(auto, auto, decided_head=False) and _same_settings(auto, on, decided_head=True)
    assert not _same_settings(auto, off, decided_head=True) and not _same_settings(auto, on, decided_head=False)
    assert _same_settings(auto, off) and not _same_settings(auto, on)  # nothing decided yet: auto counts as off
    # a variant recorded before harden's --augment (round 28) has no train.augment: none is the same run
    filled = {**variant, "train": {"lr": 0.003, "augment": "none"}}
    assert _same_settings({**variant, "train": {"lr": 0.003}}, filled)
    assert not _same_settings(
        {**variant, "train": {"lr": 0.003}}, {**filled, "train": {"lr": 0.003, "augment": "crop-flip"}}
    )


def test_an_experiment_harden_variant_whose_output_layer_fills_its_budget_runs_without_it(tmp_path):
    """End to end: `recipe: harden` with a budget smaller than the output layer (1,290 entries on small-cnn) was
    refused ("--head: the output layer ... whole budget") where harden turns --head auto off; now the fine-tuning
    decides it, records head: false, and a later run of the same folder compares settings with what was decided."""
    from advtune.runs import experiment

    cfg = {
        **PROBE_EXPERIMENT,
        "variants": [
            {"name": "standard", "kind": "standard"},
            {"name": "h", "recipe": "harden", "params": 1000, "budget": 1200, "points": 0},
        ],
    }
    out = tmp_path / "x"
    experiment.run(cfg, out)
    ran = json.loads((out / "h" / "config.json").read_text())["run"]
    assert ran["head"] is False and ran["probe_quotas"] is True  # decided on the model, recorded as decided
    assert json.loads((out / "variant-settings.json").read_text())["h"]["head"] is None  # the variant said auto
    experiment.run({**cfg, "variants": [cfg["variants"][0], {**cfg["variants"][1], "head": False}]}, out)  # as ran
    with pytest.raises(AdvtuneError, match="variant h in .* was run with other settings"):
        experiment.run({**cfg, "variants": [cfg["variants"][0], {**cfg["variants"][1], "head": True}]}, out)


def test_probe_quotas_with_head_train_the_output_layer_whole_out_of_the_same_budget(tmp_path, capsys):
    """--head with the probe's quotas (#21, round 21): the analysis scores no output layer, so the quotas give it
    nothing; with --head it trains whole, paid first, and the scored layers share what is left by their scores.
    Without the quotas (the global ranking lets its entries compete) --head is refused before the probe trains."""
    import advtune
    from advtune.cli import main
    from advtune.components import output_layer
    from advtune.data import load_dataset
    from advtune.models import load_model
    from advtune.train.lowrank import own_params
    from advtune.train.sparse import layer_quotas
    from advtune.vulnerability import rank_layers
    from cli_helpers import train_argv

    base = tmp_path / "base"
    assert main(train_argv(base, limit=400, limit_test=40)) == 0
    model = load_model(base)[0]
    ds = load_dataset("synthetic", limit=400, limit_test=40)
    head = output_layer(model, ds.train.to_float(ds.train.x[:1]))
    recipe = Recipe(granularity="probe", analysis_limit=200)  # the default: --head auto = on with the quotas
    res = advtune.harden(model, ds, eps=0.2, budget=8000, recipe=recipe, evaluation="fgsm")
    sel = res.record.selection
    total = sum(p.numel() for p in model.parameters())
    budget = int(round(0.1 * total))
    cost = own_params(model.get_submodule(head))
    scores = dict(rank_layers(res.table))
    assert head not in scores  # the analysis scores no output layer: without --head it would get nothing
    sizes = {n: own_params(model.get_submodule(n)) for n in scores}
    want = {n: k for n, k in layer_quotas(sizes, scores, budget - cost).items() if k}
    assert sel["params_by_layer"] == {**want, head: cost}  # whole, and paid out of the same budget
    tuned = dict(res.model.named_parameters())
    for name, p in model.get_submodule(head).named_parameters():
        # trained (without --head none of its entries moves; an entry behind a dead ReLU gets no gradient)
        assert (tuned[f"{head}.{name}"] != p).float().mean() > 0.5
    with pytest.raises(AdvtuneError, match="head with probe_quotas=False"):
        Recipe(granularity="probe", head=True, probe_quotas=False)
    analysis = tmp_path / "analysis"
    argv_a = ["analyze", str(base), "--eps", "0.2", "--attack", "pgd:steps=2", "--limit", "100", "--curve-limit", "0"]
    assert main([*argv_a, "--out", str(analysis), "--quiet"]) == 0
    ft = tmp_path / "ft"
    argv = ["finetune", str(base), "--eps", "0.2", "--granularity", "probe", "--head", "--select", str(analysis)]
    assert main([*argv, "--params", "0.1", "--budget", "4000", "--limit", "200", "--out", str(ft), "--quiet"]) == 2
    assert "needs --probe-quotas" in capsys.readouterr().err and not (tmp_path / "ft.probe").exists()
    argv.append("--probe-quotas")  # an output layer that costs the whole budget: refused before the probe trains
    assert main([*argv, "--params", str(cost), "--budget", "4000", "--limit", "200", "--out", str(ft), "--quiet"]) == 2
    assert f"--head: the output layer {head}" in capsys.readouterr().err and not (tmp_path / "ft.probe").exists()
    assert main([*argv, "--params", "0.1", "--budget", "4000", "--limit", "200", "--out", str(ft), "--quiet"]) == 0
    kept = json.loads((ft / "selection.json").read_text())
    sizes = {n: p.numel() for n, p in model.get_submodule(head).named_parameters()}
    assert kept["whole"] == [head] and all(len(kept["entries"][f"{head}.{n}"]) == k for n, k in sizes.items())


def test_probe_share_is_refused_out_of_range_or_without_the_probe_rule_before_the_base_is_read(tmp_path, capsys):
    """--probe 2, or --probe with another granularity (ignored before: a fine-tuning started on the defaults), and the
    probe rule's other settings are refused in one line before the base folder or the data are read."""
    from advtune.cli import main

    missing = tmp_path / "no-such-base"  # never read: the settings are refused first
    out = ["--out", str(tmp_path / "ft"), "--quiet"]
    for argv, match in (
        (["finetune", str(missing), "--eps", "0.2", "--probe", "2"], "--probe must be a share of the budget in (0, 1)"),
        (["finetune", str(missing), "--eps", "0.2", "--probe", "0.5"], "use it with --granularity probe, not unit"),
        (["finetune", str(missing), "--eps", "0.2", "--granularity", "sparse", "--probe", "0.3"], "not sparse"),
        (["finetune", str(missing), "--eps", "0.2", "--granularity", "probe", "--params", "0.1"], "give --budget"),
        (["harden", str(missing), "--eps", "0.3", "--granularity", "unit", "--probe", "0.5"], "not unit"),
    ):
        assert main([*argv, *out]) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "ft").exists()
