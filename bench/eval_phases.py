"""Where an evaluation's time goes: per attack, the seconds in the model's forward passes, in its backward
passes, and the rest (the attack's own Python and tensor work between passes). Used by
`bench/eval_speed.py --profile`; also runnable alone:

    .venv/bin/python bench/eval_phases.py runs/<run> --n 500 [--eps 0.3]

The model is wrapped in a timer (a synchronising clock around each forward, and identity autograd nodes
at the output and input that stamp the start and the end of each backward), so the profile pass runs
Square's queries eagerly (a compiled forward cannot hold the clock): its forward share is then an upper
bound for a compiled run. Timing adds a few microseconds per pass; it is a separate pass from the timed
comparison with AutoAttack.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch
from torch import nn

import advtune.evaluation.protocol as protocol
from advtune.data import load_dataset
from advtune.errors import AdvtuneError
from advtune.evaluation import compiled_queries, robust_accuracy, suite
from advtune.models import load_model
from advtune.threat import ThreatModel


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Stamp(torch.autograd.Function):
    """Identity; its backward stamps the clock: at the output it runs first, at the input last."""

    @staticmethod
    def forward(ctx, x, timer, end):  # noqa: D102
        ctx.timer, ctx.end = timer, end
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        ctx.timer.stamp(grad.device, ctx.end)
        return grad, None, None


class PhaseTimer(nn.Module):
    """`inner` with a clock: `forward_s` and `backward_s` accumulate the seconds spent in each."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.forward_s = self.backward_s = 0.0
        self._backward_t0 = None

    def stamp(self, device: torch.device, end: bool) -> None:
        _sync(device)
        now = time.perf_counter()
        if not end:
            self._backward_t0 = now
        elif self._backward_t0 is not None:
            self.backward_s += now - self._backward_t0
            self._backward_t0 = None

    def forward(self, x):
        _sync(x.device)
        t0 = time.perf_counter()
        grads = torch.is_grad_enabled() and x.requires_grad
        out = self.inner(_Stamp.apply(x, self, True) if grads else x)
        _sync(x.device)
        self.forward_s += time.perf_counter() - t0
        return _Stamp.apply(out, self, False) if grads and out.requires_grad else out


def profile(model: nn.Module, x, y, eps: float, batch_size: int, name: str = "standard") -> dict:
    """Per attack of suite `name`: seconds total, in forward, in backward, and the rest."""
    timer = PhaseTimer(model).eval()
    # eager queries: the timer syncs inside the forward, which no CUDA graph can capture
    attacks = [
        dataclasses.replace(a, graphs=False) if hasattr(a, "graphs") else a
        for a in compiled_queries(suite(name, ThreatModel.linf(eps)), compile=False)
    ]
    phases: dict[str, dict] = {}
    real = protocol._attack_once

    def timed(model_, attack, spec, *args, **kwargs):
        f0, b0, t0 = timer.forward_s, timer.backward_s, time.perf_counter()
        hit = real(model_, attack, spec, *args, **kwargs)
        p = phases.setdefault(spec, {"total_s": 0.0, "forward_s": 0.0, "backward_s": 0.0})
        p["total_s"] += time.perf_counter() - t0
        p["forward_s"] += timer.forward_s - f0
        p["backward_s"] += timer.backward_s - b0
        return hit

    protocol._attack_once = timed
    try:
        r = robust_accuracy(
            timer, (x, y), attacks, batch_size=batch_size, gate=False, generator=torch.Generator().manual_seed(0)
        )
    finally:
        protocol._attack_once = real
    for p in phases.values():
        p["other_s"] = p["total_s"] - p["forward_s"] - p["backward_s"]
        p["forward_share"] = p["forward_s"] / p["total_s"] if p["total_s"] else 0.0
    for spec, p in phases.items():
        p["grad_evals"], p["forward_evals"] = r.grad_evals.get(spec, 0), r.forward_evals.get(spec, 0)
    return {"attacks": phases, "worst_case": r.worst_case_accuracy, "n": r.n, "clean": r.clean_accuracy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--batch-size", type=int, default=500)
    args = ap.parse_args()
    model, meta = load_model(args.run)
    ds = load_dataset(meta.get("dataset_spec") or meta["dataset"], limit=1, limit_test=args.n)
    x, y = ds.test.tensors()
    out = profile(model.eval(), x, y, args.eps, args.batch_size)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    try:
        main()
    except AdvtuneError as e:  # bad input: one line, not a traceback
        sys.exit(f"error: {e}")
