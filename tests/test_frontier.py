"""The frontier: snapshots along each run, each evaluated with the protocol, costs counted alike on
every curve, resumable, and the findings computed from the records."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml

from advtune.cli import main
from advtune.errors import AdvtuneError
from advtune.frontier import Frontier, as_points, merge_curves, reference_plateau, robust_at, verdicts
from advtune.models import load_state

FRONTIER = {
    "name": "tiny-frontier",
    "seed": 0,
    "base": {
        "dataset": "synthetic",
        "model": "small-cnn",
        "limit": 256,
        "limit_test": 64,
        "train": {"epochs": 1, "batch_size": 64},
    },
    "threat": {"norm": "linf", "eps": 0.25},
    "evaluation": {"attacks": "pgd:steps=3", "limit": 64},
    "analysis": {"attack": "pgd:steps=2", "criteria": ["taylor"], "limit": 64, "curve_limit": 0},
    "variants": [
        {"name": "standard", "kind": "standard"},
        {"name": "at", "kind": "train", "attack": "pgd:steps=2", "reference": True, "budget": 1536, "points": 3},
        {
            "name": "sel",
            "kind": "finetune",
            "select": "top",
            "params": 2000,
            "attack": "pgd:steps=2",
            "budget": 1536,
            "points": 2,
        },
        {
            "name": "rnd",
            "kind": "finetune",
            "select": "random",
            "params_like": "sel",
            "attack": "pgd:steps=2",
            "budget": 1536,
            "points": 2,
        },
    ],
}


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frontier")
    cfg = tmp / "f.yaml"
    cfg.write_text(yaml.safe_dump(FRONTIER))
    out = tmp / "out"
    assert main(["experiment", str(cfg), "--out", str(out), "--quiet"]) == 0
    return cfg, out


def test_snapshots_are_taken_at_the_budget_points_and_evaluated(done):
    _, out = done
    pts = json.loads((out / "frontier.json").read_text())["points"]
    by = {}
    for p in pts:
        by.setdefault(p["variant"], []).append(p)
    # AT from scratch: budget 1536 = 8 steps of 64 x (2 + 1); 3 points at steps 3, 5, 8
    assert [p["step"] for p in by["at"]] == [3, 5, 8]
    assert [p["train_grad_evals"] for p in by["at"]] == [3 * 192, 5 * 192, 8 * 192]
    assert all(p["base_grad_evals"] == 0 and p["total_grad_evals"] == p["train_grad_evals"] for p in by["at"])
    # fine-tuning curves include the base model's training (256 clean gradient evaluations) ...
    for name in ("sel", "rnd"):
        assert [p["step"] for p in by[name]] == [2, 4]  # batch 128 (the fine-tuning default): 4 steps
        assert all(p["base_grad_evals"] == 256 for p in by[name])
    # ... and the selective one also its analysis
    assert all(p["analysis_grad_evals"] > 0 for p in by["sel"]) and all(
        p["analysis_grad_evals"] == 0 for p in by["rnd"]
    )
    assert all(
        p["total_grad_evals"] == p["train_grad_evals"] + p["base_grad_evals"] + p["analysis_grad_evals"]
        for p in pts
        if p["kind"] != "standard"
    )
    # every snapshot holds its own protocol record, and the final row is the last snapshot's
    for name in ("at", "sel", "rnd"):
        snaps = sorted((out / name / "snapshots").glob("step-*"))
        assert len(snaps) == len(by[name])
        for snap, p in zip(snaps, by[name]):
            ev = json.loads((snap / "eval-protocol.json").read_text())
            assert ev["worst_case_accuracy"] == p["robust_acc"] and ev["examples"] == 64
        final = json.loads((out / name / "eval-protocol.json").read_text())
        assert final["worst_case_accuracy"] == by[name][-1]["robust_acc"]
        # ... because the last snapshot IS the final model (same weights), not by construction alone
        last, final_w = load_state(snaps[-1] / "model.safetensors"), load_state(out / name / "model.safetensors")
        assert last.keys() == final_w.keys() and all(torch.equal(last[k], final_w[k]) for k in last)
    # parameter budgets: the selection fits in 2000 entries, and the random control matches what it trains
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    used = rows["sel"]["trainable_params"]
    assert 2000 - 600 < used <= 2000
    assert used - 600 < rows["rnd"]["trainable_params"] <= used


def test_rerun_evaluates_nothing_again(done, monkeypatch):
    cfg, out = done

    def boom(*a, **k):
        raise AssertionError("a finished curve was evaluated again")

    monkeypatch.setattr("advtune.runs.evaluate.run", boom)
    assert main(["experiment", str(cfg), "--out", str(out), "--quiet"]) == 0


def test_an_interrupted_evaluation_resumes_where_it_stopped(done, monkeypatch):
    """Lose one snapshot's evaluation and the final one (as if killed while evaluating): the re-run
    evaluates exactly that snapshot again, no training, and the records come back the same."""
    import advtune.runs.evaluate as evaluate_job

    cfg, out = done
    snap = sorted((out / "at" / "snapshots").glob("step-*"))[1]
    kept = json.loads((snap / "eval-protocol.json").read_text())["worst_case_accuracy"]
    (snap / "eval-protocol.json").unlink()
    (out / "at" / "eval-protocol.json").unlink()
    seen = []
    real = evaluate_job.run
    monkeypatch.setattr(evaluate_job, "run", lambda run: seen.append(run.run) or real(run))
    monkeypatch.setattr("advtune.runs.train.run", lambda *a, **k: pytest.fail("trained again"))
    assert main(["experiment", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert seen == [str(snap)]
    assert json.loads((snap / "eval-protocol.json").read_text())["worst_case_accuracy"] == kept


def test_report_shows_the_frontier_and_its_findings(done):
    _, out = done
    assert main(["report", str(out), "--quiet"]) == 0
    md = (out / "report.md").read_text()
    assert (out / "frontier.png").is_file() and "frontier.png" in md
    record = json.loads((out / "frontier.json").read_text())
    assert record["schema"] == 1 and record["kind"] == "frontier"  # a typed record: Frontier of FrontierPoints
    assert [p.to_json() for p in Frontier.read(out / "frontier.json").points] == record["points"]
    pts = record["points"]
    plat = reference_plateau(pts)
    assert plat.variant == "at" and plat.robust_acc == max(p["robust_acc"] for p in pts if p["variant"] == "at")
    verb = "is still rising at its last checkpoint," if plat.still_rising else "plateaus at"
    assert f"{verb} {100 * plat.robust_acc:.2f}%" in md
    for v in verdicts(pts, plat):
        assert v.best_robust_acc == max(p["robust_acc"] for p in pts if p["variant"] == v.variant)
        assert f"**{v.variant}**" in md
    assert "read off the evaluated test images after the fact" in md  # a best-of-N on test is said to be one


def test_plateau_and_budget_arithmetic():
    pts = [
        {"variant": "at", "kind": "train", "reference": True, "total_grad_evals": c, "robust_acc": r, "clean_acc": 0.9}
        for c, r in ((100, 0.2), (200, 0.80), (300, 0.895), (400, 0.90), (500, 0.899))
    ]
    pts += [
        {
            "variant": "s",
            "kind": "finetune",
            "select": "top",
            "param_share": 0.05,
            "total_grad_evals": c,
            "robust_acc": r,
            "clean_acc": 0.95,
        }
        for c, r in ((30, 0.5), (70, 0.885), (90, 0.89))
    ]
    plat = reference_plateau(pts)
    assert plat.robust_acc == 0.90 and plat.cost == 300  # first point within 1 point of the best
    assert plat.first_robust_acc == 0.895 and plat.best_cost == 400  # the two checkpoints are told apart
    (v,) = verdicts(pts, plat)
    assert v.reached_target and v.cost_to_target == 70 and v.cost_share_of_reference == pytest.approx(70 / 300)
    assert v.robust_at_reference_budget == 0.885  # 25% of 300 = 75: the points at 30 and 70
    assert robust_at(pts, "s", 50) == 0.5 and robust_at(pts, "s", 10) is None
    # two curves marked as references (PGD-AT and fast AT): the stronger one is the baseline, not the first name
    fast = [{**p, "variant": "a-fast-at", "robust_acc": 0.8 * p["robust_acc"]} for p in pts if p["variant"] == "at"]
    assert reference_plateau(pts + fast).variant == "at"


def test_val_select_scores_runs_on_training_images_they_never_saw(tmp_path, monkeypatch, capsys):
    """bench/val_select.py (choosing a default without the test split, #21): it evaluates a run on the
    training images past the run's --limit, reports them as such, and refuses a run that saw them all."""
    from pathlib import Path

    from cli_helpers import train_argv

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import val_select

    run = tmp_path / "std"
    assert main(train_argv(run, limit=300, limit_test=20)) == 0
    data, limit = val_select.unseen_tail(run, 50)
    assert limit == 300 and len(data.test) == 50
    from advtune.data import load_dataset

    full = load_dataset("synthetic")
    assert torch.equal(data.test.x, full.train.x[300:350]) and torch.equal(data.test.y, full.train.y[300:350])
    assert val_select.main([str(run), "--eps", "0.1", "--n", "50", "--attacks", "fgsm"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["val_images"] == "train[300:350]" and 0 <= line["robust"] <= line["clean"] <= 1
    with pytest.raises(AdvtuneError, match="no 5000 unseen ones"):
        val_select.unseen_tail(run, 5000)
    with pytest.raises(AdvtuneError, match="not a finished run folder"):  # a run that never finished: one line
        val_select.unseen_tail(tmp_path / "never-ran", 50)
    # a fine-tuning on 200 images of a base trained on 300: the tail starts after the base's (its own limit alone
    # would have validated on images the base was trained on)
    ft = tmp_path / "ft"
    argv = ["finetune", str(run), "--eps", "0.1", "--select", "all", "--attack", "fgsm", "--limit", "200"]
    assert main([*argv, "--out", str(ft), "--quiet"]) == 0
    assert val_select.unseen_tail(ft, 50)[1] == 300
    # an audit: weights brought in (trained on who knows which images), or a base whose record is gone: unknown
    brought = tmp_path / "brought"
    weights = ["--weights", str(run / "model.safetensors"), "--epochs", "0"]
    assert main(train_argv(brought, limit=300, limit_test=20, extra=tuple(weights))) == 0
    with pytest.raises(AdvtuneError, match=r"trained on all \(or an unknown share\) of"):
        val_select.unseen_tail(brought, 50)
    (run / "config.json").rename(run / "gone.json")
    with pytest.raises(AdvtuneError, match=r"trained on all \(or an unknown share\) of"):
        val_select.unseen_tail(ft, 50)


def _pt(variant, kind, cost, robust, clean=0.9, step=1):
    return {
        "variant": variant,
        "kind": kind,
        "step": step,
        "total_grad_evals": cost,
        "robust_acc": robust,
        "clean_acc": clean,
    }


def test_publishing_a_partial_run_keeps_the_published_curves_it_lacks(tmp_path, monkeypatch, caplog):
    """bench/frontier.py --publish on a machine that reran the base and one variant (#21): the variant's
    curve replaces the published one, the other published curves stay, and a run from another base model
    is refused instead of being plotted beside curves it does not share a start with."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import frontier as bench_frontier

    std = _pt("standard", "standard", 1000, 0.0, step=None)
    published = [std, _pt("a", "finetune", 1100, 0.2), _pt("a", "finetune", 1200, 0.3), _pt("b", "finetune", 1100, 0.1)]
    new = [dict(std, wall_s=99.0), _pt("b", "finetune", 1100, 0.25), _pt("c", "finetune", 1100, 0.4)]
    merged, kept = merge_curves(published, new)
    assert kept == ["a"]  # the standard model and b come from the new run
    assert [(p.variant, p.robust_acc) for p in merged] == [
        ("standard", 0.0),
        ("a", 0.2),
        ("a", 0.3),
        ("b", 0.25),
        ("c", 0.4),
    ]
    other_base = [_pt("base", "standard", 1000, 0.0, clean=0.85, step=None), new[1]]  # another name, too
    with pytest.raises(AdvtuneError, match=r"differs from the published one \(variant base vs standard.*--replace"):
        merge_curves(published, other_base)
    robust_differs = [_pt("standard", "standard", 1000, 0.01, step=None), new[1]]
    with pytest.raises(AdvtuneError, match=r"\(robust_acc 0.01 vs 0.0\)"):
        merge_curves(published, robust_differs)
    with pytest.raises(AdvtuneError, match="this run's frontier has no standard model's curve.*--replace"):
        merge_curves(published, new[1:])
    # curves trained from scratch start from no base: they join the published ones whatever this run's base was,
    # and the published standard curve stays; one fine-tuned curve beside them brings the check back
    at = _pt("at", "train", 900, 0.45)
    with caplog.at_level(logging.WARNING, logger="advtune.frontier"):
        merged, kept = merge_curves(published, [*other_base[:1], at])
    assert "standard model differs from the published one" in caplog.text  # said, not silently dropped
    assert kept == ["standard", "a", "b"] and [p.variant for p in merged] == ["standard", "a", "a", "b", "at"]
    assert merged[0].clean_acc == std["clean_acc"]
    with pytest.raises(AdvtuneError, match="differs from the published one"):
        merge_curves(published, [*other_base, at])
    # a published frontier without a standard curve takes this run's
    merged, kept = merge_curves(published[1:], [std, at])
    assert kept == ["a", "b"] and [p.variant for p in merged] == ["a", "a", "b", "standard", "at"]

    dest = tmp_path / "frontier-x-eps0.2"  # a dot in the name, as the real configs have
    (tmp_path / "frontier-x-eps0.2.json").write_text(json.dumps(Frontier(tuple(as_points(published))).to_json()))
    bench_frontier.publish(new, dest, "x", replace=False)
    on_disk = Frontier.read(tmp_path / "frontier-x-eps0.2.json").points
    assert sorted({p.variant for p in on_disk}) == ["a", "b", "c", "standard"]
    assert (tmp_path / "frontier-x-eps0.2.csv").read_text().count("\n") == 1 + len(on_disk)
    assert (tmp_path / "frontier-x-eps0.2.png").stat().st_size > 0
    assert sorted(f.name for f in tmp_path.glob("frontier-x-eps0.*")) == [
        f"frontier-x-eps0.2.{e}" for e in ("csv", "json", "png")
    ]
    bench_frontier.publish(new, dest, "x", replace=True)
    again = Frontier.read(tmp_path / "frontier-x-eps0.2.json").points
    assert sorted({p.variant for p in again}) == ["b", "c", "standard"]


def test_publish_as_needs_publish_and_a_plain_name(monkeypatch):
    """bench/frontier.py --publish-as NAME: curves from another base model go to docs/results/NAME.*; it is refused
    without --publish and with a path for a name, before anything runs."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import frontier as bench_frontier

    for argv, match in (
        (["--publish-as", "x"], "only change what --publish writes"),
        (["--publish", "--publish-as", "../x"], "plain file name"),
    ):
        monkeypatch.setattr("sys.argv", ["frontier.py", "configs/does-not-exist.yaml", *argv])
        with pytest.raises(AdvtuneError, match=match):
            bench_frontier.main()


def test_recheck_evaluates_each_curves_best_point_with_a_transfer_attack_and_merges(done, tmp_path, monkeypatch):
    """bench/recheck.py (#21, item 6): each curve's best checkpoint on the frontier's protocol is evaluated
    again, on the frontier's own eps, images and seed, with more attacks plus a transfer attack from another
    robust run (never from itself), and the records merge by variant and point into one file, refusing a
    file of another frontier or a setting the frontier was not measured at before evaluating anything."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import recheck

    _, out = done
    pts = [p for p in json.loads((out / "frontier.json").read_text())["points"] if p["variant"] == "at"]
    folder, record = recheck.frontier_point(out / "at", "best")
    best = max(pts, key=lambda p: p["robust_acc"])  # first of equals, as recheck picks
    assert folder.name == f"step-{best['step']:07d}" and record["worst_case_accuracy"] == best["robust_acc"]
    assert recheck.frontier_point(out / "at", "last")[0] == out / "at"
    assert recheck.frontier_point(out / "at", folder.name) == (folder, record)  # a snapshot by name (a table's point)
    with pytest.raises(AdvtuneError, match="--point step-9999999: no measured snapshot"):
        recheck.frontier_point(out / "at", "step-9999999")
    sources = [out / "at", out / "at" / "snapshots" / folder.name, out / "sel"]
    assert recheck.transfer_source(out / "at", sources) == (out / "sel").resolve()  # not itself, nor its snapshot

    dest = tmp_path / "recheck.json"
    argv = [str(out), "sel", "at", "--eps", "0.25", "--attacks", "pgd:steps=3,fgsm", "--out", str(dest)]
    argv += ["--transfer", f"{out / 'at'},{out / 'sel'}"]
    assert recheck.main(argv) == 0
    rows = {r["variant"]: r for r in json.loads(dest.read_text())["points"]}
    assert set(rows) == {"sel", "at"} and rows["at"]["checkpoint"] == folder.name
    assert rows["sel"]["checkpoint"] == recheck.frontier_point(out / "sel", "best")[0].name
    assert rows["sel"]["transfer_source"] == str(out / "at") and rows["at"]["transfer_source"] == str(out / "sel")
    for r in rows.values():
        ev = r["evaluation"]
        assert ev["n"] == 64 and ev["threat"]["eps"] == 0.25  # the frontier's own setting
        assert list(ev["accuracy"]) == ["fgsm", "pgd:steps=3", f"transfer:source={r['transfer_source']}"]
        assert r["robust"] == min(ev["accuracy"].values()) and 0 <= r["robust"] <= r["clean"] <= 1  # cascaded
        assert r["gate"] in ("passed", "flagged")
    assert recheck.main([*argv[:2], *argv[3:], "--point", "last"]) == 0  # "sel" at its last point: added
    kept = sorted((r["variant"], r["point"]) for r in json.loads(dest.read_text())["points"])
    assert kept == [("at", "best"), ("sel", "best"), ("sel", "last")]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": 1, "kind": "recheck", "frontier": "else", "points": []}))
    with pytest.raises(AdvtuneError, match="no re-checks of 'out'"):
        recheck.main([*argv[:-4], "--out", str(other)])
    with pytest.raises(AdvtuneError, match="measured on 64 test images"):
        recheck.main([*argv, "--n", "32"])
    with pytest.raises(AdvtuneError, match="no eval-protocol.json"):
        recheck.frontier_point(tmp_path, "best")


def test_a_seeded_replay_is_named_apart_and_trains_another_standard_model(done, tmp_path, monkeypatch):
    """bench/frontier.py --seed N (#21: the spread of a curve across seeds): the whole setting under another
    seed, as the experiment <name>-seedN in its own folder and published file; a bad seed is refused before
    anything is written, and so is a folder that holds another seed's experiment."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import frontier as bench_frontier
    from advtune.runs.experiment import run

    cfg = bench_frontier.seeded(FRONTIER, 3, "f.yaml")
    assert (cfg["name"], cfg["seed"]) == ("tiny-frontier-seed3", 3)
    assert (FRONTIER["name"], FRONTIER["seed"]) == ("tiny-frontier", 0)  # the original is left as it was
    for bad in (-1, True):
        with pytest.raises(AdvtuneError, match="seed must be an integer"):
            bench_frontier.seeded(FRONTIER, bad, "f.yaml")
    config, out = done
    with pytest.raises(AdvtuneError, match="seed 0, not 3; use a new --out"):  # never mixed into seed 0's folder
        run(cfg, out, only=["standard"])
    monkeypatch.setattr(bench_frontier, "ROOT", tmp_path)
    argv = ["frontier.py", str(config), "--seed", "3", "--only", "standard,sel", "--publish"]
    monkeypatch.setattr("sys.argv", argv)
    bench_frontier.main()
    replay = tmp_path / "runs" / "tiny-frontier-seed3"
    record = json.loads((replay / "experiment.json").read_text())
    assert record["config"]["seed"] == 3 and record["source"] == f"{config} --seed 3"
    assert (tmp_path / "docs" / "results" / "tiny-frontier-seed3.json").is_file()
    assert not (tmp_path / "docs" / "results" / "tiny-frontier.json").exists()
    seed0 = load_state(out / "standard" / "model.safetensors")
    seed3 = load_state(replay / "standard" / "model.safetensors")
    assert seed0.keys() == seed3.keys()
    assert any(not torch.equal(seed0[k], seed3[k]) for k in seed0)
