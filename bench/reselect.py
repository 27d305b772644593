"""Re-selection after the eps ramp (issue 21, item 3; the idea from CLAT, which re-picks its critical layers during
adversarial fine-tuning): does choosing the trained parameters again, on the model the ramp has half-hardened,
beat keeping the first choice? Measured on the VALIDATION split, never on test.

Three arms, each harden's recipe of rounds 7-19 (the shares rule, PGD-5, Adam 3e-3, batch 64, EMA 0.99, 10% of the
parameters) for the same training budget from the same standard model:

  single    one run, eps ramped over the first 15% (harden's recipe, without --keep-best)
  restart   two runs: the first `--switch` of the budget (the ramp ends at 15%, as in `single`), the trained
            adapters merged into the weights, then the rest with the SAME layers chosen again from the first
            analysis: fresh adapters, optimizer and average. It isolates what splitting the run costs. With
            `--restarts N` the rest is N equal runs, each merged and restarted (ReLoRA's repeated restarts).
  reselect  as restart, but every run after the first takes its selection from a new analysis of the model as it
            stands (its cost counted, like the first analysis').

restart vs single changes several things at once (the second run starts from the averaged weights, with fresh Adam
moments, an average that warms up again, and, without --fresh-seed, the first run's batch order and noise replayed);
restart vs reselect changes only the selection. harden's --keep-best is off in every arm.

    .venv/bin/python bench/reselect.py runs/frontier-mnist-eps0.3-spread/standard --eps 0.3 \
        --arms reselect,restart,single --out docs/results/reselect-mnist-eps0.3.jsonl
    .venv/bin/python bench/reselect.py runs/frontier-cifar10-resnet/standard --eps 8/255 --budget 540000 \
        --limit 45000 --val-start 45000 --augment crop-flip --points 1.0 --arms reselect,restart \
        --out docs/results/reselect-cifar10-resnet.jsonl

Every arm's averaged weights are evaluated at the same shares of the budget with APGD-CE + APGD-T (3 targets) on
`--n` validation images: the `--val-start`.. of the training split, which the standard model and these runs never
trained on (the frontier's base trains on the first 55,000 MNIST images). One JSON line per point.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from dataclasses import replace

import torch

from advtune.attacks import build_attack
from advtune.cost import CostMeter
from advtune.errors import AdvtuneError
from advtune.evaluation.protocol import robust_accuracy
from advtune.recipe import Recipe
from advtune.runs.analyze import analyze_model
from advtune.runs.common import dataset_of, load_base
from advtune.runs.configs import HardenRun
from advtune.runs.finetune import prepare_finetune
from advtune.runs.harden_plan import analysis_settings, finetune_settings, plan_harden
from advtune.settings import number
from advtune.threat import ThreatModel
from advtune.train import fit
from advtune.train.config import SCHEDULES
from val_select import emit, writable_out

SHARES = Recipe(granularity="shares")  # the rule measured here (harden's default in rounds 7-19)
log = logging.getLogger("reselect")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", help="the standard model's run folder")
    ap.add_argument("--eps", type=number, required=True, help="0.3, 8/255, ...")
    ap.add_argument("--budget", type=int, default=900_000, help="training gradient evaluations of every arm")
    ap.add_argument("--switch", type=float, default=0.2, help="share of the budget after which the second run starts")
    ap.add_argument("--ramp", type=float, default=0.15, help="share of the budget over which eps ramps up")
    ap.add_argument("--limit", type=int, default=55_000, help="training examples (the base model's)")
    ap.add_argument("--val-start", type=int, default=55_000)
    ap.add_argument("--n", type=int, default=1000, help="validation images")
    ap.add_argument("--points", default="0.2,0.6,1.0", help="shares of the budget at which to evaluate")
    ap.add_argument("--arms", default="reselect,restart,single")
    ap.add_argument(
        "--restarts",
        type=int,
        default=1,
        help="restart and reselect: the budget after --switch split into this many equal runs, each merged and "
        "restarted (ReLoRA's schedule, Lialin et al. 2023: every merge adds the adapters' rank to the update)",
    )
    ap.add_argument(
        "--fresh-seed",
        action="store_true",
        help="every run after the first draws its own batch order, attack noise and adapter init (run i: seed + i; "
        "default, as recorded in round 15: each replays the first run's seed; required with --restarts > 1)",
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="harden's seed: analysis, batch order, attack noise, adapter init"
    )
    ap.add_argument(
        "--params",
        type=number,
        help="the selection's parameter budget: a share (< 1) or a number of entries (default: harden's 10%%)",
    )
    ap.add_argument(
        "--schedule", choices=SCHEDULES, help="the fine-tuning's rate schedule, over each run (default: harden's)"
    )
    ap.add_argument("--augment", default="none", help="the fine-tuning's augmentation (crop-flip on CIFAR-10)")
    ap.add_argument("--out", required=True, help="JSON lines file the points are appended to")
    args = ap.parse_args()
    args.out = writable_out(args.out)
    points = sorted(float(p) for p in args.points.split(","))
    # refused in one line before any work (the eps ramp must end inside the first run; validation never trained on)
    if not 0 < args.ramp < args.switch < 1:
        raise SystemExit(f"need 0 < --ramp < --switch < 1, got --ramp {args.ramp} --switch {args.switch}")
    if any(not 0 < p <= 1 for p in points) or len(set(points)) != len(points):
        raise SystemExit(f"--points must be distinct shares of the budget in (0, 1], got {args.points}")
    unknown = set(args.arms.split(",")) - {"single", "restart", "reselect"}
    if unknown:
        raise SystemExit(f"unknown arm(s) {', '.join(sorted(unknown))}: single, restart or reselect")
    if not 1 <= args.restarts <= 20:
        raise SystemExit(f"--restarts must be 1..20 runs after the switch, got {args.restarts}")
    if args.restarts > 1 and not args.fresh_seed:  # each run's epoch 0 would see the same images in the same order
        raise SystemExit("--restarts > 1 needs --fresh-seed: runs shorter than an epoch would replay the same images")
    if args.val_start < args.limit:
        raise SystemExit(f"--val-start {args.val_start} < --limit {args.limit}: validation would overlap training")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    base, meta, base_cfg = load_base(args.base, "cpu")
    ds = dataset_of(base_cfg, meta, None, limit=args.limit)
    full = dataset_of(base_cfg, meta, None)
    if len(full.train) < args.val_start + args.n:
        raise SystemExit(f"no {args.n} validation images after training image {args.val_start}")
    vx, vy = full.train.index(torch.arange(args.val_start, args.val_start + args.n)).tensors(torch.device("cpu"))
    threat = ThreatModel("linf", args.eps)
    protocol = [build_attack(s, threat) for s in ("apgd-ce", "apgd-t:n_target_classes=3")]
    hrun = HardenRun(
        base=args.base,
        out="",
        seed=args.seed,
        # the rule these arms re-select with (harden's default until round 20; the probe rule finds its own mask)
        recipe=replace(SHARES, params=SHARES.params if args.params is None else args.params),
        eps=args.eps,
        budget=args.budget,
        limit=args.limit,
        holdout=0,
        keep_best=0,
    )
    plan = plan_harden(base, ds, hrun)
    hrun = replace(hrun, recipe=plan.recipe)
    for arm in args.arms.split(","):
        run_arm(arm, base, ds, hrun, plan, args, points, (vx, vy), protocol)


def analyse(model, ds, hrun) -> tuple[object, int]:
    acfg = analysis_settings(hrun, len(ds.train), None)
    x, y = ds.train.take(acfg.limit).tensors(torch.device("cpu"))
    analysis = analyze_model(model, x, y, acfg)
    cost = analysis.summary.to_json().get("cost", {})
    return analysis.tables[hrun.recipe.criterion], int(cost.get("grad_evals", 0))


def stages_of(arm: str, switch: float, ramp: float, restarts: int) -> list[tuple[float, float]]:
    """(share of the budget, share of that run over which eps ramps) for each run of an arm: the ramp ends at the
    same absolute point in every arm, inside the first run; the runs after the switch share the rest equally."""
    if arm == "single":
        return [(1.0, ramp)]
    return [(switch, ramp / switch)] + [((1 - switch) / restarts, 0.0)] * restarts


def marks_of(points: list[float], done: float, share: float, steps: int, last: bool) -> dict[int, float]:
    """{step of this run: share of the budget} for the points that fall in a run covering (done, done + share] of
    the budget in `steps` steps. Shares summed in floats miss their boundaries by ~1e-16 (0.2 + 0.2 + 0.2 > 0.6,
    0.2 + 0.6 < 0.8), so a point within 1e-9 of a run's end belongs to that run and the last run takes every point
    left: no point is dropped, moved into the next run's first step, or merged with another."""
    tol = 1e-9
    mine = [p for p in points if done + tol < p and (last or p <= done + share + tol)]
    marks = {min(steps, max(1, round((p - done) / share * steps))): p for p in mine}
    if len(marks) != len(mine):
        raise SystemExit(f"points {mine} fall on the same step of a {steps}-step run: space them further apart")
    return marks


