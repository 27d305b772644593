"""`advtune experiment` + `advtune report`: records, resume without redoing, report == records, refusals."""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml

from advtune.cli import main
from advtune.errors import AdvtuneError
from advtune.runs import experiment

TINY = {
    "name": "tiny",
    "seed": 0,
    "base": {
        "dataset": "synthetic",
        "model": "small-cnn",
        "limit": 300,
        "limit_test": 100,
        "train": {"epochs": 1, "batch_size": 64},
    },
    "threat": {"norm": "linf", "eps": 0.25},
    "evaluation": {"attacks": "fgsm,pgd:steps=5", "limit": 100},
    "analysis": {
        "attack": "pgd:steps=3",
        "criteria": ["taylor"],
        "limit": 100,
        "curve_limit": 100,
        "shares": [0.05, 0.2, 1.0],
        "random_seeds": [0],
    },
    "variants": [
        {"name": "standard", "kind": "standard"},
        {"name": "full-ft", "kind": "finetune", "select": "all", "attack": "pgd:steps=2"},
        {"name": "sel", "kind": "finetune", "select": "top", "share": [0.1, 0.3], "attack": "pgd:steps=2"},
        {"name": "random", "kind": "finetune", "select": "random", "share": 0.1, "attack": "pgd:steps=2"},
    ],
}


