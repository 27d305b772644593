"""`advtune train`: train a model (zoo name or file.py:factory) on a dataset into a run folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from .. import filenames as files
from ..cost import CostMeter
from ..data import dataset_key, load_dataset
from ..devices import resolve_device
from ..errors import AdvtuneError
from ..metrics import accuracy
from ..models import (
    check_model_name,
    describe_meta,
    factory_record,
    is_factory_spec,
    load_model,
    load_weights,
    model_for,
)
from ..records import Record
from ..seeding import seed_everything
from ..settings import default
from ..storage import read_json
from ..threat import ThreatModel
from ..train import TrainConfig, build_objective, clean, fit
from ..train.config import inert_regrow
from ..train.objectives import check_objective
from ..train.ramp import check_eps_warmup
from .common import (
    check_val,
    close_training_folder,
    dataset_spec,
    fit_in_folder,
    open_training_folder,
    overfit_guard,
    refuse_out_holding,
    resolve_eps_warmup,
    snapshot_steps,
    with_budget,
)
from .configs import TrainRun
from .record import check_resume_overwrite, refuse_taken_out

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSummary(Record):
    """What `advtune train` returns and writes to summary.json (`TrainSummary.read` reads it back)."""

    SCHEMA = 1
    KIND = "train-summary"

    test_acc: float  # clean accuracy on the test split (limit_test examples)
    test_examples: int
    epochs: int  # epochs run
    stopped: str | None  # why training stopped early, if it did
    final: dict  # the last epoch's record (metrics.jsonl)
    cost: dict  # the CostMeter record (cost.json)


# what standard training ignores: refused unless --adversarial (they were dropped without a word)
ADVERSARIAL_ONLY = ("norm", "attack_mode", "eps_warmup", "guard")


def resumed_reading(run: TrainRun) -> dict | None:
    """A resumed run on the user's own data reads it as it started (its classes; an image folder of a run from before
    round 37 sorted by class): the checkpoint's epoch order and the --val split index those examples."""
    config = Path(run.out) / files.CONFIG if run.out else None
    if not run.resume or dataset_key(run.dataset) or config is None or not config.is_file():
        return None
    recorded = read_json(config, "run config").get("dataset") or {}
    return {
        "classes": recorded.get("classes"),
        "order": recorded.get("order", "sorted"),
        "images": recorded.get("images"),
    }


