"""The CLI explains itself: `info` and `report` work on every kind of run folder."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from advtune.cli import main
from cli_helpers import train_argv

SMALL = {
    "name": "small",
    "seed": 0,
    "base": {
        "dataset": "synthetic",
        "model": "small-cnn",
        "limit": 200,
        "limit_test": 50,
        "train": {"epochs": 1, "batch_size": 64},
    },
    "threat": {"norm": "linf", "eps": 0.25},
    "evaluation": {"attacks": "fgsm", "limit_test": 50},
    "analysis": {
        "attack": "pgd:steps=2",
        "criteria": ["taylor"],
        "limit": 64,
        "curve_limit": 64,
        "shares": [0.1, 1.0],
        "random_seeds": [0],
    },
    "variants": [
        {"name": "standard", "kind": "standard"},
        {"name": "full-ft", "kind": "finetune", "select": "all", "attack": "pgd:steps=2"},
    ],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("ux")
    assert main(train_argv(root / "train", limit=200, limit_test=50, epochs=2)) == 0
    assert (
        main(
            [
                "analyze",
                str(root / "train"),
                "--eps",
                "0.2",
                "--criteria",
                "taylor",
                "--limit",
                "64",
                "--curve-limit",
                "64",
                "--out",
                str(root / "analyze"),
                "--quiet",
            ]
        )
        == 0
    )
    (root / "exp.yaml").write_text(yaml.safe_dump(SMALL))
    assert main(["experiment", str(root / "exp.yaml"), "--out", str(root / "exp"), "--no-report", "--quiet"]) == 0
    return root


def test_info_describes_every_kind_of_run(runs, capsys):
    for name, expect in (
        ("train", "small-cnn on synthetic"),
        ("analyze", "analysis   64 training examples"),
        ("exp", "2 runs, 2 finished"),
    ):
        assert main(["info", str(runs / name)]) == 0
        shown = capsys.readouterr().out
        assert expect in shown and "None on None" not in shown, shown
    assert "full-ft" in shown and "standard" in shown  # the experiment's results table


def test_info_on_a_record_of_another_shape_is_one_line(runs, tmp_path, capsys):
    """A hand-edited or foreign record made `info` end in a KeyError/AttributeError traceback."""
    import json
    import shutil

    copy = tmp_path / "train"
    shutil.copytree(runs / "train", copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary.pop("test_examples")
    (copy / "summary.json").write_text(json.dumps(summary))
    assert main(["info", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "a record has an unexpected shape (KeyError: 'test_examples')" in err and len(err.splitlines()) == 1
    assert main(["info", str(copy), "--json"]) == 0  # the raw records still show


def test_report_works_on_any_run_folder_and_on_several(runs, capsys):
    assert main(["report", str(runs / "train"), str(runs / "analyze"), str(runs / "exp")]) == 0
    for name in ("train", "analyze", "exp"):
        html = (runs / name / "report.html").read_text()
        assert html.startswith("<!doctype html>") and "data:image/png;base64," in html
    assert (runs / "train" / "training.png").is_file()
    assert "concentration" in (runs / "analyze" / "report.md").read_text()
    assert main(["report", str(runs / "nope")]) == 2
    assert "nope not found" in capsys.readouterr().err


def _commands() -> tuple[str, ...]:
    """Every command the CLI registers (a new job is checked without an edit here)."""
    from advtune.cli import COMMANDS

    return tuple(COMMANDS)


def test_commands_that_compute_nothing_take_no_seed_or_device(capsys):
    """report, info and apply accepted --seed and --device and ignored them."""
    for cmd in (["report", "x"], ["info", "x"], ["apply", "x", "p", "--out", "o"]):
        for flag in ("--seed", "--device"):
            with pytest.raises(SystemExit) as e:
                main([*cmd, flag, "1"])
            assert e.value.code == 2 and f"unrecognized arguments: {flag} 1" in capsys.readouterr().err


def test_every_help_does_not_import_torch():
    """`advtune --help` and `advtune <command> --help` answer at once: the job settings (runs/configs.py)
    load without torch."""
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "from advtune.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'harden' in out.getvalue() and 'experiment' in out.getvalue()\n"
        f"for cmd in {_commands()!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        try: main([cmd, '--help'])\n"
        "        except SystemExit as e: assert e.code == 0, (cmd, e.code)\n"
        "    assert 'torch' not in sys.modules, f'{cmd} --help imported torch'\n"
        "    assert f'usage: advtune {cmd}' in out.getvalue(), cmd\n"
        "    assert '(default' in out.getvalue() or cmd in ('info', 'report'), cmd  # flags without defaults\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_attack_names_in_the_help_are_the_registry():
    """`evaluate --help` reads the names from the attacks' `@register` decorators (no torch, no list to
    keep in cli.py): they are the registry's, in its order."""
    import advtune.evaluation  # noqa: F401  (registers the transfer attack, as evaluate does)
    from advtune import list_attacks
    from advtune.cli import attack_names

    assert attack_names() == list_attacks()


