"""`advtune train`: train a model (zoo name or file.py:factory) on a dataset into a run folder."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

from .. import filenames as files
from ..cost import CostMeter
from ..data import load_dataset
from ..errors import AdvtuneError
from ..metrics import accuracy
from ..models import describe_meta, load_weights, model_for, save_model
from ..threat import ThreatModel
from ..train import TrainConfig, build_objective, check_resume, clean, fit
from ..utils import resolve_device, seed_everything
from .common import (
    check_same_run,
    check_val,
    dataset_spec,
    overfit_guard,
    snapshot_saver,
    snapshot_steps,
    with_budget,
    write_config_once,
)
from .record import RunDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRun:
    """Everything `advtune train` needs; recorded verbatim in config.json."""

    dataset: str
    model: str  # a zoo name, or path/to/file.py:factory / package.module:factory
    out: str
    train: "Any" = None  # TrainConfig (default: TrainConfig())
    weights: str | None = None  # start from these safetensors weights (with epochs 0: record them as is)
    data_dir: str | None = None
    limit: int | None = None
    limit_test: int | None = None
    val: float = 0
    device: str = "auto"
    adversarial: str | None = None  # attack spec for adversarial training, e.g. "pgd:steps=10"
    norm: str = "linf"
    eps: float | None = None
    attack_mode: str = "eval"
    eps_warmup: float = 0.0  # share of training over which eps ramps up from 0
    guard: bool | None = None  # catastrophic-overfitting guard; None: on for FGSM attacks
    budget: int | None = None  # training gradient evaluations; ends training early (steps)
    points: int = 0  # snapshots along the run (evenly spaced in steps), for curves
    resume: bool = False
    overwrite: bool = False

    def to_json(self) -> dict:
        d = asdict(self)
        d["train"] = self.train.to_json()
        return d


def run(run: TrainRun) -> dict:
    """Train a model by name on a dataset by name into `run.out`; returns the summary record."""

    run = replace(run, train=run.train or TrainConfig())
    cfg = run.train
    check_val(run.val)
    if cfg.epochs == 0 and run.budget is None and run.weights is None:
        raise AdvtuneError(
            "--epochs 0 would save an untrained model; train for at least 1 epoch (or give --budget, "
            "or --weights to record a trained model as it is)"
        )
    if run.adversarial is not None and not run.adversarial.strip():
        raise AdvtuneError(
            "--adversarial needs an attack spec, e.g. --adversarial pgd:steps=10 (or drop it for standard training)"
        )
    if run.eps is not None and not run.adversarial:
        raise AdvtuneError("--eps without --adversarial does nothing; add --adversarial pgd:steps=10, or drop --eps")
    device = resolve_device(run.device)
    seed_everything(cfg.seed)
    ds = load_dataset(
        run.dataset, run.data_dir, limit=run.limit, limit_test=run.limit_test, val=run.val, seed=cfg.seed or 0
    )
    model = model_for(ds, run.model)
    if run.weights is not None:
        load_weights(model, run.weights, f"--weights {run.weights}")
    model = model.to(device)
    objective, val_attack, callbacks = clean(), None, []
    meter = CostMeter()
    if run.adversarial:
        if run.eps is None:
            raise AdvtuneError("adversarial training needs --eps (e.g. --eps 0.3 for MNIST, --eps 8/255 for CIFAR-10)")
        threat = ThreatModel(run.norm, run.eps)
        objective = build_objective(run.adversarial, threat, run.attack_mode, run.eps_warmup)
        val_attack = getattr(objective, "attack", None)
        callbacks = overfit_guard(run.guard, run.adversarial, threat, ds, device, cfg.seed, meter)
    cfg = with_budget(cfg, run.budget, objective, len(ds.train), model, ds.train.to_float(ds.train.x[:1], device))
    snaps = snapshot_steps(cfg, len(ds.train), run.points)
    # everything is validated: only now is the run folder created (or an old one replaced)
    rd = RunDir.create(run.out, resume=run.resume, overwrite=run.overwrite)
    if run.resume and rd.file(files.CONFIG).is_file():
        check_same_run(rd.read_json(files.CONFIG).get("run", {}), run.to_json())
    if run.resume:
        check_resume(rd.path, cfg)
    config = {
        "command": "train",
        "run": run.to_json(),
        "seed": cfg.seed,
        "dataset": ds.describe(),
        "objective": objective.describe(),
        "guard": bool(callbacks),
        "device": str(device),
        "steps": cfg.steps,
    }
    write_config_once(rd, config)
    meta = describe_meta(run.model, ds)
    meta["dataset_spec"] = dataset_spec(run.dataset)
    history = fit(
        model,
        ds.train,
        objective,
        cfg,
        val=ds.val,
        val_attack=val_attack,
        meter=meter,
        checkpoint_dir=rd.path,
        resume=run.resume,
        callbacks=callbacks,
        on_record=lambda h: (rd.write_metrics(h.epochs), rd.write_cost(meter)),
        on_step=snapshot_saver(rd, meta, config, snaps),
        desc=f"{run.model}/{ds.name}",
    )
    test_acc = accuracy(model, ds.test, cfg.eval_batch_size)
    summary = {
        "test_acc": test_acc,
        "test_examples": len(ds.test),
        "epochs": len(history.epochs),
        "stopped": history.stopped,
        "final": history.last,
        "cost": meter.to_json(),
    }
    meta["training"] = {
        "objective": objective.describe(),
        "config": cfg.to_json(),
        "test_acc": test_acc,
        "run": str(rd.path),
    }
    save_model(rd.path, model, meta)
    rd.write_metrics(history.epochs)
    rd.write_cost(meter)
    rd.write_json(files.SUMMARY, summary)
    rd.done()
    return summary
