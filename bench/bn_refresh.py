"""BatchNorm statistics re-estimated for a run's final (averaged) weights, measured on validation (issue 21, round 26).

With `--ema` a run ends with the moving average of its weights (train/average.py), but its BatchNorm running
statistics are the live ones: tracked (momentum 0.1) by the raw weights' last training batches, not by the weights
that are kept. Izmailov et al. (SWA, 2018) recompute the statistics for averaged weights with one pass over training
data; this script does that the way the statistics were made in training: PGD examples crafted against the kept
model (eval mode, as the objective does), then forward passes in training mode with a cumulative average
(momentum None) over `--batches` batches of training images the run trained on. Each run's final model is measured
on the frontier's validation split (the unseen training tail, as bench/val_select.py) before and after; the refresh's
cost (attack + forward per example, in gradient evaluations) is printed beside it. Nothing is written to the run.

    python bench/bn_refresh.py runs/frontier-cifar10-resnet-seed1/probe-quotas-head --eps 8/255 --n 1000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from advtune import api
from advtune.attacks import build_attack
from advtune.devices import eval_mode
from advtune.errors import AdvtuneError
from advtune.settings import parse_number
from advtune.threat import ThreatModel
from advtune.train.augment import augment, check_augment
from val_select import emit, unseen_tail, writable_out


@torch.no_grad()
def refresh_statistics(
    model, train, limit: int, eps: float, batches: int, batch_size: int, seed: int = 0, kind: str = "none"
) -> int:
    """Re-estimate every BatchNorm's running statistics of `model` on PGD-5 examples of `batches` random batches of
    the first `limit` training images, augmented by `kind` first as training augmented them (train/augment.py);
    returns the gradient evaluations it cost (6 per example: 5 steps + 1 pass)."""
    check_augment(kind)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        raise AdvtuneError("the model has no BatchNorm: nothing to re-estimate")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(limit, generator=g)[: batches * batch_size]
    attack = build_attack("pgd:steps=5", ThreatModel("linf", eps))
    crafted = []
    for i in range(0, len(order), batch_size):  # crafted with the statistics the run ended with
        idx = order[i : i + batch_size]
        x, y = train.to_float(train.x[idx], device), train.y[idx].to(device)
        x = augment(x, kind, torch.Generator(device=device).manual_seed(seed + 7919 + i))
        with torch.enable_grad(), eval_mode(model):
            crafted.append(attack(model, x, y, generator=torch.Generator().manual_seed(seed + i)))
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, not a moving one
    model.train()
    for x_adv in crafted:
        model(x_adv)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return len(order) * 6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--eps", required=True, help="e.g. 8/255")
    p.add_argument("--n", type=int, default=1000, help="unseen training images to validate on (default 1000)")
    p.add_argument("--batches", type=int, default=50, help="training batches for the statistics (default 50)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--augment", default="none", help="augment the refresh's batches as training did: crop-flip")
    p.add_argument("--attacks", default="apgd-ce,apgd-t:n_target_classes=3", help="the frontier's protocol")
    p.add_argument("--skip-before", action="store_true", help="only the refreshed model (the before is known)")
    p.add_argument("--out", type=Path, help="append the JSON lines to this file")
    a = p.parse_args(argv)
    eps = parse_number(a.eps)
    a.out = writable_out(a.out)
    check_augment(a.augment)  # before the first evaluation (a typo was refused minutes in)
    if a.batches < 1:
        raise AdvtuneError(f"--batches must be at least 1 (0 reset the statistics to their defaults), got {a.batches}")
    for run in a.runs:
        data, limit = unseen_tail(run, a.n)
        model = api.load_model(run)
        rows = []
        if not a.skip_before:
            t0 = time.perf_counter()
            r = api.evaluate(model, data, eps=eps, attacks=a.attacks, limit=a.n, batch_size=500)
            rows.append(("as trained", r, 0, time.perf_counter() - t0))
        t0 = time.perf_counter()  # each row's own time (the refresh's includes the re-estimate)
        cost = refresh_statistics(model, data.train, limit, eps, a.batches, a.batch_size, kind=a.augment)
        r = api.evaluate(model, data, eps=eps, attacks=a.attacks, limit=a.n, batch_size=500)
        rows.append((f"statistics re-estimated ({a.augment} batches)", r, cost, time.perf_counter() - t0))
        for what, r, cost, seconds in rows:
            line = {
                "run": str(run),
                "model": what,
                "val_images": f"train[{limit}:{limit + a.n}]",
                "attacks": a.attacks,
                "eps": eps,
                "clean": r.clean_accuracy,
                "robust": r.worst_case_accuracy,
                "refresh_grad_evals": cost,
                "refresh_batches": a.batches if cost else 0,
                "refresh_augment": a.augment if cost else None,
                "seconds": round(seconds, 1),
            }
            emit(line, a.out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AdvtuneError as e:
        sys.exit(f"error: {e}")