@pytest.mark.parametrize("columns", ["60", "80", "200"])
def test_the_criterion_names_in_the_help_are_the_registry(capsys, monkeypatch, columns):
    """analyze's help lists the criteria read from their source (a new criterion needs no edit of the help), each
    name whole at any terminal width (a line broke `activation-shift` after its hyphen at 200 columns)."""
    from advtune.cli import criterion_names, main
    from advtune.vulnerability import list_criteria

    monkeypatch.setenv("COLUMNS", columns)
    assert criterion_names() == list_criteria()
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    out = capsys.readouterr().out
    assert f"Criteria: {', '.join(list_criteria())}." in " ".join(out.split())
    assert not [line for line in out.splitlines() if line.rstrip().endswith("-") and not line.strip() == "-"]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "advtune: error: the following arguments are required: COMMAND (see advtune --help)"),
        (
            ["trian"],
            "advtune: error: argument COMMAND: invalid choice: 'trian' (choose from "
            + ", ".join(repr(c) for c in ("train", "evaluate", "analyze", "finetune", "harden", "experiment"))
            + ", 'report', 'info', 'apply', 'export', 'demo') (see advtune --help)",
        ),
        (
            ["train", "--dataset", "synthetic", "--model", "small-cnn", "--out", "x", "--bogus"],
            "advtune train: error: unrecognized arguments: --bogus (see advtune train --help)",
        ),
        (
            ["train", "--dataset", "synthetic", "--model", "small-cnn", "--out", "x", "--epochs", "abc"],
            "advtune train: error: argument --epochs: invalid int value: 'abc' (see advtune train --help)",
        ),
        (
            ["evaluate", "run", "--eps", "0.1", "--dist-backend", "mpi"],
            "advtune evaluate: error: argument --dist-backend: invalid choice: 'mpi' (choose from 'auto', 'gloo', "
            "'nccl') (see advtune evaluate --help)",
        ),
        (["info"], "advtune info: error: the following arguments are required: run (see advtune info --help)"),
        (["info", "run", "--bogus"], "advtune info: error: unrecognized arguments: --bogus (see advtune info --help)"),
        (
            ["report", "--config"],
            "advtune report: error: argument --config: expected one argument (see advtune report --help)",
        ),
        (  # no abbreviations: --limit was silently --limit-test (the only --limit* flag of export)
            ["export", "run", "--limit", "5", "--out", "x"],
            "advtune export: error: unrecognized arguments: --limit 5 (see advtune export --help)",
        ),
    ],
    ids=[
        *("no-command", "bad-command", "unknown-flag", "bad-type", "bad-choice"),
        *("missing", "info-flag", "config", "abbrev"),
    ],
)
def test_argparse_errors_are_one_line_pointing_at_help(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    captured = capsys.readouterr()
    assert e.value.code == 2 and captured.out == ""
    assert captured.err.strip() == message and "usage:" not in captured.err


def test_help_still_shows_the_usage(capsys):
    for argv, usage in (
        (["--help"], "usage: advtune [-h] [--version] COMMAND ..."),
        (["info", "--help"], "usage: advtune info"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0 and capsys.readouterr().out.startswith(usage)


def _no_space(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_the_run_lock_is_one_line_and_loses_nothing(tmp_path, capsys, monkeypatch):
    """The lock's pid write fails on a full disk: one line naming the folder and the reason; an existing
    run that --overwrite was replacing is put back in its place, as it was."""
    out = tmp_path / "run"
    monkeypatch.setattr(os, "pwrite", _no_space)
    assert main(train_argv(out, limit=64, limit_test=32)) == 2
    err = capsys.readouterr().err
    assert err == (
        f"advtune: error: cannot write the run lock in {out}: No space left on device; "
        "free disk space or choose another --out\n"
    )
    monkeypatch.undo()
    assert main(train_argv(out, limit=64, limit_test=32)) == 0  # the folder it left is usable
    before = _snapshot(out)
    # in this process the old run's lock is held already: the new folder's lock is the one that fails
    monkeypatch.setattr(os, "pwrite", _no_space)
    assert main(train_argv(out, limit=64, limit_test=32, extra=("--overwrite",))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"advtune: error: cannot write the run lock in {out}: No space left on device")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("call", ["fsync", "replace"])
def test_a_full_disk_while_writing_a_record_is_one_line_and_keeps_the_old_file(tmp_path, capsys, monkeypatch, call):
    out = tmp_path / "run"
    assert main(train_argv(out, limit=64, limit_test=32)) == 0
    before = _snapshot(out)
    monkeypatch.setattr(os, call, _no_space)
    assert main(train_argv(out, limit=64, limit_test=32, epochs=2, extra=("--resume",))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"advtune: error: cannot write {out}{os.sep}") and "No space left on device" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert _snapshot(out) == before  # every record as it was, and no temporary file left behind


def _snapshot(folder):
    """Every file of a run folder (temporary ones included), but the lock holder's pid."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


def test_demo_full_is_the_demo_at_the_frontiers_sizes_in_its_own_folder(tmp_path, monkeypatch):
    """`advtune demo --full` ran the round-1 frontier config (harden's rule of round 1) into runs/demo, where a
    `make demo` run refused it ("another base"); --seed and --data-dir were ignored before that."""
    from advtune.runs import demo
    from advtune.runs.configs import DemoConfig
    from advtune.runs.experiment.config import validate_config

    cfg = demo.demo_config(str(tmp_path), 3, full=True)
    assert cfg["seed"] == 3 and cfg["data_dir"] == str(tmp_path)
    assert cfg["base"]["limit"] == 55000 and cfg["evaluation"]["limit_test"] == 1000  # the frontier's sizes
    variants = {v["name"]: v for v in cfg["variants"]}
    assert variants["harden"] == {"name": "harden", "recipe": "harden", "budget": 900_000, "points": 5, "limit": 55000}
    assert variants["pgd-at"]["reference"] and "apgd-t" in cfg["evaluation"]["attacks"]
    validate_config(cfg)
    seen = []
    monkeypatch.setattr(demo.experiment_job, "run", lambda config, out, **k: seen.append((config["name"], out)) or [])
    monkeypatch.setattr(demo, "write_report", lambda out: {"html": "r.html", "md": "r.md"})
    for full, name, out in ((True, "advtune-demo-full", "runs/demo-full"), (False, "advtune-demo", "runs/demo")):
        demo.run(DemoConfig(full=full))
        assert seen.pop() == (name, Path(out))


def test_general_flags_before_the_command_are_refused_saying_where_they_go(capsys):
    """`advtune --quiet info RUN` said "unrecognized arguments: --quiet" (info has it) and `--device cpu info RUN`
    "invalid choice: 'cpu'"."""
    for argv, flags in ((["--quiet", "info", "run"], "--quiet"), (["--device", "cpu", "info", "run"], "--device cpu")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"advtune: error: flags go after the command: advtune info ... {flags}"


def test_an_empty_layers_selection_is_refused_before_any_folder_is_touched(tmp_path, capsys):
    """`--select layers:` named nothing to train and was refused by the training loop, after the run folder was made
    (and, with --overwrite, after the old run had been moved aside)."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("keep me")
    for out, extra in ((tmp_path / "new", []), (old, ["--overwrite"])):
        argv = ["finetune", str(tmp_path / "base"), "--select", "layers:", "--eps", "0.3", "--out", str(out), *extra]
        assert main(argv) == 2
        assert "--select 'layers:' names no layer" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and (old / "keep.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


@pytest.mark.parametrize(
    "spec,said",
    [
        ("trades:beta=-1", "TRADES needs beta > 0"),
        ("trades:step_size=-0.01", "TRADES: step_size must be > 0"),  # ran a descent
        ("trades:step_size=0", "TRADES: step_size must be > 0"),  # meant the default without a word
        ("trades:step_size=nan", "TRADES: step_size must be > 0"),
        ("awp:gamma=-1", "awp: gamma"),
        ("rwp:sigma=2", "rwp: sigma"),
    ],
)
def test_an_objectives_values_are_refused_before_the_base_is_read(spec, said, tmp_path, capsys):
    """The objective's own values were checked only when it was built, after the base model and the data loaded: a
    missing base folder here would be named first if they still were."""
    argv = ["finetune", str(tmp_path / "no-base"), "--eps", "0.1", "--attack", spec, "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert said in capsys.readouterr().err and not (tmp_path / "o").exists()
