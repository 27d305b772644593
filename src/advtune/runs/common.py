"""Pieces the jobs share: the base run a job starts from, its dataset, budgets and snapshots,
resume checks, selections from `--select`."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import filenames as files
from ..attacks import PGD
from ..components import model_params, output_layer
from ..cost import CostMeter
from ..data import DATASETS, load_dataset, num_batches
from ..distributed import check_global_batch, is_main_process, rank_and_world
from ..errors import AdvtuneError
from ..models import load_model, save_model
from ..recipe import ADAPTER_GRANULARITIES, GRANULARITIES, HEAD_GRANULARITIES
from ..storage import read_json
from ..train import (
    OverfitGuard,
    check_resume,
    config_changes,
    cost_per_example,
    steps_for_budget,
    total_steps,
)
from ..train.lowrank import (
    LowRank,
    budget_ranks,
    has_adapters,
    hybrid_ranks,
    norm_layers,
    norm_params,
    own_params,
    plain_state_dict,
    share_ranks,
    uniform_ranks,
)
from ..vulnerability import (
    ScoreTable,
    check_params,
    check_share,
    rank_layers,
    select_layers,
    select_quota,
    select_random,
    select_top,
    select_top_layers,
)
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


def open_training_folder(run, cfg, config: dict) -> RunDir:
    """The run folder of a training job (train, finetune), once everything is validated: created (or
    an old run replaced), or reopened with --resume after checking the settings and the checkpoint
    match; config.json written once (a resume appends when)."""
    rd = RunDir.create(run.out, resume=run.resume, overwrite=run.overwrite)
    if run.resume and rd.file(files.CONFIG).is_file():
        check_same_run(rd.read_json(files.CONFIG).get("run", {}), run.to_json())
    if run.resume:
        check_resume(rd.path, cfg)
    write_config_once(rd, config)
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
        "on_record": lambda h: (rd.write_metrics(h.epochs), rd.write_cost(meter)),
        "on_step": snapshot_saver(rd, meta, config, snaps),
    }


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
                **{k: v for k, v in config.items() if k not in ("created", "versions")},
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

    return name if name.strip().lower() in DATASETS else str(Path(name).expanduser().resolve())


def write_config_once(rd: RunDir, config: dict) -> None:
    """config.json records how a run started; a resume appends when, and keeps the original."""

    if rd.file(files.CONFIG).is_file():
        old = rd.read_json(files.CONFIG)
        old.setdefault("resumed", []).append(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        rd.write_json(files.CONFIG, old)
    else:
        rd.write_config(config)


def refuse_same_folder(out: str, base: str) -> None:

    if Path(out).resolve() == Path(base).resolve():
        raise AdvtuneError(f"--out {out} is the base run itself; write the new run to another folder")


RUN_DEFAULTS = {
    "budget": None,
    "points": 0,
    "params": None,
    "granularity": "unit",
    "weights": None,
    "weights_key": None,
    "keep_best": 0,
    "norms": False,
    "head": False,
}  # keys newer than some records


def check_same_run(saved: dict, now: dict) -> None:
    """A resume must use the settings the run started with (training ones included, whether or not a
    checkpoint exists yet); only where it runs may change: the folder's path (a moved run resumes),
    the device, and the number of epochs."""

    ignore = {"resume", "overwrite", "device", "out", "train"}
    changed = [
        (k, saved.get(k, RUN_DEFAULTS.get(k)), now[k])
        for k in now
        if k not in ignore and saved.get(k, RUN_DEFAULTS.get(k)) != now[k]
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


def dataset_of(base_config: dict, meta: dict, data_dir: str | None, **kw):
    """The dataset a base run was trained on (same name/path, optionally another data folder)."""

    run = base_config.get("run", {})
    name = meta.get("dataset_spec") or run.get("dataset") or meta.get("dataset")
    if not name:
        raise AdvtuneError("the base run does not record its dataset; pass a run folder written by `advtune train`")
    return load_dataset(name, data_dir or run.get("data_dir"), **kw)


def guard_on(guard: bool | None, spec: str) -> bool:
    """--guard as given, or on by default for FGSM-type training (catastrophic overfitting)."""
    return guard if guard is not None else spec.strip().lower().startswith("fgsm")


def overfit_guard(guard: bool | None, spec: str, threat, ds, device, seed, meter) -> list:
    """The catastrophic-overfitting guard as a fit callback (when `guard_on`)."""
    if not guard_on(guard, spec):
        return []

    gx, gy = ds.train.take(512).tensors(device)
    return [OverfitGuard(PGD(threat, steps=10), gx, gy, seed=seed, meter=meter)]


def make_selection(
    model,
    select: str | ScoreTable,
    share: float,
    criterion: str,
    per_layer: bool,
    seed: int,
    params: float | None = None,
    granularity: str = "unit",
    example_input=None,
    norms: bool = False,
    head: bool = False,
):
    """Resolve `--select` into a Selection (None means everything: the full-network path).

    select: all | random | layers:<name,...> | an analyze folder (or score file) | a ScoreTable. With `params`, a
    random or analysed selection fills a parameter budget instead of a share of components;
    granularity=layer picks whole layers from the analysis (best summed score first). `norms`: the
    normalization layers' scale and shift train too, paid out of `params` (low-rank and hybrid only).
    `head`: the output layer trains whole, paid out of `params` (hybrid and shares on an analysis only)."""
    analysed = isinstance(select, ScoreTable) or _analysed(select)
    if head and (granularity not in HEAD_GRANULARITIES or not analysed):
        raise AdvtuneError(
            "--head trains the output layer whole next to the other layers' adapters: use it with an analysis "
            f"(--select <analyze folder>) and --granularity {' or '.join(HEAD_GRANULARITIES)}"
        )
    selection = _make_selection(
        model, select, share, criterion, per_layer, seed, params, granularity, example_input, norms, head
    )
    if norms and not isinstance(selection, LowRank):
        raise AdvtuneError(
            "--norms trains the normalization layers next to low-rank adapters: use it with --granularity "
            f"{', '.join(ADAPTER_GRANULARITIES)} and an analysis (or --select lowrank); unit selections already "
            "train the BatchNorm that follows each selected unit"
        )
    return selection


def _analysed(select: Any) -> bool:
    """--select names an analysis (a folder or a score file), not all/random/lowrank/layers."""
    text = str(select)
    return text not in ("all", "random") and not text.startswith(("lowrank", "layers:"))


def _make_selection(
    model, select, share, criterion, per_layer, seed, params, granularity, example_input, norms, head=False
):

    if params is None:
        check_share(share)
    else:
        check_params(params, model)
    if granularity not in GRANULARITIES:
        raise AdvtuneError(f"granularity {granularity!r}: use {', '.join(GRANULARITIES)}")
    if isinstance(select, ScoreTable):  # an analysis already in memory (harden)
        return select_from_table(select, model, share, per_layer, params, granularity, example_input, seed, norms, head)
    if select == "all":
        return None
    if select == "lowrank" or select.startswith("lowrank:"):
        return lowrank_selection(model, select, params, seed, norms=norms)
    if select.startswith("layers:"):
        return select_layers(model, [n for n in select[len("layers:") :].split(",") if n])
    if select == "random":
        if params is not None:
            return select_random(model, params=params, seed=seed, example_input=example_input)
        return select_random(model, share=share, seed=seed, per_layer=per_layer)
    table = read_table(select, criterion)
    return select_from_table(table, model, share, per_layer, params, granularity, example_input, seed, norms, head)


NORMS_AUTO_SHARE = 0.25  # auto --norms: on only where the normalization layers cost at most this share of --params


def resolve_norms(model, norms: bool | None, select: Any, granularity: str, params) -> bool:
    """--norms as given, or (None: auto) on where it applies and is cheap: a selection that trains low-rank
    adapters (an analysis with an adapter granularity, or --select lowrank) within a parameter budget, on
    a model with normalization layers whose scale and shift cost at most a quarter of that budget. On the
    residual CIFAR-10 frontier it was the best single lever (docs/RESULTS.md, round 7); a model without
    normalization layers (small-cnn) is unchanged."""
    if norms is not None:
        return bool(norms)
    if params is None or not norm_layers(model):
        return False
    if isinstance(select, ScoreTable):
        adapters = granularity in ADAPTER_GRANULARITIES
    else:
        text = str(select)
        adapters = text.startswith("lowrank") or (
            granularity in ADAPTER_GRANULARITIES and text not in ("all", "random") and not text.startswith("layers:")
        )
    return adapters and norm_params(model) <= NORMS_AUTO_SHARE * check_params(params, model)


def norms_of(model, norms: bool) -> tuple[str, ...]:
    """The normalization layers the norms extra trains (none when it is off); refused on a model without any."""
    if not norms:
        return ()
    found = tuple(norm_layers(model))
    if not found:
        raise AdvtuneError("--norms: the model has no normalization layer with a scale and shift to train")
    return found


def budget_after_norms(model, params, norms: bool) -> int:
    """The parameter budget (entries) left for the selection once the norms extra, if on, is paid."""
    budget = check_params(params, model)
    if not norms_of(model, norms):
        return budget
    cost = norm_params(model)
    if cost >= budget:
        raise AdvtuneError(
            f"--norms: the normalization layers have {cost:,} parameters, the whole budget of {budget:,} or more; "
            "raise --params"
        )
    return budget - cost


def head_layer(model, budget: int, example_input=None) -> list[str]:
    """[the output layer] for --head, refused where it alone costs the whole budget."""
    name = output_layer(model, example_input)
    cost = own_params(model.get_submodule(name))
    if cost >= budget:
        raise AdvtuneError(
            f"--head: the output layer {name} has {cost:,} parameters, the whole budget of {budget:,} or more; "
            "raise --params"
        )
    return [name]


def lowrank_selection(
    model, select: str, params: float | None, seed: int, scores: dict | None = None, norms: bool = False
) -> LowRank:
    """`lowrank:rank=R`: adapters of rank R on every conv and linear layer; `lowrank` with a parameter
    budget: ranks that fill it, shared out by the layers' vulnerability scores when given."""
    extra = norms_of(model, norms)
    _, _, arg = select.partition(":")
    if arg:
        key, _, value = arg.partition("=")
        if key.strip() != "rank" or not value.strip().isdigit() or int(value) < 1:
            raise AdvtuneError(
                f"--select {select!r}: write lowrank:rank=<a positive integer>, or lowrank with --params"
            )
        selection = LowRank(uniform_ranks(model, int(value)), seed, norms=extra)
    elif params is None:
        raise AdvtuneError("--select lowrank needs a rank (lowrank:rank=8) or a parameter budget (--params 0.05)")
    else:
        selection = LowRank(budget_ranks(model, budget_after_norms(model, params, norms), scores), seed, norms=extra)
    selection.validate(model)
    return selection


