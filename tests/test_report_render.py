"""The HTML report renders in a real headless browser (Debian's chromium), when one is installed; a
record that lacks a field the report needs, or holds it malformed, is one line naming file and field."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from advtune.errors import AdvtuneError
from advtune.report import write_harden_report, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def fake_experiment(folder):
    """A results.json as `advtune experiment` writes it (two variants), without training anything."""
    import json

    rows = [
        {
            "variant": "standard",
            "kind": "standard",
            "eps": 0.3,
            "clean_acc": 0.99,
            "robust_acc": 0.0,
            "acc[pgd]": 0.0,
            "suspect": "",
            "grad_evals": 120000,
            "analysis_grad_evals": 0,
            "wall_s": 40.0,
            "flops": 1e12,
            "trainable_params": 421642,
            "total_params": 421642,
            "stopped": None,
            "eval_examples": 100,
        },
        {
            "variant": "selective-10",
            "kind": "finetune",
            "select": "top",
            "share": 0.1,
            "eps": 0.3,
            "clean_acc": 0.97,
            "robust_acc": 0.61,
            "acc[pgd]": 0.61,
            "suspect": "",
            "grad_evals": 66000,
            "analysis_grad_evals": 5000,
            "wall_s": 30.0,
            "flops": 2e12,
            "trainable_params": 40000,
            "total_params": 421642,
            "stopped": None,
            "eval_examples": 100,
        },
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"rows": rows}))
    return rows


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    fake_experiment(tmp_path / "exp")
    paths = write_report(tmp_path / "exp")
    url = paths["html"].resolve().as_uri()
    dom = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-500:]
    assert "<td>selective-10</td>" in dom.stdout and "<td>61.00%</td>" in dom.stdout
    shot = tmp_path / "shot.png"
    r = subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and shot.stat().st_size > 20_000  # a page with a table and plots, not a blank one


def fake_harden(folder):
    """A summary.json as `advtune harden` writes it, without hardening anything."""
    summary = {
        "eps": 0.2,
        "norm": "linf",
        "base": "runs/base",
        "architecture": "small-cnn",
        "before": {"clean_acc": 0.99, "robust_acc": 0.02, "suspect": []},
        "after": {"clean_acc": 0.97, "robust_acc": 0.61, "accuracy": {"apgd-ce": 0.61}, "suspect": []},
        "test_examples": 100,
        "evaluation": "apgd-ce",
        "selection": {
            "components": ["net.conv1"],
            "trainable_params": 320,
            "param_share": 0.002,
            "by_layer": {"net.conv1": [32, 32], "net.conv2": [0, 64]},
            "params_by_layer": {"net.conv1": 320},
        },
        "trainable_params": 320,
        "param_share": 0.002,
        "recipe": {"granularity": "layer", "criterion": "taylor", "eps_warmup": 0.3},
        "budget": 20000,
        "cost": {
            "base_training_grad_evals": 600,
            "analysis_grad_evals": 6600,
            "finetune_grad_evals": 20304,
            "harden_grad_evals": 26904,
        },
        "concentration": None,
        "analysis_examples": 600,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    return summary


def rewrite(path, edit):
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def report_error(write, folder) -> str:
    with pytest.raises(AdvtuneError) as e:
        write(folder)
    message = str(e.value)
    assert "\n" not in message, message
    return message


def test_a_complete_harden_record_gives_its_report(tmp_path):
    fake_harden(tmp_path / "hard")
    paths = write_harden_report(tmp_path / "hard")
    md = paths["md"].read_text()
    assert "from 2.00% to 61.00%" in md and "net.conv1: 32/32 units, 320 parameters" in md
    assert (tmp_path / "hard" / "selection.png").is_file()


def test_a_missing_field_names_the_file_and_the_field(tmp_path):
    folder = tmp_path / "hard"
    fake_harden(folder)
    rewrite(folder / "summary.json", lambda s: s["after"].pop("robust_acc"))
    message = report_error(write_harden_report, folder)
    assert message.startswith(f"{folder / 'summary.json'}: missing field 'after.robust_acc'")
    assert f"advtune harden BASE --resume --out {folder}" in message
    assert not (folder / "report.html").exists()
    # an experiment: the row and the field
    exp = tmp_path / "exp"
    fake_experiment(exp)
    rewrite(exp / "results.json", lambda r: r["rows"][1].pop("kind"))
    message = report_error(write_report, exp)
    assert message.startswith(f"{exp / 'results.json'}: missing field 'rows[1].kind'")
    assert f"advtune experiment CONFIG --out {exp}" in message


def test_a_malformed_field_names_the_file_and_the_field(tmp_path):
    folder = tmp_path / "hard"
    fake_harden(folder)
    rewrite(folder / "summary.json", lambda s: s["before"].update(clean_acc="high"))
    message = report_error(write_harden_report, folder)
    assert message.startswith(f"{folder / 'summary.json'}: field 'before.clean_acc' is \"high\", not a number")
    rewrite(folder / "summary.json", lambda s: s["before"].update(clean_acc=0.99) or s.update(cost=[1, 2]))
    message = report_error(write_harden_report, folder)
    assert message.startswith(f"{folder / 'summary.json'}: field 'cost' is [1, 2], not an object")
    fake_harden(folder)
    rewrite(folder / "summary.json", lambda s: s.update(after=None))  # a record with no evaluation after
    message = report_error(write_harden_report, folder)
    assert message.startswith(f"{folder / 'summary.json'}: field 'after' is null, not an object")
    # an experiment: a row's number as a string, an analysis file's list with a hole in it
    exp = tmp_path / "exp"
    fake_experiment(exp)
    rewrite(exp / "results.json", lambda r: r["rows"][0].update({"acc[pgd]": "0.5"}))
    message = report_error(write_report, exp)
    assert message.startswith(f"{exp / 'results.json'}: field 'rows[0].acc[pgd]' is \"0.5\", not a number")
    fake_experiment(exp)
    rewrite(exp / "results.json", lambda r: r["rows"][1].update(regrow="0.3"))  # the description formats it
    message = report_error(write_report, exp)
    assert message.startswith(f"{exp / 'results.json'}: field 'rows[1].regrow' is \"0.3\", not a number")
    fake_experiment(exp)
    point = {"variant": "standard", "kind": "standard", "total_grad_evals": 120000, "clean_acc": 0.99}
    (exp / "frontier.json").write_text(json.dumps({"points": [{**point, "robust_acc": "none"}]}))
    message = report_error(write_report, exp)
    assert message.startswith(f"{exp / 'frontier.json'}: field 'points[0].robust_acc' is \"none\", not a number")
    assert f"advtune experiment CONFIG --out {exp}" in message
    (exp / "frontier.json").unlink()
    fake_experiment(exp)
    (exp / "analysis").mkdir()
    (exp / "analysis" / "scores-taylor.json").write_text(json.dumps({"components": ["conv1[0]"], "scores": ["x"]}))
    message = report_error(write_report, exp)
    assert message.startswith(f"{exp / 'analysis' / 'scores-taylor.json'}: field 'scores' is [\"x\"]")


def test_an_adapter_selection_is_described_by_ranks_not_units():
    """A hybrid selection's by_layer counts ranks: the report must not call rank 7 of fc1 "7/128 units"."""
    from advtune.report import describe

    row = {
        "kind": "finetune",
        "select": "top",
        "granularity": "hybrid",
        "criterion": "taylor",
        "params_budget": 0.1,
        "attack": "pgd:steps=5",
        "selected_by_layer": {"net.conv1": [9, 9], "net.conv2": [64, 64], "net.fc1": [7, 128], "net.fc2": [3, 10]},
    }
    text = describe(row)
    assert "low-rank adapters" in text and "within 10% of the parameters" in text
    assert text.endswith("trains conv1, conv2 whole; rank 7 on fc1, rank 3 on fc2"), text
    units = describe({**row, "granularity": "unit"})
    assert units.endswith("trains conv1 9/9, conv2 64/64, fc1 7/128, fc2 3/10"), units
    assert "normalization layers" not in text
    assert "and the normalization layers' scale and shift, within 10%" in describe({**row, "norms": True})


