"""The jobs behind the CLI commands: each takes a frozen config, writes a run folder, returns a summary.

`advtune train` -> train_run, `advtune finetune` -> finetune_run, `advtune analyze` -> analyze_run,
`advtune evaluate` -> evaluate_run. The CLI only builds these configs; experiments and the demo
call the same functions.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from .cost import CostMeter, PassCounter
from .errors import AdvtuneError
from .runs import CONFIG, SUMMARY, RunDir, open_run
from .utils import resolve_device, seed_everything

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TrainRun:
    """Everything `advtune train` needs; recorded verbatim in config.json."""

    dataset: str
    model: str                          # a zoo name, or path/to/file.py:factory / package.module:factory
    out: str
    train: "Any" = None                  # TrainConfig (default: TrainConfig())
    weights: str | None = None          # start from these safetensors weights (with epochs 0: record them as is)
    data_dir: str | None = None
    limit: int | None = None
    limit_test: int | None = None
    val: float = 0
    device: str = "auto"
    adversarial: str | None = None      # attack spec for adversarial training, e.g. "pgd:steps=10"
    norm: str = "linf"
    eps: float | None = None
    attack_mode: str = "eval"
    eps_warmup: float = 0.0             # share of training over which eps ramps up from 0
    guard: bool | None = None           # catastrophic-overfitting guard; None: on for FGSM attacks
    budget: int | None = None           # training gradient evaluations; ends training early (steps)
    points: int = 0                     # snapshots along the run (evenly spaced in steps), for curves
    resume: bool = False
    overwrite: bool = False

    def to_json(self) -> dict:
        d = asdict(self)
        d["train"] = self.train.to_json()
        return d


def train_run(run: TrainRun) -> dict:
    """Train a model by name on a dataset by name into `run.out`; returns the summary record."""
    from .data import load_dataset
    from .models import describe_meta, load_weights, model_for, save_model
    from .metrics import accuracy
    from .train import TrainConfig, clean, fit

    run = replace(run, train=run.train or TrainConfig())
    cfg = run.train
    check_val(run.val)
    if cfg.epochs == 0 and run.budget is None and run.weights is None:
        raise AdvtuneError("--epochs 0 would save an untrained model; train for at least 1 epoch (or give --budget, "
                           "or --weights to record a trained model as it is)")
    if run.adversarial is not None and not run.adversarial.strip():
        raise AdvtuneError("--adversarial needs an attack spec, e.g. --adversarial pgd:steps=10 (or drop it for standard training)")
    if run.eps is not None and not run.adversarial:
        raise AdvtuneError("--eps without --adversarial does nothing; add --adversarial pgd:steps=10, or drop --eps")
    device = resolve_device(run.device)
    seed_everything(cfg.seed)
    ds = load_dataset(run.dataset, run.data_dir, limit=run.limit, limit_test=run.limit_test, val=run.val,
                      seed=cfg.seed or 0)
    model = model_for(ds, run.model)
    if run.weights is not None:
        load_weights(model, run.weights, f"--weights {run.weights}")
    model = model.to(device)
    objective, val_attack, callbacks = clean(), None, []
    meter = CostMeter()
    if run.adversarial:
        from .threat import ThreatModel

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
    if run.resume and rd.file(CONFIG).is_file():
        _check_same_run(rd.read_json(CONFIG).get("run", {}), run.to_json())
    if run.resume:
        from .train import check_resume

        check_resume(rd.path, cfg)
    config = {"command": "train", "run": run.to_json(), "seed": cfg.seed, "dataset": ds.describe(),
              "objective": objective.describe(), "guard": bool(callbacks), "device": str(device),
              "steps": cfg.steps}
    write_config_once(rd, config)
    meta = describe_meta(run.model, ds)
    meta["dataset_spec"] = dataset_spec(run.dataset)
    history = fit(model, ds.train, objective, cfg, val=ds.val, val_attack=val_attack, meter=meter,
                  checkpoint_dir=rd.path, resume=run.resume, callbacks=callbacks,
                  on_record=lambda h: (rd.write_metrics(h.epochs), rd.write_cost(meter)),
                  on_step=snapshot_saver(rd, meta, config, snaps), desc=f"{run.model}/{ds.name}")
    test_acc = accuracy(model, ds.test, cfg.eval_batch_size)
    summary = {"test_acc": test_acc, "test_examples": len(ds.test), "epochs": len(history.epochs),
               "stopped": history.stopped, "final": history.last, "cost": meter.to_json()}
    meta["training"] = {"objective": objective.describe(), "config": cfg.to_json(), "test_acc": test_acc,
                        "run": str(rd.path)}
    save_model(rd.path, model, meta)
    rd.write_metrics(history.epochs)
    rd.write_cost(meter)
    rd.write_json(SUMMARY, summary)
    rd.done()
    return summary


SNAPSHOTS = "snapshots"


def with_budget(cfg, budget: int | None, objective, n_train: int, model=None, example=None):
    """`cfg` with steps set so that training spends `budget` gradient evaluations (attack steps
    + the update, per example; a local objective's block passes by their FLOPs share)."""
    from .train import cost_per_example, steps_for_budget

    if budget is None:
        return cfg
    per = cost_per_example(objective, model, example)
    return replace(cfg, steps=steps_for_budget(budget, objective, cfg.batch_size, n_train, per_example=per))


def snapshot_steps(cfg, n_train: int, points: int) -> list[int]:
    """`points` optimizer steps evenly spaced over the run, the last one at its end."""
    from .data import num_batches
    from .train import total_steps

    if isinstance(points, bool) or not isinstance(points, int) or points < 0:
        raise AdvtuneError(f"points must be a non-negative integer (snapshots along the run), got {points!r}")
    total = total_steps(cfg, num_batches(n_train, cfg.batch_size))
    return sorted({max(1, round(total * i / points)) for i in range(1, points + 1)}) if points else []


def snapshot_saver(rd: RunDir, meta: dict, config: dict, steps: list[int]):
    """An on_step callback that saves the model at the given steps into `snapshots/step-NNNNNNN/`
    (a loadable run folder: model, config.json, cost.json with the cost *up to that step*).
    cost.json is written last, so a folder with it is complete; a resumed run skips those."""
    if not steps:
        return None
    from .models import save_model
    from .train import is_main_process

    wanted = set(steps)

    def on_step(model, step: int, meter: CostMeter) -> None:
        if step not in wanted or not is_main_process():
            return
        folder = rd.path / SNAPSHOTS / f"step-{step:07d}"
        if (folder / "cost.json").is_file():
            return
        folder.mkdir(parents=True, exist_ok=True)
        save_model(folder, model, {**meta, "snapshot": {"of": str(rd.path), "step": step}})
        sub = RunDir(folder)
        sub.write_config({**{k: v for k, v in config.items() if k not in ("created", "versions")},
                          "snapshot": {"of": str(rd.path), "step": step}})
        sub.write_cost(meter)
    return on_step


def list_snapshots(folder) -> list[tuple[int, "Path"]]:
    """Complete snapshots of a run, as (step, folder), by step."""
    from pathlib import Path

    root = Path(folder) / SNAPSHOTS
    if not root.is_dir():
        return []
    out = []
    for p in root.glob("step-*"):
        if (p / "cost.json").is_file() and p.name[5:].isdigit():
            out.append((int(p.name[5:]), p))
    return sorted(out)


def check_val(val) -> None:
    """--val: a number of training examples (a whole number >= 1) or a fraction in (0, 1); 0 = none."""
    import math

    ok = (isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val)
          and (val == 0 or 0 < val < 1 or (val >= 1 and float(val).is_integer())))
    if not ok:
        raise AdvtuneError(f"--val must be a number of training examples (e.g. 5000) or a fraction in (0, 1) "
                           f"(e.g. 0.1), got {val!r}")