def read_table(source: str | Path, criterion: str) -> ScoreTable:
    """The score table of `criterion` in an analysis folder (or a score file itself)."""
    folder = Path(source)
    table_file = folder / files.scores(criterion) if folder.is_dir() else folder
    if folder.is_dir() and not table_file.is_file():
        have = sorted(p.stem.removeprefix("scores-") for p in folder.glob("scores-*.json"))
        raise AdvtuneError(
            f"{folder} has no scores for criterion {criterion!r}"
            + (f"; it has: {', '.join(have)}" if have else "; run `advtune analyze` into it first")
        )
    if not table_file.is_file():
        raise AdvtuneError(
            f"--select {str(source)!r}: not all, random, layers:<names>, or an analyze folder/score file"
        )
    return ScoreTable.from_json(read_json(table_file, "score table"))


def select_from_table(
    table: ScoreTable,
    model,
    share: float,
    per_layer: bool,
    params=None,
    granularity: str = "unit",
    example_input=None,
    seed: int = 0,
    norms: bool = False,
    head: bool = False,
):
    """The most vulnerable components of a score table: whole layers (granularity=layer) or units
    within a parameter budget, low-rank adapters on every layer with ranks shared out by the layers'
    summed scores (granularity=lowrank), the best whole layers plus adapters on the others with the budget
    they leave (granularity=hybrid), units in every layer with the budget shared out by the layers' scores
    (granularity=quota), or the top share of units (globally or per layer). `head` (hybrid, shares): the output
    layer, which the analysis does not score, trains whole first, out of the same budget."""
    if granularity in (*ADAPTER_GRANULARITIES, "quota") and params is None:
        raise AdvtuneError(f"--granularity {granularity} needs a parameter budget (--params)")
    if granularity == "lowrank":
        return lowrank_selection(model, "lowrank", params, seed, dict(rank_layers(table)), norms)
    if granularity in ("hybrid", "shares"):
        budget, scores = budget_after_norms(model, params, norms), dict(rank_layers(table))
        fixed = head_layer(model, budget, example_input) if head else []
        if granularity == "hybrid":  # whole layers by score, adapters on the others with what is left
            left = budget - sum(own_params(model.get_submodule(n)) for n in fixed)
            best = [c.module for c in select_top_layers(table, model, left, example_input=example_input)]
            whole = fixed + [n for n in best if n not in fixed]  # a table that scored the head: not twice
            ranks = hybrid_ranks(model, budget, whole, scores)
        else:  # every layer its score's share: whole where that pays for it, else an adapter
            whole, ranks = share_ranks(model, budget, scores, fixed)
        if fixed and whole == fixed and not ranks:
            raise AdvtuneError(
                f"--head: the output layer {fixed[0]} leaves no budget for any other layer, not even a rank-1 "
                "adapter; raise --params"
            )
        selection = LowRank(ranks, seed, tuple(whole), norms_of(model, norms))
        selection.validate(model)
        return selection
    if granularity == "quota":  # units in every layer, the budget shared out by the layers' scores
        selection = select_quota(table, model, params, example_input=example_input)
    elif params is not None and granularity == "layer":
        selection = select_top_layers(table, model, params, example_input=example_input)
    elif params is not None:
        selection = select_top(table, params=params, model=model, example_input=example_input)
    else:
        selection = select_top(table, share, per_layer=per_layer)
    selection.validate(model)
    return selection


