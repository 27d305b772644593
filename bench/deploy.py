"""The deploy path on MNIST, as a user runs it (issue 22): a model in, a robustness patch and ONNX out.

1. small-cnn, 1 epoch of standard training, `advtune harden --eps 0.1 --limit 20000`: the size of
   patch.safetensors against model.safetensors (target: <= 6%), and `advtune apply` rebuilding the
   hardened weights bit for bit.
2. A user's own module (a .py file advtune has never seen), trained outside advtune, saved from
   `nn.DataParallel` inside a checkpoint dict as `.pt`: `advtune train --weights ckpt.pt --epochs 0`,
   `advtune harden --eps 0.1 --limit 20000`, `advtune export --format onnx` with its check on the first
   1000 test images, clean and under the run's attack (target: every prediction equal to PyTorch's).

Every step runs through the CLI in a subprocess (`python -m advtune`), one after the other.

    .venv/bin/python bench/deploy.py --out bench/out/deploy        # ~10 min on 2 CPU cores

Writes <out>/deploy.json (numbers, wall times, versions) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

import advtune
from advtune.errors import AdvtuneError
from advtune.provenance import versions
from advtune.storage import atomic_write_text

NET = textwrap.dedent(
    """
    from torch import nn

    class Net(nn.Module):  # a user's own CNN: advtune knows nothing of it
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            )
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

        def forward(self, x):
            return self.classifier(self.features(x))

    def net():
        return Net()
    """
)


def advtune_cli(*args: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "advtune", *args, "--quiet"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"advtune {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    print(r.stdout.strip(), flush=True)
    return time.perf_counter() - t0


def bit_identical(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/out/deploy")
    ap.add_argument("--limit", type=int, default=20000, help="harden's training examples")
    ap.add_argument("--n", type=int, default=1000, help="test images of the evaluation and the ONNX check")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}
    harden = ["--eps", "0.1", "--limit", str(args.limit), "--limit-test", str(args.n), "--overwrite"]

    # 1. the zoo model: patch size and apply
    wall["train_small_cnn"] = advtune_cli(
        "train", "--dataset", "mnist", "--model", "small-cnn", "--epochs", "1", "--out", str(out / "std"), "--overwrite"
    )
    wall["harden_small_cnn"] = advtune_cli("harden", str(out / "std"), *harden, "--out", str(out / "std-hard"))
    wall["apply"] = advtune_cli(
        "apply", str(out / "std"), str(out / "std-hard" / "patch.safetensors"), "--out", str(out / "std-applied"),
        "--overwrite",
    )  # fmt: skip
    patch_bytes = (out / "std-hard" / "patch.safetensors").stat().st_size
    model_bytes = (out / "std-hard" / "model.safetensors").stat().st_size
    summary = json.loads((out / "std-hard" / "summary.json").read_text())

    # 2. a user's own module and a DataParallel checkpoint, to ONNX
    (out / "mynet.py").write_text(NET)
    sys.path.insert(0, str(out))
    import mynet

    torch.manual_seed(0)
    model = mynet.net()
    t0 = time.perf_counter()
    advtune.fit(model, advtune.load_dataset("mnist"), config=advtune.TrainConfig(epochs=1, lr=1e-3))
    wall["train_user_model_outside"] = time.perf_counter() - t0
    torch.save({"epoch": 1, "model_state_dict": nn.DataParallel(model).state_dict()}, out / "ckpt.pt")
    spec = f"{out / 'mynet.py'}:net"
    wall["import_checkpoint"] = advtune_cli(
        "train", "--dataset", "mnist", "--model", spec, "--weights", str(out / "ckpt.pt"), "--epochs", "0",
        "--out", str(out / "mine"), "--overwrite",
    )  # fmt: skip
    wall["harden_user_model"] = advtune_cli("harden", str(out / "mine"), *harden, "--out", str(out / "mine-hard"))
    wall["export_onnx"] = advtune_cli(
        "export", str(out / "mine-hard"), "--format", "onnx", "--out", str(out / "mine.onnx"),
        "--limit-test", str(args.n), "--overwrite",
    )  # fmt: skip
    check = json.loads((out / "mine.onnx.check.json").read_text())
    mine = json.loads((out / "mine-hard" / "summary.json").read_text())
    record = {
        "small_cnn": {
            "patch_bytes": patch_bytes,
            "model_bytes": model_bytes,
            "patch_share": patch_bytes / model_bytes,
            "changed_entries_share": summary["param_share"],
            "apply_bit_identical": bit_identical(
                out / "std-applied" / "model.safetensors", out / "std-hard" / "model.safetensors"
            ),
            "before": summary["before"],
            "after": summary["after"],
        },
        "user_model": {
            "before": mine["before"],
            "after": mine["after"],
            "patch_bytes": (out / "mine-hard" / "patch.safetensors").stat().st_size,
            "model_bytes": (out / "mine-hard" / "model.safetensors").stat().st_size,
            "onnx_bytes": (out / "mine.onnx").stat().st_size,
            "onnx_check": {k: check[k] for k in ("examples", "attack", "clean", "adversarial", "ok", "check_wall_s")},
        },
        "harden": {"eps": 0.1, "limit": args.limit, "test_examples": args.n, "evaluation": summary["evaluation"]},
        "wall_s": wall,
        "versions": versions(),
    }
    atomic_write_text(out / "deploy.json", json.dumps(record, indent=2) + "\n")
    s, u = record["small_cnn"], record["user_model"]
    c = u["onnx_check"]
    print("\n| what | number |\n| --- | --- |")
    share = f"{s['patch_bytes']:,} / {s['model_bytes']:,} B = {100 * s['patch_share']:.2f}%"
    print(f"| small-cnn patch / model file | {share} |")
    print(f"| apply rebuilds the hardened weights bit for bit | {s['apply_bit_identical']} |")
    robust = f"{100 * u['before']['robust_acc']:.1f}% -> {100 * u['after']['robust_acc']:.1f}%"
    print(f"| user module: robust {robust} | patch {u['patch_bytes']:,} B of {u['model_bytes']:,} B |")
    for kind in ("clean", "adversarial"):
        k = c[kind]
        agree = f"agreement {100 * k['agreement']:.2f}%, max abs diff {k['max_abs_diff']:.1e}"
        print(f"| ONNX vs PyTorch, {kind} ({c['examples']} images) | {agree} |")
    print(f"-> {out / 'deploy.json'}")


if __name__ == "__main__":
    try:
        main()
    except AdvtuneError as e:  # bad input: one line, not a traceback
        sys.exit(f"error: {e}")
