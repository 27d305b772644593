"""How much of full-network adversarial fine-tuning fits in 10% of the parameters? A diagnostic for issue 21.

On the residual network every selective recipe ends 6-8 points under full-network fine-tuning at equal compute
(RESULTS rounds 6-17), whatever the rule (whole layers, low-rank adapters, single entries), the rate, the
schedule or the budget (20% bought under a point). Two readings are possible: the optimizer cannot *find* a small
change as good as the full one, or there is none of that size near the standard model. This script asks a first,
narrower question: does full fine-tuning's own change compress? It takes D = W_tuned - W_base for every conv and
linear weight, keeps the part of it closest to D in ||D||^2 that a budget of parameter entries can hold, puts that
back on the base and measures what is left, on the VALIDATION split (never test). The part is cut once and never
trained again, and closest in ||D||^2 is not best for accuracy: a collapse says the change does not compress, not
that no good change of that size exists (a mask taken from |D| and trained again within it asks that next).

  full     all of D (must give the fine-tuned model's own accuracy: the check that nothing is lost in between)
  norms    none of D: the base's weights with the fine-tuned model's normalization layers and biases
  lowrank  per layer the best low-rank approximation of D (conv: out x in*k*k), singular directions taken across
           all layers by captured energy per entry (sigma^2 / (out + in*k*k)) while the budget lasts: what
           low-rank adapters of the best ranks hold at best (LoRA-style; Biderman et al. 2024, "LoRA Learns Less
           and Forgets Less", found full fine-tuning's change to be of far higher rank than LoRA's, from memory)
  sparse   the entries with the largest |D| over all layers: what an entry mask holds at best
  layers   whole layers, by ||D||^2 per entry, while they fit: what whole-layer selection holds at best
  sparse-retrain  the sparse arm's mask (with the normalization layers and biases) trained again from the BASE with
           the tuned run's own recipe and budget, every other entry frozen: an oracle mask (it needs full
           fine-tuning first, so it is no recipe), asking whether a good 10% change exists where full
           fine-tuning's lies (pruning's cut-then-retrain; the lottery-ticket question). Evaluated with its own
           statistics, as harden's output is.
  probe    a recipe built on what sparse-retrain finds, needing no full fine-tuning: the whole network fine-tuned for
           the first `--probe` share of the same budget (the eps ramp ending where the tuned run's does), the mask
           taken from ITS change (largest |D_probe|), every entry outside the mask put back to the base's value, and
           the rest of the budget trained within the mask (a fresh seed, so the batches are not replayed). The
           probe is paid out of the budget, so the comparison stays at equal compute; the output changes 10%.
           Since round 19 the arm runs the library's rule (`--granularity probe`, runs/probe.py).

Every truncated arm keeps the fine-tuned model's normalization layers and biases (their scale and shift, as
harden's default trains them) and pays their entries out of the budget, as harden does. The BatchNorm statistics
of the tuned model belong to its own weights (with the base's weights under them the tuned statistics leave 9.6%
clean accuracy), so every arm, `full` included, re-estimates them (`--recalibrate` N training images, PGD-5
examples of the patched model, batches of 64 as in training, a plain average over the batches).

    .venv/bin/advtune finetune runs/frontier-cifar10-resnet/standard --out runs/delta-fullft --eps 8/255 \
        --select all --attack pgd:steps=5 --eps-warmup 0.15 --budget 540000 --batch-size 64 --lr 0.003 \
        --ema 0.99 --augment crop-flip --limit 45000 --limit-test 1000 --monitor-test 0 --seed 0
    .venv/bin/python bench/delta_truncate.py runs/frontier-cifar10-resnet/standard runs/delta-fullft \
        --eps 8/255 --val-start 45000 --shares 0.1 --out docs/results/delta-truncate-cifar10-resnet.jsonl

One JSON line per arm: validation worst case (APGD-CE + APGD-T with 3 targets) and clean accuracy, the entries
kept and the share of ||D||^2 they hold.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from dataclasses import replace

import torch
from torch import Tensor, nn

from advtune.attacks import build_attack
from advtune.cost import CostMeter
from advtune.errors import AdvtuneError
from advtune.evaluation.protocol import robust_accuracy
from advtune.metrics import adversarial_examples
from advtune.runs.common import dataset_of, load_base
from advtune.runs.configs import FinetuneRun
from advtune.runs.finetune import finetune_model, prepare_finetune
from advtune.runs.probe import probe_then_mask as probe_rule
from advtune.settings import number
from advtune.threat import ThreatModel
from advtune.train import fit
from advtune.train.config import TrainConfig
from advtune.train.lowrank import norm_layers
from advtune.train.probe import whole_params
from advtune.train.sparse import SparseEntries
from val_select import emit, writable_out

log = logging.getLogger("delta_truncate")

ARMS = ("full", "norms", "lowrank", "sparse", "layers", "sparse-retrain", "probe")


def weight_deltas(base: nn.Module, tuned: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """{name of a conv or linear module: (its base weight, tuned - base)}; the two models must match."""
    tuned_mods = dict(tuned.named_modules())
    out = {}
    for name, m in base.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            t = tuned_mods.get(name)
            if t is None or type(t) is not type(m) or t.weight.shape != m.weight.shape:
                raise SystemExit(f"the tuned model has no {type(m).__name__} {name!r} of shape {tuple(m.weight.shape)}")
            out[name] = (m.weight.detach().clone(), (t.weight - m.weight).detach().clone())
    return out


def lowrank_part(deltas: dict[str, Tensor], budget: int) -> tuple[dict[str, Tensor], int]:
    """The best low-rank part of each delta, ranks chosen across layers by sigma^2 per entry of storage."""
    svds, cands = {}, []
    for name, d in deltas.items():
        u, s, vh = torch.linalg.svd(d.flatten(1).double(), full_matrices=False)
        svds[name] = (u, s, vh)
        cost = d.shape[0] + d[0].numel()
        cands += [(float(s[i] ** 2) / cost, name, i, cost) for i in range(len(s))]
    ranks, spent = dict.fromkeys(deltas, 0), 0
    for _, name, i, cost in sorted(cands, key=lambda c: -c[0]):
        if spent + cost <= budget and ranks[name] == i:  # a layer's directions in order (sigma descending)
            ranks[name], spent = i + 1, spent + cost
    part = {}
    for name, d in deltas.items():
        u, s, vh = svds[name]
        r = ranks[name]
        part[name] = ((u[:, :r] * s[:r]) @ vh[:r]).reshape(d.shape).to(d.dtype)
    return part, spent


def sparse_part(deltas: dict[str, Tensor], budget: int) -> tuple[dict[str, Tensor], int]:
    """The `budget` entries of largest |delta| over every layer."""
    flat = torch.cat([d.abs().flatten() for d in deltas.values()])
    k = min(budget, len(flat))
    if k == 0:
        return {n: torch.zeros_like(d) for n, d in deltas.items()}, 0
    keep = torch.zeros(len(flat), dtype=torch.bool)
    keep[flat.topk(k).indices] = True
    part, at = {}, 0
    for name, d in deltas.items():
        part[name] = torch.where(keep[at : at + d.numel()].reshape(d.shape), d, torch.zeros_like(d))
        at += d.numel()
    return part, k


def layers_part(deltas: dict[str, Tensor], budget: int) -> tuple[dict[str, Tensor], int]:
    """Whole layers by ||delta||^2 per entry, each taken while it fits."""
    part, spent = {n: torch.zeros_like(d) for n, d in deltas.items()}, 0
    for name, d in sorted(deltas.items(), key=lambda kv: -float(kv[1].pow(2).sum()) / kv[1].numel()):
        if spent + d.numel() <= budget:
            part[name], spent = d.clone(), spent + d.numel()
    return part, spent


def patched(tuned: nn.Module, weights: dict[str, tuple[Tensor, Tensor]], part: dict[str, Tensor]) -> nn.Module:
    """A copy of the tuned model (its normalization layers and biases) with each conv/linear weight = base + part."""
    model = copy.deepcopy(tuned)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, (w0, _) in weights.items():
            mods[name].weight.copy_(w0 + part[name])
    return model


def recalibrate(model: nn.Module, x: Tensor, y: Tensor, attack, seed: int = 0, batch: int = 64) -> nn.Module:
    """Re-estimate every BatchNorm's statistics on adversarial examples of `model` (crafted with the statistics it
    has): the average over batches of `batch` (momentum None), as the training's batches saw them."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    x_adv = adversarial_examples(model, attack, x, y, 256, seed)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(x_adv), batch):
            model(x_adv[i : i + batch])
    model.eval()
    for m, mom in zip(norms, momenta):
        m.momentum = mom
    return model


