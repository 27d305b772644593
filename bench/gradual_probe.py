"""The probe rule with a gradual cut (issue 21, round 22): does shrinking the changed entries step by step beat the
probe's one cut at 20% of the budget? Measured on the VALIDATION split (bench/val_select.py), never on test.

The probe rule (train/probe.py, RESULTS round 18) fine-tunes the whole network for 20% of the budget, keeps the
10% of entries that moved most (per-layer quotas from the analysis), puts every other entry back to the base and
trains the rest of the budget within that mask. Round 18 measured what a cut costs: full fine-tuning's change cut
once to 10% keeps 8.5% robust accuracy where the whole change has 25%, and trained again within the mask it comes
back to 27.9%, under full fine-tuning's 32.6%. Gradual pruning (Zhu & Gupta 2017, "To prune, or not to prune";
movement pruning's cubic schedule, Sanh et al. 2020; both from memory) cuts a little at a time while training goes
on, so the kept entries can take over what the dropped ones did. Here the *change* from the base is pruned, not the
weights: a dropped entry goes back to its base value, so the result differs from the base in as many entries as
the probe rule's.

The schedule: the whole network trains until `--start` of the budget; from there to `--end` the entries allowed to
differ from the base shrink on a cubic curve from every conv/linear entry to the final budget (harden's: --params of
the model, the normalization layers paid first, the output layer whole with --head, the rest by the analysis'
per-layer quotas, within each layer the entries that have moved most, |W - W_base|); every `--every` of the budget
the mask is taken again (it only shrinks: an entry once dropped stays at the base), and after every step the entries
outside it are put back to the base. Their gradients are masked, so Adam's moments for them decay to nothing.
The same recipe as the run `--like` (its config.json: attack, eps ramp, rate, batch, average, augmentation, budget,
seed), one stage, one seed stream, no fresh start.

    python bench/gradual_probe.py runs/frontier-cifar10-resnet/probe-quotas-head --out runs/gradual-cifar
    python bench/val_select.py runs/gradual-cifar --eps 8/255 --n 1000 --snapshots

The output folder holds the final model (and --points snapshots along the run) in the form val_select reads: the
like-run's config.json (plus a "gradual" record), model.json, model.safetensors, cost.json. No resume: a run is one
sitting (13 min on the residual network, 4 on small-cnn).

Measured (RESULTS round 22, seed 0, validation): residual network 28.5% against the one cut's 27.8%; small-cnn 89.2%
against 90.8%. Not a lever: the one cut stays harden's rule.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from advtune.cost import CostMeter
from advtune.errors import AdvtuneError
from advtune.models import save_model
from advtune.runs.common import dataset_of, example_input, load_base
from advtune.runs.configs import FinetuneRun
from advtune.runs.finetune import prepare_finetune
from advtune.runs.selecting import head_layer, norms_of, read_table
from advtune.storage import atomic_write_json, read_json
from advtune.train import fit
from advtune.train.config import TrainConfig
from advtune.train.lowrank import norm_params
from advtune.train.probe import masked_params
from advtune.train.sparse import sparse_selection
from advtune.vulnerability import check_params, rank_layers

log = logging.getLogger("gradual_probe")


class GradualCut:
    """The shrinking mask: `update(t)` at share t of the budget re-takes it on schedule and puts every entry outside
    it back to the base; the gradient hooks keep the dropped entries' gradients at zero."""

    def __init__(self, model, base_state, final, layer_scores, head, norms, start, end, every):
        self.model, self.final, self.scores, self.head, self.norms = model, final, layer_scores, head, norms
        self.start, self.end, self.every = start, end, every
        self.params = dict(masked_params(model))  # conv/linear weights and biases: what the mask chooses among
        self.base = {n: base_state[n].to(p.device, p.dtype) for n, p in self.params.items()}
        self.mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
        self.scale = {n: torch.ones_like(p) for n, p in self.params.items()}  # the mask as a gradient factor
        self.total = sum(p.numel() for p in self.params.values())
        self.next_cut = start
        self.cuts: list[dict] = []
        for n, p in self.params.items():
            p.register_hook(lambda g, n=n: g * self.scale[n])

    def entries_at(self, t: float) -> int:
        """The cubic schedule: every entry before `start`, the final budget from `end` on."""
        if t <= self.start:
            return self.total
        x = min((t - self.start) / max(self.end - self.start, 1e-12), 1.0)
        return int(self.final + (self.total - self.final) * (1 - x) ** 3)

    @torch.no_grad()
    def update(self, t: float) -> None:
        if t >= self.next_cut and (not self.cuts or self.cuts[-1]["t"] < self.end):
            self.cut(t)
            self.next_cut = t + self.every
        self.project()

    @torch.no_grad()
    def project(self) -> None:
        """Every entry outside the mask back to the base's value (after every step, and on what is saved)."""
        for n, p in self.params.items():
            p.copy_(torch.where(self.mask[n], p, self.base[n]))

    @torch.no_grad()
    def cut(self, t: float) -> None:
        k = self.entries_at(t)
        moved = {n: ((p - self.base[n]).abs() * self.mask[n]).cpu() for n, p in self.params.items()}
        if k >= self.total:
            return
        chosen = sparse_selection(self.model, k, self.scores, moved, self.head, ()).entries
        for n, m in self.mask.items():
            new = chosen.get(n)
            m &= new.to(m.device) if new is not None else torch.zeros_like(m)
            self.scale[n].copy_(m)
        kept = sum(int(m.sum()) for m in self.mask.values())
        self.cuts.append({"t": round(t, 4), "target": k, "kept": kept})
        log.info(
            "cut at %.1f%% of the budget: %s of %s conv/linear entries may differ",
            100 * t,
            f"{kept:,}",
            f"{self.total:,}",
        )

    def changed(self) -> int:
        return sum(int((p != self.base[n]).sum()) for n, p in self.params.items())


