"""Scale-out: training and evaluation throughput with 1 vs N processes (torchrun, gloo on CPU), as
ratios measured in one run, and — only when a GPU is present — the CIFAR-10 GPU suite of issue 9.

    .venv/bin/python bench/scale.py                       # CPU: 1 vs 2 processes
    .venv/bin/python bench/scale.py --gpu-suite           # on a CUDA machine: preact-resnet18 at 8/255
    python bench/scale.py --gpu-suite --gpu-limit 10000 --gpu-epochs 0.2 --gpu-test 500   # a sized-down suite

CPU: the same adversarial training (PGD-3, global batch 128) and the same evaluation (PGD-20 and
APGD-CE against the adversarially trained model, so the attacks have work to do), first in one
process with all the cores, then in N processes with cores/N threads each, so the machine does the
same arithmetic both ways; examples/s comes from the runs' own records (cost.json, eval-*.json).
The GPU suite trains FGSM-RS (fast AT) and PGD-10 adversarial training from scratch and hardens a
standard model with `advtune harden`, then evaluates each with APGD-CE + APGD-T on 1000 test images,
recording wall time, gradient evaluations, robust accuracy and the GPU's name next to the published
fast-AT anchor (Wong et al. 2020, PreAct ResNet-18: FGSM-RS 12 min, 46.06% PGD-20 / 43.21% AutoAttack;
PGD-7 AT 4966 min). `--gpu-limit/--gpu-epochs/--gpu-test` size it down (training examples, a factor
on every job's epochs, test images): each row records examples/s, so a full run's time is
(50,000 x epochs) / examples/s. `--gpu-suite` runs the GPU suite alone (no CPU comparison).
Nothing in the project depends on a GPU; this only measures one when there is.
Writes bench/out/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# a bare GPU machine runs this checkout by path, with nothing installed: its advtune then comes from src/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # as the jobs it runs see it

ANCHOR = {
    "source": "Wong, Rice, Kolter 2020 (Fast is better than free), PreAct ResNet-18, CIFAR-10, eps 8/255",
    "fgsm_rs_minutes": 12,
    "fgsm_rs_pgd20": 0.4606,
    "fgsm_rs_autoattack": 0.4321,
    "pgd7_minutes": 4966,
}


def run(cmd: list[str], cwd: Path, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    # the jobs run in a scratch folder: paths given relative to where this script started must still reach
    if env.get("ADVTUNE_DATA"):
        env["ADVTUNE_DATA"] = str(Path(env["ADVTUNE_DATA"]).resolve())
    # and the checkout's advtune first: a bare GPU machine has no install (its jobs failed "No module named advtune")
    paths = [str(Path(__file__).resolve().parents[1] / "src"), *env.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(str(Path(p).resolve()) for p in paths if p))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def launcher(nproc: int) -> list[str]:
    """`python -m advtune` (works from a checkout on PYTHONPATH too), under torchrun for nproc > 1."""
    if nproc == 1:
        return [sys.executable, "-m", "advtune"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "advtune",
    ]


def cpu_scale(args, work: Path) -> list[dict]:
    data = ["--dataset", args.dataset, "--limit", str(args.examples), "--limit-test", str(args.test)]
    if args.data_dir:
        data += ["--data-dir", args.data_dir]
    rows = []
    for nproc in (1, args.nproc):
        threads = max(1, args.cores // nproc)
        out = work / f"at-{nproc}"
        wall = run(
            [
                *launcher(nproc),
                "train",
                *data,
                "--model",
                "small-cnn",
                "--adversarial",
                "pgd:steps=3",
                "--eps",
                str(args.eps),
                "--epochs",
                str(args.epochs),
                "--batch-size",
                "128",
                "--device",
                "cpu",
                "--out",
                str(out),
                "--quiet",
            ],
            work,
            threads,
        )
        cost = json.loads((out / "cost.json").read_text())
        # both evaluations attack the same model: the one the single process trained
        ev_wall = run(
            [
                *launcher(nproc),
                "evaluate",
                str(work / "at-1"),
                "--eps",
                str(args.eps),
                "--attacks",
                "pgd:steps=20,apgd-ce",
                "--limit-test",
                str(args.test),
                "--name",
                f"scale{nproc}",
                "--device",
                "cpu",
                "--quiet",
            ],
            work,
            threads,
        )
        ev = json.loads((work / "at-1" / f"eval-scale{nproc}.json").read_text())
        rows.append(
            {
                "processes": nproc,
                "threads_each": threads,
                "train_examples_per_s": cost["examples"] / cost["wall_s"],
                "train_grad_evals": cost["grad_evals"],
                "train_wall_s": cost["wall_s"],
                "train_command_s": wall,
                "eval_examples_per_s": ev["examples"] / ev["total_wall_s"],
                "eval_worst_case": ev["worst_case_accuracy"],
                "eval_command_s": ev_wall,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    one, many = rows
    for k in ("train_examples_per_s", "eval_examples_per_s"):
        many[f"{k}_ratio"] = many[k] / one[k]
    return rows


def gpu_suite(args, work: Path, out: Path) -> list[dict]:
    import torch

    device = "cpu" if args.rehearse else "cuda"
    if args.rehearse:  # the same jobs at toy sizes on the CPU: a lent GPU's minutes are not spent finding a bug
        args.gpu_limit, args.gpu_epochs, args.gpu_test, args.amp = 64, 0.01, 8, "off"
        gpu = "cpu (rehearsal: toy sizes, not a measurement)"
    elif not torch.cuda.is_available():
        raise SystemExit("--gpu-suite needs a CUDA GPU; this machine has none (--rehearse runs it on the CPU, tiny)")
    else:
        gpu = torch.cuda.get_device_name(0)
    os.environ["ADVTUNE_NO_DOWNLOAD"] = "1"  # a GPU machine may have no network: the data must be there, said now
    from advtune.data import load_dataset
    from advtune.errors import AdvtuneError

    try:
        load_dataset("cifar10", args.data_dir, limit=1, limit_test=1)
    except AdvtuneError as e:
        raise SystemExit(f"--gpu-suite: {e}") from None
    eps = "8/255"
    where = ["--device", device, "--quiet"]
    where += ["--data-dir", args.data_dir] if args.data_dir else []
    where += ["--limit", str(args.gpu_limit)] if args.gpu_limit else []
    test = ["--limit-test", str(args.gpu_test)]
    # (the training jobs' own clean test accuracy reads every test image: on a GPU seconds, on the CPU minutes)
    common = ["--dataset", "cifar10", "--model", "preact-resnet18", *where, *(test if args.rehearse else [])]
    ev = ["--eps", eps, "--attacks", "apgd-ce,apgd-t:n_target_classes=9", *test, "--name", "suite"]
    sgd = ["--optimizer", "sgd", "--lr", "0.1", "--schedule", "cosine", "--batch-size", "128", "--amp", args.amp]

    def epochs(n: int) -> str:
        return str(max(1, round(n * args.gpu_epochs)))

    jobs = {  # fast AT's own schedule for FGSM-RS (Wong et al.: one-cycle, peak lr 0.2, 15 epochs)
        "fgsm-rs": ["train", *common, "--adversarial", "fgsm-rs", "--eps", eps, "--epochs", epochs(15), *sgd,
                    "--lr", "0.2", "--schedule", "onecycle"],
        "pgd10-at": ["train", *common, "--adversarial", "pgd:steps=10", "--eps", eps, "--epochs",
                     epochs(args.pgd_epochs), *sgd],
        "standard": ["train", *common, "--epochs", epochs(30), *sgd],
        # of the standard model; harden has no --amp (its row runs in float32) and takes the recipe's 2 epochs scaled
        "harden": ["harden", str(work / "standard"), "--eps", eps, "--epochs",
                   "5" if args.rehearse else f"{2 * args.gpu_epochs:g}", *test, *where],  # (5: the probe's batch fits)
    }  # fmt: skip
    rows = []
    for name, cmd in jobs.items():
        wall = run([*launcher(1), *cmd, "--out", str(work / name)], work, 8)
        run([*launcher(1), "evaluate", str(work / name), *ev, "--device", device, "--quiet"], work, 8)
        row = {**_gpu_row(name, work / name, wall, gpu), "amp": "off" if name == "harden" else args.amp}
        rows.append({**row, "rehearsal": True} if args.rehearse else row)
        _save(out, rows)  # a sized run can be cut off: what is done is kept
    return rows


def _save(out: Path, rows: list[dict]) -> None:
    from advtune.provenance import versions
    from advtune.storage import atomic_write_text

    record = {"gpu": rows, "anchor": ANCHOR, "versions": versions(), "argv": sys.argv[1:]}
    atomic_write_text(out, json.dumps(record, indent=2))


def _gpu_row(name: str, folder: Path, wall: float, gpu: str) -> dict:
    cost = json.loads((folder / "cost.json").read_text())
    ev = json.loads((folder / "eval-suite.json").read_text())
    row = {
        "job": name,
        "gpu": gpu,
        "wall_min": wall / 60,
        "train_examples": cost.get("examples"),
        "train_wall_s": cost.get("wall_s"),
        "examples_per_s": cost["examples"] / cost["wall_s"] if cost.get("wall_s") else None,
        "grad_evals": cost.get("grad_evals"),
        "clean": ev["clean_accuracy"],
        "robust_worst_case": ev["worst_case_accuracy"],
        "eval_wall_s": ev.get("total_wall_s"),
        "n": ev["examples"],
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2, help="processes to compare with one (default: 2)")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="threads of the 1-process run")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--data-dir")
    ap.add_argument("--examples", type=int, default=4096, help="training examples (default: 4096)")
    ap.add_argument("--test", type=int, default=500, help="test examples evaluated (default: 500)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--eps", type=float, default=0.1, help="eps of training and evaluation (default: 0.1)")
    ap.add_argument("--gpu-suite", action="store_true", help="run the CIFAR-10 GPU suite instead (needs CUDA)")
    ap.add_argument("--gpu-limit", type=int, help="GPU suite: training examples (default: all 50,000)")
    ap.add_argument("--gpu-epochs", type=float, default=1.0, help="GPU suite: factor on every job's epochs")
    ap.add_argument("--gpu-test", type=int, default=1000, help="GPU suite: test images evaluated (default: 1000)")
    ap.add_argument("--amp", default="bf16", choices=("off", "bf16", "fp16"), help="precision of the GPU suite")
    ap.add_argument("--pgd-epochs", type=int, default=10, help="PGD-10 AT epochs in the GPU suite")
    ap.add_argument(
        "--rehearse",
        action="store_true",
        help="with --gpu-suite: run its jobs on the CPU at toy sizes (64 images, 1 epoch, harden 5, 8 test images), "
        "to check the script end to end before a GPU is lent; its rows say rehearsal and measure nothing",
    )
    ap.add_argument("--out", default="bench/out/scale.json", help="the record (on a lent GPU: $OUT/scale.json)")
    args = ap.parse_args()
    if args.rehearse and not args.gpu_suite:
        ap.error("--rehearse rehearses the GPU suite: give --gpu-suite too")
    if args.data_dir:  # the jobs run in a scratch folder
        args.data_dir = str(Path(args.data_dir).resolve())
    work = Path(tempfile.mkdtemp(prefix="advtune-scale-"))
    out = Path(args.out)
    try:
        if args.gpu_suite:
            gpu_suite(args, work, out)  # writes its rows as each job ends
            return
        record = {
            "machine": platform.processor() or platform.machine(),
            "cores": args.cores,
            "cpu": cpu_scale(args, work),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from advtune.provenance import versions
    from advtune.storage import atomic_write_text

    atomic_write_text(out, json.dumps({**record, "versions": versions(), "argv": sys.argv[1:]}, indent=2))
    one, many = record["cpu"]
    print(
        f"\ntraining: {one['train_examples_per_s']:.0f} -> {many['train_examples_per_s']:.0f} examples/s "
        f"({many['train_examples_per_s_ratio']:.2f}x with {many['processes']} processes); evaluation: "
        f"{one['eval_examples_per_s']:.1f} -> {many['eval_examples_per_s']:.1f} examples/s "
        f"({many['eval_examples_per_s_ratio']:.2f}x); worst case {one['eval_worst_case']:.4f} vs "
        f"{many['eval_worst_case']:.4f}"
    )


if __name__ == "__main__":
    main()
