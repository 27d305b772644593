"""`advtune analyze` -> `advtune finetune --select <folder>`: the records, and the refusals."""

from __future__ import annotations

import json

import pytest

from advtune.cli import main
from cli_helpers import train_argv


@pytest.fixture(scope="module")
def std_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs") / "std"
    assert main(train_argv(base, limit=400, limit_test=100)) == 0
    return base


@pytest.fixture(scope="module")
def vuln(std_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vuln"
    assert (
        main(
            [
                "analyze",
                str(std_run),
                "--eps",
                "0.15",
                "--attack",
                "pgd:steps=5",
                "--limit",
                "200",
                "--curve-limit",
                "150",
                "--shares",
                "0.01,0.05,0.1,1",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    return out


def test_analyze_writes_scores_curves_and_plots(vuln):
    names = {p.name for p in vuln.iterdir()}
    for crit in ("activation-shift", "taylor", "restoration"):
        assert {f"scores-{crit}.json", f"scores-{crit}.csv", f"layers-{crit}.json"} <= names
    assert {
        "concentration.json",
        "concentration.png",
        "layers.png",
        "summary.json",
        "config.json",
        "cost.json",
    } <= names
    summary = json.loads((vuln / "summary.json").read_text())
    assert summary["examples_scored"] == 200 and summary["adv_acc"] <= summary["clean_acc"]
    assert set(summary["rank_agreement_with_restoration"]) == {"activation-shift", "taylor"}
    curves = json.loads((vuln / "concentration.json").read_text())
    taylor = curves["taylor"]
    assert taylor["shares"] == [0.01, 0.05, 0.1, 1.0] and taylor["repaired"][-1] == 1.0
    cfg = json.loads((vuln / "config.json").read_text())
    assert cfg["split"] == "train" and cfg["attack"].startswith("pgd")
    assert (vuln / "concentration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the analysis cost counts every pass: the attack (5 steps) and Taylor's backward, at least
    assert summary["cost"]["attack_grad_evals"] >= 200 * (5 + 1) and summary["cost"]["forward_evals"] > 0
    assert main(["info", str(vuln)]) == 0
    rows = (vuln / "scores-taylor.csv").read_text().splitlines()
    assert rows[0].startswith("rank,component,layer,unit,taylor") and rows[1].startswith("1,net.")


def test_finetune_resumes_from_another_working_folder(std_run, vuln, tmp_path, monkeypatch, capsys):
    """The base and the analysis were recorded as typed, relative to the folder the run started in, and a resume
    from another folder, naming the same folders by other relative paths, was refused as "different settings"."""
    import os
    import shutil

    start, later = tmp_path / "a", tmp_path / "a" / "b"
    later.mkdir(parents=True)

    def argv(where, base=std_run):
        rel = lambda p: os.path.relpath(p, where)  # noqa: E731
        return ["finetune", rel(base), "--select", rel(vuln), "--eps", "0.15", "--attack", "pgd:steps=1"] + [
            "--epochs", "1", "--limit", "100", "--out", rel(tmp_path / "ft"), "--quiet",
        ]  # fmt: skip

    monkeypatch.chdir(start)
    assert main(argv(start)) == 0
    monkeypatch.chdir(later)
    assert main([*argv(later), "--resume"]) == 0
    shutil.copytree(std_run, tmp_path / "copy")  # the same weights in another folder: another base
    capsys.readouterr()
    assert main([*argv(later, tmp_path / "copy"), "--resume"]) == 2
    assert "different settings (base:" in capsys.readouterr().err


def test_a_recorded_relative_folder_is_read_from_the_folder_the_run_started_in(tmp_path, monkeypatch):
    """A review found that the same relative string, typed from another working folder, was accepted for another
    folder of that name (while the one the run used is still there); a tree moved as a whole still matches."""
    from advtune.runs.common import same_setting

    for folder in ("x/std", "y/std"):
        (tmp_path / folder).mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "y")
    then = str(tmp_path / "x")
    assert not same_setting("base", "std", "std", working_dir=then)
    assert not same_setting("base", "std", "./std", working_dir=then)
    assert same_setting("base", "std", "../x/std", working_dir=then)
    assert same_setting("base", "std", "std/", working_dir=str(tmp_path / "moved-away"))  # the tree moved
    assert same_setting("base", "std", "./std")  # a record from before working_dir: read from today's folder
    # harden's own analysis beside a moved run: matched by its place next to the run
    assert same_setting("select", "old/analysis", "std/analysis", "old/finetune", "std/finetune", working_dir=then)
    assert not same_setting("select", "old/analysis", "std/analysis", "old/finetune", "new/finetune", working_dir=then)
    # a dataset file and a weights file are paths too (compared as strings, another folder's data.npz was taken);
    # a dataset by name stays a name
    for folder in ("x", "y"):
        (tmp_path / folder / "data.npz").write_bytes(b"")
    assert not same_setting("dataset", "data.npz", "data.npz", working_dir=then)
    assert same_setting("dataset", "data.npz", "../x/data.npz", working_dir=then)
    assert not same_setting("weights", "data.npz", "data.npz", working_dir=then)
    assert same_setting("dataset", "mnist", "mnist", working_dir=then)
    assert not same_setting("dataset", "mnist", "cifar10", working_dir=then)


def test_finetune_from_analysis_trains_the_top_share(std_run, vuln, tmp_path):
    out = tmp_path / "sft"
    assert (
        main(
            [
                "finetune",
                str(std_run),
                "--select",
                str(vuln),
                "--share",
                "0.1",
                "--criterion",
                "restoration",
                "--eps",
                "0.15",
                "--attack",
                "pgd:steps=2",
                "--epochs",
                "1",
                "--limit",
                "200",
                "--monitor-test",
                "50",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    sel = json.loads((out / "selection.json").read_text())
    ranked = [line.split(",")[1] for line in (vuln / "scores-restoration.csv").read_text().splitlines()[1:]]
    k = len(sel["components"])
    assert k == -(-len(ranked) // 10)  # ceil(10%)
    assert sorted(sel["components"]) == sorted(ranked[:k])


def test_selection_for_another_model_is_refused(vuln, tmp_path, capsys):
    other = tmp_path / "lenet"
    assert (
        main(
            [
                "train",
                "--dataset",
                "synthetic",
                "--model",
                "vgg-cifar",
                "--epochs",
                "1",
                "--limit",
                "64",
                "--limit-test",
                "10",
                "--out",
                str(other),
                "--quiet",
            ]
        )
        == 0
    )
    # every rule that reads the table: the budget rules read its layer sums by name, and refused nothing (an audit)
    for extra in (
        [],
        ["--params", "0.05", "--granularity", "lowrank"],
        ["--params", "0.05", "--granularity", "shares"],
        ["--params", "0.05", "--granularity", "sparse"],
        ["--params", "0.05", "--granularity", "probe", "--probe-quotas", "--budget", "3000"],
    ):
        argv = ["finetune", str(other), "--select", str(vuln), "--eps", "0.1", "--out", str(tmp_path / "x"), *extra]
        assert main([*argv, "--quiet"]) == 2, extra
        assert "different model" in capsys.readouterr().err, extra
        assert not (tmp_path / "x").exists() and not (tmp_path / "x.probe").exists()


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--criteria", "gradcam"], "unknown criterion gradcam; valid:"),
        (["--granularity", "layer"], "invalid choice"),  # argparse's (its quoting differs across versions)
        (["--eps", "0"], "eps must be > 0"),
        (["--attack", "cw"], "unknown attack"),
        (["--criteria", "taylor,taylor"], "--criteria lists taylor twice"),  # was refused after the attack ran
        (["--random-seeds", "0,0"], "--random-seeds must be distinct integers"),  # a smaller spread, unsaid
        (["--random-seeds", str(2**64)], "--random-seeds must be distinct integers (64-bit)"),
    ],
)
def test_analyze_bad_input(std_run, argv, match, tmp_path, capsys):
    args = ["analyze", str(std_run), "--eps", "0.1", "--out", str(tmp_path / "a"), "--quiet"]
    try:
        rc = main(args + argv)
    except SystemExit as e:  # refused by argparse (a choice): the same one line, status 2
        rc = e.code
    assert rc == 2 and match in capsys.readouterr().err and not (tmp_path / "a").exists()


def test_finetune_unknown_criterion_in_folder(std_run, vuln, tmp_path, capsys):
    rc = main(
        [
            "finetune",
            str(std_run),
            "--select",
            str(vuln),
            "--criterion",
            "gradcam",
            "--eps",
            "0.1",
            "--out",
            str(tmp_path / "x"),
            "--quiet",
        ]
    )
    assert (
        rc == 2
        and "no scores for criterion 'gradcam'; it has: activation-shift, restoration, taylor"
        in capsys.readouterr().err
    )


def test_a_finetune_steered_by_scores_of_another_norm_says_so(tmp_path, caplog, monkeypatch):
    """An analysis made under linf chose the mask of an l2 fine-tuning without a word."""
    import json
    from dataclasses import replace

    from advtune.runs import finetune as finetune_job
    from advtune.runs.configs import FinetuneRun

    analysis = tmp_path / "analysis"
    analysis.mkdir()
    (analysis / "config.json").write_text(json.dumps({"threat": {"norm": "linf", "eps": 0.3}}))

    def stop(*a, **k):
        raise RuntimeError("stopped after the check")

    monkeypatch.setattr(finetune_job, "load_base", stop)
    run = FinetuneRun(base=str(tmp_path / "b"), out=str(tmp_path / "o"), eps=1.0, norm="l2", select=str(analysis))
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="stopped after the check"):
        finetune_job.run(replace(run, share=0.1))
    assert f"--select {analysis} scored the model under linf; this fine-tuning attacks under l2" in caplog.text


def test_finetune_says_when_the_analysis_scored_another_model(std_run, vuln, tmp_path, capsys):
    """Another seed of the same architecture passes every shape check, but its unit indices name other units: the
    selection would be near random. The analysis records its model's fingerprint; finetune compares."""
    other = tmp_path / "other"
    assert main(train_argv(other, limit=400, limit_test=100, extra=("--seed", "7"))) == 0
    argv = ["--select", str(vuln), "--share", "0.1", "--eps", "0.1", "--epochs", "1", "--limit", "64", "--quiet"]
    capsys.readouterr()
    assert main(["finetune", str(std_run), *argv, "--out", str(tmp_path / "same")]) == 0
    assert "scored another model" not in capsys.readouterr().err
    # refused after the selection is made (fp16 off CUDA): the refusal is the only line, the warning never above it
    assert main(["finetune", str(other), *argv, "--amp", "fp16", "--out", str(tmp_path / "refused")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["finetune", str(other), *argv, "--out", str(tmp_path / "diff")]) == 0
    assert "scored another model than this base" in capsys.readouterr().err
    recorded = json.loads((tmp_path / "diff" / "config.json").read_text())["selection"]
    assert recorded["analysis_of_other_model"] == str(vuln)


def test_an_analysis_without_random_seeds_prints_no_random_nan(std_run, tmp_path, capsys):
    """An audit: `--random-seeds ""` (no random control) printed "(random nan%)" next to each share."""
    argv = ["analyze", str(std_run), "--eps", "0.15", "--attack", "fgsm", "--limit", "60", "--curve-limit", "60"]
    assert main([*argv, "--random-seeds", "", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "errors repaired by restoring top 1%:" in out and "nan" not in out and "random" not in out