def test_a_lowrank_select_is_recorded_as_adapters_not_as_an_analysis(tmp_path):
    """`select: lowrank:rank=R` takes no analysis: its row must say adapters (ranks), not top units."""
    from advtune.report import describe
    from advtune.runs.experiment.results import what_ran

    run = {"select": "lowrank:rank=4", "granularity": "unit", "criterion": "taylor", "attack": "pgd:steps=5"}
    (tmp_path / "config.json").write_text(json.dumps({"run": run}))
    ran = what_ran(tmp_path, "finetune", {})
    assert (ran["select"], ran["granularity"], ran["criterion"]) == ("lowrank", "lowrank", None)
    row = {"kind": "finetune", **ran, "selected_by_layer": {"net.conv1": [4, 9], "net.fc2": [4, 10]}}
    text = describe(row)
    assert text.startswith("low-rank adapters on every layer; fine-tuned with pgd:steps=5"), text
    assert text.endswith("trains rank 4 on conv1, rank 4 on fc2"), text


def test_a_probe_rule_variant_is_a_selection_whatever_its_select(tmp_path):
    """An audit: a `granularity: probe` variant with `select: all` (the CLI's default, accepted: the probe reads no
    analysis) was reported as full fine-tuning and compared with itself."""
    from advtune.report import describe
    from advtune.runs.experiment.results import what_ran

    run = {"select": "all", "granularity": "probe", "params": 0.1, "attack": "pgd:steps=5", "probe": 0.2}
    (tmp_path / "config.json").write_text(json.dumps({"run": run}))
    ran = what_ran(tmp_path, "finetune", {})
    assert (ran["select"], ran["granularity"]) == ("top", "probe")
    assert "all parameters" not in describe({"kind": "finetune", **ran})


