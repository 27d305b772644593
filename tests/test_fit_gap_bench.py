"""bench/fit_gap.py (#21, round 42): robustness on the images a run trained on against images it never saw, for
its final (averaged) weights and its last checkpoint's live ones; a run that held some of its images out refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from advtune.cli import main
from advtune.errors import AdvtuneError


@pytest.fixture
def fit_gap(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import fit_gap

    return fit_gap


def test_both_splits_and_both_weights_are_attacked_and_a_held_out_split_is_refused(
    tmp_path, fit_gap, capsys, monkeypatch
):
    from advtune import api
    from advtune.data import load_dataset
    from cli_helpers import train_argv

    base = tmp_path / "std"
    assert main(train_argv(base, limit=300, limit_test=20)) == 0
    ft = tmp_path / "ft"
    argv = ["finetune", str(base), "--eps", "0.1", "--select", "all", "--attack", "fgsm", "--limit", "200"]
    assert main([*argv, "--ema", "0.9", "--epochs", "2", "--out", str(ft), "--quiet"]) == 0
    full = load_dataset("synthetic")
    head = fit_gap.seen_head(ft, 50)  # the first images: trained on
    assert torch.equal(head.test.x, full.train.x[:50]) and torch.equal(head.test.y, full.train.y[:50])
    live, final = fit_gap.live_weights(ft), api.load_model(ft)
    assert any(not torch.equal(a, b) for a, b in zip(live.parameters(), final.parameters()))  # not the average
    out = tmp_path / "gap.jsonl"
    capsys.readouterr()
    args = [str(ft), "--eps", "0.1", "--n", "50", "--attacks", "pgd:steps=2, step_size=0.05,fgsm", "--live"]
    seen = []  # what each evaluation got: the weights' first tensor and the images
    evaluate = api.evaluate

    def watched(model, data, **kw):
        seen.append((next(model.parameters()).detach().clone(), data.test.x.clone()))
        return evaluate(model, data, **kw)

    monkeypatch.setattr(api, "evaluate", watched)
    assert fit_gap.main([*args, "--out", str(out)]) == 0
    monkeypatch.undo()
    first = {"final": next(final.parameters()).detach(), "live": next(live.parameters()).detach()}
    images = {"train": full.train.x[:50], "held-out": full.train.x[300:350]}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    got = {(r["weights"], r["split"], r["attack"]) for r in rows}
    specs = ("pgd:steps=2,step_size=0.05", "fgsm")
    want = {(w, s, a) for w in ("final", "live") for s in ("train", "held-out") for a in specs}
    assert got == want and len(rows) == 8
    assert {r["images"] for r in rows} == {"train[0:50]", "train[300:350]"}  # the tail starts after the base's
    assert all(0 <= r["robust"] <= r["clean"] <= 1 for r in rows)
    for r, (weights, x) in zip(rows, seen):  # each row attacked the weights and the images it names
        assert torch.equal(weights, first[r["weights"]]) and torch.equal(x, images[r["split"]]), r
    held = tmp_path / "held"
    assert main([*argv, "--val", "20", "--out", str(held), "--quiet"]) == 0
    with pytest.raises(AdvtuneError, match="held out images of its training data"):
        fit_gap.seen_head(held, 50)
    with pytest.raises(AdvtuneError, match="trained on 200 images, fewer than --n 250"):  # 200-249: only the base's
        fit_gap.seen_head(ft, 250)
    with pytest.raises(AdvtuneError, match="--n must be a positive"):
        fit_gap.seen_head(ft, -5)
    cost = json.loads((ft / "cost.json").read_text())
    (ft / "cost.json").write_text(json.dumps({**cost, "examples": 150}))  # as a probe's: less than one pass
    with pytest.raises(AdvtuneError, match="less than one pass over its 200 images"):
        fit_gap.seen_head(ft, 50)
    # the probe rule's meter starts with its probe's counts: 300 examples of which the probe's half leave 150 < 200
    config = json.loads((ft / "config.json").read_text())
    selection = config.get("selection") or {}
    (ft / "cost.json").write_text(json.dumps({**cost, "examples": 300, "grad_evals": 1000}))
    probe = {"share": 0.5, "grad_evals": 500}
    (ft / "config.json").write_text(json.dumps({**config, "selection": {**selection, "probe": probe}}))
    with pytest.raises(AdvtuneError, match="150 examples after its probe, less than one pass"):
        fit_gap.seen_head(ft, 50)
    probe["grad_evals"] = 100  # 270 of the 300 the masked stage's own: a full pass
    (ft / "config.json").write_text(json.dumps({**config, "selection": {**selection, "probe": probe}}))
    assert fit_gap.seen_head(ft, 50).test.x.shape[0] == 50
    (ft / "checkpoint.pt").unlink()
    assert fit_gap.live_weights(ft) is None  # no checkpoint: no live weights (main says so and goes on)
    with pytest.raises(AdvtuneError, match="not a finished run folder"):
        fit_gap.seen_head(tmp_path / "never-ran", 50)
