"""Attack wall time: advtune vs a bare hand-written autograd loop vs peer libraries, in one process.

Same small MNIST-sized CNN (1x28x28, defined here), same batch of 256, same number of forward and
backward passes. Repeats are interleaved (the order alternates) and medians compared, so machine
load hits every contender alike. Peer libraries are optional: torchattacks (PGD), pyautoattack
(APGD-CE), adversarial-robustness-toolbox (PGD); missing ones are reported as such.

    .venv/bin/python bench/attack_speed.py [--quick] [--steps 40] [--repeats 5]

Prints a markdown table and writes bench/out/attack_speed.json. No dataset needed: the model is
trained for a few seconds on synthetic 28x28 blobs so that attacks face a model with real margins
(and the standard suite has survivors to work on).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from advtune.attacks import APGD, APGDT, PGD, Square
from advtune.data import synthetic_blobs
from advtune.evaluation import robust_accuracy, suite
from advtune.storage import atomic_write_text
from advtune.threat import ThreatModel


class SmallCNN(nn.Module):
    """The PyTorch MNIST example's CNN: 2 convs, max-pool, 2 linear layers (1.2 M parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def train_model(steps: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x, y = synthetic_blobs(64 * steps + 256, classes=10, size=28, generator=g)
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for s in range(steps):
        loss = F.cross_entropy(model(x[s * 64 : (s + 1) * 64]), y[s * 64 : (s + 1) * 64])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model, x[-256:], y[-256:]


def hand_pgd(model, x, y, eps, alpha, steps, generator):
    """What a careful user writes: random start, `steps` input gradients, a final forward."""
    x_adv = (x + (2 * torch.rand(x.shape, generator=generator) - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), [x_adv])
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    with torch.no_grad():
        model(x_adv)  # advtune also evaluates the last iterate
    return x_adv