def tuned_recipe(tuned_cfg: dict, seed: int | None = None) -> FinetuneRun:
    """The tuned run's own fine-tuning settings (its config.json), to run again in memory (under `seed`: its batch
    order, attack noise and initialisation; None: the tuned run's)."""
    run = dict(tuned_cfg["run"])
    train = TrainConfig(**{**run["train"], **({} if seed is None else {"seed": seed})})
    return FinetuneRun(**{**run, "train": train, "out": "", "resume": False})


def train_within(model: nn.Module, ds, ftrun: FinetuneRun, part: dict[str, Tensor] | None) -> tuple[int, dict]:
    """Fine-tune `model` in place by `ftrun`: every parameter (`part` None), or only the weight entries where `part`
    is non-zero plus every parameter that is not a conv/linear weight (normalization layers, biases).
    Returns the gradient evaluations spent and the last epoch's training record (loss, accuracy)."""
    job = prepare_finetune(model, ds, ftrun)
    selection = None
    if part is not None:
        weights = {f"{n}.weight" for n in part}
        entries = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters() if n not in weights}
        entries.update({f"{n}.weight": d != 0 for n, d in part.items()})
        norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        selection = SparseEntries(entries, norms=norms)
    meter = CostMeter()
    history = fit(model, ds.train, job.objective, job.cfg, selection=selection, meter=meter)
    return meter.grad_evals, history.last


