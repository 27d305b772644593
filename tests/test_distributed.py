"""Every command under torchrun: 2 local CPU processes (gloo) against one process on the same work.

What must hold whatever the number of processes: the same final weights (float tolerance: the two
ranks' mean gradient sums in another order), the same records (examples, gradient evaluations,
robust accuracy), exactly one run folder written by rank 0, a resume after a kill -9 of one rank,
and one-line errors for a batch that does not split, NCCL without a GPU, a taken --out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

BIN = Path(sys.executable).parent
TORCHRUN = BIN / "torchrun"
pytestmark = pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun not installed")
TRAIN = ["--dataset", "synthetic", "--model", "small-cnn", "--limit", "256", "--limit-test", "100"]
TRAIN += ["--batch-size", "64", "--device", "cpu", "--quiet"]
# float32 sums of 2 x 32 per-example gradients vs 64: Adam's first steps magnify the last bits a little
ATOL = 1e-4


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", ADVTUNE_DIST_TIMEOUT="120")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def one(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "advtune"), *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=300
    )


def two(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "advtune", *args]
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


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


WORKER = """
import torch, torch.distributed as dist
from advtune import fit, TrainConfig, Selection, adversarial, ThreatModel, PGD
from advtune.models import build_model
from advtune.data import load_dataset
dist.init_process_group("gloo")
torch.manual_seed(dist.get_rank())  # every rank starts different: fit must make them one model
ds = load_dataset("synthetic", limit=128, limit_test=10)
model = build_model("small-cnn", ds.input_shape, ds.num_classes)
before = {k: v.clone() for k, v in model.state_dict().items()}
dist.broadcast_object_list(box := [before], src=0)
before = box[0]
fit(model, ds.train, adversarial(PGD(ThreatModel.linf(0.1), steps=2)), TrainConfig(epochs=1, batch_size=32),
    selection=Selection.of(model, ["net.conv2[0]", "net.conv2[3]"]))
after = model.state_dict()
for k in after:
    moved = after[k] != before[k]
    if k.startswith("net.conv2."):  # only units 0 and 3 (their filter rows and biases) may move
        assert not moved[[i for i in range(moved.shape[0]) if i not in (0, 3)]].any(), k
        assert moved[[0, 3]].any(), k
    else:
        assert not moved.any(), "an unselected entry moved: " + k
mine = torch.cat([v.flatten() for v in after.values()])
theirs = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
dist.all_gather(theirs, mine)
assert all(torch.equal(t, theirs[0]) for t in theirs), "the ranks disagree"
print(f"rank {dist.get_rank()} ok", flush=True)  # one write: the ranks share stdout
dist.barrier()  # no rank leaves while a peer's collective is in flight (gloo aborts at exit otherwise)
dist.destroy_process_group()
"""


def test_every_rank_holds_the_same_model_with_frozen_entries_exact(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    r = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(script)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0 ok" in r.stdout and "rank 1 ok" in r.stdout


def test_resume_after_kill_9_of_one_rank(tmp_path):
    args = ["train", "--dataset", "synthetic", "--model", "small-cnn", "--limit", "2048", "--limit-test", "50"]
    args += ["--batch-size", "64", "--device", "cpu", "--quiet", "--epochs", "4", "--out", "run"]
    ref = one(tmp_path, *[a if a != "run" else "ref" for a in args])
    assert ref.returncode == 0, ref.stderr
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "advtune", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies mid-run
    proc.communicate(timeout=240)  # torchrun stops the other rank: nothing hangs
    assert proc.returncode != 0
    assert not (tmp_path / "run" / "summary.json").is_file()  # not finished
    r = two(tmp_path, *args, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert max_diff(weights(tmp_path / "ref"), weights(tmp_path / "run")) < ATOL
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3, 4]


def test_a_batch_that_does_not_split_is_refused_before_anything_is_written(tmp_path):
    args = [a if a != "64" else "63" for a in TRAIN]
    r = two(tmp_path, "train", *args, "--epochs", "1", "--out", "odd")
    assert r.returncode != 0
    assert "--batch-size 63 is the global batch and must split evenly over the 2 processes" in r.stderr
    assert "advtune/" not in r.stderr
    assert not (tmp_path / "odd").exists()


def test_nccl_without_a_gpu_is_a_one_line_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = two(tmp_path, "train", *TRAIN, "--epochs", "1", "--out", "x", "--dist-backend", "nccl")
    assert r.returncode != 0
    assert "--dist-backend nccl needs CUDA GPUs" in r.stderr and "advtune/" not in r.stderr
    assert not (tmp_path / "x").exists()


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


def test_no_advtune_flag_is_taken_by_torchrun():
    """torchrun matches abbreviations of its own options anywhere on the line: an advtune flag that is a
    prefix of one (as --monitor was of --monitor-interval) would never reach advtune."""
    from torch.distributed.run import get_args_parser

    from advtune.cli import COMMANDS, build_parser

    theirs = [o for a in get_args_parser()._actions for o in a.option_strings if o.startswith("--")]
    taken = []
    for command in COMMANDS:
        parser = build_parser([command])
        sub = next(a for a in parser._actions if isinstance(getattr(a, "choices", None), dict)).choices[command]
        for action in sub._actions:
            taken += [
                f"{command} {o}"
                for o in action.option_strings
                if o != "--help" and any(t.startswith(o) for t in theirs)
            ]
    assert taken == []


def test_ddp_harden_composes_every_job_and_writes_one_report(trained):
    """harden = analyze -> finetune -> evaluate x2 -> report: every hand-over between jobs waits for
    rank 0's records, and the report (which reads back its figures) is written once."""
    r = two(trained, "harden", "single", "--eps", "0.1", "--limit", "128", "--limit-test", "50", "--budget", "1000",
            "--analysis-limit", "128", "--out", "hard", "--device", "cpu", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((trained / "hard" / "summary.json").read_text())
    assert s["after"]["robust_acc"] >= 0 and (trained / "hard" / "report.html").is_file()
    assert r.stdout.count("-> ") == 1  # rank 0 alone reports