def test_a_harden_rows_training_settings_come_from_its_recipe_and_a_moving_mask_is_named(tmp_path):
    """Two harden variants that differ only in lr or --regrow were the same row: the row carries the recipe's training
    settings and the description says when the mask moved."""
    from advtune.report import describe
    from advtune.runs.experiment.results import what_ran

    recipe = {"granularity": "probe", "criterion": "taylor", "attack": "pgd:steps=5", "probe_quotas": None}
    recipe |= {"optimizer": "adam", "lr": 0.001, "schedule": "cosine", "batch_size": 32, "ema": 0.99}
    recipe |= {"augment": "none", "regrow": 0.3}
    (tmp_path / "config.json").write_text(json.dumps({"run": {"recipe": recipe, "budget": 1000}}))
    ran = what_ran(tmp_path, "harden", {})
    got = (ran["lr"], ran["schedule"], ran["batch_size"], ran["ema"], ran["regrow"])
    assert got == (0.001, "cosine", 32, 0.99, 0.3)
    text = describe({"kind": "harden", **ran})
    assert "fine-tuned with pgd:steps=5, the mask moving (regrow 0.3)" in text, text
    assert "mask moving" not in describe({"kind": "harden", **ran, "regrow": 0.0})
    assert (ran["regrow_every"], ran["regrow_score"]) == (100, "movement")  # harden moves it finetune's default way
    assert "(regrow 0.3, grown by fisher)" in describe({"kind": "finetune", **ran, "regrow_score": "fisher"})
    assert "(regrow 0.3, window moments)" in describe({"kind": "finetune", **ran, "regrow_moments": "window"})
    assert "(regrow 0.3, grown entries' steps x2)" in describe({"kind": "finetune", **ran, "regrow_rate": 2.0})
    assert "(regrow 0.3, regrown across layers)" in describe({"kind": "finetune", **ran, "regrow_pool": "global"})
    assert "(regrow 0.3, dropped by change per step)" in describe(
        {"kind": "finetune", **ran, "regrow_drop": "per-step"}
    )
    assert "(regrow 0.3, moving until 90% of the run)" in describe({"kind": "finetune", **ran, "regrow_end": 0.9})
    # a finetune record from before the regrow_ settings existed ran their defaults
    (tmp_path / "config.json").write_text(json.dumps({"run": {"select": "all", "train": {"regrow": 0.3}}}))
    old = what_ran(tmp_path, "finetune", {})
    assert (old["regrow_every"], old["regrow_score"], old["regrow_moments"]) == (100, "movement", "zero")
    assert (old["regrow_rate"], old["regrow_pool"], old["regrow_drop"]) == (1.0, "layer", "moved")
    assert old["regrow_end"] == 0.75 and "moving until" not in describe({"kind": "finetune", **old})
    assert "steps x" not in describe({"kind": "finetune", **old}) and "across" not in describe(
        {"kind": "finetune", **old}
    )


