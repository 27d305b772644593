"""Nothing lost, nothing silently wrong (issue 11): overwrite keeps the old run until the new one
finishes, one writer per run folder, honest records, one-line errors for bad input."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from advtune.cli import main
from advtune.errors import AdvtuneError
from advtune.runs import RunDir
from advtune.storage import atomic_write_bytes

TRAIN = [
    "train",
    "--dataset",
    "synthetic",
    "--model",
    "small-cnn",
    "--epochs",
    "1",
    "--limit",
    "256",
    "--limit-test",
    "64",
    "--quiet",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "run"
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--model", "no-such-model"], "unknown model"),
        (["--dataset", "no-such-set"], "unknown dataset"),
        (["--epochs", "0"], "epochs"),
        (["--adversarial", "", "--eps", "0.1"], "adversarial"),
        (["--eps", "0.1"], "--eps without --adversarial"),
        (["--val", "-5"], "--val"),
        (["--val", "1.5"], "--val"),
        (["--adversarial", "pgd", "--eps", "0.1", "--budget", "0"], "budget"),
        (["--adversarial", "pgd", "--eps", "0.1", "--points", "-1"], "points"),
        (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"),  # was refused in fit, run moved
        (["--val-attack-limit", "50"], "--val-attack-limit sets how much of the --val split"),  # was dropped
    ],
)
def test_a_refused_overwrite_leaves_the_finished_run_untouched(finished, capsys, bad, message):
    before = snapshot(finished)
    args = [*TRAIN, "--out", str(finished), "--overwrite"]
    for flag in bad[::2]:  # the bad value replaces the good one
        if flag in args:
            i = args.index(flag)
            del args[i : i + 2]
    try:
        code = main([*args, *bad])
    except SystemExit as e:  # refused by argparse (a value of the wrong kind): the same one line, status 2
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert snapshot(finished) == before


def test_overwrite_keeps_the_old_run_aside_until_the_new_one_is_done(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main([*TRAIN, "--out", str(out)]) == 0
    old = snapshot(out)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("advtune.runs.train.fit", killed)
    assert main([*TRAIN, "--out", str(out), "--overwrite"]) == 130
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".run.replaced-")]
    assert len(aside) == 1 and snapshot(aside[0]) == old  # the old run survives the interruption
    err = capsys.readouterr().err.strip()  # and the one line says where it is
    assert len(err.splitlines()) == 1 and f"the run {out} held before is kept at {aside[0]}" in err, err
    assert main([*TRAIN, "--out", str(tmp_path / "other"), "--epochs", "0"]) == 2  # a later error: said once only
    assert "kept at" not in capsys.readouterr().err
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*TRAIN, "--out", str(out), "--overwrite"]) == 0
    assert (out / "summary.json").is_file()
    # the interrupted run's aside is not this run's to delete, and no later command forgot it without a word
    assert f"moved aside are still kept ({aside[0]})" in capsys.readouterr().err and aside[0].is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.replaced-") and p != aside[0]]


def test_a_resume_may_change_epochs_only_where_nothing_spans_the_run(tmp_path, capsys):
    """A cosine schedule and the eps ramp are laid over the run's length: --resume with another --epochs made the
    learning rate jump from the schedule's end back near its peak (and the ramp restart). A constant schedule with
    no ramp extends as before."""
    ramped = ["--adversarial", "fgsm", "--eps", "0.1"]
    cases = [
        (["--schedule", "cosine"], "the cosine learning-rate schedule spans the run's length"),
        ([*ramped, "--eps-warmup", "0.6"], "the eps ramp (over the first 60% of the run) spans the run's length"),
        ([*ramped, "--eps-warmup", "0"], None),
        (ramped, None),  # the default ramp (30%) ends before epoch 1 of 1 or of 2: eps stays at its full value
        (["--schedule", "cosine", "--budget", "512"], None),  # a budget's steps decide the length, not --epochs
    ]
    for i, (extra, refused) in enumerate(cases):
        out = tmp_path / f"run{i}"
        first = [*TRAIN, *extra, "--out", str(out)]
        if "--budget" in extra:  # --epochs with --budget is refused on a new run (the budget decides the length)
            del first[first.index("--epochs") : first.index("--epochs") + 2]
        assert main(first) == 0
        before, _ = snapshot(out), capsys.readouterr()
        again = [*TRAIN, *extra, "--out", str(out), "--resume"]
        again[again.index("--epochs") + 1] = "2"
        code = main(again)
        err = capsys.readouterr().err.strip()
        if refused:
            assert code == 2 and refused in err and "resume with --epochs 1" in err and len(err.splitlines()) == 1
            assert snapshot(out) == before
        else:
            assert code == 0, err
            if "--budget" not in extra:
                assert json.loads((out / "model.json").read_text())["training"]["config"]["epochs"] == 2


def test_out_may_not_hold_the_base_run(finished, capsys):
    """`analyze H/finetune --out H --overwrite` (H a harden folder) moved H aside with its base inside, then deleted
    it when the analysis finished."""
    before = snapshot(finished)
    for job in (["analyze", "--eps", "0.1"], ["finetune", "--eps", "0.1", "--select", "all"]):
        assert main([job[0], str(finished), *job[1:], "--out", str(finished.parent), "--overwrite", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"--out {finished.parent} holds the base run {finished}" in err and len(err.splitlines()) == 1, err
    assert snapshot(finished) == before


def test_out_may_not_hold_the_weights_it_records(tmp_path, capsys):
    """`train --weights R/model.safetensors --epochs 0 --out R --overwrite` read the weights, moved R aside and
    deleted it with them when done; a damaged config.json is named for what it is, not as another tool's folder."""
    out = tmp_path / "run"
    assert main([*TRAIN, "--out", str(out)]) == 0
    before, _ = snapshot(out), capsys.readouterr()
    weights = str(out / "model.safetensors")
    again = [*TRAIN, "--epochs", "0", "--weights", weights, "--out", str(out), "--overwrite"]
    assert main(again) == 2
    assert f"--out {out} holds {weights}, which this run reads" in capsys.readouterr().err
    assert snapshot(out) == before
    (out / "config.json").write_text('{"cut sho')
    assert main([*TRAIN, "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "config.json cannot be read (JSONDecodeError)" in err and "delete the folder yourself" in err, err


def test_overwrite_refuses_a_folder_another_tool_made(tmp_path, capsys):
    """A Hugging Face model folder has a config.json too: --overwrite deleted it as if it were a run."""
    out = tmp_path / "bert-base"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    (out / "pytorch_model.bin").write_bytes(b"weights")
    assert main([*TRAIN, "--out", str(out), "--overwrite"]) == 2
    assert "is not an advtune run" in capsys.readouterr().err
    assert (out / "pytorch_model.bin").read_bytes() == b"weights" and len(list(tmp_path.iterdir())) == 1


def test_out_must_name_a_folder(capsys, monkeypatch):
    import advtune.runs.train as train_job

    # refused before the data are read (it was refused only once the run folder was made, after loading them)
    monkeypatch.setattr(train_job, "load_dataset", lambda *a, **k: pytest.fail("read the data before the check"))
    assert main([*TRAIN, "--out", ""]) == 2
    assert "--out must name a run folder" in capsys.readouterr().err


def test_an_existing_folder_is_refused_with_the_flags_the_command_has(tmp_path):
    """analyze and apply have no --resume: their refusal of an existing --out offered it all the same."""
    out = tmp_path / "taken"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(AdvtuneError, match="pass --resume to continue it or --overwrite to replace it"):
        RunDir.create(out)
    with pytest.raises(AdvtuneError, match="already exists; pass --overwrite to replace it, or choose another") as e:
        RunDir.create(out, resumable=False)
    assert "--resume" not in str(e.value)


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        from advtune.runs import RunDir
        RunDir.create({str(out)!r})
        print("locked", flush=True)
        time.sleep(60)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(AdvtuneError, match=rf"being written by another advtune process \(pid {holder.pid}\)"):
            RunDir.create(out, resume=True)
    finally:
        holder.kill()
        holder.wait()
    # the lock died with its process: a resume goes ahead (a stale lock never blocks)
    (out / "config.json").write_text("{}")
    RunDir.create(out, resume=True)


def test_files_honour_the_umask_and_orphan_tmp_files_are_cleaned(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "b.json", b"{}")
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / ".checkpoint.pt.abc123.tmp").write_bytes(b"half")
    RunDir.create(run, resume=True)
    assert not (run / ".checkpoint.pt.abc123.tmp").exists()


def test_a_read_only_or_full_output_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import errno
    import pathlib

    real_mkdir = pathlib.Path.mkdir

    def read_only(self, *a, **k):
        if "ro" in self.parts:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    assert main([*TRAIN, "--out", str(tmp_path / "ro" / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write to output folder" in err and "Read-only" in err and len(err.splitlines()) == 1
    monkeypatch.undo()
    # a disk that fills up while training: the checkpoint write fails as one line, the run can resume
    import advtune.storage as storage

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", full)
    assert main([*TRAIN, "--out", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err.strip()
    assert "No space left on device" in err and "free disk space" in err and len(err.splitlines()) == 1


def test_resume_refuses_changed_training_flags_and_leaves_the_record_alone(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TRAIN, "--out", str(out)]) == 0
    (out / "checkpoint.pt").unlink()  # no checkpoint: the flags must still be compared
    before = snapshot(out)
    assert main([*TRAIN, "--out", str(out), "--resume", "--lr", "0.01"]) == 2
    assert "train.lr: 0.001 -> 0.01" in capsys.readouterr().err
    assert snapshot(out) == before  # no "resumed" stamp for a refused resume


def test_a_moved_run_resumes(tmp_path):
    first = tmp_path / "first"
    assert main([*TRAIN, "--out", str(first)]) == 0
    moved = tmp_path / "moved"
    first.rename(moved)
    args = [a if a != "1" else "2" for a in TRAIN]  # --epochs 2: one more epoch
    assert main([*args, "--out", str(moved), "--resume"]) == 0
    assert len((moved / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_refused_variant_can_be_corrected(tmp_path, capsys):
    import yaml

    cfg = {
        "name": "t",
        "seed": 0,
        "threat": {"eps": 0.2},
        "evaluation": {"attacks": "fgsm", "limit": 32},
        "base": {"dataset": "synthetic", "model": "small-cnn", "limit": 128, "limit_test": 32, "train": {"epochs": 1}},
        "variants": [{"name": "ft", "kind": "finetune", "select": "all", "attack": "no-such-attack"}],
    }
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["experiment", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "unknown attack" in capsys.readouterr().err
    cfg["variants"][0]["attack"] = "fgsm"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["experiment", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 0


def test_bad_records_and_config_values_are_one_line_errors(finished, tmp_path, capsys):
    import shutil

    import yaml

    # a model.json with a bad num_classes / input_shape
    for key, value in (("num_classes", "ten"), ("input_shape", [1, -28, 28])):
        run = tmp_path / f"bad-{key}"
        shutil.copytree(finished, run, ignore=shutil.ignore_patterns(".lock"))
        meta = json.loads((run / "model.json").read_text())
        meta[key] = value
        (run / "model.json").write_text(json.dumps(meta))
        assert main(["evaluate", str(run), "--attacks", "fgsm", "--eps", "0.1", "--limit-test", "8", "--quiet"]) == 2
        assert f"{key} must be" in capsys.readouterr().err
    # a corrupt metrics.jsonl: info says which line
    run = tmp_path / "bad-metrics"
    shutil.copytree(finished, run, ignore=shutil.ignore_patterns(".lock"))
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n{not json\n')
    assert main(["info", str(run)]) == 2 and "line 2 is not valid JSON" in capsys.readouterr().err
    # experiment YAML numbers that are not numbers
    base = {
        "name": "t",
        "threat": {"eps": 0.2},
        "evaluation": {"attacks": "fgsm"},
        "base": {"dataset": "synthetic", "model": "small-cnn"},
    }
    for variant, message in (
        ({"name": "v", "share": "ten"}, "share must be a number"),
        ({"name": "v", "eps_warmup": 1.5}, "eps_warmup = 1.5 is out of range"),
    ):
        path = tmp_path / "e.yaml"
        path.write_text(yaml.safe_dump({**base, "variants": [variant]}))
        assert main(["experiment", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
        assert message in capsys.readouterr().err
    path.write_text(yaml.safe_dump({**base, "seed": 2**70, "variants": [{"name": "v"}]}))
    assert main(["experiment", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "seed must be an integer" in capsys.readouterr().err
    # a report on partial results
    part = tmp_path / "partial"
    part.mkdir()
    (part / "results.json").write_text(json.dumps({"rows": [{"variant": "x"}]}))
    assert main(["report", str(part), "--quiet"]) == 2
    assert "incomplete or corrupt" in capsys.readouterr().err


def test_a_nan_loss_stops_training_with_an_error(tmp_path, capsys):
    assert main([*TRAIN, "--out", str(tmp_path / "run"), "--lr", "1e30", "--optimizer", "sgd"]) == 2
    assert "the training loss became" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_finetune_checks_monitor_before_training(finished, tmp_path, capsys):
    assert (
        main(
            [
                "finetune",
                str(finished),
                "--eps",
                "0.1",
                "--monitor-test",
                "-5",
                "--out",
                str(tmp_path / "ft"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "--monitor-test must be" in capsys.readouterr().err and not (tmp_path / "ft").exists()


# ---------------------------------------------------------------- the Python API boundary of the attacks


@pytest.fixture(scope="module")
def bn_model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)
    )


@pytest.mark.parametrize(
    "spec",
    [
        "fgsm",
        "pgd:steps=2",
        "mifgsm:steps=2",
        "apgd-ce:steps=2",
        "apgd-t:steps=2,n_target_classes=1",
        "square:queries=3",
    ],
)
def test_attacks_refuse_bad_calls_and_leave_batchnorm_statistics_alone(bn_model, spec):
    import torch

    from advtune.attacks import build_attack
    from advtune.threat import ThreatModel

    attack = build_attack(spec, ThreatModel("linf", 0.3))
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 5, (6,))
    bad = [
        ((x * 255, y), "must lie in \\[0, 1\\]"),
        ((torch.where(x > 0.5, float("nan"), x), y), "NaN"),
        ((x[:, :, :, :4], y), "cannot take inputs of shape"),
        ((torch.rand(6, 3, 8, 8), y), "cannot take inputs of shape"),
        ((x.double(), y), "convert x"),
        ((x, y + 5), "labels must be in \\[0, 4\\]"),
        ((x, -y - 1), "labels must be class indices >= 0"),
    ]
    for (xb, yb), message in bad:
        with pytest.raises(AdvtuneError, match=message):
            attack(bn_model, xb, yb)
    with pytest.raises(AdvtuneError, match="torch.Generator"):
        attack(bn_model, x, y, generator=0)
    # pure in train mode too: the attack uses batch statistics, as the caller chose, but moves none
    bn_model.train()
    before = {k: v.clone() for k, v in bn_model.state_dict().items()}
    try:
        x_adv = attack(bn_model, x, y, generator=torch.Generator().manual_seed(0))
    finally:
        bn_model.eval()
    assert all(torch.equal(v, bn_model.state_dict()[k]) for k, v in before.items())
    assert float((x_adv - x).abs().max()) <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_robust_accuracy_refuses_a_generator_that_is_not_one(bn_model):
    import torch

    from advtune.attacks import build_attack
    from advtune.evaluation import robust_accuracy
    from advtune.threat import ThreatModel

    with pytest.raises(AdvtuneError, match="torch.Generator"):
        robust_accuracy(
            bn_model,
            (torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)),
            [build_attack("fgsm", ThreatModel("linf", 0.1))],
            generator=42,
        )


def test_refused_analyze_and_experiment_leave_finished_records_alone(finished, tmp_path, capsys):
    import yaml

    ana = tmp_path / "ana"
    assert (
        main(
            [
                "analyze",
                str(finished),
                "--eps",
                "0.2",
                "--criteria",
                "taylor",
                "--limit",
                "32",
                "--curve-limit",
                "0",
                "--out",
                str(ana),
                "--quiet",
            ]
        )
        == 0
    )
    before = snapshot(ana)
    assert (
        main(
            [
                "analyze",
                str(finished),
                "--eps",
                "0.2",
                "--attack",
                "no-such",
                "--out",
                str(ana),
                "--overwrite",
                "--quiet",
            ]
        )
        == 2
    )
    assert "unknown attack" in capsys.readouterr().err and snapshot(ana) == before
    cfg = {
        "name": "t",
        "seed": 0,
        "threat": {"eps": 0.2},
        "evaluation": {"attacks": "fgsm", "limit": 32},
        "base": {"dataset": "synthetic", "model": "small-cnn", "limit": 128, "limit_test": 32, "train": {"epochs": 1}},
        "variants": [{"name": "ft", "kind": "finetune", "select": "all", "attack": "fgsm"}],
    }
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "exp"
    assert main(["experiment", str(path), "--out", str(out), "--quiet"]) == 0
    record = (out / "experiment.json").read_bytes()
    cfg["variants"][0]["attack"] = "pgd:steps=2"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["experiment", str(path), "--out", str(out), "--quiet"]) == 2
    assert "was run with other settings" in capsys.readouterr().err
    assert (out / "experiment.json").read_bytes() == record
    # another base (here a pretrained run that is missing) is refused before experiment.json is rewritten
    cfg["variants"][0]["attack"] = "fgsm"
    cfg["base"] = {"pretrained": str(tmp_path / "gone")}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["experiment", str(path), "--out", str(out), "--quiet"]) == 2
    assert "another base" in capsys.readouterr().err
    assert (out / "experiment.json").read_bytes() == record


def test_out_of_memory_in_training_is_one_line(tmp_path, monkeypatch, capsys):
    """Training and analysis do not retry smaller batches (the evaluation does): a traceback from inside torch."""
    import torch

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79 GiB total)")

    monkeypatch.setattr("advtune.runs.train.fit", oom)
    assert main([*TRAIN, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out of memory (CUDA out of memory." in err and "smaller --batch-size" in err
    monkeypatch.setattr("advtune.runs.train.fit", lambda *a, **k: 1 / 0)  # a bug stays a traceback
    with pytest.raises(ZeroDivisionError):
        main([*TRAIN, "--out", str(tmp_path / "other")])


def test_overwrite_refuses_a_run_that_holds_other_runs(tmp_path, capsys):
    """`finetune RUN --out RUN/hardened`, then `train --out RUN --overwrite`: the run saved inside was deleted with
    the old one, without a word. Its own snapshots do not count as other runs."""
    run = tmp_path / "run"
    assert main([*TRAIN, "--out", str(run)]) == 0
    inner = run / "hardened"
    assert main([*TRAIN, "--out", str(inner)]) == 0
    before, _ = snapshot(inner), capsys.readouterr()
    assert main([*TRAIN, "--seed", "1", "--out", str(run), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"--overwrite: {run} holds other runs (hardened); move them out of it first" in err
    assert len(err.splitlines()) == 1 and snapshot(inner) == before
    snapped = tmp_path / "snapped"  # a run with snapshots of itself is replaced as before
    adv = ["--adversarial", "fgsm", "--eps", "0.1", "--budget", "1024", "--points", "2"]
    argv = [a for a in TRAIN if a not in ("--epochs", "1")] + adv
    assert main([*argv, "--out", str(snapped)]) == 0
    assert list((snapped / "snapshots").iterdir())
    assert main([*argv, "--seed", "1", "--out", str(snapped), "--overwrite"]) == 0


def test_overwrite_refuses_a_symlinked_run_folder(finished, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(finished, target_is_directory=True)
    before = snapshot(finished)
    assert main([*TRAIN, "--out", str(link), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"--overwrite: {link} is a symbolic link (to {finished}); pass the folder it points to" in err
    assert link.is_symlink() and snapshot(finished) == before


def test_a_tilde_the_shell_left_is_the_home_folder(tmp_path, monkeypatch, capsys):
    """`--out=~/x` (no shell expansion after `=`) and a YAML `out: ~/x` made a folder named `~` here."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main([*TRAIN, "--out=~/runs/a"]) == 0
    assert (tmp_path / "home" / "runs" / "a" / "model.safetensors").is_file() and not (tmp_path / "~").exists()
    assert main(["info", "~/runs/a"]) == 0 and "runs/a" in capsys.readouterr().out


def test_a_longer_resume_of_a_finished_run_reads_unfinished_until_it_ends(tmp_path, monkeypatch, capsys):
    """A finished run resumed with more epochs and interrupted kept its summary (finished, the old model) next to
    the cost and metrics of the longer run: info showed the 1-epoch accuracy beside the 2-epoch cost."""
    import advtune.runs.train as train_job
    from advtune.runs.info import format_info, run_info

    out = tmp_path / "run"
    assert main([*TRAIN, "--out", str(out)]) == 0

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_job, "close_training_folder", interrupted)
    longer = [*TRAIN, "--out", str(out), "--resume"]
    longer[longer.index("--epochs") + 1] = "2"
    assert main(longer) == 130
    assert not (out / "summary.json").exists() and "status     unfinished" in format_info(run_info(out))
    monkeypatch.undo()
    assert main(longer) == 0 and (out / "summary.json").is_file()


def test_sigterm_is_handled_as_an_interruption(tmp_path):
    """A scheduler's SIGTERM ended the process without a word (Ctrl-C said what to rerun)."""
    argv = [a for a in TRAIN if a != "--quiet"] + ["--out", str(tmp_path / "run")]  # its log says when it trains
    argv[argv.index("--epochs") + 1] = "500"
    proc = subprocess.Popen(
        [sys.executable, "-m", "advtune", *argv],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        for line in proc.stderr:  # the first epoch's log line (or the end of the output, if it died)
            if "epoch" in line.lower():
                break
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143
    assert "advtune: interrupted by SIGTERM; nothing half-written left" in err


def test_a_write_error_names_its_own_fix(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(AdvtuneError, match=r"a part of the path is a file, not a folder"):
        atomic_write_bytes(afile / "x.bin", b"1")


def test_a_damaged_evaluation_record_does_not_hide_the_run(finished, tmp_path, capsys):
    """One bad eval-*.json refused `info` and `report` for the whole run, and every damaged record's advice was to
    delete the run: the advice now fits the record, and info leaves the bad evaluation out with a warning."""
    import shutil

    from advtune.storage import read_json

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "eval-broken.json").write_text("{not json")
    assert main(["info", str(run)]) == 0
    captured = capsys.readouterr()
    assert "test accuracy" in captured.out or "acc" in captured.out
    assert "eval-broken.json" in captured.err and "delete this file or rerun advtune evaluate" in captured.err
    (run / "summary.json").write_text("[1]")
    with pytest.raises(AdvtuneError, match="rerun the command that made the run with --resume"):
        read_json(run / "summary.json")


def test_a_run_with_a_long_name_can_be_overwritten(tmp_path, capsys):
    """A 240-byte folder name was made, then could not be moved aside (the aside name passed 255 bytes)."""
    out = tmp_path / ("運" * 80)
    assert main([*TRAIN, "--out", str(out)]) == 0
    assert main([*TRAIN, "--seed", "1", "--out", str(out), "--overwrite"]) == 0, capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_termination_handlers_keep_nohup_and_a_callers_own():
    """`nohup advtune ...` ignores SIGHUP: the handler replaced that and a closed session killed the run."""
    import signal

    from advtune import cli

    old = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        replaced = cli._handle_termination()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is cli._terminated and set(replaced) == {signal.SIGTERM}
    finally:
        for s, h in old.items():
            signal.signal(s, h)
