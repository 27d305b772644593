"""The command line: help, an end-to-end run's records, one-line errors, YAML config, kill -9 + resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from advtune.cli import COMMANDS, main
from advtune.errors import AdvtuneError


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_for_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage: advtune " + command in capsys.readouterr().out


def train_args(out, *extra):
    return [
        "train",
        "--dataset",
        "synthetic",
        "--model",
        "small-cnn",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--limit",
        "400",
        "--limit-test",
        "100",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def test_train_writes_a_complete_record(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(out, "--val", "80", "--seed", "3")) == 0
    assert "test accuracy:" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["seed"] == 3 and cfg["command"] == "train" and cfg["versions"]["torch"].startswith("2.")
    assert cfg["run"]["train"]["epochs"] == 2 and cfg["run"]["dataset"] == "synthetic" and cfg["dataset"]["val"] == 80
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(
        {"train_loss", "train_acc", "val_acc", "lr"} <= set(r) for r in rows
    )
    cost = json.loads((out / "cost.json").read_text())
    assert cost["update_grad_evals"] == 2 * 320 and cost["flops"] > 0 and cost["wall_s"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["test_acc"] <= 1 and summary["test_examples"] == 100
    meta = json.loads((out / "model.json").read_text())
    assert meta["architecture"] == "small-cnn" and meta["input_shape"] == [1, 16, 16]
    assert main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "seed 3" in shown and "test acc" in shown and "grad evals" in shown
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["test_examples"] == 100


@pytest.mark.parametrize(
    "argv,match",
    [
        (
            ["train", "--dataset", "imagenet", "--model", "small-cnn", "--out", "{tmp}/a"],
            "unknown dataset 'imagenet'; valid:",
        ),
        (
            ["train", "--dataset", "synthetic", "--model", "resnet50", "--out", "{tmp}/a"],
            "unknown model 'resnet50'; valid:",
        ),
        (  # a new-user walk: your own file without its factory was told only the zoo's names
            ["train", "--dataset", "synthetic", "--model", "mynet.py", "--out", "{tmp}/a"],
            "or your own as path/to/file.py:factory",
        ),
        (
            ["train", "--dataset", "synthetic", "--model", "small-cnn", "--epochs", "-2", "--out", "{tmp}/a"],
            "epochs must be",
        ),
        (
            ["train", "--dataset", "synthetic", "--model", "small-cnn", "--lr", "-1", "--out", "{tmp}/a"],
            "learning rate must be positive",
        ),
        (
            ["train", "--dataset", "synthetic", "--model", "small-cnn", "--out", "{tmp}/file/sub"],
            "cannot write to output folder|is a file",
        ),
        (
            ["train", "--dataset", "synthetic", "--model", "small-cnn", "--device", "tpu", "--out", "{tmp}/a"],
            "unknown device",
        ),
        (["info", "{tmp}/nothing"], "run folder .* not found"),
        # refused in one line, before any data (a CLI audit): the budget wins over --epochs without a word before
        (
            ["train", "--dataset", "synthetic", "--model", "small-cnn", "--epochs", "3", "--budget", "1000"]
            + ["--out", "{tmp}/a"],
            "--epochs 3 and --budget both set how long it runs; give one of them",
        ),
        (
            ["train", "--dataset", "synthetic", "--model", "small-cnn", "--adversarial", "tradez", "--eps", "0.1"]
            + ["--out", "{tmp}/a"],
            "unknown attack 'tradez'; valid attacks: .*; training objectives: trades",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, match, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("advtune: error:")
    import re

    assert re.search(match, err), err


def test_existing_output_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(out)) == 0
    assert main(train_args(out)) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    assert main(train_args(out, "--overwrite")) == 0
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "precious.txt").write_text("keep me")
    assert main(train_args(tmp_path / "notarun", "--overwrite")) == 2
    assert (tmp_path / "notarun" / "precious.txt").read_text() == "keep me"


def test_finetune_refuses_what_it_found_out_only_after_loading(tmp_path, capsys, monkeypatch):
    """A CLI audit: a mistyped --select folder, --keep-best without --val and --head with --select all were refused
    only after the base and the data loaded; an experiment folder given as RUN was "not an advtune run"."""
    out = tmp_path / "run"
    assert main(train_args(out)) == 0
    monkeypatch.setattr("advtune.runs.finetune.load_base", lambda *a: pytest.fail("loaded the base first"))
    ft = ["finetune", str(out), "--eps", "0.1", "--out", str(tmp_path / "ft"), "--quiet"]
    capsys.readouterr()
    for extra, refusal in (
        (["--select", str(tmp_path / "no-such-analysis")], "no-such-analysis'.*nor an analysis folder"),
        (["--keep-best", "2"], "--keep-best chooses on held-out training examples: give --val N"),
        (["--select", "all", "--head"], "--head adds to a selection; --select all trains everything"),
    ):
        assert main([*ft, *extra]) == 2
        err = capsys.readouterr().err
        assert re.search(refusal, err) and len(err.strip().splitlines()) == 1, err
    monkeypatch.setattr("advtune.runs.train.load_dataset", lambda *a, **k: pytest.fail("read the data first"))
    trades = ["--adversarial", "trades", "--eps", "0.1", "--attack-mode", "train", "--out", str(tmp_path / "t")]
    assert main(["train", "--dataset", "synthetic", "--model", "small-cnn", *trades]) == 2
    assert "trades crafts its examples with the model in eval mode" in capsys.readouterr().err
    assert main([*ft, "--attack", "trades", "--attack-mode", "train"]) == 2  # finetune: before the base
    assert "trades crafts its examples with the model in eval mode" in capsys.readouterr().err
    for argv, hint in (  # the same idea spelled differently by another command: named
        (["train", "--dataset", "synthetic", "--model", "small-cnn", "--attack", "pgd"], "--attack is --adversarial"),
        (["harden", str(out), "--eps", "0.3", "--attacks", "fgsm"], "--attacks is --evaluation here"),
    ):
        with pytest.raises(SystemExit):
            main([*argv, "--out", str(tmp_path / "x")])
        assert hint in capsys.readouterr().err
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "experiment.json").write_text("{}")
    (tmp_path / "exp" / "standard").symlink_to(out)
    assert main(["evaluate", str(tmp_path / "exp"), "--eps", "0.1", "--attacks", "fgsm"]) == 2
    assert "is an experiment folder, not a run; pass one of its runs (standard" in capsys.readouterr().err


def test_overwrite_never_deletes_a_file_the_new_run_reads(tmp_path, capsys):
    """--overwrite moved the old run aside and deleted it with a dataset, data folder or model file kept inside it
    (and the new run recorded a dataset path that no longer existed); finetune/harden/analyze with a base whose own
    data or model file lies inside --out likewise."""
    import numpy as np

    from advtune.errors import AdvtuneError
    from advtune.runs.common import refuse_same_folder

    out = tmp_path / "run"
    assert main(train_args(out)) == 0
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), np.arange(40) % 2
    np.savez(out / "mine.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    (out / "net.py").write_text("import torch\ndef make(num_classes):\n    return torch.nn.Linear(64, num_classes)\n")
    own = ["train", "--dataset", str(out / "mine.npz"), "--model", "small-cnn", "--epochs", "1", "--out", str(out)]
    factory = [*train_args(out, "--overwrite")]
    factory[factory.index("small-cnn")] = f"{out / 'net.py'}:make"
    capsys.readouterr()
    for argv in ([*own, "--overwrite", "--quiet"], [*factory, "--quiet"]):
        assert main(argv) == 2
        assert "which this run reads; write the new run to another folder" in capsys.readouterr().err
    assert (out / "mine.npz").is_file() and (out / "net.py").is_file() and (out / "config.json").is_file()
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"run": {"dataset": str(out / "mine.npz"), "data_dir": None}}))
    with pytest.raises(AdvtuneError, match=r"holds .*mine\.npz, which this run reads"):
        refuse_same_folder(str(out), str(base))
    (base / "config.json").write_text(json.dumps({"run": {"dataset": "mnist", "data_dir": str(out / "data")}}))
    with pytest.raises(AdvtuneError, match=r"holds .*data, which this run reads"):
        refuse_same_folder(str(out), str(base))
    (base / "model.json").write_text(json.dumps({"factory": {"file": str(out / "net.py")}}))
    (base / "config.json").write_text(json.dumps({"run": {"dataset": "mnist"}}))
    with pytest.raises(AdvtuneError, match=r"holds .*net\.py, which this run reads"):
        refuse_same_folder(str(out), str(base))
    refuse_same_folder(str(tmp_path / "elsewhere"), str(base))  # another --out: nothing to refuse


def test_yaml_config_gives_defaults_and_flags_override(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "dataset: synthetic\nmodel: small-cnn\nepochs: 1\nlimit: 200\nlimit-test: 50\nbatch_size: 50\nlr: 0.002\n"
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--lr", "0.003", "--quiet"]) == 0
    run = json.loads((out / "config.json").read_text())["run"]
    assert run["train"]["epochs"] == 1 and run["train"]["batch_size"] == 50 and run["train"]["lr"] == 0.003
    cfg.write_text("dataset: synthetic\nmodel: small-cnn\nlr: 1e-3\nepochs: 1\nlimit: 100\nlimit-test: 20\n")
    assert (
        main(["train", "--config", str(cfg), "--out", str(tmp_path / "sci"), "--quiet"]) == 0
    )  # 1e-3 is a str to YAML
    assert json.loads((tmp_path / "sci" / "config.json").read_text())["run"]["train"]["lr"] == 0.001
    cfg.write_text("dataset: synthetic\nmodel: small-cnn\noptimizer: lbfgs\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r4")]) == 2
    assert "optimizer must be one of adam, sgd" in capsys.readouterr().err
    assert main(["--config", str(cfg)]) == 2
    assert "--config needs a command" in capsys.readouterr().err
    cfg.write_text("dataset: synthetic\nmodl: small-cnn\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r2")]) == 2
    assert "unknown key 'modl'; did you mean 'model'?" in capsys.readouterr().err
    cfg.write_text("dataset: synthetic\nmodel: [small-cnn\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r3")]) == 2
    assert "not valid YAML at line" in capsys.readouterr().err
    cfg.write_text("dataset: synthetic\nmodel: small-cnn\nresume: 'false'\n")  # a quoted "false" is truthy
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r6")]) == 2
    assert "resume is a switch: write true or false, got 'false'" in capsys.readouterr().err
    cfg.write_text("head: null\nnorms: ~\n")  # an auto switch (bool | None): null is auto, as its help says
    assert main(["finetune", str(tmp_path / "no-base"), "--config", str(cfg), "--eps", "0.3", "--out", "x"]) == 2
    assert "run folder" in capsys.readouterr().err  # the YAML passed; the missing base is what stops it
    # an empty value, a switch's word for a value, a number where the flag reads text: one line each (an audit)
    for text, said in (
        ("lr:\n", "lr has no value; give one or drop the key"),
        ("dataset: true\n", "dataset takes a value, not true"),
        ("device: 1\n", "device"),
    ):
        cfg.write_text("dataset: synthetic\nmodel: small-cnn\n" + text)
        assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r7")]) == 2, text
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r7").exists()
    cfg.write_text("limit-test: null\nseed: null\ndevice: null\n")  # null where the setting takes it: accepted
    assert main(["evaluate", str(tmp_path / "no-run"), "--config", str(cfg), "--eps", "0.1", "--attacks", "fgsm"]) == 2
    assert "run folder" in capsys.readouterr().err  # the YAML passed; the missing run is what stops it
    from advtune.cli import COMMANDS, build_parser
    from advtune.settings import apply_yaml_defaults

    cfg.write_text("only: null\ndevice: 1\n")  # a text flag's null is its default, not the word "None"
    argv = ["experiment", "exp.yaml", "--config", str(cfg), "--out", "x"]
    parser = build_parser(argv)
    apply_yaml_defaults(parser, COMMANDS, argv)
    args = parser.parse_args(argv)
    assert args.only is None and args.device == "1"  # (a number for a text flag: the CLI's text)
    cfg.write_text("out:\n")  # finetune's --out is required: null is no folder
    assert main(["finetune", str(tmp_path / "no-base"), "--config", str(cfg), "--eps", "0.3"]) == 2
    assert "out has no value" in capsys.readouterr().err
    # a binary file given by mistake (a weights file, a UTF-16 export): one line, not a UnicodeDecodeError
    cfg.write_bytes(b"\xff\xfe\x00bin")
    for argv in (
        ["train", "--config", str(cfg), "--out", str(tmp_path / "r5")],
        ["experiment", str(cfg), "--out", str(tmp_path / "x")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "is not a YAML text file" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r5").exists()


def test_python_dash_m_and_eps_fraction(tmp_path):
    r = subprocess.run([sys.executable, "-m", "advtune", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("advtune ")
    from advtune.settings import number

    assert number("8/255") == pytest.approx(8 / 255) and number("0.3") == 0.3


def test_kill_9_then_resume_gives_the_uninterrupted_weights(tmp_path):
    """A real SIGKILL mid-run: --resume must end with exactly the weights of an uninterrupted run."""
    base = [
        sys.executable,
        "-m",
        "advtune",
        "train",
        "--dataset",
        "synthetic",
        "--model",
        "madry-mnist",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--limit",
        "640",
        "--limit-test",
        "50",
        "--optimizer",
        "sgd",
        "--lr",
        "0.02",
        "--checkpoint-every",
        "5",
        "--quiet",
    ]
    env = {**os.environ, "ADVTUNE_NO_DOWNLOAD": "1"}
    ref = tmp_path / "ref"
    subprocess.run(base + ["--out", str(ref)], check=True, env=env, capture_output=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen(base + ["--out", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "model.safetensors").exists()

    r = subprocess.run(base + ["--out", str(run), "--resume"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (
        json.loads((run / "summary.json").read_text())["test_acc"]
        == json.loads((ref / "summary.json").read_text())["test_acc"]
    )


def test_evaluate_command_records_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(out)) == 0
    assert (
        main(
            [
                "evaluate",
                str(out),
                "--attacks",
                "fgsm,pgd:steps=3,restarts=2",
                "--eps",
                "0.2",
                "--limit-test",
                "50",
                "--quiet",
            ]
        )
        == 0
    )
    shown = capsys.readouterr().out
    assert "worst case over attacks" in shown and "masking gate" in shown
    rec = json.loads(next(out.glob("eval-fgsm-pgd*.json")).read_text())
    assert rec["attacks"] == ["fgsm", "pgd:steps=3,restarts=2"] and rec["examples"] == 50 and rec["split"] == "test"
    assert rec["gate_grad_evals"] > 0  # the gate ran (a skipped gate printed "passed" too)
    assert rec["max_perturbation"]["pgd:steps=3,restarts=2"] <= 0.2 + 1e-6
    assert (
        main(
            [
                "evaluate",
                str(out),
                "--suite",
                "quick",
                "--eps",
                "0.1,0.3",
                "--limit-test",
                "40",
                "--plot",
                "--name",
                "curve",
                "--quiet",
            ]
        )
        == 0
    )
    curve = json.loads((out / "eval-curve.json").read_text())
    assert (
        curve["eps"] == [0.1, 0.3]
        and curve["accuracy"][1] <= curve["accuracy"][0]
        and (out / "eval-curve.png").is_file()
    )
    assert main(["evaluate", str(out), "--attacks", "cw", "--eps", "0.1", "--quiet"]) == 2
    assert "unknown attack" in capsys.readouterr().err


def test_an_interrupted_evaluation_leaves_the_last_record_and_reruns(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of `evaluate`: one line, exit 130, the previous record untouched and no
    half-written file; the same command then runs to the end."""
    import advtune.evaluation.protocol as protocol

    out = tmp_path / "run"
    assert main(train_args(out)) == 0
    argv = ["evaluate", str(out), "--attacks", "pgd:steps=2", "--eps", "0.1", "--limit-test", "40"]
    argv += ["--batch-size", "10", "--name", "e", "--quiet"]
    assert main(argv) == 0
    record = (out / "eval-e.json").read_bytes()
    capsys.readouterr()

    real, calls = protocol._attack_once, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(protocol, "_attack_once", interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err and "rerun" in err
    assert (out / "eval-e.json").read_bytes() == record
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.setattr(protocol, "_attack_once", real)
    assert main([*argv[:-3], "--name", "again", "--quiet"]) == 0
    assert json.loads((out / "eval-again.json").read_text())["examples"] == 40


def test_evaluate_never_replaces_a_record_of_another_measurement(tmp_path, capsys):
    """A quick 10-image check under the same attacks and eps wrote over the 40-image record of the same name (and
    `--name protocol` over harden's own); now it is refused before any work, unless --overwrite. The same
    measurement again replaces it (a rerun)."""
    out = tmp_path / "run"
    assert main(train_args(out)) == 0
    argv = ["evaluate", str(out), "--attacks", "fgsm", "--eps", "0.1", "--batch-size", "10", "--quiet"]
    assert main([*argv, "--limit-test", "40"]) == 0
    (record,) = out.glob("eval-*.json")
    before = record.read_bytes()
    capsys.readouterr()
    others = (["--limit-test", "10"], ["--limit-test", "40", "--seed", "1"], ["--limit-test", "40", "--no-cascade"])
    for other in others:
        assert main([*argv, *other]) == 2, other
        err = capsys.readouterr().err
        assert "already holds an evaluation with other settings" in err and "--name" in err, err
        assert len(err.strip().splitlines()) == 1 and record.read_bytes() == before
    assert main([*argv, "--limit-test", "40"]) == 0  # the same measurement: a rerun replaces it
    assert main([*argv, "--limit-test", "10", "--overwrite"]) == 0
    assert json.loads(record.read_text())["examples"] == 10
    record.write_text("{not json")  # a broken record is not judged equal: refused as well, and named as broken
    capsys.readouterr()
    assert main([*argv, "--limit-test", "10"]) == 2
    assert "is unreadable (not an evaluation record this version can compare)" in capsys.readouterr().err


def test_evaluate_checks_it_can_write_its_record_before_any_attack(tmp_path, capsys, monkeypatch):
    """A run folder it cannot write to was found out only when the record was written, after every attack (hours on
    a CPU): now before any work, with --record-dir to write the record elsewhere. A --limit-test of 0 is named as
    such (it was "already holds an evaluation with other settings" next to an earlier record)."""
    import advtune.runs.evaluate as evaluate_job

    out = tmp_path / "run"
    assert main(train_args(out)) == 0
    argv = ["evaluate", str(out), "--attacks", "fgsm", "--eps", "0.1", "--limit-test", "20", "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    (tmp_path / "a-file").write_text("")
    real = evaluate_job.evaluation_record
    monkeypatch.setattr(evaluate_job, "evaluation_record", lambda *a, **k: pytest.fail("attacked before the check"))
    assert main([*argv, "--record-dir", str(tmp_path / "a-file" / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write the evaluation record to" in err, err
    assert main([*argv, "--eps", "0.1,0.1", "--plot"]) == 2  # the same eps twice: refused, not plotted as one point
    assert "--eps lists an eps twice (0.1,0.1)" in capsys.readouterr().err
    assert main([*argv, "--eps", "", "--record-dir", str(tmp_path / "never")]) == 2  # no eps: before the folder
    assert "evaluate needs --eps" in capsys.readouterr().err and not (tmp_path / "never").exists()
    assert main([*argv[:-3], "--limit-test", "0", "--quiet"]) == 2
    assert "(--limit-test) must be a positive number of examples, got 0" in capsys.readouterr().err
    monkeypatch.setattr(evaluate_job, "evaluation_record", real)
    assert main([*argv, "--record-dir", str(tmp_path / "elsewhere")]) == 0
    assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == [p.name for p in out.glob("eval-*.json")]
    # another run into the same --record-dir: its record would have replaced the first run's without a word
    other = tmp_path / "other"
    assert main(train_args(other, "--seed", "5")) == 0
    capsys.readouterr()
    into = [*argv[:1], str(other), *argv[2:], "--record-dir", str(tmp_path / "elsewhere")]
    assert main(into) == 2
    assert "holds the evaluation of another model" in capsys.readouterr().err
    assert main([*into, "--name", "other"]) == 0 and len(list((tmp_path / "elsewhere").iterdir())) == 2
    assert main([*argv, "--record-dir", str(tmp_path / "elsewhere")]) == 0  # the first run again: a rerun
    monkeypatch.setattr(evaluate_job, "load_base", lambda *a, **k: pytest.fail("read the model before the check"))
    assert main([*argv[:3], "fgsm,fgsm", *argv[4:]]) == 2  # a spec twice: refused before the model is read
    assert "appears twice" in capsys.readouterr().err


def test_info_says_when_an_evaluation_measured_earlier_weights(tmp_path, capsys):
    """An evaluation, then more training (--resume --epochs 3): info showed the old robustness as the run's own."""
    out = tmp_path / "run"
    assert main(train_args(out)) == 0
    assert main(["evaluate", str(out), "--attacks", "fgsm", "--eps", "0.1", "--limit-test", "20", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    said = capsys.readouterr().out
    assert "measured on earlier weights" not in said and "linf eps=0.1, clean" in said  # the threat said (l2 too)
    longer = train_args(out, "--resume")
    longer[longer.index("--epochs") + 1] = "3"
    assert main(longer) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("eval ")]
    assert "measured on earlier weights: model.safetensors changed since" in line


def test_a_relative_data_dir_is_recorded_as_the_folder_it_names(tmp_path, monkeypatch):
    """Later jobs (harden, finetune, evaluate) read the base run's data folder from its record: recorded as typed
    (`data`), it named another folder from another working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert main(train_args(tmp_path / "run", "--data-dir", "data")) == 0
    run = json.loads((tmp_path / "run" / "config.json").read_text())["run"]
    assert run["data_dir"] == str(tmp_path.resolve() / "data")
    assert main(train_args(tmp_path / "run", "--data-dir", "./data/", "--resume")) == 0  # the same folder: resumes
    monkeypatch.setenv("HOME", str(tmp_path))  # ~ as the loaders read it (a YAML or --data-dir=~/data keeps it)
    assert main(train_args(tmp_path / "home", "--data-dir", "~/data")) == 0
    assert json.loads((tmp_path / "home" / "config.json").read_text())["run"]["data_dir"] == str(run["data_dir"])


def test_finetune_resume_refuses_a_base_retrained_in_place(tmp_path, capsys):
    """A review: finetune compared its base by path only; retrained in place, a resume took its selection and patch
    from the new base and its weights from the old base's checkpoint. The probe stage's finished folder too."""
    base = tmp_path / "base"
    assert main(train_args(base)) == 0
    for extra in ([], ["--granularity", "probe", "--probe", "0.5", "--params", "0.2"]):
        ft = ["finetune", str(base), "--eps", "0.1", "--budget", "4000", "--quiet", *extra]
        out = tmp_path / f"ft{len(extra)}"
        assert main([*ft, "--out", str(out)]) == 0
        assert main([*ft, "--out", str(out), "--resume"]) == 0  # the same base: resumes (finished: records again)
    capsys.readouterr()
    tiny = ["finetune", str(base), "--eps", "0.1", "--budget", "400", "--granularity", "probe", "--params", "0.2"]
    assert main([*tiny, "--out", str(tmp_path / "tiny"), "--quiet"]) == 2  # the probe's one step spent it all
    assert "leaving none to the masked stage; raise --budget" in capsys.readouterr().err
    assert main(train_args(base, "--overwrite", "--seed", "1")) == 0
    capsys.readouterr()
    for extra in ([], ["--granularity", "probe", "--probe", "0.5", "--params", "0.2"]):
        ft = ["finetune", str(base), "--eps", "0.1", "--budget", "4000", "--quiet", *extra]
        assert main([*ft, "--out", str(tmp_path / f"ft{len(extra)}"), "--resume"]) == 2
        err = capsys.readouterr().err
        assert "the base model changed since" in err and len(err.strip().splitlines()) == 1, err


def test_a_failed_overwrite_of_the_probe_rule_keeps_the_old_probe(tmp_path, capsys, monkeypatch):
    """A review: the probe stage's folder (OUT.probe) deleted the probe it replaced as soon as the probe finished, so
    a masked stage that then failed left the old run without its probe. Both are kept until both stages finish."""
    import advtune.runs.finetune as ft_job

    base, out = tmp_path / "base", tmp_path / "ft"
    assert main(train_args(base)) == 0
    argv = ["finetune", str(base), "--eps", "0.1", "--budget", "4000", "--granularity", "probe", "--probe", "0.5"]
    argv += ["--params", "0.2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    real = ft_job.finetune_model

    def masked_stage_fails(model, ds, job, rd=None, *a, **k):
        if rd is not None and rd.path == out:
            raise AdvtuneError("the masked stage failed")
        return real(model, ds, job, rd, *a, **k)

    monkeypatch.setattr(ft_job, "finetune_model", masked_stage_fails)
    assert main([*argv, "--overwrite", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    kept = {p.name.split(".replaced-")[0] for p in tmp_path.glob(".*.replaced-*")}
    assert kept == {".ft", ".ft.probe"} and "the masked stage failed" in err, (kept, err)
    probe_aside = next(tmp_path.glob(".ft.probe.replaced-*"))
    assert (probe_aside / "summary.json").is_file()  # the old run's probe, whole
    monkeypatch.setattr(ft_job, "finetune_model", real)
    for p in tmp_path.glob(".*.replaced-*"):  # (put aside by hand: what the error line says to do)
        shutil.rmtree(p)
    assert main([*argv, "--overwrite", "--seed", "4"]) == 0
    assert not list(tmp_path.glob(".*.replaced-*"))  # both stages done: both old folders deleted


def test_select_of_a_run_that_is_no_analysis_says_how_to_make_one(tmp_path, capsys):
    """A new-user walk: `--select runs/base` (a train run) said "run advtune analyze into it first"."""
    base = tmp_path / "base"
    assert main(train_args(base)) == 0
    capsys.readouterr()
    argv = ["finetune", str(base), "--select", str(base), "--eps", "0.1", "--out", str(tmp_path / "x"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "(not an analysis folder): run `advtune analyze BASE --eps EPS --out DIR` on the model you fine-tune" in err


def test_a_mistyped_flag_is_answered_with_the_one_meant(tmp_path, capsys):
    """A new-user walk: `--epoch 1` got "unrecognized arguments" with no suggestion, where a config key gets one."""
    with pytest.raises(SystemExit) as e:  # argparse's own exit, status 2
        main(["train", "--dataset", "synthetic", "--model", "small-cnn", "--epoch", "1", "--out", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "unrecognized arguments: --epoch 1 (did you mean --epochs?)" in err
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "synthetic", "--zzzz", "--out", "x"])
    assert "did you mean" not in capsys.readouterr().err  # nothing close: nothing suggested
    with pytest.raises(SystemExit):  # a hint of another name already there: not doubled by a suggestion (a review)
        main(["harden", "x", "--eps", "0.3", "--val", "0.1", "--out", "y"])
    err = capsys.readouterr().err
    assert "(--val is --holdout here)" in err and "did you mean" not in err


def test_a_log_to_a_file_has_times_and_prints_as_they_happen():
    """Under nohup or a scheduler stdout is a file: harden's stage lines and every result were block-buffered (they
    came after the end's lines, or never when the job was killed), and no log line said when it was written."""
    import subprocess
    import sys

    code = (
        "import argparse, logging, sys; from advtune.cli import _setup_logging; "
        "_setup_logging(argparse.Namespace(verbose=True)); print(sys.stdout.line_buffering); "
        "logging.getLogger('advtune.x').debug('ours'); logging.getLogger('matplotlib.x').debug('theirs')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "True", done.stderr
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d DEBUG advtune\.x: ours$", done.stderr, re.M), done.stderr
    assert "theirs" not in done.stderr  # --verbose is advtune's debug lines, not every library's
