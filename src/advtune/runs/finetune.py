"""`advtune finetune`: adversarial fine-tuning of a trained run: all parameters, a selection of
components, or a random control, through the one training loop."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

from .. import filenames as files
from ..cost import CostMeter
from ..errors import AdvtuneError
from ..metrics import accuracy, quick_robust_acc
from ..models import save_model
from ..threat import ThreatModel
from ..train import TrainConfig, build_objective, check_resume, fit
from ..utils import resolve_device, seed_everything
from .common import (
    check_same_run,
    check_val,
    dataset_of,
    describe_selection,
    load_base,
    make_selection,
    overfit_guard,
    refuse_same_folder,
    snapshot_saver,
    snapshot_steps,
    with_budget,
    write_config_once,
)
from .record import RunDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneRun:
    """Adversarial fine-tuning of a trained run: all parameters, a selection of components, or a
    random control of equal size, through the one training loop."""

    base: str  # run folder of the model to fine-tune
    out: str
    eps: float | None = None
    select: str = "all"  # all | random | <analyze folder> | layers:<name,name,...>
    share: float = 0.1
    criterion: str = "taylor"  # which score table of the analyze folder ranks components
    per_layer: bool = False
    attack: str = "pgd:steps=10"  # attack spec, or trades[:steps=..,beta=..]
    norm: str = "linf"
    attack_mode: str = "eval"
    eps_warmup: float = 0.0  # share of training over which eps ramps up from 0
    guard: bool | None = None  # catastrophic-overfitting guard; None: on for FGSM attacks
    train: Any = None  # TrainConfig
    data_dir: str | None = None
    limit: int | None = None
    limit_test: int | None = None
    val: float = 0
    monitor: int = 500  # test examples for the quick PGD-10 monitor (0: none)
    params: float | None = None  # parameter budget of the selection (entries, or a share < 1), instead of share
    granularity: str = "unit"  # unit | layer: what a parameter budget selects from an analysis
    budget: int | None = None  # training gradient evaluations; ends training early (steps)
    points: int = 0  # snapshots along the run (evenly spaced in steps), for curves
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False

    def to_json(self) -> dict:
        d = asdict(self)
        d["train"] = self.train.to_json() if self.train is not None else None
        return d


def run(run: FinetuneRun) -> dict:

    run = replace(run, train=run.train or TrainConfig(epochs=1))
    cfg = run.train
    if run.eps is None:
        raise AdvtuneError("finetune needs --eps (e.g. 0.3 for MNIST, 8/255 for CIFAR-10)")
    check_val(run.val)
    if isinstance(run.monitor, bool) or not isinstance(run.monitor, int) or run.monitor < 0:
        raise AdvtuneError(f"--monitor must be a number of test examples >= 0 (0: off), got {run.monitor!r}")
    if cfg.epochs == 0 and run.budget is None:
        raise AdvtuneError(
            "--epochs 0 would save the base model unchanged; fine-tune for at least 1 epoch (or give --budget)"
        )
    refuse_same_folder(run.out, run.base)
    device = resolve_device(run.device)
    model, meta, base_cfg = load_base(run.base, device)
    seed_everything(cfg.seed)
    ds = dataset_of(
        base_cfg, meta, run.data_dir, limit=run.limit, limit_test=run.limit_test, val=run.val, seed=cfg.seed or 0
    )
    threat = ThreatModel(run.norm, run.eps)
    objective = build_objective(run.attack, threat, run.attack_mode, run.eps_warmup, model=model)
    example = ds.train.to_float(ds.train.x[:1], device)  # the traced BN rule, as fit uses it
    selection = make_selection(
        model, run.select, run.share, run.criterion, run.per_layer, cfg.seed or 0, run.params, run.granularity, example
    )
    cfg = with_budget(cfg, run.budget, objective, len(ds.train), model, example)
    snaps = snapshot_steps(cfg, len(ds.train), run.points)
    meter = CostMeter()
    callbacks = overfit_guard(run.guard, run.attack, threat, ds, device, cfg.seed, meter)
    sel_info = describe_selection(selection, model, example) if selection is not None else None
    # everything is validated: only now is the run folder created (or an old one replaced)
    rd = RunDir.create(run.out, resume=run.resume, overwrite=run.overwrite)
    if run.resume and rd.file(files.CONFIG).is_file():
        check_same_run(rd.read_json(files.CONFIG).get("run", {}), run.to_json())
    if run.resume:
        check_resume(rd.path, cfg)
    config = {
        "command": "finetune",
        "run": run.to_json(),
        "seed": cfg.seed,
        "base": str(run.base),
        "dataset": ds.describe(),
        "objective": objective.describe(),
        "threat": threat.to_json(),
        "selection": sel_info,
        "guard": bool(callbacks),
        "device": str(device),
        "steps": cfg.steps,
    }
    write_config_once(rd, config)
    if selection is not None:
        rd.write_json(files.SELECTION, selection.to_json())
    snap_meta = {k: v for k, v in meta.items() if k not in ("parameters", "tensors", "training")}
    history = fit(
        model,
        ds.train,
        objective,
        cfg,
        val=ds.val,
        selection=selection,
        meter=meter,
        checkpoint_dir=rd.path,
        resume=run.resume,
        callbacks=callbacks,
        on_record=lambda h: (rd.write_metrics(h.epochs), rd.write_cost(meter)),
        on_step=snapshot_saver(rd, snap_meta, config, snaps),
        desc="finetune",
    )
    # monitoring after training: not counted as training cost
    summary: dict[str, Any] = {"test_acc": accuracy(model, ds.test, cfg.eval_batch_size), "test_examples": len(ds.test)}
    if run.monitor:
        n = min(run.monitor, len(ds.test))
        summary["pgd10_acc_quick"] = quick_robust_acc(model, ds.test.take(n), threat, cfg.seed)
        summary["pgd10_examples"] = n
    summary.update(
        {
            "epochs": len(history.epochs),
            "stopped": history.stopped,
            "final": history.last,
            "selection": sel_info,
            "cost": meter.to_json(),
        }
    )
    new_meta = {k: v for k, v in meta.items() if k not in ("parameters", "tensors", "training")}
    new_meta["training"] = {
        "finetuned_from": str(run.base),
        "objective": objective.describe(),
        "config": cfg.to_json(),
        "selection": sel_info,
        "test_acc": summary["test_acc"],
    }
    save_model(rd.path, model, new_meta)
    rd.write_metrics(history.epochs)
    rd.write_cost(meter)
    rd.write_json(files.SUMMARY, summary)
    rd.done()
    return summary
