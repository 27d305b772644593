"""Evaluation at AutoAttack strength: advtune's standard suite against reference AutoAttack, in one run.

For each model (a run folder), on the same first N test images: reference AutoAttack (`pyautoattack`,
the PyPI packaging of Croce & Hein's code, version "standard": APGD-CE, APGD-T, FAB-T, Square, each on
the points still robust) and advtune's `evaluate` (suite "standard": APGD-CE, APGD-T, Square, cascaded,
cheapest first, then the masking gate, whose time is included). Both robust accuracies and both wall
times are measured in this one process, the two runs interleaved per model, so machine load hits both.

    pip install -e '.[reference]'          # pyautoattack
    .venv/bin/python bench/eval_speed.py runs/an-adversarially-trained-run --n 1000     # at its training eps
    .venv/bin/python bench/eval_speed.py runs/a-standard-run --eps 0.3 --n 1000         # a standard model: give eps

advtune runs with `evaluate`'s defaults (Square compiles its queries by itself when their load is large);
`--compile` / `--no-compile` force either; `--square sync_every=1` / `--square graphs=false` force Square's
host syncs per query / eager queries on a GPU (ablations of its defaults). Both tools get the same batch size,
by default `evaluate`'s for the device (256 on the CPU, 1000 on a GPU), after one warm-up pass of the model.
`--profile` adds, per model, a separate pass that splits each
attack's time into forward, backward and the rest (bench/eval_phases.py).

Targets (issues 12, 23): robust accuracy within ±0.3 points of AutoAttack's, wall time ≤ 0.5× AutoAttack's.
Prints a markdown table and writes bench/out/eval_speed.json (with the machine and versions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import eval_phases  # bench/: run as a script, its folder is on the path
from advtune.data import load_dataset
from advtune.errors import AdvtuneError
from advtune.evaluation import compiled_queries, robust_accuracy, suite
from advtune.evaluation.protocol import default_batch_size
from advtune.models import load_model, read_meta
from advtune.provenance import versions
from advtune.settings import number, parse_number
from advtune.storage import atomic_write_text
from advtune.threat import ThreatModel
from val_select import writable_out


def reference(model, x, y, eps: float, batch_size: int) -> tuple[float, float]:
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, eps=eps, norm="Linf", version="standard", seed=0, device=x.device)
    t0 = time.perf_counter()
    out = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    x_adv = out[0] if isinstance(out, tuple) else out
    assert (x_adv - x).abs().max() <= eps + 1e-6
    with torch.no_grad():
        acc = float((model(x_adv).argmax(1) == y).float().mean())
    return acc, seconds


def ours(
    model, x, y, eps: float, batch_size: int, name: str, compile: bool | None, square: dict | None = None
) -> tuple[float, float, dict]:
    threat = ThreatModel.linf(eps)
    attacks = suite(name, threat)  # compile None: the suite's own default (auto), as `advtune evaluate`
    if square:  # an ablation: Square's parameters forced (e.g. sync_every=1, graphs=false)
        attacks = [dataclasses.replace(a, **square) if a.name == "square" else a for a in attacks]
    t0 = time.perf_counter()  # the compile, when asked for, happens inside and is timed
    r = robust_accuracy(
        model,
        (x, y),
        attacks if compile is None else compiled_queries(attacks, compile=compile),
        batch_size=batch_size,
        cascade=True,
        generator=torch.Generator().manual_seed(0),
    )
    seconds = time.perf_counter() - t0
    return (
        r.worst_case_accuracy,
        seconds,
        {"per_attack_s": r.wall_time_s, "suspect": r.suspect, "accuracy": r.accuracy, "clean": r.clean_accuracy},
    )


def option(kv: str) -> tuple[str, object]:
    """'sync_every=1' -> ('sync_every', 1); true/false -> bool; 0.5 -> float."""
    key, _, value = kv.partition("=")
    if not value:
        raise SystemExit(f"--square takes KEY=VALUE, got {kv!r}")
    low = value.lower()
    if low in ("true", "false"):
        return key, low == "true"
    try:
        return key, int(value)
    except ValueError:
        return key, float(value)


def warm_up(model, x, y) -> None:
    """One forward and backward on a batch before either tool is timed: the device's lazy set-up (cuDNN and
    cuBLAS handles, kernel selection) would otherwise be charged to whichever tool runs first."""
    x = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders of the models to evaluate")
    ap.add_argument("--n", type=int, default=1000, help="first N test images (default: 1000)")
    ap.add_argument("--eps", type=number, help="linf eps, e.g. 0.3 or 8/255 (default: the run's training eps)")
    ap.add_argument(
        "--batch-size", type=int, help="both tools' batch (default: evaluate's for the device: 256 CPU, 1000 GPU)"
    )
    ap.add_argument(
        "--square",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="force one of Square's parameters (an ablation), e.g. sync_every=1 or graphs=false; repeatable",
    )
    ap.add_argument("--suite", default="standard", help="advtune suite to compare (default: standard)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force Square's compiled (--compile) or eager (--no-compile) queries (default: evaluate's auto)",
    )
    ap.add_argument("--profile", action="store_true", help="also split each attack's time into phases")
    ap.add_argument("--out", default="bench/out/eval_speed.json")
    args = ap.parse_args()
    for run in args.runs:  # every folder checked before any attack: a typo in the second lost the first's hour
        for name in ("config.json", "model.json"):
            if not (Path(run) / name).is_file():
                raise SystemExit(f"eval_speed: {run} is no finished run folder (no {name}); check the path")
        recorded = json.loads((Path(run) / "config.json").read_text()).get("run", {}).get("eps")
        if args.eps is None and not recorded:
            raise SystemExit(f"eval_speed: {run} records no training eps (a standard model): give --eps")
    writable_out(args.out)  # a bad path failed after the first model's AutoAttack run
    try:  # checked before any attack runs: a missing reference must not cost the first half of the run
        import pyautoattack  # noqa: F401
    except ImportError:
        raise SystemExit("eval_speed: reference AutoAttack is not installed; pip install -e '.[reference]'")
    square = dict(option(kv) for kv in args.square)
    torch.manual_seed(0)
    rows = []
    for run in args.runs:
        model, meta = load_model(run)
        cfg = json.loads((Path(run) / "config.json").read_text())
        eps = args.eps if args.eps is not None else parse_number(cfg["run"]["eps"])
        ds = load_dataset(meta.get("dataset_spec") or meta["dataset"], limit=1, limit_test=args.n)
        x, y = ds.test.tensors()
        model, x, y = model.to(args.device).eval(), x.to(args.device), y.to(args.device)
        batch = args.batch_size or default_batch_size(x.device)
        warm_up(model, x[:batch], y[:batch])
        mine_acc, mine_s, detail = ours(model, x, y, eps, batch, args.suite, args.compile, square)
        ref_acc, ref_s = reference(model, x, y, eps, batch)
        phases = eval_phases.profile(model, x, y, eps, batch, args.suite) if args.profile else None
        rows.append(
            {
                "run": run,
                "architecture": read_meta(run).get("architecture"),
                "n": len(y),
                "batch_size": batch,
                "eps": eps,
                "clean": detail["clean"],
                "autoattack_acc": ref_acc,
                "advtune_acc": mine_acc,
                "diff_points": 100 * (mine_acc - ref_acc),
                "autoattack_s": ref_s,
                "advtune_s": mine_s,
                "time_ratio": mine_s / ref_s,
                "advtune_per_attack_s": detail["per_attack_s"],
                "advtune_suspect": detail["suspect"],
                "advtune_phases": phases,
            }
        )
        r = rows[-1]
        print(
            f"{run}: AutoAttack {100 * ref_acc:.2f}% in {ref_s:.0f} s; advtune {100 * mine_acc:.2f}% in "
            f"{mine_s:.0f} s (ratio {r['time_ratio']:.2f})",
            flush=True,
        )
        save(rows, args, square)
    print("\n| model | n | eps | clean | AutoAttack | advtune | diff (points) | AA time | advtune time | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['n']} | {r['eps']:g} | {100 * r['clean']:.1f}% | {100 * r['autoattack_acc']:.2f}% | "
            f"{100 * r['advtune_acc']:.2f}% | {r['diff_points']:+.2f} | {r['autoattack_s']:.0f} s | "
            f"{r['advtune_s']:.0f} s | {r['time_ratio']:.2f} |"
        )
    save(rows, args, square)


def save(rows: list[dict], args, square: dict) -> None:
    """The rows so far (written after every model: an interruption keeps the models measured), atomically."""
    atomic_write_text(
        args.out,
        json.dumps(
            {
                "rows": rows,
                "machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "omp": os.environ.get("OMP_NUM_THREADS"),
                "versions": versions(),
                "argv": sys.argv[1:],
                "suite": args.suite,
                "compile": args.compile,
                "square": square,
                "device": args.device,
                "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
            },
            indent=2,
        )
        + "\n",
    )


if __name__ == "__main__":
    try:
        main()
    except AdvtuneError as e:  # bad input: one line, not a traceback
        sys.exit(f"error: {e}")