class WithCut:
    """The objective of the run, with the cut applied before each step's forward (the loop calls `at` every step)."""

    def __init__(self, inner, cut: GradualCut):
        self.inner, self.cut_ = inner, cut

    def __getattr__(self, name):  # everything else is the inner objective's (block_fraction stays absent)
        return getattr(self.inner, name)

    def at(self, t: float):
        self.cut_.update(t)
        return self.inner.at(t) if hasattr(self.inner, "at") else self.inner


def save(folder: Path, model, meta, like_config, record, meter) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder, model, {k: v for k, v in meta.items() if k not in ("parameters", "tensors", "training")})
    atomic_write_json(folder / "config.json", {**like_config, "gradual": record})
    atomic_write_json(folder / "cost.json", meter.to_json())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("like", type=Path, help="a probe-rule run folder whose settings to use (its config.json)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--start", type=float, default=0.1, help="share of the budget at which the cut begins")
    ap.add_argument("--end", type=float, default=0.5, help="share of the budget at which the final mask is reached")
    ap.add_argument("--every", type=float, default=0.01, help="the mask is taken again every this share")
    ap.add_argument("--points", default="0.6,0.8", help="shares of the budget at which to save snapshots")
    ap.add_argument("--seed", type=int, help="default: the like-run's")
    ap.add_argument("--budget", type=int, help="training gradient evaluations (default: the like-run's)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    like = read_json(a.like / "config.json")
    run = dict(like["run"])
    run["budget"] = a.budget or run["budget"]
    train = TrainConfig(**{**run["train"], **({} if a.seed is None else {"seed": a.seed})})
    model, meta, base_cfg = load_base(run["base"], "cpu")
    ds = dataset_of(base_cfg, meta, None, limit=run["limit"], val=0, seed=train.seed or 0)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    whole_net = FinetuneRun(
        **{
            **run,
            "train": train,
            "out": "",
            "resume": False,
            "select": "all",
            "granularity": "unit",
            "params": None,
            "norms": False,
            "head": False,
            "probe_quotas": False,
            "points": 0,
            "keep_best": 0,
        }
    )
    job = prepare_finetune(model, ds, whole_net)
    norms = norms_of(model, True) if run["norms"] else ()
    budget = check_params(run["params"], model) - (norm_params(model) if norms else 0)
    head = head_layer(model, budget, example_input(model, ds)) if run["head"] else []
    table = read_table(run["select"], run["criterion"])
    scores = {n: s for n, s in rank_layers(table) if math.isfinite(s)}
    cut = GradualCut(model, base_state, budget, scores, head, norms, a.start, a.end, a.every)
    total_steps = job.cfg.steps
    points = {max(1, round(float(p) * total_steps)): float(p) for p in a.points.split(",") if p}
    record = {
        "start": a.start,
        "end": a.end,
        "every": a.every,
        "seed": train.seed,
        "budget_entries": budget,
        "head": head,
        "norms": list(norms),
        "like": str(a.like),
    }
    meter = CostMeter()

    def on_step(m, step, meter_now):
        if step in points:  # the average's weights, cut to the mask as it stands
            snap = {n: p.detach().clone() for n, p in m.state_dict().items()}
            cut.project()
            save(a.out / "snapshots" / f"step-{step:07d}", m, meta, like, {**record, "share": points[step]}, meter_now)
            m.load_state_dict(snap)

    t0 = time.perf_counter()
    history = fit(
        model,
        ds.train,
        WithCut(job.objective, cut),
        job.cfg,
        selection=None,
        meter=meter,
        on_step=on_step,
        desc="gradual",
    )
    cut.update(1.0)  # the final (averaged) weights, cut to the final mask
    changed = cut.changed() + (norm_params(model) if norms else 0)
    record.update(
        cuts=cut.cuts,
        changed_entries=changed,
        model_entries=sum(p.numel() for p in model.parameters()),
        train_last=history.last,
        wall_s=round(time.perf_counter() - t0, 1),
    )
    save(a.out, model, meta, like, record, meter)
    print(json.dumps({k: v for k, v in record.items() if k != "cuts"}))


if __name__ == "__main__":
    try:
        main()
    except AdvtuneError as e:  # bad input: one line, not a traceback
        sys.exit(f"error: {e}")
