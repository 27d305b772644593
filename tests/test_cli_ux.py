"""The CLI explains itself: `info` and `report` work on every kind of run folder."""

from __future__ import annotations

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
        ("exp", "2 variants, 2 finished"),
    ):
        assert main(["info", str(runs / name)]) == 0
        shown = capsys.readouterr().out
        assert expect in shown and "None on None" not in shown, shown
    assert "full-ft" in shown and "standard" in shown  # the experiment's results table


def test_report_works_on_any_run_folder_and_on_several(runs, capsys):
    assert main(["report", str(runs / "train"), str(runs / "analyze"), str(runs / "exp")]) == 0
    for name in ("train", "analyze", "exp"):
        html = (runs / name / "report.html").read_text()
        assert html.startswith("<!doctype html>") and "data:image/png;base64," in html
    assert (runs / "train" / "training.png").is_file()
    assert "concentration" in (runs / "analyze" / "report.md").read_text()
    assert main(["report", str(runs / "nope")]) == 2
    assert "nope not found" in capsys.readouterr().err


COMMANDS = ("train", "finetune", "analyze", "evaluate", "harden", "experiment", "demo", "info", "report")


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
        f"for cmd in {COMMANDS!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        try: main([cmd, '--help'])\n"
        "        except SystemExit as e: assert e.code == 0, (cmd, e.code)\n"
        "    assert 'torch' not in sys.modules, f'{cmd} --help imported torch'\n"
        "    assert f'usage: advtune {cmd}' in out.getvalue() and '(default' in out.getvalue(), cmd\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_attack_names_in_the_help_are_the_registry():
    from advtune import list_attacks
    from advtune.cli import ATTACK_NAMES

    assert list(ATTACK_NAMES) == list_attacks(), "a new attack: add its name to advtune.cli.ATTACK_NAMES"
