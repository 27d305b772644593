"""Images/s of advtune's `fit` vs a bare hand-written PyTorch loop: same model, data, batch size,
optimizer, number of steps. Repeats are interleaved and the medians compared, in one process.

    .venv/bin/python bench/train_throughput.py [--model small-cnn] [--steps 120] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
from torch import nn

from advtune.data import load_dataset
from advtune.errors import AdvtuneError
from advtune.models import model_for
from advtune.storage import atomic_write_text
from advtune.train import TrainConfig, clean, fit


def bare_loop(model, x_u8, y, batch_size, steps, lr, seed):
    """What a user would write by hand: shuffle, slice, to float, forward, backward, step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    for s in range(steps):
        idx = perm[s * batch_size : (s + 1) * batch_size]
        xb, yb = x_u8[idx].float().div_(255), y[idx]
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--model", default="small-cnn")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/out/train_throughput.json")
    args = ap.parse_args()

    n = args.batch_size * args.steps
    ds = load_dataset(args.dataset, limit=n, limit_test=10)
    x_u8, y = ds.train.x, ds.train.y
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=1e-3, seed=0)
    times = {"bare": [], "fit": []}
    for r in range(args.repeats + 1):  # first round is warm-up, not counted
        for name in ("bare", "fit") if r % 2 == 0 else ("fit", "bare"):
            torch.manual_seed(0)
            model = model_for(ds, args.model)
            t = time.perf_counter()
            if name == "bare":
                bare_loop(model, x_u8, y, args.batch_size, args.steps, 1e-3, 0)
            else:
                fit(model, ds.train, clean(), cfg)
            if r:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "dataset": args.dataset,
        "model": args.model,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "images_per_s": {k: n / v for k, v in med.items()},
        "ratio_fit_over_bare": med["bare"] / med["fit"],
        "seconds": times,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"| loop | images/s (median of {args.repeats}) |\n|---|---|")
    for k in ("bare", "fit"):
        print(f"| {k} | {result['images_per_s'][k]:.0f} |")
    print(f"\nfit / bare throughput ratio: {result['ratio_fit_over_bare']:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    try:
        main()
    except AdvtuneError as e:  # bad input: one line, not a traceback
        sys.exit(f"error: {e}")