def describe_selection(selection, model, example=None) -> dict:
    """What a selection trains, for the records: components, units, parameters (also per layer)."""

    trainable = selection.trainable_params(model, example_input=example)
    extra = {}
    if isinstance(selection, LowRank):  # degrees of freedom differ from the entries that change
        extra = {
            "kind": "hybrid" if selection.whole else "lowrank",
            "ranks": selection.ranks,
            "whole": list(selection.whole),
            "norms": list(selection.norms),
            "changed_params": selection.changed_entries(model),
        }
    return {
        **extra,
        "components": len(selection),
        "units": selection.n_units(model),
        "trainable_params": trainable,
        "param_share": trainable / model_params(model),
        "by_layer": selection.by_layer(model),
        "params_by_layer": selection.params_by_layer(model, example),
    }


DEFAULT_EPS_WARMUP = 0.3  # without a ramp, PGD training from a standard model stalled at chance (docs/RESULTS.md)


def resolve_eps_warmup(value: float | None, spec: str) -> float:
    """--eps-warmup as given, or the default ramp (TRADES has none); says which when it applies it."""
    if value is not None:
        return float(value)
    if spec.strip().lower().startswith("trades"):
        return 0.0
    log.info(
        "eps ramps up from 0 over the first %g%% of training (the default; --eps-warmup 0 turns it off)",
        100 * DEFAULT_EPS_WARMUP,
    )
    return DEFAULT_EPS_WARMUP
