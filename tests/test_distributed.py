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
    # the training wrote one folder per launch (the other tests' folders are named below)
    assert {p.name for p in trained.iterdir()} - {"hard1", "hard2", "an1", "an2"} == {"ddp", "single"}
    assert sorted(p.name for p in (trained / "ddp").iterdir()) == sorted(p.name for p in (trained / "single").iterdir())
    assert not [p for p in (trained / "ddp").iterdir() if p.name.endswith(".tmp")]


def test_ddp_evaluate_gives_the_one_process_robust_accuracy(trained):
    """`advtune evaluate` itself under torchrun (harden below covers the evaluation inside a job)."""
    attacks = ["--eps", "0.2", "--attacks", "fgsm,pgd:steps=3", "--limit-test", "64"]
    assert one(trained, "evaluate", "single", *attacks, "--batch-size", "16", "--name", "one").returncode == 0
    r = two(trained, "evaluate", "single", *attacks, "--batch-size", "16", "--name", "two")
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((trained / "single" / f"eval-{n}.json").read_text()) for n in ("one", "two"))
    for key in ("accuracy", "worst_case_accuracy", "clean_accuracy", "grad_evals", "n", "suspect"):
        assert a[key] == b[key], key
    assert b["processes"] == 2 and a["processes"] == 1
    assert r.stdout.count("worst case") == 1  # rank 0 alone prints the result


def test_ddp_analyze_records_the_one_process_cost(trained):
    """Two batches, two ranks: each scores one, and the record counted rank 0's share of the scoring only."""
    args = ["analyze", "single", "--eps", "0.2", "--limit", "64", "--curve-limit", "32", "--batch-size", "32"]
    args += ["--attack", "pgd:steps=2", "--criteria", "taylor", "--device", "cpu", "--quiet"]
    assert one(trained, *args, "--out", "an1").returncode == 0
    r = two(trained, *args, "--out", "an2")
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((trained / f / "summary.json").read_text())["cost"] for f in ("an1", "an2"))
    assert a["attack_grad_evals"] == b["attack_grad_evals"] > 0  # taylor's gradients: half of them on rank 1
    assert 0 <= b["forward_evals"] - a["forward_evals"] <= 1  # (each rank traces the model once to know its layers)


def test_a_taken_out_folder_stops_every_rank_with_the_same_error(trained):
    r = two(trained, "train", *TRAIN, "--epochs", "1", "--out", "single")
    assert r.returncode != 0
    # both ranks stop with rank 0's one-line reason (none waits for a collective that never comes)
    assert r.stderr.count("already exists; pass --resume") == 2
    assert "advtune/" not in r.stderr  # no traceback from inside advtune (torchrun summarises the exit)


@pytest.fixture(scope="module")
def hardened(trained):
    """The same harden in one process and in two. harden runs the other jobs' own code (the analysis,
    the selective fine-tuning, the evaluation before and after), so this one launch covers analyze,
    finetune and evaluate under torchrun too."""
    args = ["harden", "single", "--eps", "0.2", "--limit", "128", "--limit-test", "50", "--budget", "1000"]
    args += ["--analysis-limit", "64", "--analysis-attack", "pgd:steps=3", "--granularity", "unit"]
    args += ["--params", "0.2", "--evaluation", "fgsm,pgd:steps=3,apgd-ce:steps=5", "--device", "cpu", "--quiet"]
    r1 = one(trained, *args, "--out", "hard1")
    r2 = two(trained, *args, "--out", "hard2")
    assert r1.returncode == 0, r1.stderr[-2000:]
    assert r2.returncode == 0, r2.stderr[-2000:]
    return trained, r2


def test_ddp_analysis_gives_the_one_process_scores(hardened):
    d, _ = hardened
    a, b = (json.loads((d / f / "analysis" / "scores-taylor.json").read_text()) for f in ("hard1", "hard2"))
    assert a["components"] == b["components"] and a["metadata"]["n_samples"] == b["metadata"]["n_samples"] == 64
    assert max(abs(x - y) for x, y in zip(a["scores"], b["scores"])) < 1e-6 * max(map(abs, a["scores"]))


def test_ddp_evaluation_gives_the_one_process_robust_accuracy(hardened):
    d, r = hardened
    a, b = (json.loads((d / f / "eval-base.json").read_text()) for f in ("hard1", "hard2"))  # the same model
    for key in ("accuracy", "worst_case_accuracy", "clean_accuracy", "grad_evals", "n", "suspect"):
        assert a[key] == b[key], key
    assert b["processes"] == 2 and a["processes"] == 1