def run_arm(arm, base, ds, hrun, plan, args, points, val, protocol) -> None:
    model = copy.deepcopy(base)
    table, analysis_ge = analyse(model, ds, hrun)
    ft = finetune_settings(hrun, plan, None)
    ft = replace(ft, train=replace(ft.train, augment=args.augment))  # the frontier's CIFAR-10 variants: crop-flip
    if args.schedule:  # a decaying rate (Rice et al. 2020: robust accuracy peaks after a decay)
        ft = replace(ft, train=replace(ft.train, schedule=args.schedule))
    stages = stages_of(arm, args.switch, args.ramp, args.restarts)
    done_share, spent = 0.0, 0
    start = time.perf_counter()
    for i, (share, warmup) in enumerate(stages):
        if i >= 1 and arm == "reselect":
            table, more = analyse(model, ds, hrun)
            analysis_ge += more
        train = ft.train if i == 0 or not args.fresh_seed else replace(ft.train, seed=(ft.train.seed or 0) + i)
        stage = replace(ft, budget=int(share * args.budget), eps_warmup=warmup, train=train)
        job = prepare_finetune(model, ds, stage, table)
        total = job.cfg.steps
        marks = marks_of(points, done_share, share, total, last=i == len(stages) - 1)

        def on_step(m, step, meter, marks=marks, spent=spent):
            if step not in marks:
                return
            res = robust_accuracy(
                m, val, protocol, batch_size=500, generator=torch.Generator().manual_seed(0), gate=False
            )
            line = {
                "arm": arm,
                "share": marks[step],
                "train_grad_evals": spent + meter.grad_evals,
                "analysis_grad_evals": analysis_ge,
                "val_robust": res.n_robust_worst / res.n,
                "val_clean": res.n_clean_correct / res.n,
                "n": res.n,
                "wall_s": round(time.perf_counter() - start, 1),
                "switch": args.switch if arm != "single" else None,
                "restarts": args.restarts if arm != "single" else 0,
                "fresh_seed": args.fresh_seed,
                "seed": args.seed,
                "params": hrun.recipe.params,
                "schedule": job.cfg.schedule,
                "selection": job.selection_info.get("kind") if job.selection_info else None,
                "trainable": job.selection_info.get("trainable_params") if job.selection_info else None,
                "whole": job.selection_info.get("whole") if job.selection_info else None,
                "ranks": job.selection_info.get("ranks") if job.selection_info else None,
            }
            log.info("%s", line)
            emit(line, args.out, echo=False)

        meter = CostMeter()
        fit(model, ds.train, job.objective, job.cfg, selection=job.selection, meter=meter, on_step=on_step, desc=arm)
        spent += meter.grad_evals
        done_share += share


if __name__ == "__main__":
    try:
        main()
    except AdvtuneError as e:  # bad input: one line, not a traceback
        sys.exit(f"error: {e}")