def dataset_spec(name: str) -> str:
    """What rebuilds the dataset later: a registry name, or the absolute path of a file/folder."""
    from pathlib import Path

    from .data import DATASETS

    return name if name.strip().lower() in DATASETS else str(Path(name).expanduser().resolve())


def write_config_once(rd: RunDir, config: dict) -> None:
    """config.json records how a run started; a resume appends when, and keeps the original."""
    import time

    if rd.file(CONFIG).is_file():
        old = rd.read_json(CONFIG)
        old.setdefault("resumed", []).append(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        rd.write_json(CONFIG, old)
    else:
        rd.write_config(config)


def refuse_same_folder(out: str, base: str) -> None:
    from pathlib import Path

    if Path(out).resolve() == Path(base).resolve():
        raise AdvtuneError(f"--out {out} is the base run itself; write the new run to another folder")


RUN_DEFAULTS = {"budget": None, "points": 0, "params": None, "granularity": "unit", "weights": None}   # keys newer than some records


def _check_same_run(saved: dict, now: dict) -> None:
    """A resume must use the settings the run started with (training ones included, whether or not a
    checkpoint exists yet); only where it runs may change: the folder's path (a moved run resumes),
    the device, and the number of epochs."""
    from .train import config_changes

    ignore = {"resume", "overwrite", "device", "out", "train"}
    changed = [(k, saved.get(k, RUN_DEFAULTS.get(k)), now[k]) for k in now
               if k not in ignore and saved.get(k, RUN_DEFAULTS.get(k)) != now[k]]
    if isinstance(now.get("train"), dict):
        changed += [(f"train.{k}", a, b) for k, a, b in config_changes(saved.get("train") or {}, now["train"])]
    if changed:
        raise AdvtuneError(f"--resume with different settings ({', '.join(f'{k}: {a!r} -> {b!r}' for k, a, b in changed)}); "
                           "use the original flags or a new --out")


# ---------------------------------------------------------------- shared pieces


def load_base(path: str, device) -> tuple[Any, dict, dict]:
    """A trained run's model, its model.json, and its config.json."""
    from .models import load_model

    rd = open_run(path)
    model, meta = load_model(rd.path, device)
    return model, meta, rd.read_json(CONFIG)


def dataset_of(base_config: dict, meta: dict, data_dir: str | None, **kw):
    """The dataset a base run was trained on (same name/path, optionally another data folder)."""
    from .data import load_dataset

    run = base_config.get("run", {})
    name = meta.get("dataset_spec") or run.get("dataset") or meta.get("dataset")
    if not name:
        raise AdvtuneError("the base run does not record its dataset; pass a run folder written by `advtune train`")
    return load_dataset(name, data_dir or run.get("data_dir"), **kw)


def overfit_guard(guard: bool | None, spec: str, threat, ds, device, seed, meter) -> list:
    """The catastrophic-overfitting guard as a fit callback: on by default for FGSM-type training."""
    use = guard if guard is not None else spec.strip().lower().startswith("fgsm")
    if not use:
        return []
    from .attacks import PGD
    from .train import OverfitGuard

    gx, gy = ds.train.take(512).tensors(device)
    return [OverfitGuard(PGD(threat, steps=10), gx, gy, seed=seed, meter=meter)]


def _spec_params(name: str, params: str, types: dict[str, type]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        k, _, v = item.partition("=")
        k = {"step": "step_size"}.get(k.strip(), k.strip())
        if k not in types:
            raise AdvtuneError(f"unknown {name} parameter {k!r}; valid: {', '.join(types)}")
        try:
            kw[k] = types[k](v)
        except ValueError:
            raise AdvtuneError(f"{name} parameter {k} needs a {types[k].__name__}, got {v!r}") from None
    return kw


def build_objective(spec: str, threat, attack_mode: str = "eval", eps_warmup: float = 0.0, model=None):
    """`pgd:steps=10`, `fgsm`, `fgsm-rs`, ... -> adversarial(attack); `trades[:steps=..,beta=..]` -> TRADES;
    `local:layer=<module>[,steps=..,clean=..]` -> the local feature objective of the block ending at
    that module (needs the model: its current weights are the reference)."""
    from .attacks import build_attack
    from .train import adversarial, local_feature, trades

    name, _, params = spec.partition(":")
    name = name.strip().lower()
    if name == "trades":
        kw = _spec_params("TRADES", params, {"steps": int, "step_size": float, "beta": float})
        if eps_warmup:
            raise AdvtuneError("--eps-warmup is not supported with TRADES; drop it")
        return trades(threat, **kw)
    if name == "local":
        kw = _spec_params("local", params, {"layer": str, "steps": int, "clean": float})
        if "layer" not in kw:
            raise AdvtuneError("local needs the block's last module, e.g. local:layer=net.pool2,steps=10")
        if model is None:
            raise AdvtuneError("the local objective needs the model (its current features are the reference)")
        return local_feature(model, kw["layer"], threat, kw.get("steps", 10), kw.get("clean", 1.0), eps_warmup)
    return adversarial(build_attack(spec, threat), attack_mode, eps_warmup=eps_warmup)


# ---------------------------------------------------------------- finetune


@dataclass(frozen=True)
class FinetuneRun:
    """Adversarial fine-tuning of a trained run: all parameters, a selection of components, or a
    random control of equal size, through the one training loop."""

    base: str                          # run folder of the model to fine-tune
    out: str
    eps: float | None = None
    select: str = "all"                # all | random | <analyze folder> | layers:<name,name,...>
    share: float = 0.1
    criterion: str = "taylor"          # which score table of the analyze folder ranks components
    per_layer: bool = False
    attack: str = "pgd:steps=10"       # attack spec, or trades[:steps=..,beta=..]
    norm: str = "linf"
    attack_mode: str = "eval"
    eps_warmup: float = 0.0            # share of training over which eps ramps up from 0
    guard: bool | None = None          # catastrophic-overfitting guard; None: on for FGSM attacks
    train: Any = None                  # TrainConfig
    data_dir: str | None = None
    limit: int | None = None
    limit_test: int | None = None
    val: float = 0
    monitor: int = 500                 # test examples for the quick PGD-10 monitor (0: none)
    params: float | None = None        # parameter budget of the selection (entries, or a share < 1), instead of share
    granularity: str = "unit"          # unit | layer: what a parameter budget selects from an analysis
    budget: int | None = None          # training gradient evaluations; ends training early (steps)
    points: int = 0                    # snapshots along the run (evenly spaced in steps), for curves
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False

    def to_json(self) -> dict:
        d = asdict(self)
        d["train"] = self.train.to_json() if self.train is not None else None
        return d


def make_selection(model, select: str, share: float, criterion: str, per_layer: bool, seed: int,
                   params: float | None = None, granularity: str = "unit", example_input=None):
    """Resolve `--select` into a Selection (None means everything: the full-network path).

    select: all | random | layers:<name,...> | an analyze folder (or score file). With `params`, a
    random or analysed selection fills a parameter budget instead of a share of components;
    granularity=layer picks whole layers from the analysis (best summed score first)."""
    from pathlib import Path

    from .vulnerability import (ScoreTable, check_params, check_share, select_layers, select_random, select_top,
                                select_top_layers)

    if params is None:
        check_share(share)
    else:
        check_params(params, model)
    if granularity not in ("unit", "layer"):
        raise AdvtuneError(f"granularity {granularity!r}: use unit or layer")
    if select == "all":
        return None
    if select.startswith("layers:"):
        return select_layers(model, [n for n in select[len("layers:"):].split(",") if n])
    if select == "random":
        if params is not None:
            return select_random(model, params=params, seed=seed, example_input=example_input)
        return select_random(model, share=share, seed=seed, per_layer=per_layer)
    folder = Path(select)
    table_file = folder / f"scores-{criterion}.json" if folder.is_dir() else folder
    if folder.is_dir() and not table_file.is_file():
        have = sorted(p.stem.removeprefix("scores-") for p in folder.glob("scores-*.json"))
        raise AdvtuneError(f"{folder} has no scores for criterion {criterion!r}" +
                           (f"; it has: {', '.join(have)}" if have else "; run `advtune analyze` into it first"))
    if not table_file.is_file():
        raise AdvtuneError(f"--select {select!r}: not all, random, layers:<names>, or an analyze folder/score file")
    from .utils import read_json

    table = ScoreTable.from_json(read_json(table_file, "score table"))
    if params is not None and granularity == "layer":
        selection = select_top_layers(table, model, params, example_input=example_input)
    elif params is not None:
        selection = select_top(table, params=params, model=model, example_input=example_input)
    else:
        selection = select_top(table, share, per_layer=per_layer)
    selection.validate(model)
    return selection


def finetune_run(run: FinetuneRun) -> dict:
    from .models import save_model
    from .threat import ThreatModel
    from .metrics import accuracy, quick_robust_acc
    from .train import TrainConfig, fit

    run = replace(run, train=run.train or TrainConfig(epochs=1))
    cfg = run.train
    if run.eps is None:
        raise AdvtuneError("finetune needs --eps (e.g. 0.3 for MNIST, 8/255 for CIFAR-10)")
    check_val(run.val)
    if isinstance(run.monitor, bool) or not isinstance(run.monitor, int) or run.monitor < 0:
        raise AdvtuneError(f"--monitor must be a number of test examples >= 0 (0: off), got {run.monitor!r}")
    if cfg.epochs == 0 and run.budget is None:
        raise AdvtuneError("--epochs 0 would save the base model unchanged; fine-tune for at least 1 epoch (or give --budget)")
    refuse_same_folder(run.out, run.base)
    device = resolve_device(run.device)
    model, meta, base_cfg = load_base(run.base, device)
    seed_everything(cfg.seed)
    ds = dataset_of(base_cfg, meta, run.data_dir, limit=run.limit, limit_test=run.limit_test, val=run.val, seed=cfg.seed or 0)
    threat = ThreatModel(run.norm, run.eps)
    objective = build_objective(run.attack, threat, run.attack_mode, run.eps_warmup, model=model)
    example = ds.train.to_float(ds.train.x[:1], device)  # the traced BN rule, as fit uses it
    selection = make_selection(model, run.select, run.share, run.criterion, run.per_layer, cfg.seed or 0,
                               run.params, run.granularity, example)
    cfg = with_budget(cfg, run.budget, objective, len(ds.train), model, example)
    snaps = snapshot_steps(cfg, len(ds.train), run.points)
    meter = CostMeter()
    callbacks = overfit_guard(run.guard, run.attack, threat, ds, device, cfg.seed, meter)
    sel_info = describe_selection(selection, model, example) if selection is not None else None
    # everything is validated: only now is the run folder created (or an old one replaced)
    rd = RunDir.create(run.out, resume=run.resume, overwrite=run.overwrite)
    if run.resume and rd.file(CONFIG).is_file():
        _check_same_run(rd.read_json(CONFIG).get("run", {}), run.to_json())
    if run.resume:
        from .train import check_resume

        check_resume(rd.path, cfg)
    config = {"command": "finetune", "run": run.to_json(), "seed": cfg.seed, "base": str(run.base),
              "dataset": ds.describe(), "objective": objective.describe(), "threat": threat.to_json(),
              "selection": sel_info, "guard": bool(callbacks), "device": str(device), "steps": cfg.steps}
    write_config_once(rd, config)
    if selection is not None:
        rd.write_json("selection.json", selection.to_json())
    snap_meta = {k: v for k, v in meta.items() if k not in ("parameters", "tensors", "training")}
    history = fit(model, ds.train, objective, cfg, val=ds.val, selection=selection, meter=meter,
                  checkpoint_dir=rd.path, resume=run.resume, callbacks=callbacks,
                  on_record=lambda h: (rd.write_metrics(h.epochs), rd.write_cost(meter)),
                  on_step=snapshot_saver(rd, snap_meta, config, snaps), desc="finetune")
    # monitoring after training: not counted as training cost
    summary: dict[str, Any] = {"test_acc": accuracy(model, ds.test, cfg.eval_batch_size), "test_examples": len(ds.test)}
    if run.monitor:
        n = min(run.monitor, len(ds.test))
        summary["pgd10_acc_quick"] = quick_robust_acc(model, ds.test.take(n), threat, cfg.seed)
        summary["pgd10_examples"] = n
    summary.update({"epochs": len(history.epochs), "stopped": history.stopped, "final": history.last,
                    "selection": sel_info, "cost": meter.to_json()})
    new_meta = {k: v for k, v in meta.items() if k not in ("parameters", "tensors", "training")}
    new_meta["training"] = {"finetuned_from": str(run.base), "objective": objective.describe(),
                            "config": cfg.to_json(), "selection": sel_info, "test_acc": summary["test_acc"]}
    save_model(rd.path, model, new_meta)
    rd.write_metrics(history.epochs)
    rd.write_cost(meter)
    rd.write_json(SUMMARY, summary)
    rd.done()
    return summary

def describe_selection(selection, model, example=None) -> dict:
    """What a selection trains, for the records: components, units, parameters (also per layer)."""
    from .components import model_params

    trainable = selection.trainable_params(model, example_input=example)
    return {"components": len(selection), "units": selection.n_units(model), "trainable_params": trainable,
            "param_share": trainable / model_params(model), "by_layer": selection.by_layer(model),
            "params_by_layer": selection.params_by_layer(model, example)}

# ---------------------------------------------------------------- analyze


@dataclass(frozen=True)
class AnalyzeRun:
    """Score every component of a trained run under an attack, on training data (never the test
    split), and measure how concentrated the adversarial errors are."""

    base: str
    out: str
    eps: float | None = None
    attack: str = "pgd:steps=20"
    norm: str = "linf"
    criteria: tuple[str, ...] = ("activation-shift", "taylor", "restoration")
    granularity: str = "channel"
    limit: int = 2000                  # training examples scored
    curve_limit: int = 1000            # training examples for the concentration curve
    shares: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
    random_seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 256
    seed: int = 0
    data_dir: str | None = None
    device: str = "auto"
    overwrite: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def analyze_run(run: AnalyzeRun) -> dict:
    from .attacks import build_attack
    from .threat import ThreatModel
    from .metrics import adversarial_examples, correct
    from .vulnerability import concentration_curve, layer_scores, list_criteria, rank_agreement, score_many

    if run.eps is None:
        raise AdvtuneError("analyze needs --eps (e.g. 0.3 for MNIST, 8/255 for CIFAR-10)")
    if run.granularity not in ("channel", "unit"):
        raise AdvtuneError(f"granularity {run.granularity!r} is not supported; use channel (= unit). "
                           "Per-layer figures come with every analysis (layers-*.json)")
    unknown = [c for c in run.criteria if c not in list_criteria()]
    if unknown or not run.criteria:
        raise AdvtuneError(f"unknown criterion {unknown[0] if unknown else '(none)'}; valid: {', '.join(list_criteria())}")
    if run.limit <= 0 or run.curve_limit < 0 or run.batch_size <= 0:
        raise AdvtuneError("--limit and --batch-size must be positive and --curve-limit non-negative")
    refuse_same_folder(run.out, run.base)
    device = resolve_device(run.device)
    model, meta, base_cfg = load_base(run.base, device)
    seed_everything(run.seed)
    ds = dataset_of(base_cfg, meta, run.data_dir, limit=max(run.limit, run.curve_limit))
    threat = ThreatModel(run.norm, run.eps)
    attack = build_attack(run.attack, threat)
    rd = RunDir.create(run.out, overwrite=run.overwrite)   # everything validated: only now create/replace
    rd.write_config({"command": "analyze", "run": run.to_json(), "seed": run.seed, "base": str(run.base),
                     "dataset": ds.describe(), "split": "train", "threat": threat.to_json(), "attack": attack.spec,
                     "device": str(device)})
    meter = CostMeter()
    meter.measure_model(model, ds.input_shape)
    counter = PassCounter()  # every example through the model: attack, criteria, curves
    meter.start()
    # one attack run serves every criterion and the curves: adversarials are computed once, here
    x, y = ds.train.take(max(run.limit, run.curve_limit)).tensors(device)
    with counter.attached(model):
        x_adv = adversarial_examples(model, attack, x, y, run.batch_size, run.seed)
    clean_ok, adv_ok = correct(model, x, y, run.batch_size), correct(model, x_adv, y, run.batch_size)
    n_score = min(run.limit, len(x))
    with counter.attached(model):
        tables = score_many(model, (x[:n_score], y[:n_score], x_adv[:n_score]), None, list(run.criteria), batch_size=run.batch_size)
    summary: dict[str, Any] = {"examples_scored": n_score, "clean_acc": float(clean_ok[:n_score].float().mean()),
                               "adv_acc": float(adv_ok[:n_score].float().mean()), "attack": attack.spec,
                               "threat": threat.to_json(), "criteria": {}}
    curves = {}
    for name, table in tables.items():
        rd.write_json(f"scores-{name}.json", table.to_json())
        table.to_csv(rd.file(f"scores-{name}.csv"))
        layers = layer_scores(table)
        rd.write_json(f"layers-{name}.json", layers)
        top = [(str(c), s) for c, s in table.ranked()[:10]]
        summary["criteria"][name] = {"components": len(table), "top10": top}
        if run.curve_limit:
            n = min(run.curve_limit, len(x))
            with counter.attached(model):
                curve = concentration_curve(model, (x[:n], y[:n], x_adv[:n]), None, table, run.shares, run.random_seeds,
                                            batch_size=run.batch_size)
            curves[name] = curve
            summary["criteria"][name]["curve"] = curve.rows()
            summary["criteria"][name]["adversarial_errors"] = curve.n_errors
    if curves:
        rd.write_json("concentration.json", {k: c.to_json() for k, c in curves.items()})
    if "restoration" in tables:
        summary["rank_agreement_with_restoration"] = {
            k: rank_agreement(t, tables["restoration"]) for k, t in tables.items() if k != "restoration"}
    meter.stop()
    meter.attack_grad_evals, meter.forward_evals = counter.take()
    summary["cost"] = meter.to_json()
    _analysis_plots(rd, tables, curves)
    rd.write_cost(meter)
    rd.write_json(SUMMARY, summary)
    rd.done()
    return summary


def _analysis_plots(rd: RunDir, tables: dict, curves: dict) -> None:
    from .report import plot_concentration, plot_layer_scores
    from .vulnerability import layer_scores

    if curves:
        plot_concentration({k: c.to_json() for k, c in curves.items()}, rd.file("concentration.png"))
    plot_layer_scores({k: layer_scores(t) for k, t in tables.items()}, rd.file("layers.png"))


# ---------------------------------------------------------------- evaluate


def split_attack_list(text: str) -> list[str]:
    """`fgsm,pgd:steps=40,restarts=2,apgd-ce` -> ["fgsm", "pgd:steps=40,restarts=2", "apgd-ce"]:
    a comma-separated item with `=` and no `:` is one more parameter of the attack before it."""
    specs: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item:
            if not specs:
                raise AdvtuneError(f"attack list {text!r} starts with a parameter; write name:key=value")
            specs[-1] += "," + item
        else:
            specs.append(item)
    if not specs:
        raise AdvtuneError("no attack given; e.g. --attacks fgsm,pgd:steps=40 or --suite standard")
    return specs


@dataclass(frozen=True)
class EvaluateRun:
    """Evaluate a trained run on its test split under an attack list or a named suite, at one or more eps."""

    run: str
    eps: tuple[float, ...] = ()
    attacks: str | None = None          # comma list of specs
    suite: str | None = None            # standard | quick
    norm: str = "linf"
    limit: int | None = 1000
    batch_size: int = 256
    cascade: bool = False
    plot: bool = False
    name: str | None = None             # eval-<name>.json; default from the attacks and eps
    record_dir: str | None = None       # where eval-<name>.json goes (default: the run folder itself)
    seed: int = 0
    data_dir: str | None = None
    device: str = "auto"

    def to_json(self) -> dict:
        return asdict(self)


def attacks_for(run: EvaluateRun, eps: float):
    from .attacks import build_attack
    from .evaluation import suite
    from .threat import ThreatModel

    threat = ThreatModel(run.norm, eps)
    if run.suite and run.attacks:
        raise AdvtuneError("give --suite or --attacks, not both")
    if run.suite:
        return suite(run.suite, threat)
    return [build_attack(s, threat) for s in split_attack_list(run.attacks or "")]


def evaluate_model(model, data, run: EvaluateRun) -> dict:
    """The evaluation record for one model on (x, y): one eps -> robust_accuracy, several -> eps_curve."""
    from .evaluation import eps_curve, robust_accuracy
    from .utils import make_generator, model_device

    if not run.eps:
        raise AdvtuneError("evaluate needs --eps (e.g. 0.3, or 0.1,0.2,0.3 for a curve)")
    for e in run.eps:
        attacks_for(run, e)  # validate every eps and spec before any work
    gen = make_generator(run.seed, model_device(model))
    if len(run.eps) == 1:
        result = robust_accuracy(model, data, attacks_for(run, run.eps[0]), batch_size=run.batch_size,
                                 generator=gen, limit=run.limit, cascade=run.cascade)
        return {"kind": "single", **result.to_json()}
    curve = eps_curve(model, data, lambda e: attacks_for(run, e), list(run.eps), batch_size=run.batch_size,
                      generator=gen, limit=run.limit)
    return {"kind": "curve", **curve.to_json(), "mode": "full", "_curve": curve}


def evaluate_run(run: EvaluateRun) -> dict:
    import re
    import time

    from .utils import atomic_write_json, versions

    device = resolve_device(run.device)
    model, meta, base_cfg = load_base(run.run, device)
    ds = dataset_of(base_cfg, meta, run.data_dir, limit=1, limit_test=run.limit)
    x, y = ds.test.tensors(device)
    seed_everything(run.seed)
    t0 = time.perf_counter()
    record = evaluate_model(model, (x, y), run)
    curve = record.pop("_curve", None)
    config = run.to_json()
    if record["kind"] == "curve":
        config["cascade"] = False  # eps curves always run every attack on every sample
    record.update({"run": str(run.run), "split": "test", "dataset": ds.name, "examples": len(x),
                   "config": config, "versions": versions(), "wall_s": time.perf_counter() - t0,
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    label = run.name or (f"{run.suite or '-'.join(split_attack_list(run.attacks or ''))}-{run.norm}-eps"
                         + "_".join(f"{e:.4g}" for e in run.eps))
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", label)[:120]
    if run.record_dir:
        RunDir(run.record_dir).path.mkdir(parents=True, exist_ok=True)
    path = (RunDir(run.record_dir) if run.record_dir else open_run(run.run)).file(f"eval-{label}.json")
    if curve is not None and run.plot:
        from .report import plot_eps_curve

        png = path.with_suffix(".png")
        plot_eps_curve({meta.get("architecture", "model"): curve}, png, title=f"{run.run}: accuracy vs eps ({run.norm})")
        record["plot"] = png.name
    atomic_write_json(path, record)
    record["path"] = str(path)
    return record


def format_evaluation(record: dict) -> str:
    """A terminal table of an evaluation record."""
    lines = []
    if record["kind"] == "single":
        lines.append(f"{record['examples']} test examples, {record['threat']['norm']} eps={record['threat']['eps']:.4g}, "
                     f"mode {record['mode']}")
        lines.append(f"  {'clean':28s} {100 * record['clean_accuracy']:6.2f}%")
        for spec, acc in record["accuracy"].items():
            lines.append(f"  {spec:28s} {100 * acc:6.2f}%   grad evals/ex {record['grad_evals_per_example'][spec]:7.1f}   "
                         f"{record['wall_time_s'][spec]:6.1f}s   max pert {record['max_perturbation'][spec]:.4g}")
        lines.append(f"  {'worst case over attacks':28s} {100 * record['worst_case_accuracy']:6.2f}%")
    else:
        lines.append(f"{record['examples']} test examples, accuracy vs eps (monotone: broken at eps_i counts as broken above)")
        lines.append(f"  {'eps':>8s}  {'robust':>7s}  {'raw':>7s}")
        for e, a, r in zip(record["eps"], record["accuracy"], record["raw_accuracy"]):
            lines.append(f"  {e:8.4g}  {100 * a:6.2f}%  {100 * r:6.2f}%")
    if record.get("suspect"):
        lines.append("!! SUSPECT EVALUATION (possible gradient masking): do not call this model robust:")
        lines.extend(f"!!   {s}" for s in record["suspect"])
    else:
        lines.append("  masking gate: passed")
    return "\n".join(lines)