def retrain_within(
    base: nn.Module, tuned_cfg: dict, meta_cfg: tuple, part: dict[str, Tensor], seed: int | None = None
) -> tuple[nn.Module, dict]:
    """The base trained again by the tuned run's own recipe and budget, only the entries where `part` is non-zero
    (and every parameter that is not a conv/linear weight: the normalization layers, biases) free to move."""
    ftrun = tuned_recipe(tuned_cfg, seed)
    model = copy.deepcopy(base)
    _, last = train_within(model, dataset_of(*meta_cfg, None, limit=ftrun.limit), ftrun, part)
    return model.eval(), {"seeds": [ftrun.train.seed], **_trained(last)}


def _trained(last: dict) -> dict:
    return {"train_loss": last.get("train_loss"), "train_acc": last.get("train_acc")}


def probe_then_mask(
    base: nn.Module, tuned_cfg: dict, meta_cfg: tuple, probe: float, budget: int, seed: int | None = None
) -> tuple[nn.Module, int, int, dict]:
    """The probe arm: the library's probe rule (`--granularity probe`, runs/probe.py) with the tuned run's recipe:
    the whole network for `probe` of its budget, the mask = `budget` weight entries of largest |D_probe| (every
    normalization layer and bias whole, paid on top here as in every arm), the rest put back to the base, then the
    rest of the budget within the mask. Returns the model, the weight entries in the mask, the gradient evaluations
    spent (both stages) and what to record (the seeds of the two stages, the last training loss and accuracy)."""
    ftrun = tuned_recipe(tuned_cfg, seed)
    ds = dataset_of(*meta_cfg, None, limit=ftrun.limit)
    norms = tuple(norm_layers(base))
    whole = set(whole_params(base, norms))
    paid = sum(p.numel() for n, p in base.named_parameters() if n in whole)
    run = replace(
        ftrun, granularity="probe", probe=probe, params=budget + paid, norms=bool(norms), monitor_test=0, keep_best=0
    )
    try:
        probed = probe_rule(copy.deepcopy(base), {}, ds, run, None, log.info)
    except AdvtuneError as e:
        raise SystemExit(str(e)) from None
    model = probed.start
    job = prepare_finetune(model, ds, probed.run, select=probed.mask)
    summary = finetune_model(model, ds, job, spent=probed.spent, base_state=probed.base_state)
    seeds = [ftrun.train.seed, probed.run.train.seed]
    return (
        model.eval(),
        probed.mask.probe["weight_entries"],
        summary.cost["grad_evals"],
        {
            "seeds": seeds,
            **_trained(summary.final),
        },
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="the standard model's run folder")
    p.add_argument("tuned", help="the full-network fine-tuning's run folder (from BASE)")
    p.add_argument("--eps", required=True, type=number, help="0.3, 8/255, ...")
    p.add_argument("--val-start", type=int, required=True, help="first validation image of the training split")
    p.add_argument("--n", type=int, default=1000, help="validation images")
    p.add_argument("--shares", default="0.1", help="comma list: budgets as shares of the model's parameters")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--probe", type=float, default=0.2, help="the probe arm: share of the budget fine-tuned whole")
    p.add_argument("--seed", type=int, help="the training arms' seed (default: the tuned run's)")
    p.add_argument("--recalibrate", type=int, default=2000, help="training images for the BatchNorm statistics")
    p.add_argument("--out", required=True, help="JSON lines file the results are appended to")
    args = p.parse_args()
    args.out = writable_out(args.out)
    arms = args.arms.split(",")
    if set(arms) - set(ARMS):
        raise SystemExit(f"unknown arm(s) {', '.join(sorted(set(arms) - set(ARMS)))}: {', '.join(ARMS)}")
    shares = [float(s) for s in args.shares.split(",")]
    if any(not 0 < s < 1 for s in shares):
        raise SystemExit(f"--shares must be in (0, 1), got {args.shares}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    base, meta, cfg = load_base(args.base, "cpu")
    tuned, _, tuned_cfg = load_base(args.tuned, "cpu")
    weights = weight_deltas(base, tuned)
    deltas = {n: d for n, (_, d) in weights.items()}
    total = sum(p.numel() for p in base.parameters())
    extras = total - sum(d.numel() for d in deltas.values())  # normalization layers and biases, always kept
    energy = sum(float(d.pow(2).sum()) for d in deltas.values())
    full = dataset_of(cfg, meta, None)
    if len(full.train) < args.val_start + args.n:
        raise SystemExit(f"no {args.n} validation images after training image {args.val_start}")
    for what, c in (("base", cfg), ("tuned", tuned_cfg)):  # validation must be images neither model trained on
        limit = c.get("run", {}).get("limit")
        if limit is None or limit > args.val_start:
            seen = "every training image" if limit is None else f"the first {limit} training images"
            raise SystemExit(f"the {what} run trained on {seen}: --val-start {args.val_start} would overlap them")
    if args.recalibrate > args.val_start:
        raise SystemExit(
            f"--recalibrate {args.recalibrate} images would reach the validation images at {args.val_start}"
        )
    val = full.train.index(torch.arange(args.val_start, args.val_start + args.n)).tensors(torch.device("cpu"))
    threat = ThreatModel("linf", args.eps)
    protocol = [build_attack(s, threat) for s in ("apgd-ce", "apgd-t:n_target_classes=3")]
    if args.recalibrate < 0:
        raise SystemExit(
            f"--recalibrate must be >= 0 training images (0: keep the tuned statistics), got {args.recalibrate}"
        )
    rx, ry = full.train.take(max(args.recalibrate, 1)).tensors(torch.device("cpu"))
    pgd5 = build_attack("pgd:steps=5", threat)
    rules = {"lowrank": lowrank_part, "sparse": sparse_part, "layers": layers_part, "sparse-retrain": sparse_part}
    rules["probe"] = sparse_part  # its mask is taken from the probe's change, not from D (below)
    if not 0 < args.probe < 1:
        raise SystemExit(f"--probe must be a share of the budget in (0, 1), got {args.probe}")
    spent = overlap = None
    record: dict = {}
    runs = [(a, None) for a in arms if a in ("full", "norms")] + [(a, s) for s in shares for a in arms if a in rules]
    for arm, share in runs:
        t0 = time.perf_counter()
        if arm == "full":
            part, kept = deltas, sum(d.numel() for d in deltas.values())
        elif arm == "norms":
            part, kept = {n: torch.zeros_like(d) for n, d in deltas.items()}, 0
        else:
            part, kept = rules[arm](deltas, int(share * total) - extras)
        if arm == "sparse-retrain":
            model, record = retrain_within(base, tuned_cfg, (cfg, meta), part, args.seed)
        elif arm == "probe":
            model, kept, spent, record = probe_then_mask(
                base, tuned_cfg, (cfg, meta), args.probe, int(share * total) - extras, args.seed
            )
            oracle = part  # full fine-tuning's own mask, to see how much of it the probe found
            part = {n: d for n, (_, d) in weight_deltas(base, model).items()}  # the change the arm made
            overlap = sum(int(((part[n] != 0) & (oracle[n] != 0)).sum()) for n in part) / max(kept, 1)
        elif args.recalibrate:
            model = recalibrate(patched(tuned, weights, part), rx, ry, pgd5)
        else:
            model = patched(tuned, weights, part)
        res = robust_accuracy(
            model,
            val,
            protocol,
            batch_size=500,
            generator=torch.Generator().manual_seed(0),
            gate=False,
        )
        line = {
            "arm": arm,
            "share": share,
            "kept_entries": kept,
            "extras": extras,
            "trainable_share": (kept + extras) / total,
            # the probe's change is no part of D: its energy against D's means nothing
            "energy_kept": None if arm == "probe" else sum(float(d.pow(2).sum()) for d in part.values()) / energy,
            "val_robust": res.n_robust_worst / res.n,
            "val_clean": res.n_clean_correct / res.n,
            "n": res.n,
            "eval_s": round(time.perf_counter() - t0, 1),
            "recalibrate": 0 if arm in ("sparse-retrain", "probe") else args.recalibrate,
            "probe": args.probe if arm == "probe" else None,
            **(record if arm in ("sparse-retrain", "probe") else {}),  # seeds as run, the last training loss
            "train_grad_evals": spent if arm == "probe" else None,
            "mask_overlap": overlap if arm == "probe" else None,  # share of its mask in full fine-tuning's
            "base": args.base,
            "tuned": args.tuned,
        }
        log.info("%s", line)
        emit(line, args.out, echo=False)


if __name__ == "__main__":
    try:
        main()
    except AdvtuneError as e:  # bad input: one line, not a traceback
        sys.exit(f"error: {e}")