def test_an_entry_rule_is_not_drawn_as_whole_units_and_the_lead_adds_up(tmp_path, monkeypatch):
    """A sparse (probe) mask's selection.json names the layers it touches, not units: ringing every unit of those
    layers said the run trained them all. Its counts are entries; the lead's sum names the checkpoint choice; an
    unrecorded base cost is not a zero."""
    from advtune.report import writers

    folder = tmp_path / "hard"
    summary = fake_harden(folder)

    def sparse(s):
        s["selection"].update(kind="sparse", by_layer={"net.conv1": [40, 800]}, params_by_layer={"net.conv1": 40})
        s["cost"].update(checkpoint_grad_evals=1200, harden_grad_evals=summary["cost"]["harden_grad_evals"] + 1200)
        s["cost"]["base_training_grad_evals"] = None

    rewrite(folder / "summary.json", sparse)
    (folder / "analysis").mkdir()
    scores = {"components": [f"net.conv1[{u}]" for u in range(8)], "scores": [float(u) for u in range(8)]}
    (folder / "analysis" / "scores-taylor.json").write_text(json.dumps(scores))
    (folder / "selection.json").write_text(json.dumps({"kind": "sparse", "components": ["net.conv1"]}))
    drawn = {}
    real = writers.plot_unit_scores
    monkeypatch.setattr(writers, "plot_unit_scores", lambda sc, path, sel=None: drawn.update(sel=sel) or real(sc, path))
    md = write_harden_report(folder)["md"].read_text()
    assert drawn["sel"] is None and "not whole units" in md
    assert "net.conv1: 40/800 weight entries, 40 parameters" in md
    assert "+ choosing the checkpoint 1,200)" in md and "cost is unrecorded" in md and "took 0" not in md
    # the layers an entry rule trains whole (the output layer, here conv1) keep their rings
    whole = {"kind": "sparse", "components": ["net.conv1"], "whole": ["net.conv1"]}
    (folder / "selection.json").write_text(json.dumps(whole))
    md = write_harden_report(folder)["md"].read_text()
    assert drawn["sel"] == {"hardened": (["net.conv1"], "tab:orange")} and "rings: the layers it trained whole" in md
    # a unit selection keeps its rings
    unit = {"format": "advtune.selection/1", "components": ["net.conv1[3]"]}
    (folder / "selection.json").write_text(json.dumps(unit))
    write_harden_report(folder)
    assert drawn["sel"] == {"hardened": (["net.conv1[3]"], "tab:orange")}


def test_an_eps_sweep_gets_one_frontier_figure_per_eps(tmp_path):
    """One figure drew every eps' curves against one reference's plateau (the first by name, at one eps), while the
    findings below it compared each eps with its own."""
    from advtune.frontier import Frontier, FrontierPoint

    exp = tmp_path / "exp"
    fake_experiment(exp)
    points = [
        FrontierPoint(
            variant=f"{v}-eps{e:g}",
            kind=k,
            eps=e,
            reference=ref,
            step=s,
            total_grad_evals=c,
            clean_acc=0.9,
            robust_acc=r * e,
        )
        for e in (0.1, 0.2)
        for v, k, ref in (("at", "train", True), ("sel", "finetune", False))
        for s, c, r in ((100, 10_000, 2.0), (200, 20_000, 3.0), (None, 40_000, 3.1))
    ]
    (exp / "frontier.json").write_text(json.dumps(Frontier(points=tuple(points)).to_json()))
    md = write_report(exp)["md"].read_text()
    assert "frontier-eps0.1.png" in md and "frontier-eps0.2.png" in md and "(the frontier) at eps=0.2" in md
    assert (exp / "frontier-eps0.1.png").is_file() and not (exp / "frontier.png").exists()


def test_a_score_table_with_nan_scores_is_drawn(tmp_path):
    """A criterion may give NaN (ranked last, null on file): the report's schema refused such a table as corrupt."""
    from advtune.report.plots import plot_unit_scores
    from advtune.report.records import read_scores

    table = {"components": ["conv1[0]", "conv1[1]", "fc[0]"], "scores": [0.5, None, 0.2]}
    (tmp_path / "scores-taylor.json").write_text(json.dumps(table))
    assert read_scores(tmp_path, rerun="advtune analyze ...") == {"taylor": table}
    plot_unit_scores({"taylor": table}, tmp_path / "units.png")
    assert (tmp_path / "units.png").stat().st_size > 1000
