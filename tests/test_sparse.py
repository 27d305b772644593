"""The sparse rule (#21, round 14): single weight entries of every layer, quotas by the layers' scores and entries
by their adversarial Fisher. Only the selected entries move (every other one bit-exact), the budget is never
exceeded, the selection survives selection.json, and harden with it records, patches and reloads exactly."""

from __future__ import annotations

import json

import pytest
import torch

from advtune.attacks import PGD
from advtune.components import Component
from advtune.data import TensorData
from advtune.errors import AdvtuneError
from advtune.threat import ThreatModel
from advtune.train import TrainConfig, adversarial, fit
from advtune.train.sparse import SparseEntries, layer_quotas, sparse_selection
from advtune.vulnerability import ScoreTable
from advtune.vulnerability.entries import entry_fisher
from test_selective import bn_net

THREAT = ThreatModel("linf", 0.1)
CFG = TrainConfig(epochs=1, batch_size=32, optimizer="adam", lr=0.01, seed=1)
SIZES = {"net.conv1": 80, "net.conv2": 1168, "net.fc": 1028}  # bn_net's conv/linear layers: weight + bias


@pytest.fixture(scope="module")
def data():
    from advtune.data import synthetic_blobs

    x, y = synthetic_blobs(256, generator=torch.Generator().manual_seed(3))
    return TensorData((x * 255).round().to(torch.uint8), y)


def table(with_fc: bool = False) -> ScoreTable:
    comps = [Component("net.conv1", i) for i in range(8)] + [Component("net.conv2", i) for i in range(16)]
    scores = [1.0 / 8] * 8 + [3.0 / 16] * 16
    if with_fc:
        comps += [Component("net.fc", i) for i in range(4)]
        scores += [1.0 / 4] * 4
    return ScoreTable("taylor", tuple(comps), tuple(scores))


def test_layer_quotas_share_the_budget_by_score_and_fill_small_layers_whole():
    q = layer_quotas(SIZES, {"net.conv1": 1.0, "net.conv2": 3.0, "net.fc": 1.0}, 900)
    assert q["net.conv1"] == 80  # its share (180) pays for the whole layer: the surplus goes to the others
    assert q["net.conv2"] == 615 and q["net.fc"] == 205 and sum(q.values()) == 900  # 820 split 3:1
    assert sum(layer_quotas(SIZES, {"net.conv1": 0.3, "net.conv2": 0.7}, 1001).values()) == 1001  # rounding
    assert layer_quotas(SIZES, {"net.conv1": -1.0, "net.conv2": 2.0}, 500)["net.conv1"] == 0  # negative: nothing
    assert layer_quotas(SIZES, {}, 99_999) == SIZES  # no score: equal shares, capped at every layer's size


def test_entries_are_the_largest_fisher_scores_and_only_they_train(data):
    model = bn_net()
    x, y = data.tensors()
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    fisher, evals = entry_fisher(model, data, PGD(THREAT, steps=2), n=64, seed=0)
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == was  # as it was
    assert evals == 64 * 3 and all(bool((f >= 0).all()) for f in fisher.values())
    assert float(fisher["net.conv2.weight"].sum()) > 0
    sel = sparse_selection(model, 900, {"net.conv1": 1.0, "net.conv2": 3.0}, fisher, norms=("net.bn1",))
    masks = sel.masks(model)
    assert bool(masks["net.conv1.weight"].all()) and bool(masks["net.bn1.weight"].all())
    conv2 = torch.cat([masks["net.conv2.weight"].flatten(), masks["net.conv2.bias"]])
    scores = torch.cat([fisher["net.conv2.weight"].flatten(), fisher["net.conv2.bias"]])
    assert int(conv2.sum()) == 900 - 80
    assert float(scores[conv2].min()) >= float(scores[~conv2].max())  # the largest entries, none passed over
    assert "net.fc.weight" not in masks  # unscored: frozen
    assert sel.trainable_params(model) == 900 + 16 and sel.changed_entries() == sel.trainable_params()
    assert sel.by_layer(model)["net.fc"] == (0, 1028) and sel.by_layer(model)["net.conv2"] == (820, 1168)
    assert sel.params_by_layer(model)["net.conv1"] == 80 and not sel.is_everything(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from advtune.cost import CostMeter

    meter = CostMeter()
    fit(model, data, adversarial(PGD(THREAT, steps=1)), CFG, selection=sel, meter=meter)
    assert meter.trainable_params == sel.trainable_params(model)
    after = model.state_dict()
    for name, m in masks.items():  # what is not selected is bit-exact; the selected entries moved
        assert torch.equal(after[name][~m], before[name][~m]), name
        assert not torch.equal(after[name][m], before[name][m]), name
    for name in ("net.fc.weight", "net.fc.bias", "net.bn2.weight", "net.bn2.running_mean"):
        assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["net.bn1.running_mean"], before["net.bn1.running_mean"])  # norms: stats move