def overhead_ms_per_step(x, y, eps, steps=40, repeats=15) -> dict[str, float]:
    """Per-step bookkeeping cost on a linear model (where it is largest relative to the model):
    advtune PGD / APGD minus the hand-written loop, in ms per step. Barely sensitive to machine load."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 10)).eval()
    threat = ThreatModel("linf", eps)
    alpha = 2.5 * eps / steps
    fns = {
        "hand": lambda: hand_pgd(lin, x, y, eps, alpha, steps, torch.Generator().manual_seed(0)),
        "pgd": lambda: PGD(threat, steps=steps)(lin, x, y, generator=torch.Generator().manual_seed(0)),
        "apgd": lambda: APGD(threat, steps=steps)(lin, x, y, generator=torch.Generator().manual_seed(0)),
    }
    t: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            if r:
                t[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1000 / steps for k, v in t.items()}
    return {
        "hand_ms_per_step": med["hand"],
        "advtune_pgd_extra_ms_per_step": med["pgd"] - med["hand"],
        "advtune_apgd_extra_ms_per_step": med["apgd"] - med["hand"],
    }


def contenders(model, x, y, eps, steps):
    alpha = 2.5 * eps / steps
    threat = ThreatModel("linf", eps)
    out = {
        f"hand-written PGD-{steps}": lambda: hand_pgd(model, x, y, eps, alpha, steps, torch.Generator().manual_seed(0)),
        f"advtune PGD-{steps}": lambda: PGD(threat, steps=steps)(
            model, x, y, generator=torch.Generator().manual_seed(0)
        ),
        f"advtune APGD-CE-{steps}": lambda: APGD(threat, steps=steps)(
            model, x, y, generator=torch.Generator().manual_seed(0)
        ),
    }
    if importlib.util.find_spec("torchattacks"):
        import torchattacks

        ta = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
        out[f"torchattacks PGD-{steps}"] = lambda: ta(x, y)
    if importlib.util.find_spec("pyautoattack"):
        from pyautoattack.autopgd_base import APGDAttack

        # n_iter=steps-1: the reference takes n_iter+1 gradients, advtune takes `steps`
        ref = APGDAttack(model, n_iter=steps - 1, eps=eps, loss="ce", device=x.device)
        out[f"pyautoattack APGD-CE-{steps}"] = lambda: ref.perturb(x, y)
    if importlib.util.find_spec("art"):
        from art.attacks.evasion import ProjectedGradientDescent
        from art.estimators.classification import PyTorchClassifier

        clf = PyTorchClassifier(
            model, nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10, clip_values=(0.0, 1.0)
        )
        art_pgd = ProjectedGradientDescent(
            clf, eps=eps, eps_step=alpha, max_iter=steps, batch_size=len(x), verbose=False
        )
        xn, yn = x.numpy(), y.numpy()
        out[f"ART PGD-{steps}"] = lambda: art_pgd.generate(xn, yn)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="PGD-10, 3 repeats, small suite run (about a minute)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument(
        "--suite-n",
        type=int,
        default=None,
        help="examples for the standard-suite timing (default 256, --quick 32; 0 skips it)",
    )
    ap.add_argument("--out", default="bench/out/attack_speed.json")
    args = ap.parse_args()
    steps = args.steps or (10 if args.quick else 40)
    repeats = args.repeats or (3 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, x, y = train_model(60 if args.quick else 150)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    runs = contenders(model, x, y, args.eps, steps)
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(repeats + 1):  # round 0 warms up and is not counted
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            t = time.perf_counter()
            runs[name]()
            dt = time.perf_counter() - t
            if r:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    base_name = f"hand-written PGD-{steps}"
    base = med[base_name]
    # paired: each contender against the hand-written loop of the same round (cancels load drift)
    paired = {k: statistics.median(t / b for t, b in zip(v, times[base_name])) for k, v in times.items()}

    overhead = overhead_ms_per_step(x, y, args.eps)

    # the standard suite (APGD-CE, APGD-T, Square) through robust_accuracy, gate included
    n_suite = args.suite_n if args.suite_n is not None else (32 if args.quick else 256)
    threat = ThreatModel("linf", args.eps)
    attacks = suite("standard", threat)
    if args.quick:
        attacks = [APGD(threat, steps=20), APGDT(threat, steps=20), Square(threat, queries=500)]
    res, suite_s = None, 0.0
    if n_suite > 0:
        t = time.perf_counter()
        res = robust_accuracy(model, (x[:n_suite], y[:n_suite]), attacks, generator=torch.Generator().manual_seed(0))
        suite_s = time.perf_counter() - t

    print(
        f"\nAttack speed, batch {len(x)}, SmallCNN 1x28x28, linf eps={args.eps}, {steps} steps, "
        f"median of {repeats} interleaved repeats, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load avg {os.getloadavg()[0]:.1f}\n"
    )
    print("| attack | median s | / hand-written PGD (medians) | / hand-written PGD (paired per round) |")
    print("| --- | ---: | ---: | ---: |")
    for k in names:
        print(f"| {k} | {med[k]:.3f} | {med[k] / base:.3f} | {paired[k]:.3f} |")
    print(
        f"\nbookkeeping per step on a linear model (batch {len(x)}): hand-written loop "
        f"{overhead['hand_ms_per_step']:.2f} ms, advtune PGD +{overhead['advtune_pgd_extra_ms_per_step']:.2f} ms, "
        f"APGD +{overhead['advtune_apgd_extra_ms_per_step']:.2f} ms (a SmallCNN step at batch 256 is ~"
        f"{1000 * base / steps:.0f} ms)"
    )
    if res is not None:
        print(
            f"\nstandard suite ({', '.join(res.attacks)}) on {n_suite} examples: {suite_s:.1f} s "
            f"(clean {res.clean_accuracy:.3f}, worst case {res.worst_case_accuracy:.3f}); per attack: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in res.wall_time_s.items())
            + f"; suspect: {res.suspect or 'none'}"
        )
    out = {
        "config": {
            "batch": len(x),
            "steps": steps,
            "repeats": repeats,
            "eps": args.eps,
            "quick": args.quick,
            "clean_accuracy": clean,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "load_avg_1min": os.getloadavg()[0],
        },
        "median_s": med,
        "ratio_to_hand_written_pgd": {k: v / base for k, v in med.items()},
        "paired_ratio_to_hand_written_pgd": paired,
        "all_s": times,
        "linear_model_overhead": overhead,
        "standard_suite": None if res is None else {"n": n_suite, "wall_s": suite_s, "result": res.to_json()},
    }
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
