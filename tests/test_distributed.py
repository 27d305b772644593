"""Every command under torchrun: 2 local CPU processes (gloo) against one process on the same work.

What must hold whatever the number of processes: the same final weights (float tolerance: the two
ranks' mean gradient sums in another order), the same records (examples, gradient evaluations,
robust accuracy), exactly one run folder written by rank 0, a resume after a kill -9 of one rank,
and a taken --out stops every rank with one line. The jobs in a torchrun launch: here; kills, resumes
and refusals: test_distributed_failures.py (two files, so `make test` runs them on two workers).
"""

from __future__ import annotations

import json

import pytest
import torch

from ddp_helpers import ATOL, TORCHRUN, TRAIN, max_diff, one, two, weights

pytestmark = pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun not installed")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The same training in one process and in two."""
    d = tmp_path_factory.mktemp("ddp")
    r1 = one(d, "train", *TRAIN, "--epochs", "2", "--out", "single")
    r2 = two(d, "train", *TRAIN, "--epochs", "2", "--out", "ddp")
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr[-2000:]
    return d


def test_ddp_train_gives_one_process_weights_and_records(trained):
    assert max_diff(weights(trained / "single"), weights(trained / "ddp")) < ATOL
    for name in ("cost.json",):
        a, b = (json.loads((trained / f / name).read_text()) for f in ("single", "ddp"))
        assert a["grad_evals"] == b["grad_evals"] == 2 * 256 and a["examples"] == b["examples"]
    m1, m2 = ((trained / f / "metrics.jsonl").read_text().splitlines() for f in ("single", "ddp"))
    assert len(m1) == len(m2) == 2  # one record set: rank 1 wrote no second line
    for a, b in zip(m1, m2):
        a, b = json.loads(a), json.loads(b)
        assert a["examples"] == b["examples"] == 256 and a["grad_evals"] == b["grad_evals"]
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4
    cfg = json.loads((trained / "ddp" / "config.json").read_text())
    assert cfg["processes"] == 2


def test_exactly_one_run_folder_is_written(trained):
    assert sorted(p.name for p in trained.iterdir()) == ["ddp", "single"]
    assert sorted(p.name for p in (trained / "ddp").iterdir()) == sorted(p.name for p in (trained / "single").iterdir())
    assert not [p for p in (trained / "ddp").iterdir() if p.name.endswith(".tmp")]


def test_ddp_evaluate_gives_the_one_process_robust_accuracy(trained):
    attacks = ["--eps", "0.2", "--attacks", "fgsm,pgd:steps=3,apgd-ce:steps=5", "--limit-test", "100"]
    assert one(trained, "evaluate", "single", *attacks, "--batch-size", "16", "--name", "one").returncode == 0
    r = two(trained, "evaluate", "single", *attacks, "--batch-size", "16", "--name", "two")
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((trained / "single" / f"eval-{n}.json").read_text()) for n in ("one", "two"))
    for key in ("accuracy", "worst_case_accuracy", "clean_accuracy", "grad_evals", "n", "suspect"):
        assert a[key] == b[key], key
    assert b["processes"] == 2 and a["processes"] == 1
    assert r.stdout.count("worst case") == 1  # rank 0 alone prints the result


def test_ddp_selective_finetune_keeps_unselected_entries_bit_exact(trained):
    r = two(
        trained,
        "finetune",
        "single",
        "--select",
        "layers:net.conv1",
        "--eps",
        "0.1",
        "--attack",
        "pgd:steps=2",
        "--epochs",
        "1",
        "--limit",
        "256",
        "--batch-size",
        "64",
        "--monitor-test",
        "0",
        "--device",
        "cpu",
        "--out",
        "ft",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    base, tuned = weights(trained / "single"), weights(trained / "ft")
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.startswith("net.conv1") for k in changed)
    assert json.loads((trained / "ft" / "cost.json").read_text())["grad_evals"] == 256 * 3


def test_a_taken_out_folder_stops_every_rank_with_the_same_error(trained):
    r = two(trained, "train", *TRAIN, "--epochs", "1", "--out", "single")
    assert r.returncode != 0
    # both ranks stop with rank 0's one-line reason (none waits for a collective that never comes)
    assert r.stderr.count("already exists; pass --resume") == 2
    assert "advtune/" not in r.stderr  # no traceback from inside advtune (torchrun summarises the exit)


def test_ddp_analyze_gives_the_one_process_scores(trained):
    args = ["analyze", "single", "--eps", "0.2", "--attack", "pgd:steps=3", "--criteria", "taylor,activation-shift"]
    args += ["--limit", "64", "--curve-limit", "0", "--batch-size", "16", "--quiet"]
    r1 = one(trained, *args, "--out", "an1")
    r2 = two(trained, *args, "--out", "an2")
    assert r1.returncode == 0 and r2.returncode == 0, r2.stderr[-2000:]
    for crit in ("taylor", "activation-shift"):
        a, b = (json.loads((trained / f / f"scores-{crit}.json").read_text()) for f in ("an1", "an2"))
        assert a["components"] == b["components"] and a["metadata"]["n_samples"] == b["metadata"]["n_samples"] == 64
        assert max(abs(x - y) for x, y in zip(a["scores"], b["scores"])) < 1e-6 * max(map(abs, a["scores"]))


def test_ddp_harden_composes_every_job_and_writes_one_report(trained):
    """harden = analyze -> finetune -> evaluate x2 -> report: every hand-over between jobs waits for
    rank 0's records, and the report (which reads back its figures) is written once."""
    r = two(trained, "harden", "single", "--eps", "0.1", "--limit", "128", "--limit-test", "50", "--budget", "1000",
            "--analysis-limit", "128", "--out", "hard", "--device", "cpu", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((trained / "hard" / "summary.json").read_text())
    assert s["after"]["robust_acc"] >= 0 and (trained / "hard" / "report.html").is_file()
    assert r.stdout.count("-> ") == 1  # rank 0 alone reports