def test_ddp_selective_finetune_keeps_unselected_entries_bit_exact(hardened):
    d, _ = hardened
    base, tuned = weights(d / "single"), weights(d / "hard2")
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    selected = set(json.loads((d / "hard2" / "summary.json").read_text())["selection"]["params_by_layer"])
    assert changed and all(any(k.startswith(layer + ".") for layer in selected) for k in changed)
    from cli_helpers import check_sparse_harden  # entry by entry: an unselected unit of a selected layer stays put

    check_sparse_harden(
        d / "single", d / "hard2", json.loads((d / "hard2" / "summary.json").read_text())["trainable_params"]
    )
    one_cost, two_cost = (json.loads((d / f / "cost.json").read_text()) for f in ("hard1", "hard2"))
    assert one_cost["grad_evals"] == two_cost["grad_evals"] >= 1000
    # the selection is the same units in both: the same entries moved
    t1 = weights(d / "hard1")
    assert {k for k in base if not torch.equal(base[k], t1[k])} == changed
    assert max_diff(t1, tuned) < 1e-2  # Adam on 2 x 32 vs 64 per-example sums: close, not bitwise


def test_ddp_harden_writes_one_report(hardened):
    """Every hand-over between harden's stages waits for rank 0's records, and the report (which reads
    back its figures) is written once."""
    d, r = hardened
    s = json.loads((d / "hard2" / "summary.json").read_text())
    assert s["after"]["robust_acc"] >= 0 and (d / "hard2" / "report.html").is_file()
    assert r.stdout.count("-> ") == 1  # rank 0 alone reports


def test_ddp_awp_pushes_every_rank_to_the_same_weights(tmp_path):
    """awp's push comes from the ranks' mean gradient, so two processes train as one (each rank's own half-batch
    gradient would push the ranks to different points). Without a random start: each rank draws its own noise."""
    spec = "awp:gamma=0.05,steps=1,random_start=false"
    args = ("train", *TRAIN, "--epochs", "1", "--eps", "0.1", "--adversarial", spec)
    r1 = one(tmp_path, *args, "--out", "single")
    r2 = two(tmp_path, *args, "--out", "ddp")
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert max_diff(weights(tmp_path / "single"), weights(tmp_path / "ddp")) < ATOL
    cost = json.loads((tmp_path / "ddp" / "cost.json").read_text())
    assert cost["grad_evals"] == 3 * 256  # PGD-1, the push's pass, the update


def test_ddp_regrow_moves_the_one_process_mask(trained, tmp_path):
    """--regrow under torchrun: the window's sums are of the all-reduced gradients, so every rank moves the mask the
    one process moves (a rank's own half-batch sums would grow other entries, and the ranks would drift apart). BIM:
    no random start, so the two processes' adversarial examples are the one process's (PGD's noise is drawn per
    rank: its masks agree on ~75% of the grown entries, their movement scores being near-ties)."""
    base = str(trained / "single")  # its runs in a folder of their own (the module's folder counts its runs)
    args = ["finetune", base, "--eps", "0.2", "--select", "random", "--granularity", "sparse", "--params", "0.1"]
    args += ["--attack", "bim:steps=2", "--limit", "256", "--limit-test", "50", "--batch-size", "64", "--epochs", "3"]
    args += ["--device", "cpu", "--quiet"]
    runs = {"fixed": one(tmp_path, *args, "--out", "rg-fixed")}
    runs["one"] = one(tmp_path, *args, "--regrow", "0.3", "--regrow-every", "2", "--out", "rg1")
    runs["two"] = two(tmp_path, *args, "--regrow", "0.3", "--regrow-every", "2", "--out", "rg2")
    for r in runs.values():
        assert r.returncode == 0, r.stderr[-2000:]

    def mask(out):
        entries = json.loads((tmp_path / out / "selection.json").read_text())["entries"]
        return {(n, i) for n, idx in entries.items() for i in idx}

    fixed, m1, m2 = mask("rg-fixed"), mask("rg1"), mask("rg2")
    assert len(fixed) == len(m1) == len(m2)  # the budget: as many entries after the moves as before
    assert len(m1 - fixed) > 0.05 * len(fixed)  # the mask moved
    # ... and the same way in two processes (float rounding aside: a near-tie at the cut may flip on another CPU;
    # the sums taken before the all-reduce share ~75% of the grown entries)
    assert len(m1 & m2) >= 0.99 * len(m1)
    base, tuned = weights(trained / "single"), weights(tmp_path / "rg2")
    for name in base:  # what is outside the final mask is the base, bit for bit
        on = torch.zeros(base[name].numel(), dtype=torch.bool)
        on[[i for n, i in m2 if n == name]] = True
        if name in {n for n, _ in m2}:
            assert torch.equal(base[name].flatten()[~on], tuned[name].flatten()[~on]), name