def test_entry_scores_are_per_example_squared_gradients_whatever_the_batching(data):
    """The empirical Fisher FISH uses: each example's own gradient squared, then summed (not the square of a batch
    mean, which would change with the batch size); the vectorized path equals a plain per-example loop."""
    import torch.nn.functional as F

    from advtune.vulnerability.entries import _per_example_squares

    model = bn_net().eval()
    x, y = data.tensors()
    x, y = x[:10], y[:10]
    params = dict(model.named_parameters())
    got = _per_example_squares(model, params, x, y)
    for i in range(10):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(params.values()))
        for (k, _), g in zip(params.items(), grads):
            got[k] -= g.pow(2)
    assert all(float(v.abs().max()) < 1e-6 for v in got.values())


def test_selection_json_round_trips_and_a_malformed_or_foreign_one_is_refused(data):
    from advtune.train.lowrank import selection_from_json

    model = bn_net()
    fisher, _ = entry_fisher(model, data, PGD(THREAT, steps=1), n=32, seed=0)
    sel = sparse_selection(model, 1500, {"net.conv1": 1.0, "net.conv2": 2.0}, fisher, whole=("net.fc",))
    back = selection_from_json(json.loads(json.dumps(sel.to_json())), model)
    assert isinstance(back, SparseEntries) and back.whole == ("net.fc",)
    assert back.entries.keys() == sel.entries.keys()
    assert all(torch.equal(back.entries[n], m) for n, m in sel.entries.items())
    bad = sel.to_json()
    bad["entries"]["net.conv1.weight"] = [10**6]
    with pytest.raises(AdvtuneError, match="sparse selection.json is malformed"):
        selection_from_json(bad, model)
    for key, value in (("format", "advtune-selection/1"), ("entries", {**sel.to_json()["entries"]})):
        bad = {**sel.to_json(), key: value}
        if key == "entries":
            bad["entries"]["net.conv1.weight"] = [-1]
        with pytest.raises(AdvtuneError, match="sparse selection.json is malformed"):
            selection_from_json(bad, model)
    for index in (1.5, True, "3"):  # never truncated or coerced into another entry
        bad = sel.to_json()
        bad["entries"]["net.conv1.weight"] = [index]
        with pytest.raises(AdvtuneError, match="sparse selection.json is malformed"):
            selection_from_json(bad, model)
    other = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3))
    with pytest.raises(AdvtuneError, match="made for a different model"):
        selection_from_json(sel.to_json(), other)


def test_bad_sparse_requests_are_one_line_errors():
    from advtune.recipe import Recipe
    from advtune.runs.selecting import make_selection, select_from_table

    model = bn_net()
    with pytest.raises(AdvtuneError, match="use it through finetune or harden"):
        select_from_table(table(), model, 0.1, False, params=900, granularity="sparse")
    with pytest.raises(AdvtuneError, match="needs a parameter budget"):
        select_from_table(table(), model, 0.1, False, granularity="sparse", entry_scores={})
    with pytest.raises(AdvtuneError, match="raise --params"):  # the norms cost the whole budget
        make_selection(model, table(), 0.1, "taylor", False, 0, 40, "sparse", None, True, entry_scores={})
    assert Recipe(granularity="sparse", norms=True, head=True).granularity == "sparse"


