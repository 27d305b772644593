"""Pieces the jobs share: the base run a job starts from, its dataset, budgets and snapshots,
resume checks, selections from `--select`."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import filenames as files
from ..attacks import PGD
from ..cost import CostMeter, CostRecord
from ..data import SPECS, dataset_key, holds_dataset, load_dataset, num_batches
from ..devices import model_device, resolve_device
from ..distributed import check_global_batch, is_main_process, rank_and_world
from ..errors import AdvtuneError
from ..models import load_model, save_model
from ..storage import read_json
from ..train import (
    OverfitGuard,
    check_resume,
    config_changes,
    cost_per_example,
    steps_for_budget,
    total_steps,
)
from ..train.loop import amp_dtype
from ..train.lowrank import (
    has_adapters,
    plain_state_dict,
)
from .analysis_source import OTHER_MODEL
from .record import RunDir, open_run

log = logging.getLogger(__name__)


def with_budget(cfg, budget: int | None, objective, n_train: int, model=None, example=None):
    """`cfg` with steps set so that training spends `budget` gradient evaluations (attack steps
    + the update, per example; a local objective's block passes by their FLOPs share). Under torchrun
    the batch must split over the processes: checked here, before any run folder exists."""
    check_global_batch(cfg.batch_size)
    if budget is None:
        return cfg
    per = cost_per_example(objective, model, example)
    return replace(cfg, steps=steps_for_budget(budget, objective, cfg.batch_size, n_train, per_example=per))


def snapshot_steps(cfg, n_train: int, points: int) -> list[int]:
    """`points` optimizer steps evenly spaced over the run, the last one at its end."""

    if isinstance(points, bool) or not isinstance(points, int) or points < 0:
        raise AdvtuneError(f"points must be a non-negative integer (snapshots along the run), got {points!r}")
    return spaced_steps(fit_steps(cfg, n_train), points)


def spaced_steps(total: int, points: int, after: float = 0.0) -> list[int]:
    """`points` steps evenly spaced over the part of a `total`-step run after its first share `after`,
    the last one at its end (snapshots: the whole run; keep-best: after the eps ramp)."""
    start = after * total
    return sorted({max(1, round(start + (total - start) * i / points)) for i in range(1, points + 1)})


def fit_steps(cfg, n_train: int) -> int:
    """The optimizer steps `fit` will take: under torchrun each rank takes its share of the examples and
    of the global batch, as `fit` counts them."""
    world = rank_and_world()[1]
    return total_steps(cfg, num_batches(n_train // world, check_global_batch(cfg.batch_size)))


def open_training_folder(run, cfg, config: dict, inert: Callable[[dict], Collection[str]] | None = None) -> RunDir:
    """The run folder of a training job (train, finetune), once everything is validated: created (or
    an old run replaced), or reopened with --resume after checking the settings and the checkpoint
    match; config.json written once (a resume appends when). `inert`: the recorded settings that had no
    effect on that run (they are not compared)."""
    amp_dtype(cfg.amp, resolve_device(run.device))  # --amp fp16 off CUDA: refused before a run is moved aside
    rd = RunDir.create(run.out, resume=run.resume, overwrite=run.overwrite)
    if run.resume and rd.file(files.CONFIG).is_file():
        recorded = rd.read_json(files.CONFIG)
        saved = recorded.get("run", {})
        ignore = set(inert(saved)) if inert else set()
        check_same_run(saved, run.to_json(), ignore=ignore, working_dir=recorded.get("working_dir"))
        check_same_base(recorded, config.get("base_sha256"), rd.path)
    if run.resume:  # an adversarial run's eps ramp (None: the job's auto ramp, at most the default)
        ramp = getattr(run, "eps_warmup", None)
        ramp = (DEFAULT_EPS_WARMUP if ramp is None else float(ramp)) if getattr(run, "adversarial", True) else 0.0
        check_resume(rd.path, cfg, ramp)
    write_config_once(rd, config)
    other = (config.get("selection") or {}).get("analysis_of_other_model")
    if other and is_main_process():  # said here, once every check passed: a refusal stays the only line
        log.warning(OTHER_MODEL, other)
    return rd


def fit_in_folder(
    rd: RunDir | None, meter: CostMeter, meta: dict, config: dict, snaps: list[int], resume: bool
) -> dict:
    """`fit`'s keywords that keep a training run in its folder: the checkpoint (and resuming from it),
    metrics and cost written after every epoch, snapshots at `snaps`; none without a folder."""
    if rd is None:
        return {}
    return {
        "checkpoint_dir": rd.path,
        "resume": resume,
        "on_record": lambda h: (rd.write_metrics(h.epochs), unfinished(rd), rd.write_cost(meter)),
        "on_step": snapshot_saver(rd, meta, config, snaps),
    }


def unfinished(rd: RunDir) -> None:
    """A finished run made longer (--resume with more epochs) trains again: its summary (the old end) goes once the
    first longer record is written (a write that failed changed nothing), so that an interruption leaves a run that
    reads unfinished, not the old summary beside the new costs."""
    if rd.writer:
        rd.file(files.SUMMARY).unlink(missing_ok=True)


def close_training_folder(rd: RunDir, model, meta: dict, summary, epochs: list[dict] | None = None) -> None:
    """A finished training run's records: the model, metrics (when given), cost and summary, then done."""
    save_model(rd.path, model, meta)
    if epochs is not None:
        rd.write_metrics(epochs)
    rd.write_json(files.COST, summary.cost)
    rd.write_json(files.SUMMARY, summary.to_json())
    rd.done()


def snapshot_saver(rd: RunDir, meta: dict, config: dict, steps: list[int]):
    """An on_step callback that saves the model at the given steps into `snapshots/step-NNNNNNN/`
    (a loadable run folder: model, config.json, cost.json with the cost *up to that step*).
    cost.json is written last, so a folder with it is complete; a resumed run skips those."""
    if not steps:
        return None

    wanted = set(steps)

    def on_step(model, step: int, meter: CostMeter) -> None:
        if step not in wanted or not is_main_process():
            return
        folder = rd.path / files.SNAPSHOTS / files.snapshot(step)
        if (folder / files.COST).is_file():
            return
        folder.mkdir(parents=True, exist_ok=True)
        state = plain_state_dict(model) if has_adapters(model) else None  # low-rank adapters folded in
        save_model(folder, model, {**meta, "snapshot": {"of": str(rd.path), "step": step}}, state)
        sub = RunDir(folder)
        sub.write_config(
            {
                **{k: v for k, v in config.items() if k not in ("created", "working_dir", "versions")},
                "snapshot": {"of": str(rd.path), "step": step},
            }
        )
        sub.write_cost(meter)

    return on_step


def list_snapshots(folder) -> list[tuple[int, "Path"]]:
    """Complete snapshots of a run, as (step, folder), by step."""

    root = Path(folder) / files.SNAPSHOTS
    if not root.is_dir():
        return []
    out = []
    for p in root.glob("step-*"):
        if (p / files.COST).is_file() and p.name[5:].isdigit():
            out.append((int(p.name[5:]), p))
    return sorted(out)


def check_val(val) -> None:
    """--val: a number of training examples (a whole number >= 1) or a fraction in (0, 1); 0 = none."""

    ok = (
        isinstance(val, (int, float))
        and not isinstance(val, bool)
        and math.isfinite(val)
        and (val == 0 or 0 < val < 1 or (val >= 1 and float(val).is_integer()))
    )
    if not ok:
        raise AdvtuneError(
            f"--val must be a number of training examples (e.g. 5000) or a fraction in (0, 1) (e.g. 0.1), got {val!r}"
        )


def dataset_spec(name: str) -> str:
    """What rebuilds the dataset later: a registry name, or the absolute path of a file/folder."""

    return dataset_key(name) or str(Path(name).expanduser().resolve())  # an alias is its name, not a path


def check_same_base(recorded: dict, base_sha256: str | None, folder) -> None:
    """A resume continues from the base weights its run started from (`base_sha256`, the state's hash, recorded in its
    config): a base retrained or replaced in place since would mix two bases in one run (the checkpoint's weights
    and the selection and patch taken from the new base). Runs recorded before the hash are not checked."""
    then = recorded.get("base_sha256")
    if then and base_sha256 and then != base_sha256:
        raise AdvtuneError(
            f"--resume: the base model changed since {folder} started (its weights' sha256 was {then[:12]}..., now "
            f"{base_sha256[:12]}...); a resume would mix two bases: start anew with --overwrite or another --out"
        )


def write_config_once(rd: RunDir, config: dict) -> None:
    """config.json records how a run started; a resume appends when, and keeps the original."""

    if rd.file(files.CONFIG).is_file():
        old = rd.read_json(files.CONFIG)
        old.setdefault("resumed", []).append(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        rd.write_json(files.CONFIG, old)
    else:
        rd.write_config(config)


def refuse_same_folder(out: str, base: str, *inputs: str | None) -> None:
    """--out may not be the base run, nor a folder holding it or another input (`refuse_out_holding`), the base's
    own data and model file included."""
    o, b = Path(out).resolve(), Path(base).resolve()
    if o == b:
        raise AdvtuneError(f"--out {out} is the base run itself; write the new run to another folder")
    if o in b.parents:
        raise AdvtuneError(f"--out {out} holds the base run {base}; write the new run to a folder outside it")
    refuse_out_holding(out, *inputs, *recorded_inputs(base))


def recorded_inputs(base: str) -> list[str]:
    """The files a job on the run `base` reads besides the run: its own dataset, its recorded data folder, the
    file its model is built from (where its records name them; an unreadable record is refused later, by name)."""
    found: list[str] = []
    for name, keys in (
        (files.CONFIG, ("run.dataset", "run.data_dir")),
        (files.MODEL_META, ("factory.file", "factory.module_file")),
    ):
        try:
            record = json.loads((Path(base) / name).read_text())
        except (OSError, ValueError):
            continue
        for key in keys:
            value = record
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if isinstance(value, str) and value and not (key == "run.dataset" and dataset_key(value)):
                found.append(value)
    return found


def refuse_out_holding(out: str, *inputs: str | None) -> None:
    """--out may not hold an input this run reads from a path (--weights, a --select analysis): --overwrite would
    move it aside with the old run and delete it when the new one is done."""
    o = Path(out).resolve()
    for given in (i for i in inputs if i):
        p = Path(given).expanduser().resolve()
        if o == p or o in p.parents:
            raise AdvtuneError(f"--out {out} holds {given}, which this run reads; write the new run to another folder")


RUN_DEFAULTS = {
    "budget": None,
    "points": 0,
    "params": None,
    "granularity": "unit",
    "probe": 0.2,
    "probe_quotas": False,
    "weights": None,
    "weights_key": None,
    "keep_best": 0,
    "norms": False,
    "head": False,
}  # keys newer than some records


# folders and files: ./runs/a, runs/a/ and runs/a are one setting (a dataset by name is a name, not a path)
PATH_SETTINGS = ("base", "data_dir", "select", "weights", "dataset")


def _folder(path: str, working_dir: str | None = None) -> Path:
    path = Path(path).expanduser()
    return (Path(working_dir) / path if working_dir else path).resolve()


def same_setting(
    key: str, saved: Any, now: Any, saved_out: Any = None, now_out: Any = None, working_dir: str | None = None
) -> bool:
    """Whether a recorded setting and its value now are the same. A folder is compared as the path it names: a
    relative one as read from the folder the run started in (`working_dir`) while that folder is still there (so a
    resume from another working folder matches the same folder, and refuses another one of the same relative
    name), else as read from today's (a tree moved as a whole, or a record older than `working_dir`). An analysis
    next to the run (`select`: harden's own analysis beside its fine-tuning stage) is the same one when the run
    moved with it (`saved_out`, `now_out`: the run's folder then and now)."""
    if key not in PATH_SETTINGS or not (isinstance(saved, str) and isinstance(now, str)):
        return saved == now
    if key == "dataset" and (dataset_key(saved) or dataset_key(now)):
        return dataset_key(saved) == dataset_key(now)
    b = _folder(now)
    then = _folder(saved, working_dir) if working_dir else None
    if then is not None and then.exists():
        if then == b:
            return True
    elif saved == now or _folder(saved) == b:
        return True
    if key == "select" and isinstance(saved_out, str) and isinstance(now_out, str):
        a, out_then = _folder(saved, working_dir), _folder(saved_out, working_dir)  # as recorded, then
        return a.name == b.name and a.parent == out_then.parent and b.parent == _folder(now_out).parent
    return False


def check_same_run(saved: dict, now: dict, ignore: Collection[str] = (), working_dir: str | None = None) -> None:
    """A resume must use the settings the run started with (training ones included, whether or not a
    checkpoint exists yet); only where it runs may change: the folder's path (a moved run resumes),
    the device, and the number of epochs; and the settings in `ignore` (ones that had no effect).
    `working_dir`: the folder the run started in (its config's), for the relative paths it recorded."""

    ignore = {"resume", "overwrite", "device", "out", "train", *ignore}
    changed = [
        (k, saved.get(k, RUN_DEFAULTS.get(k)), now[k])
        for k in now
        if k not in ignore
        and not same_setting(
            k, saved.get(k, RUN_DEFAULTS.get(k)), now[k], saved.get("out"), now.get("out"), working_dir
        )
    ]
    if isinstance(now.get("train"), dict):
        changed += [(f"train.{k}", a, b) for k, a, b in config_changes(saved.get("train") or {}, now["train"])]
    if changed:
        raise AdvtuneError(
            f"--resume with different settings ({', '.join(f'{k}: {a!r} -> {b!r}' for k, a, b in changed)}); "
            "use the original flags or a new --out"
        )


def load_base(path: str, device) -> tuple[Any, dict, dict]:
    """A trained run's model, its model.json, and its config.json."""

    rd = open_run(path)
    model, meta = load_model(rd.path, device)
    return model, meta, rd.read_json(files.CONFIG)


def whole_training_cost(folder: str | Path, config: dict | None = None) -> dict:
    """A base run's cost.json where it is its model's whole training: a train run from scratch. {} (unrecorded)
    otherwise: weights brought in with --weights, or a finetune/harden folder's last stage, would be counted as
    the whole and make everything fine-tuned from them look cheap. `config`: its config.json, when read already."""
    folder = Path(folder)
    if config is None:
        config = read_json(folder / files.CONFIG, "config") if (folder / files.CONFIG).is_file() else {}
    whole = config.get("command") == "train" and not (config.get("run") or {}).get("weights")
    return CostRecord.read(folder / files.COST).to_json() if whole and (folder / files.COST).is_file() else {}


def dataset_of(base_config: dict, meta: dict, data_dir: str | None, **kw):
    """The dataset a base run was trained on (same name/path, optionally another data folder)."""

    run = base_config.get("run", {})
    name = meta.get("dataset_spec") or run.get("dataset") or meta.get("dataset")
    if not name:
        raise AdvtuneError("the base run does not record its dataset; pass a run folder written by `advtune train`")
    base = Path(name).name
    alias = dataset_key(base)  # an alias recorded as a path before aliases were names (/cwd/fmnist), and only that:
    if not dataset_key(name) and not Path(name).exists() and alias and alias != base.lower():  # not a folder "mnist"
        name = alias if meta.get("dataset") == alias else name
    recorded = base_config.get("dataset") or {}
    as_trained = None
    if not dataset_key(name):  # own data: read as the model read it ("sorted": an image folder before round 37)
        as_trained = {"classes": meta.get("classes"), "order": recorded.get("order", "sorted")}
    folder = data_dir or run.get("data_dir") or folder_read_from(base_config, name)
    if data_dir is None and folder and dataset_key(name) in SPECS and not holds_dataset(name, folder):
        # the folder the run recorded no longer holds the set (moved, deleted): the usual places, as documented
        log.warning("%s: the run's recorded data folder %s no longer holds it; looking elsewhere", name, folder)
        folder = None
    ds = load_dataset(name, folder, as_trained=as_trained, **kw)
    classes, shape = meta.get("classes"), meta.get("input_shape")
    count = meta.get("num_classes")  # a model recorded without class names: its count at least
    other = classes != ds.classes if isinstance(classes, list) else count not in (None, len(ds.classes))
    if other or (shape is not None and tuple(shape) != ds.input_shape):
        raise AdvtuneError(  # a class renamed, added or removed since: every label would shift without a word
            f"{name} now reads as classes {ds.classes[:6]} ({len(ds.classes)}) of {ds.input_shape} images, and the "
            f"model was trained on {classes[:6] if isinstance(classes, list) else '?'} of {tuple(shape or ())}; use "
            "the data it was trained on"
        )
    then, now = recorded.get("images"), ds.notes.get("images")
    if then is not None and now is not None and then != now:  # an image folder's order is drawn over its count
        log.warning(
            "%s holds %d training images now, %d when the base was trained: its reading order changed, so --limit and "
            "held-out splits now mix in images the base trained on; restore the folder for a clean comparison",
            name,
            now,
            then,
        )
    return ds


def folder_read_from(config: dict, name: str) -> str | None:
    """The data folder a run's dataset was read from, by the file its record names (`dataset.source`, e.g.
    <data>/cifar10/cifar10.npz): a fine-tuned or hardened run records no --data-dir of its own when its base's
    was used, and a job on it would otherwise search the default places only."""
    source = (config.get("dataset") or {}).get("source")
    if not isinstance(source, str) or not source:
        return None
    path = Path(source)
    holder = next((p for p in (path, *path.parents) if p.name == name), None)
    return str(holder.parent) if holder is not None and holder.parent.is_dir() else None


def guard_on(guard: bool | None, spec: str) -> bool:
    """--guard as given, or on by default for FGSM-type training (catastrophic overfitting)."""
    return guard if guard is not None else spec.strip().lower().startswith("fgsm")


def overfit_guard(guard: bool | None, spec: str, threat, train, device, seed, meter) -> list:
    """The catastrophic-overfitting guard as a fit callback (when `guard_on`), on 512 images of the `train` split."""
    if not guard_on(guard, spec):
        return []

    gx, gy = train.take(512).tensors(device)
    return [OverfitGuard(PGD(threat, steps=10), gx, gy, seed=seed, meter=meter)]


DEFAULT_EPS_WARMUP = 0.3  # without a ramp, PGD training from a standard model stalled at chance (docs/RESULTS.md)


def resolve_eps_warmup(value: float | None, spec: str, say: bool = True) -> float:
    """--eps-warmup as given, or the default ramp (TRADES has none); says which when it applies it (`say`)."""
    if value is not None:
        return float(value)
    if spec.strip().lower().startswith("trades"):
        return 0.0
    if say:
        log.info(
            "eps ramps up from 0 over the first %g%% of training (the default; --eps-warmup 0 turns it off)",
            100 * DEFAULT_EPS_WARMUP,
        )
    return DEFAULT_EPS_WARMUP


def example_input(model, ds):
    """One training input on the model's device: what the traced rules (the BN rule, the output layer) and the
    cost per example run on."""
    return ds.train.to_float(ds.train.x[:1], model_device(model))