def write(tmp_path, cfg, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exp")
    out = tmp / "out"
    assert main(["experiment", str(write(tmp, TINY)), "--out", str(out), "--quiet"]) == 0
    return out


def test_every_variant_is_recorded_and_tabled(finished):
    rows = json.loads((finished / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["standard", "full-ft", "sel-share0.1", "sel-share0.3", "random"]
    for r in rows:
        ev = json.loads((finished / r["variant"] / "eval-protocol.json").read_text())
        assert r["robust_acc"] == ev["worst_case_accuracy"] and r["clean_acc"] == ev["clean_accuracy"]
        assert r["robust_acc"] <= min(r["acc[fgsm]"], r["acc[pgd:steps=5]"])
    sel = {r["variant"]: r for r in rows}
    assert sel["sel-share0.1"]["analysis_grad_evals"] > 0 and sel["random"]["analysis_grad_evals"] == 0
    assert (
        sel["sel-share0.1"]["trainable_params"]
        < sel["sel-share0.3"]["trainable_params"]
        < sel["full-ft"]["trainable_params"]
    )
    # PGD-2 fine-tuning: 3 gradient evaluations per example and epoch
    assert sel["full-ft"]["grad_evals"] == 3 * 300
    assert (finished / "results.csv").read_text().splitlines()[0].startswith("variant,kind")
    # how each variant trained, as its config.json recorded it: two recipes differing only there are told apart
    for name in ("full-ft", "sel-share0.1", "random"):
        train = json.loads((finished / name / "config.json").read_text())["run"]["train"]
        keys = ("optimizer", "lr", "batch_size", "ema", "augment", "regrow", "regrow_every", "regrow_score")
        assert {k: sel[name][k] for k in keys} == {k: train[k] for k in keys}
    assert sel["standard"]["lr"] is None and "lr" in (finished / "results.csv").read_text().splitlines()[0].split(",")


def test_info_counts_the_runs_a_sweep_makes(finished, capsys):
    capsys.readouterr()
    assert main(["info", str(finished)]) == 0
    out = capsys.readouterr().out
    assert "5 runs, 5 finished" in out  # 4 YAML variants, one of them swept over two shares
    # an audit: the table's costs are each variant's own, the report's totals add the base: the table says so
    base = json.loads((finished / "standard" / "cost.json").read_text())["grad_evals"]
    assert f"the report's totals add the base's {base:,} to a fine-tuning" in out


def test_report_numbers_match_the_records(finished):
    from advtune.evaluation.gate import gate_word

    assert main(["report", str(finished), "--quiet"]) == 0
    md = (finished / "report.md").read_text()
    html = (finished / "report.html").read_text()
    rows = json.loads((finished / "results.json").read_text())["rows"]
    table = [line for line in md.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    shown = {
        cells[0]: dict(zip(head, cells))
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[1:])
    }
    for r in rows:
        s = shown[r["variant"]]
        assert s["clean"] == f"{100 * r['clean_acc']:.2f}%" and s["worst case"] == f"{100 * r['robust_acc']:.2f}%"
        assert s["own grad evals"] == f"{r['grad_evals']:,}"
        # one cost basis: a fine-tuned model counts the base model's training and the analysis behind it
        total = r["grad_evals"] + r["analysis_grad_evals"] + r["base_grad_evals"]
        assert s["total grad evals"] == f"{total:,}"
        assert (r["base_grad_evals"] > 0) == (r["kind"] == "finetune")
        assert s["gate"] == gate_word(r["suspect"], r["eval_attacks"], r["clean_acc"] > 0)
        assert s["gate"] in ("SUSPECT", "passed (no black-box check)")  # fgsm and pgd: no black-box attack ran
        assert f"<td>{100 * r['robust_acc']:.2f}%</td>" in html
        assert s["training data"] == "300 images"  # every row says what it was trained on
    # each row says what the variant was: method, selection and where its trained units sit
    assert shown["full-ft"]["what it is"].startswith("adversarial fine-tuning of all parameters with pgd:steps=2")
    assert shown["random"]["what it is"].startswith("control: a random 10% of the units")
    by_layer = next(r for r in rows if r["variant"] == "sel-share0.1")["selected_by_layer"]
    assert "the top 10% of units by taylor" in shown["sel-share0.1"]["what it is"]
    assert all(
        f"{n.split('.')[-1]} {u}/{t}" in shown["sel-share0.1"]["what it is"] for n, (u, t) in by_layer.items() if u
    )
    assert shown["sel-share0.1"]["trainable params"].endswith("%)")
    assert html.count("data:image/png;base64,") >= 4 and "<img src='data:image/png" in html  # self-contained
    for png in ("pareto.png", "trained-units.png", "analysis-unit-scores.png", "analysis-concentration.png"):
        assert (finished / png).is_file() and png in md
    assert re.search(r"restoring the top 5% of components by taylor repairs [0-9.]+% of \d+ adversarial errors", md)


def test_report_leads_with_what_won_and_at_what_cost(finished):
    rows = json.loads((finished / "results.json").read_text())["rows"]
    assert main(["report", str(finished), "--quiet"]) == 0
    md = (finished / "report.md").read_text()
    ok = [r for r in rows if not r["suspect"] and r["kind"] != "standard"]
    win = max(ok, key=lambda r: r["robust_acc"])
    first = [line for line in md.splitlines()[1:] if line.strip()][:2]
    assert first[0].startswith(f"**{win['variant']} won** at eps=0.25: {100 * win['robust_acc']:.2f}%")
    sel = max((r for r in ok if r["select"] == "top"), key=lambda r: r["robust_acc"])
    full = next(r for r in rows if r["variant"] == "full-ft")
    assert first[1].startswith(f"Selective fine-tuning of {100 * sel['param_share']:.1f}% of the parameters")
    assert f"full-network fine-tuning (**full-ft**) {100 * full['robust_acc']:.2f}%" in first[1]


def test_the_lead_never_crowns_a_suspect_model():
    from advtune.report import lead

    base = {"eps": 0.3, "clean_acc": 0.9, "grad_evals": 10, "suspect": ""}
    rows = [
        {**base, "variant": "masked", "kind": "train", "attack": "pgd", "robust_acc": 0.99, "suspect": "gap"},
        {**base, "variant": "honest", "kind": "train", "attack": "pgd", "robust_acc": 0.5},
    ]
    assert lead(rows)[0].startswith("**honest won**")
    assert lead([rows[0]]) == []


def test_the_lead_and_the_controls_count_a_harden_variant_as_the_method():
    """A `kind: harden` variant is the selective method (docs/usage.md lists it as a variant): the lead names it when
    it is the best selection, and its params_like random control is compared with it."""
    from advtune.report import headline

    base = {"eps": 0.3, "clean_acc": 0.9, "grad_evals": 10, "suspect": "", "param_share": 0.05}
    rows = [
        {**base, "variant": "sel", "kind": "finetune", "select": "top", "robust_acc": 0.6, "trainable_params": 100},
        {**base, "variant": "hard", "kind": "harden", "robust_acc": 0.7, "trainable_params": 100},
        {**base, "variant": "rnd", "kind": "finetune", "select": "random", "robust_acc": 0.4, "params_like": "hard"},
    ]
    lines = headline(rows)
    assert any("Selective fine-tuning of 5.0% of the parameters (**hard**) reached 70.00%" in x for x in lines)
    assert any("selected components (hard) gave 70.00% vs 40.00%" in x for x in lines)


def test_rerun_after_interruption_skips_finished_variants(tmp_path, monkeypatch):
    cfg = write(tmp_path, TINY)
    out = tmp_path / "out"
    import advtune.runs.finetune as finetune_job

    real = finetune_job.run
    calls = []

    def crash_on_second(run):
        calls.append(run.out)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(run)

    monkeypatch.setattr(finetune_job, "run", crash_on_second)
    assert main(["experiment", str(cfg), "--out", str(out), "--quiet"]) == 130
    monkeypatch.setattr(finetune_job, "run", real)
    first = out / "full-ft" / "model.safetensors"
    stamp = first.stat().st_mtime_ns
    std_stamp = (out / "standard" / "model.safetensors").stat().st_mtime_ns

    redone = []
    monkeypatch.setattr(finetune_job, "run", lambda run: (redone.append(run.out), real(run))[1])
    assert main(["experiment", str(cfg), "--out", str(out), "--quiet", "--no-report"]) == 0
    assert (
        first.stat().st_mtime_ns == stamp and (out / "standard" / "model.safetensors").stat().st_mtime_ns == std_stamp
    )
    assert str(out / "full-ft") not in redone and len(redone) == 3  # sel x2 (one of them interrupted) + random
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 5
    redone.clear()
    assert main(["experiment", str(cfg), "--out", str(out), "--quiet", "--no-report"]) == 0
    assert redone == []  # everything finished: nothing is trained again


def test_malformed_yaml_names_the_line(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nbase: {dataset: synthetic\nthreat: {eps: 0.1}\n")
    assert main(["experiment", str(p), "--out", str(tmp_path / "o")]) == 2
    assert re.search(r"not valid YAML at line \d+", capsys.readouterr().err)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda c: c.update(variantz=[]), "unknown key 'variantz'; did you mean 'variants'"),
        (
            lambda c: c["variants"][1].update(shar=0.1),
            r"variants\[1\] \(full-ft\): unknown key 'shar'; did you mean 'share'",
        ),
        (lambda c: c["base"].update(pretrained="runs/does-not-exist"), "holds no trained model"),
        (lambda c: c["variants"].append({"name": "x", "kind": "distill"}), "unknown kind 'distill'"),
        (lambda c: c["threat"].pop("eps"), "threat needs eps"),
        (lambda c: c["base"]["train"].update(augment="crop-flipp"), r"base.train: unknown augmentation 'crop-flipp'"),
        (
            lambda c: c["variants"][1].update(train={"lr": "fast"}),
            r"variants\[1\] \(full-ft\).train: not a number: 'fast'",
        ),
        # refused by the jobs only once they ran (a review): now on the config alone, before anything is written
        (lambda c: c["evaluation"].update(attacks="apgd-cee"), "threat/evaluation: unknown attack 'apgd-cee'"),
        (lambda c: c["analysis"].update(criteria=["taylr"]), "analysis: unknown criterion taylr"),
        (lambda c: c["threat"].update(norm="l3"), "threat/evaluation: .*l3"),
        (lambda c: c.update(base=None), "base must be a mapping"),
        (lambda c: c["base"].update(limit="ten"), "base.limit must be a positive whole number"),
        (lambda c: c["variants"][1].update(points="3"), "points must be a non-negative integer"),
        (lambda c: c["variants"][1].update(attack="pgd:stepz=2"), "variant full-ft: attack: "),
        (lambda c: c["variants"][2].update(criterion="taylr"), "'taylr' is not among the analysis' criteria"),
        (lambda c: c["variants"][1].update(name=2024), "quote it"),
        (lambda c: c["variants"][1].update(name="analysis-x"), "taken by the experiment's own folders"),
        (lambda c: c["variants"][1].update(name="standard"), "variant name 'standard' used twice|taken by"),
        (lambda c: c["variants"][3].update(params=1.0) or c["variants"][3].pop("share"), r"'1.0': a share must be"),
        (lambda c: c["variants"][3].update(budget=1000.5), "not a whole positive number of gradient evaluations"),
        (lambda c: c["variants"].append({"name": "t", "kind": "train", "share": [0.1, 0.2]}), "does not use share"),
        (lambda c: c["variants"].append({"name": "h", "kind": "harden", "select": "random"}), "does not use select"),
        (lambda c: c["variants"][1].update(keep_best=2), "keep_best needs a held-out split"),
        # a second review: criteria compared exactly and against what the analysis computes, its own checks
        (lambda c: c["analysis"].update(criteria="taylor"), "analysis.criteria must be a list"),
        (lambda c: c["analysis"].update(criteria=["Taylor"]), "analysis: unknown criterion Taylor"),
        (lambda c: c["analysis"].update(limit=0), "analysis: --limit and --batch-size must be positive"),
        (lambda c: c["analysis"].update(attack="pgd:stepz=3"), "analysis: "),
        (lambda c: c["evaluation"].update(batch_size=0), "evaluation.batch_size must be a positive"),
        (lambda c: c["variants"][2].update(criterion="restoration"), "'restoration' is not among the analysis'"),
        (lambda c: c["variants"][0].update(attack="fgsm"), "a standard variant does not use attack"),
        (lambda c: c["variants"][1].update(name="results.json"), "taken by the experiment's own folders and files"),
        (
            lambda c: c["variants"].insert(1, {"name": "c", "select": "random", "params_like": "full-ft"}),
            "params_like: full-ft must run first",
        ),
        # a third review: what the fine-tuning job itself refuses, and YAML values the CLI would refuse
        (lambda c: c["variants"].append({"name": "p", "granularity": "probe", "params": 0.1}), "give budget$"),
        (lambda c: c["variants"].append({"name": "r", "recipe": "harden"}), "variant r: .*give budget"),
        (
            lambda c: c["variants"].append({"name": "p", "granularity": "probe", "params": 0.1, "probe": 1.5}),
            "variant p: probe must be a share of the budget in",
        ),
        (lambda c: c["variants"][2].update(granularity="lowrnak"), "granularity must be one of .*got 'lowrnak'"),
        (lambda c: c["variants"][1].update(attack_mode="training"), "attack_mode must be one of eval, train"),
        (lambda c: c["variants"].append({"name": "h", "kind": "harden", "norms": "no"}), "norms is a switch"),
        (lambda c: c["variants"][1].update(train={"compile": "no"}), r"\(full-ft\).train: compile is a switch"),
        (lambda c: c["base"]["train"].update(compile="false"), "base.train: compile is a switch"),
        (lambda c: c["evaluation"].update(cascade="false"), "evaluation: cascade is a switch"),
        (lambda c: c.update(device=1), "device must be auto, cpu, cuda"),
        (  # the job's words name its flags; the variant's message names its keys
            lambda c: c["variants"].append(
                {"name": "p", "granularity": "probe", "params": 0.1, "budget": 6000, "probe": 0.1, "eps_warmup": 0.15}
            ),
            "variant p: probe 0.1 must be larger than eps_warmup 0.15: .*raise probe or lower eps_warmup$",
        ),
    ],
)
def test_bad_experiment_configs(tmp_path, mutate, match):
    import copy

    cfg = copy.deepcopy(TINY)
    mutate(cfg)
    with pytest.raises(AdvtuneError, match=match):
        experiment.run(write(tmp_path, cfg), tmp_path / "o")


def test_evaluation_attacks_as_a_yaml_list_mean_the_comma_list():
    cfg = experiment.validate_config({**TINY, "evaluation": {**TINY["evaluation"], "attacks": ["fgsm", "pgd:steps=2"]}})
    assert cfg["evaluation"]["attacks"] == "fgsm,pgd:steps=2"


def test_report_on_a_folder_without_results(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "has no results.json" in capsys.readouterr().err


def test_sweep_expansion_names():
    cfg = experiment.validate_config({**TINY, "threat": {"eps": [0.1, 0.2]}})
    names = [v["name"] for v in experiment.expand_variants(cfg)]
    assert names == [
        "standard-eps0.1",
        "standard-eps0.2",
        "full-ft-eps0.1",
        "full-ft-eps0.2",
        "sel-eps0.1-share0.1",
        "sel-eps0.1-share0.3",
        "sel-eps0.2-share0.1",
        "sel-eps0.2-share0.3",
        "random-eps0.1",
        "random-eps0.2",
    ]


def test_standard_variant_over_a_pretrained_base_records_in_its_own_folder(finished, tmp_path):
    """Evaluating a pretrained base must never write into that base's run folder."""
    import copy

    before = sorted(p.name for p in (finished / "standard").iterdir())
    cfg = copy.deepcopy(TINY)
    cfg["base"] = {"pretrained": str(finished / "standard")}
    cfg["threat"] = {"eps": [0.1, 0.2]}
    cfg["variants"] = [{"name": "standard", "kind": "standard"}]
    rows = experiment.run(write(tmp_path, cfg), tmp_path / "o")
    assert [r["variant"] for r in rows] == ["standard-eps0.1", "standard-eps0.2"] and rows[0]["eps"] == 0.1
    assert (tmp_path / "o" / "standard-eps0.2" / "eval-protocol.json").is_file()
    assert sorted(p.name for p in (finished / "standard").iterdir()) == before


def test_shipped_configs_are_valid():
    from pathlib import Path

    shipped = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(shipped) >= 3
    for p in shipped:
        cfg = experiment.load_config(p)
        assert experiment.expand_variants(cfg)


def test_yaml_numbers_written_the_usual_ways():
    cfg = experiment.train_config({"lr": "1e-3", "epochs": 2.0, "weight_decay": "5e-4"}, {"momentum": "9/10"}, seed=0)
    assert cfg.lr == 0.001 and cfg.epochs == 2 and cfg.weight_decay == 0.0005 and cfg.momentum == 0.9
    with pytest.raises(AdvtuneError, match="train.epochs must be an integer"):
        experiment.train_config({"epochs": 1.5}, None, seed=0)


def test_a_variant_rerun_with_other_settings_is_refused(finished, tmp_path):
    import copy
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    cfg = copy.deepcopy(TINY)
    cfg["variants"][3]["share"] = 0.5  # "random" was run with share 0.1
    with pytest.raises(AdvtuneError, match="variant random in .* was run with other settings"):
        experiment.run(write(tmp_path, cfg), out)
    # --only another variant: "random" is reported in the rows all the same (under its new settings' labels), so
    # its change is refused too (--only checked only the variants it runs)
    with pytest.raises(AdvtuneError, match="variant random in .* was run with other settings"):
        experiment.run(write(tmp_path, cfg), out, only=[cfg["variants"][0]["name"]])


def test_a_standard_model_copied_into_a_new_folder_is_the_experiments_base(finished, tmp_path, monkeypatch):
    """bench/base-models/README.md says: copy the committed standard model to <out>/standard and run the frontier;
    the folder was refused as "not an experiment folder". Its own evaluation is kept only if it measured the same."""
    import copy
    import shutil

    from advtune.runs.experiment import runner

    out = tmp_path / "fresh"
    out.mkdir()
    shutil.copytree(finished / "standard", out / "standard")
    monkeypatch.setattr(runner.train_job, "run", lambda run: pytest.fail("trained the base again"))
    for change in (
        lambda c: c["evaluation"].update(attacks="fgsm"),
        lambda c: c["threat"].update(eps=c["threat"]["eps"] / 2),  # the same attacks at another eps: not its row
    ):
        other = copy.deepcopy(TINY)
        change(other)
        with pytest.raises(AdvtuneError, match="delete that file to evaluate the copied model"):
            experiment.run(write(tmp_path, other), out, only=["standard"])
    other = copy.deepcopy(TINY)
    other["base"]["model"] = "lenet5"  # a run of another base: refused, not taken for this one
    with pytest.raises(AdvtuneError, match="is a run of model 'small-cnn', this experiment's base 'lenet5'"):
        experiment.run(write(tmp_path, other), out, only=["standard"])
    assert not (out / "experiment.json").exists()
    experiment.run(write(tmp_path, TINY), out, only=["standard"])
    assert (out / "experiment.json").is_file()


def test_a_rerun_with_another_evaluation_or_base_is_refused_and_rewrites_nothing(finished, tmp_path):
    """A review found a re-run into the same folder with another evaluation protocol (or base, or analysis) mixing
    the old variants' numbers with the new ones', and experiment.json rewritten before any check."""
    import copy
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    before = (out / "experiment.json").read_bytes()
    cfg = copy.deepcopy(TINY)
    cfg["threat"].pop("norm")  # the default written out or left out, and evaluation.limit as limit_test: the same
    cfg["evaluation"]["limit_test"] = cfg["evaluation"].pop("limit")
    experiment.run(write(tmp_path, cfg), out)
    before = (out / "experiment.json").read_bytes()
    for change, match in (
        (lambda c: c["evaluation"].update(attacks="fgsm"), "another evaluation"),
        (lambda c: c["base"].update(limit=200), "another base"),
        (lambda c: c["analysis"].update(limit=50), "another analysis"),
        # an audit: one eps becoming several renamed every variant (-eps suffix) and trained them all again
        (lambda c: c["threat"].update(eps=[0.25, 0.1]), "at eps 0.25; at 0.25, 0.1 its variants would be renamed"),
    ):
        cfg = copy.deepcopy(TINY)
        change(cfg)
        with pytest.raises(AdvtuneError, match=match + ".*use a new --out"):
            experiment.run(write(tmp_path, cfg), out)
        assert (out / "experiment.json").read_bytes() == before


def test_params_like_follows_an_eps_sweep():
    """params_like names a variant as written; under an eps sweep each control takes its own eps' point (it looked
    for the unswept name and failed after everything before it had run)."""
    cfg = {**TINY, "threat": {"eps": [0.1, 0.2]}}
    cfg["variants"] = [*TINY["variants"], {"name": "ctrl", "select": "random", "params_like": "full-ft"}]
    variants = experiment.expand_variants(experiment.validate_config(cfg))
    likes = {v["name"]: v["params_like"] for v in variants if v.get("params_like")}
    assert likes == {"ctrl-eps0.1": "full-ft-eps0.1", "ctrl-eps0.2": "full-ft-eps0.2"}
    cfg["variants"][-1] = {"name": "ctrl", "select": "random", "params_like": "sel"}  # sel is also swept by share
    with pytest.raises(AdvtuneError, match=r"params_like: sel matches none of its sweep points \(swept: eps, share\)"):
        experiment.validate_config(cfg)
    cfg["threat"] = TINY["threat"]  # one point of a sweep, by its own name, as before
    cfg["variants"][-1] = {"name": "ctrl", "select": "random", "params_like": "sel-share0.1"}
    (ctrl,) = [v for v in experiment.expand_variants(experiment.validate_config(cfg)) if v["name"] == "ctrl"]
    assert ctrl["params_like"] == "sel-share0.1"


def test_seed_and_flag_defaults_reach_an_experiment(finished, tmp_path, capsys):
    """`experiment --seed N` was accepted and ignored (the YAML's seed ran again, its finished variants skipped), and
    `--config` (flag defaults) overwrote the positional experiment YAML: both now do what they say."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text("report: false\n")
    experiment_yaml = write(tmp_path, TINY)
    # the seed reaches the run: an experiment folder of seed 0 refuses seed 1 before anything is written
    assert main(["experiment", str(experiment_yaml), "--config", str(defaults), "--seed", "1", "--out", str(out)]) == 2
    assert "holds an experiment run with seed 0, not 1" in capsys.readouterr().err
    before = (out / "results.json").read_bytes()
    html = (out / "report.html").stat().st_mtime_ns
    # the flag defaults are read as such (report: false), the experiment from the positional YAML: all finished
    assert main(["experiment", str(experiment_yaml), "--config", str(defaults), "--out", str(out), "--quiet"]) == 0
    assert (out / "results.json").read_bytes() == before and (out / "report.html").stat().st_mtime_ns == html
    # another kind of folder (here: the experiment's own standard run) is not an experiment's: refused, untouched
    standard = out / "standard"
    listing = sorted(p.name for p in standard.iterdir())
    assert main(["experiment", str(experiment_yaml), "--out", str(standard), "--quiet"]) == 2
    assert "is not an experiment folder" in capsys.readouterr().err
    assert sorted(p.name for p in standard.iterdir()) == listing


def test_a_started_variant_resumes_with_the_settings_it_started_with(tmp_path, monkeypatch):
    """A variant begun before a default changed (variants once trained without the eps ramp) resumes
    with what it recorded, not the new default: its resume check would refuse a change."""
    from pathlib import Path

    from advtune.runs import finetune as finetune_job
    from advtune.runs.experiment import runner

    folder = tmp_path / "ft"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"run": {"eps_warmup": 0.0, "criterion": "taylor"}}))
    seen = []
    monkeypatch.setattr(finetune_job, "run", lambda cfg: seen.append(cfg))
    ex = runner.Experiment(TINY, tmp_path, 0, "cpu", None, "linf", Path(tmp_path / "base"))
    runner._run_finetune(ex, {"name": "ft", "kind": "finetune", "select": "all", "eps": 0.25}, folder)
    runner._run_finetune(ex, {"name": "new", "kind": "finetune", "select": "all", "eps": 0.25}, tmp_path / "new")
    assert seen[0].eps_warmup == 0.0 and seen[0].resume  # as it started
    assert seen[1].eps_warmup is None  # a new variant: the CLI's default (the job resolves it to 0.3)


def test_a_bad_harden_variant_is_refused_before_anything_is_written(tmp_path):
    cfg = {**TINY, "variants": [{"name": "h", "kind": "harden", "train": {"epochs": 3}}]}
    with pytest.raises(AdvtuneError, match="a harden variant's train: takes optimizer, lr, schedule, batch_size"):
        experiment.run(cfg, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    cfg = {
        **TINY,
        "evaluation": {**TINY["evaluation"], "cascade": False},
        "variants": [{"name": "h", "kind": "harden"}],
    }
    with pytest.raises(AdvtuneError, match="evaluated by harden itself"):
        experiment.run(cfg, tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "where",
    [
        {"base": {**TINY["base"], "train": {**TINY["base"]["train"], "adapter_lr_ratio": 16}}},
        {"variants": [{"name": "s", "kind": "train", "train": {"adapter_lr_ratio": 16}}]},
        {"variants": [{"name": "f", "select": "all", "train": {"adapter_lr_ratio": 16}}]},
        {"variants": [{"name": "u", "params": 0.1, "train": {"adapter_lr_ratio": 16}}]},  # unit granularity
    ],
)
def test_adapter_lr_ratio_without_adapters_is_refused_before_anything_is_written(tmp_path, where):
    cfg = {**TINY, **where}
    with pytest.raises(AdvtuneError, match="adapter_lr_ratio"):
        experiment.run(cfg, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    ok = {
        **TINY,
        "variants": [{"name": "a", "params": 0.1, "granularity": "shares", "train": {"adapter_lr_ratio": 16}}],
    }
    experiment.validate_config(ok)  # shares trains adapters: accepted


@pytest.mark.parametrize(
    "where",
    [
        {"base": {**TINY["base"], "train": {**TINY["base"]["train"], "regrow": 0.3}}},
        {"variants": [{"name": "r", "select": "random", "params": 0.1, "train": {"regrow": 0.3}}]},  # random units
        {"variants": [{"name": "u", "params": 0.1, "train": {"regrow": 0.3}}]},  # unit granularity: nothing moves
        # how a mask moves, on a mask that stays put (no regrow): it would do nothing
        {"variants": [{"name": "e", "params": 0.1, "granularity": "sparse", "train": {"regrow_end": 0.9}}]},
        {"variants": [{"name": "t", "kind": "train", "train": {"regrow_every": 50}}]},
        {"base": {**TINY["base"], "train": {**TINY["base"]["train"], "regrow_pool": "global"}}},
    ],
)
def test_regrow_without_a_mask_of_entries_is_refused_before_anything_is_written(tmp_path, where):
    with pytest.raises(AdvtuneError, match="regrow"):
        experiment.run({**TINY, **where}, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    ok = {**TINY, "variants": [{"name": "a", "params": 0.1, "granularity": "sparse", "train": {"regrow": 0.3}}]}
    experiment.validate_config(ok)  # single entries: accepted
    hard = {**TINY, "variants": [{"name": "h", "kind": "harden", "train": {"regrow": 0.3}}]}
    experiment.validate_config(hard)  # harden's recipe (the probe rule): accepted
    fgsm = [{"name": "f", "params": 0.1, "granularity": "sparse", "attack": "fgsm", "train": {"regrow": 0.3}}]
    with pytest.raises(AdvtuneError, match="guard: false"):  # its guard's rollback: refused before anything runs
        experiment.validate_config({**TINY, "variants": fgsm})
    with pytest.raises(AdvtuneError, match="regrow"):  # harden's recipe refuses a rule without single entries
        experiment.validate_config({**TINY, "variants": [{**hard["variants"][0], "granularity": "unit"}]})


def test_train_words_reach_the_config_as_written():
    """augment / amp / optimizer / schedule are words: only numeric fields are parsed as numbers (a base
    trained with crop-flip once failed with "not a number: 'crop-flip'")."""
    from advtune.runs.experiment.variants import train_config

    cfg = train_config(
        {"epochs": 30, "optimizer": "sgd", "lr": "1e-1", "weight_decay": "5e-4", "augment": "crop-flip"},
        {"amp": "bf16", "schedule": "cosine", "batch_size": 64},
        0,
    )
    assert (cfg.augment, cfg.amp, cfg.optimizer, cfg.schedule) == ("crop-flip", "bf16", "sgd", "cosine")
    assert (cfg.lr, cfg.weight_decay, cfg.epochs, cfg.batch_size) == (0.1, 5e-4, 30, 64)


def test_a_random_control_on_the_probe_rule_is_refused_before_anything_is_written(tmp_path):
    """The probe rule's mask never depends on select, so `select: random` with it (a sweep point included) would
    silently train the probe rule: refused when the config is read, with the control to use instead."""
    for variant in (
        {"name": "r", "select": "random", "granularity": "probe", "params": 0.1},
        {"name": "h", "recipe": "harden", "select": ["top", "random"]},  # the sweep's random point on the default
    ):
        with pytest.raises(AdvtuneError, match="give the random control granularity: sparse"):
            experiment.run({**TINY, "variants": [variant]}, tmp_path / "o")
        assert not (tmp_path / "o").exists()
    experiment.validate_config({**TINY, "variants": [{"name": "c", "recipe": "harden", "select": "random"}]})
    # --head with the probe's global ranking (a plain finetune variant has no quotas unless it says so)
    with pytest.raises(AdvtuneError, match="variant p: head: true with granularity: probe needs probe_quotas: true"):
        experiment.validate_config({**TINY, "variants": [{"name": "p", "granularity": "probe", "head": True}]})
    ok = {"name": "p", "granularity": "probe", "head": True, "probe_quotas": True, "params": 0.1, "budget": 6000}
    experiment.validate_config({**TINY, "variants": [ok]})


def test_a_standard_train_variant_in_an_l2_experiment_is_given_no_threat(tmp_path, monkeypatch):
    """A train variant without attack in an l2 experiment was handed --norm l2, which train refuses without
    --adversarial: after the base model and every variant before it had run."""
    from advtune.runs.experiment import runner

    seen = []
    monkeypatch.setattr(runner.train_job, "run", lambda run: seen.append(run))
    cfg = {**TINY, "threat": {"norm": "l2", "eps": 0.5}, "evaluation": {"attacks": "pgd:steps=5", "limit": 20}}
    cfg["variants"] = [{"name": "t", "kind": "train"}]
    with pytest.raises(AdvtuneError, match=r"o/t not found"):  # nothing was trained: the evaluation finds no model
        experiment.run(write(tmp_path, cfg), tmp_path / "o")
    (variant,) = [r for r in seen if r.out.endswith("/t")]
    assert variant.adversarial is None and variant.norm == "linf" and variant.eps is None


def test_the_report_names_rows_measured_with_another_protocol():
    """The report described every row by the config's protocol and the first row's image count; a row measured
    otherwise (a folder from before a changed evaluation was refused) is named."""
    from advtune.report.narrative import experiment_protocol

    cfg = {"threat": {"eps": 0.3}, "evaluation": {"attacks": "apgd-ce,apgd-t"}}
    same = [{"variant": v, "eval_attacks": "apgd-ce,apgd-t", "eval_examples": 1000} for v in ("a", "b")]
    assert "Not comparable" not in experiment_protocol(cfg, same)
    mixed = [*same, {"variant": "c", "eval_attacks": "fgsm", "eval_examples": 200}]
    text = experiment_protocol(cfg, mixed)
    assert "different protocols (a, b: apgd-ce,apgd-t on 1000 images; c: fgsm on 200 images)" in text


def test_a_harden_variants_frontier_point_counts_its_checkpoint_choice(finished, tmp_path):
    """The row counted harden's held-out choice among its checkpoints, its curve (the frontier, the plot, the
    findings) did not: the model harden returns sat there ~7% cheaper than it cost."""
    import copy

    cfg = copy.deepcopy(TINY)
    cfg["base"] = {"pretrained": str(finished / "standard")}
    cfg["evaluation"] = {"attacks": "fgsm,pgd:steps=2", "limit": 40}
    cfg["variants"] = [{"name": "hard", "kind": "harden", "budget": 6000}]
    (row,) = experiment.run(write(tmp_path, cfg), tmp_path / "o")
    trained = json.loads((tmp_path / "o" / "hard" / "cost.json").read_text())["grad_evals"]
    held_out = json.loads((tmp_path / "o" / "hard" / "summary.json").read_text())["cost"]["checkpoint_grad_evals"]
    assert held_out > 0 and row["grad_evals"] == trained + held_out == row["curve"][-1]["grad_evals"]
    assert row["curve"][-1]["robust_acc"] == row["robust_acc"]  # the returned model, at what it cost
    # and the choice's wall time and FLOPs with it (the run's meter stops while a checkpoint is measured)
    ran = json.loads((tmp_path / "o" / "hard" / "cost.json").read_text())
    choice = json.loads((tmp_path / "o" / "hard" / "summary.json").read_text())["checkpoints"]
    assert choice["wall_s"] > 0 and choice["flops"] > 0
    for key in ("wall_s", "flops"):
        assert row[key] == row["curve"][-1][key] == pytest.approx(ran[key] + choice[key])


def test_a_random_entries_control_takes_its_rules_head(tmp_path):
    """The control of a rule that trained its output layer whole trains it whole too (its count includes it)."""
    from advtune.runs.experiment.runner import _head_of

    for name, kind, whole in (("hard", "sparse", ["net.fc"]), ("plain", "sparse", []), ("hyb", "hybrid", ["net.c"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"selection": {"kind": kind, "whole": whole}}))
    assert _head_of(tmp_path, "hard") is True and _head_of(tmp_path, "plain") is False
    assert _head_of(tmp_path, "hyb") is False  # a hybrid rule's whole layers are hidden ones, not its head


def test_a_variants_selection_that_does_not_fit_the_model_is_refused_before_any_variant_trains(tmp_path):
    """A bad-input audit: `select: lowrank:rank=999` (and a layer the model lacks) was refused when its turn came,
    after the variants before it had trained."""
    import copy

    for select, refusal in (
        ("lowrank:rank=999", "variant bad: lowrank:rank=999 is above every layer.s full rank"),
        ("layers:net.conv9", "variant bad: "),
    ):
        cfg = copy.deepcopy(TINY)
        cfg["variants"] = [
            {"name": "standard", "kind": "standard"},
            {"name": "full-ft", "kind": "finetune", "select": "all", "attack": "pgd:steps=2"},
            {"name": "bad", "kind": "finetune", "select": select, "attack": "pgd:steps=2"},
        ]
        out = tmp_path / select.replace(":", "-")
        with pytest.raises(AdvtuneError, match=refusal):
            experiment.run(write(tmp_path, cfg), out)
        assert not (out / "full-ft").exists()  # refused before the first variant trained


def test_a_base_retrained_in_place_under_finished_variants_is_refused(finished, tmp_path):
    """An audit: finished variants were reported next to a base trained again in place (a `pretrained:` run retrained,
    `standard/` deleted and trained again): rows from two bases as one experiment."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    experiment.run(write(tmp_path, TINY), out)  # records the base's hash (older folders adopt the base they hold)
    assert json.loads((out / "experiment.json").read_text())["base_sha256"]
    before = (out / "experiment.json").read_bytes()
    weights = out / "standard" / "model.safetensors"
    state = load_file(weights)
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, weights)
    with pytest.raises(AdvtuneError, match="the base model .* changed .* since full-ft, .*use a new --out"):
        experiment.run(write(tmp_path, TINY), out)
    assert (out / "experiment.json").read_bytes() == before
    shutil.rmtree(out / "standard")  # deleted: refused before a new one trains (a review: after, the old one was gone)
    with pytest.raises(AdvtuneError, match="the base model .* is gone since full-ft, .*restore it"):
        experiment.run(write(tmp_path, TINY), out)
    assert not (out / "standard").exists() and (out / "experiment.json").read_bytes() == before


def test_a_control_sized_like_a_variant_that_ran_again_with_another_count_is_refused(finished, tmp_path):
    """An audit: a params_like control kept the count of its rule's earlier run after the rule was deleted and run
    again with another size, and was reported as its control."""
    import copy
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    cfg = copy.deepcopy(TINY)
    cfg["variants"] += [
        {"name": "top1", "select": "top", "share": 0.1, "attack": "pgd:steps=2"},
        {"name": "ctrl", "select": "random", "params_like": "top1", "attack": "pgd:steps=2"},
    ]
    experiment.run(write(tmp_path, cfg), out, only=["top1", "ctrl"])
    shutil.rmtree(out / "top1")  # the rule run again with another share
    cfg["variants"][-2]["share"] = 0.3
    with pytest.raises(AdvtuneError, match="variant ctrl was sized like top1's selection when it held .* delete"):
        experiment.run(write(tmp_path, cfg), out, only=["top1", "ctrl"])
    assert (out / "top1" / "summary.json").is_file()  # the rule's new run is kept
    with pytest.raises(AdvtuneError, match="variant ctrl was sized like top1's"):  # a review: --only skipped it
        experiment.run(write(tmp_path, cfg), out, only=["standard"])


def test_a_variant_without_its_cost_record_is_refused_not_counted_free(finished, tmp_path):
    """An audit: a finished variant whose cost.json went missing was reported at a cost of 0 (the lead's share of
    adversarial training's cost fell from 49% to 16%)."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    (out / "full-ft" / "cost.json").unlink()
    with pytest.raises(AdvtuneError, match="full-ft/cost.json is missing: full-ft's cost is not recorded"):
        experiment.run(write(tmp_path, TINY), out)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"dataset": "mnst"}, r"bad\.yaml: base: unknown dataset 'mnst'; valid: .*mnist"),
        ({"model": "smal-cnn"}, r"bad\.yaml: base: unknown model 'smal-cnn'"),
    ],
)
def test_a_misspelt_dataset_or_model_is_refused_before_the_folder_records_it(tmp_path, change, match):
    """The typo was found when the base was loaded, after experiment.json recorded it: the corrected rerun into the
    same --out was then refused as "another base"."""
    cfg = copy.deepcopy(TINY)
    cfg["base"].update(change)
    path = write(tmp_path, cfg, "bad.yaml")
    out = tmp_path / "out"
    with pytest.raises(AdvtuneError, match=match):
        experiment.run(path, out)
    assert not out.exists()
    (tmp_path / "mine.npz").write_bytes(b"")  # a path to the user's own data is the loader's to judge
    experiment.validate_config({**TINY, "base": {**TINY["base"], "dataset": str(tmp_path / "mine.npz")}})


def test_a_sweep_that_repeats_a_value_names_the_file_and_the_fix(tmp_path):
    cfg = copy.deepcopy(TINY)
    cfg["variants"] = [{"name": "sel", "kind": "finetune", "select": "top", "share": [0.1, 0.1]}]
    with pytest.raises(AdvtuneError, match=r"^x\.yaml: variant names collide after sweeping: .*drop a value"):
        experiment.validate_config(cfg, "x.yaml")