def test_harden_sparse_records_patches_and_reloads_exactly(tmp_path, capsys):
    """`advtune harden --granularity sparse` end to end: the record says what trained and what scoring it cost,
    every changed entry is a selected one, and the patch rebuilds the hardened weights bit for bit."""
    from advtune.cli import main
    from advtune.models import load_model
    from cli_helpers import check_sparse_harden, train_argv

    base = tmp_path / "base"
    assert main(train_argv(base, limit=400, limit_test=40)) == 0
    out = tmp_path / "hard"
    argv = ["harden", str(base), "--eps", "0.2", "--granularity", "sparse", "--params", "0.1", "--limit", "400"]
    argv += ["--limit-test", "40", "--budget", "12000", "--evaluation", "fgsm", "--out", str(out), "--quiet"]
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "entries chosen on 360 adversarial training examples" in printed and "net.conv" in printed
    s = json.loads((out / "summary.json").read_text())
    sel = s["selection"]
    base_model = load_model(base)[0]
    total = sum(p.numel() for p in base_model.parameters())
    assert sel["kind"] == "sparse" and 0 < sel["trainable_params"] <= 0.1 * total + 1
    assert sel["changed_params"] == sel["trainable_params"] and sel["scoring"]["grad_evals"] > 0
    check_sparse_harden(base, out, sel["trainable_params"])

    # the entry scoring is counted with the analysis, as part of choosing what trains
    analysis = json.loads((out / "analysis" / "cost.json").read_text())["grad_evals"]
    assert s["cost"]["analysis_grad_evals"] == analysis + sel["scoring"]["grad_evals"]
    assert s["cost"]["harden_grad_evals"] == (
        s["cost"]["analysis_grad_evals"] + s["cost"]["finetune_grad_evals"] + s["cost"]["checkpoint_grad_evals"]
    )
    # `advtune finetune` from harden's analysis: bad input is refused before the scoring's work, and a resume
    # trains the recorded mask without scoring again
    import advtune.runs.finetune as finetune_module

    calls = []
    real = finetune_module.entry_fisher

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    ft = tmp_path / "ft"
    common = ["finetune", str(base), "--select", str(out / "analysis"), "--granularity", "sparse", "--eps", "0.2"]
    common += ["--limit", "200", "--limit-test", "40", "--epochs", "1", "--attack", "pgd:steps=1", "--quiet"]
    finetune_module.entry_fisher = counted
    try:
        for extra, match in ((["--params", "0.1", "--keep-best", "2"], "give --val"), ([], "needs a parameter budget")):
            assert main([*common, *extra, "--out", str(ft)]) == 2
            assert match in capsys.readouterr().err and not ft.exists() and not calls
        assert main([*common, "--params", "0.1", "--head", "--out", str(ft)]) == 0 and len(calls) == 1
        first = json.loads((ft / "selection.json").read_text())
        assert first["kind"] == "sparse" and first["whole"]
        assert main([*common, "--params", "0.1", "--head", "--out", str(ft), "--resume"]) == 0
        assert len(calls) == 1 and json.loads((ft / "selection.json").read_text()) == first
        assert json.loads((ft / "summary.json").read_text())["selection"]["scoring"]["grad_evals"] > 0
    finally:
        finetune_module.entry_fisher = real


def test_random_sparse_control_draws_as_many_entries_uniformly_outside_the_output_layer():
    from advtune.runs.selecting import describe_selection, make_selection

    model = bn_net()
    sel = make_selection(model, "random", 0.1, "taylor", False, 3, params=900, granularity="sparse", norms=True)
    again = make_selection(model, "random", 0.1, "taylor", False, 3, params=900, granularity="sparse", norms=True)
    assert isinstance(sel, SparseEntries) and sel.norms == ("net.bn1", "net.bn2")
    assert sel.trainable_params(model) == 900 and all(torch.equal(sel.entries[k], m) for k, m in again.entries.items())
    by = describe_selection(sel, model)["by_layer"]
    assert by["net.fc"][0] == 0 and by["net.conv1"][0] + by["net.conv2"][0] == 900 - 48  # the norms paid first
    assert by["net.conv2"][0] > by["net.conv1"][0]  # by size, not by score
    with pytest.raises(AdvtuneError, match="needs a parameter budget"):
        make_selection(model, "random", 0.1, "taylor", False, 3, granularity="sparse")
    from advtune.report.narrative import describe
    from advtune.runs.selecting import resolve_norms

    assert resolve_norms(model, None, "random", "sparse", 900) is True  # auto norms as the rule it controls
    row = {"kind": "finetune", "select": "random", "granularity": "sparse", "norms": True, "attack": "pgd:steps=5"}
    row["selected_by_layer"] = by
    words = describe(row)
    assert words.startswith("control: random single entries") and "normalization" in words and "entries" in words


def test_the_random_entries_control_trains_the_head_whole_where_the_rule_does():
    """harden's rule trains the output layer whole (--head) inside its count; its control spread that count over
    random hidden entries instead, crediting the vulnerability map with what the head adds."""
    from advtune.runs.selecting import describe_selection, make_selection

    model = bn_net()
    fc = sum(p.numel() for p in model.net.fc.parameters())
    sel = make_selection(model, "random", 0.1, "taylor", False, 3, params=1800, granularity="sparse", head=True)
    by = describe_selection(sel, model)["by_layer"]
    assert sel.whole == ("net.fc",) and sel.trainable_params(model) == 1800
    assert by["net.fc"][0] == fc and by["net.conv1"][0] + by["net.conv2"][0] == 1800 - fc
    from advtune.report.narrative import describe

    row = {"kind": "finetune", "select": "random", "granularity": "sparse", "head": True, "attack": "pgd:steps=5"}
    assert "random single entries (by layer size, no score), and the output layer whole" in describe(row)
    with pytest.raises(AdvtuneError, match="--head trains the output layer whole"):  # units: no head to add
        make_selection(model, "random", 0.1, "taylor", False, 3, params=1800, granularity="unit", head=True)