def run(run: TrainRun) -> TrainSummary:
    """Train a model by name on a dataset by name into `run.out`; returns the summary record."""

    run = replace(run, train=run.train or TrainConfig())
    if run.data_dir:  # recorded as the folder it names: later jobs read the base's data from any working folder
        run = replace(run, data_dir=str(Path(run.data_dir).expanduser().resolve()))
    given_ramp = run.eps_warmup  # the default ramp is said once the settings pass (not above a refusal)
    if run.adversarial:
        run = replace(run, eps_warmup=resolve_eps_warmup(run.eps_warmup, run.adversarial, say=False))
    cfg = run.train
    if cfg.adapter_lr_ratio != 1:
        raise AdvtuneError(
            f"adapter_lr_ratio {cfg.adapter_lr_ratio:g} applies to fine-tuning with low-rank adapters (advtune "
            "finetune --granularity lowrank, hybrid or shares); training from scratch trains every parameter: "
            "leave it at 1"
        )
    moving = ["regrow"] if cfg.regrow else inert_regrow(cfg)
    if moving:
        raise AdvtuneError(
            f"{moving[0]} moves a fine-tuning's mask of single entries (advtune finetune --granularity probe or "
            "sparse); training from scratch trains every parameter: leave it at its default"
        )
    check_val(run.val)
    if cfg.val_attack_limit != TrainConfig().val_attack_limit and not (run.val and run.adversarial or run.resume):
        raise AdvtuneError(  # it attacks the validation split of adversarial training only: it was dropped
            "--val-attack-limit sets how much of the --val split is attacked in adversarial training: give --val "
            "and --adversarial, or drop it"
        )
    check_resume_overwrite(run.resume, run.overwrite)
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
    if run.weights_key is not None and run.weights is None:
        raise AdvtuneError("--weights-key names a key of the --weights checkpoint: give --weights, or drop it")
    ignored = [name for name in ADVERSARIAL_ONLY if getattr(run, name) != default(TrainRun, name)]
    if ignored and not run.adversarial:
        flags = [
            ("--{0}/--no-{0}" if isinstance(getattr(run, n), bool) else "--{0}").format(n.replace("_", "-"))
            for n in ignored
        ]  # a switch is named by both its spellings
        joined = "/".join(flags)
        raise AdvtuneError(f"adversarial training's settings without --adversarial ({joined}): add it, or drop them")
    if run.adversarial and run.eps is None:  # before the data is read (or downloaded)
        raise AdvtuneError("adversarial training needs --eps (e.g. --eps 0.3 for MNIST, --eps 8/255 for CIFAR-10)")
    if run.eps is not None:
        ThreatModel(run.norm, run.eps)  # its range, before the data
    factory = None
    if not is_factory_spec(run.model):
        check_model_name(run.model)  # an unknown name: "unknown model ...; valid: ...", before a download
    else:
        factory = factory_record(run.model)  # the file or module and the name, before a download
    if run.adversarial:  # the spec and the ramp, before the data is read (or downloaded)
        check_objective(run.adversarial, ThreatModel(run.norm, run.eps), run.attack_mode)
        check_eps_warmup(run.eps_warmup)
    if run.out:  # --overwrite would delete a file this run reads (its weights, data or model file) with the old run
        own_data = None if dataset_key(run.dataset) else run.dataset
        model_file = factory and (factory.get("file") or factory.get("module_file"))
        refuse_out_holding(run.out, run.weights, own_data, run.data_dir, model_file)
    if run.weights is not None and not Path(run.weights).is_file():
        what = "is a folder, not a weights file" if Path(run.weights).is_dir() else "not found"
        raise AdvtuneError(f"--weights {run.weights}: {what}; give a .safetensors or .pt file")
    refuse_taken_out(run.out, resume=run.resume, overwrite=run.overwrite)  # before the data are read (`--out ''` too)
    if run.adversarial:
        resolve_eps_warmup(given_ramp, run.adversarial)
    device = resolve_device(run.device)
    seed_everything(cfg.seed)
    ds = load_dataset(
        run.dataset,
        run.data_dir,
        limit=run.limit,
        limit_test=run.limit_test,
        val=run.val,
        seed=cfg.seed or 0,
        as_trained=resumed_reading(run),
    )
    model = model_for(ds, run.model)
    if run.weights is not None:
        load_weights(model, run.weights, f"--weights {run.weights}", run.weights_key)
    model = model.to(device)
    objective, val_attack, callbacks = clean(), None, []
    meter = CostMeter()
    if run.adversarial:
        threat = ThreatModel(run.norm, run.eps)
        objective = build_objective(
            run.adversarial, threat, run.attack_mode, run.eps_warmup, model=model, load_model=load_model
        )
        val_attack = getattr(objective, "attack", None)
        callbacks = overfit_guard(run.guard, run.adversarial, threat, ds.train, device, cfg.seed, meter)
    cfg = with_budget(cfg, run.budget, objective, len(ds.train), model, ds.train.to_float(ds.train.x[:1], device))
    snaps = snapshot_steps(cfg, len(ds.train), run.points)
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
    rd = open_training_folder(run, cfg, config)  # everything is validated: only now is the folder created
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
        callbacks=callbacks,
        desc=f"{run.model}/{ds.name}",
        **fit_in_folder(rd, meter, meta, config, snaps, run.resume),
    )
    test_acc = accuracy(model, ds.test, cfg.eval_batch_size)
    summary = TrainSummary(test_acc, len(ds.test), len(history.epochs), history.stopped, history.last, meter.to_json())
    meta["training"] = {
        "objective": objective.describe(),
        "config": cfg.to_json(),
        "test_acc": test_acc,
        "run": str(rd.path),
    }
    close_training_folder(rd, model, meta, summary, history.epochs)
    return summary
