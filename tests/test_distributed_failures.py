"""torchrun when things go wrong: a rank killed with -9 and the resume, a batch that does not split, NCCL
without a GPU, flags torchrun would take; and every rank's copy of a selectively trained model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from advtune.errors import AdvtuneError
from ddp_helpers import ATOL, TORCHRUN, TRAIN, env, max_diff, one, two, weights

pytestmark = pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun not installed")


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
dist.barrier()  # no rank leaves while a peer's collective is in flight
dist.destroy_process_group()
import os, sys
sys.stdout.flush()
os._exit(0)  # as advtune's CLI does under torchrun: gloo's threads can abort the interpreter's shutdown
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
    args = ["train", "--dataset", "synthetic", "--model", "small-cnn", "--limit", "1536", "--limit-test", "50"]
    args += ["--batch-size", "64", "--device", "cpu", "--quiet", "--epochs", "3", "--checkpoint-every", "4"]
    args += ["--out", "run"]
    ref = one(tmp_path, *[a if a != "run" else "ref" for a in args])
    assert ref.returncode == 0, ref.stderr
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "advtune", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    ckpt, seen = tmp_path / "run" / "checkpoint.pt", None
    while time.time() < deadline and proc.poll() is None:  # killed after a checkpoint inside epoch 2
        if seen is None and metrics.is_file() and metrics.read_text().count("\n") >= 1:
            seen = ckpt.stat().st_mtime_ns
        if seen is not None and ckpt.stat().st_mtime_ns != seen:
            break
        time.sleep(0.01)
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
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    # the interrupted epoch's training loss too: every rank's part before the kill counted once (an audit: rank 0's
    # sums were loaded by every rank, so its part counted twice and the other rank's was lost)
    refs = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(lines, refs):
        assert a["examples"] == b["examples"] and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-2), (a, b)


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


def test_one_gpu_index_for_every_process_of_a_machine_is_refused(monkeypatch):
    """`torchrun --nproc-per-node 2 ... --device cuda:0` put both processes on GPU 0 (NCCL hangs or fails)."""
    from advtune.distributed import local_device

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(AdvtuneError, match="--device cuda:0 under torchrun puts every process of this machine on one"):
        local_device("cuda:0")
    assert local_device("cpu") == "cpu"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per machine: its one GPU is the user's to name
    assert local_device("cuda:1") == "cuda:1"


def test_cifar10_from_its_archive_is_unpacked_once_under_torchrun(tmp_path):
    """Every rank unpacked the archive into the same folder at once (a rank could read a batch another was
    writing); now the first rank of the machine unpacks it whole, the other waits, both read the same batches."""
    import pickle
    import tarfile

    import numpy as np

    src = tmp_path / "src" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(8)]}
        (src / name).write_bytes(pickle.dumps(batch, protocol=2))
    data = tmp_path / "data" / "cifar10"
    data.mkdir(parents=True)
    with tarfile.open(data / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    args = ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--model", "vgg-cifar"]
    args += ["--epochs", "1", "--batch-size", "8", "--limit", "16", "--limit-test", "8", "--device", "cpu"]
    r = two(tmp_path, *args, "--out", "run", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in data.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
