"""An experiment's variants as the jobs run them: sweeps expanded into one variant each, `recipe: harden` filled
in, and each variant's numbers (eps, budget, params, points, train settings) read as the CLI reads its flags."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path
from typing import Any

from ... import filenames as files
from ...errors import AdvtuneError
from ...recipe import NORMS_GRANULARITIES, Recipe
from ...settings import budget_number, default, grad_evals_number, parse_number, settings_from
from ...train.config import TrainConfig
from ..configs import EvaluateRun

SWEEPABLE = ("eps", "share", "attack", "criterion", "select", "params", "budget")


def as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def with_recipe(v: dict) -> dict:
    """`recipe: harden` fills a fine-tuning variant with `advtune harden`'s default recipe (the keys the
    variant sets itself win): its selection and training. It keeps the last weights (harden holds out
    data and keeps the best checkpoint; a `kind: harden` variant runs harden itself)."""
    if v.get("recipe") is None:
        return v
    if v["recipe"] != "harden":
        raise AdvtuneError(f"variant {v.get('name')}: unknown recipe {v['recipe']!r}; valid: harden")

    r = Recipe()
    filled = {
        "kind": "finetune",
        "select": "top",
        "granularity": r.granularity,
        "params": r.params,
        "criterion": r.criterion,
        "attack": r.attack,
        "eps_warmup": r.eps_warmup,
    }
    train = {
        "optimizer": r.optimizer,
        "lr": r.lr,
        "schedule": r.schedule,
        "batch_size": r.batch_size,
        "ema": r.ema,
        "augment": r.augment,
        **(v.get("train") or {}),
    }
    granularity = v.get("granularity", r.granularity)
    if v.get("select") == "random" and "granularity" not in v and granularity == "probe":
        # the probe's mask is its own (it never depends on --select): harden's random control of the same size is
        # random single entries, as many as the probe's mask holds (the sparse rule's control)
        filled["granularity"] = granularity = "sparse"
    if r.norms is not False and granularity in NORMS_GRANULARITIES:
        filled["norms"] = r.norms  # harden's auto (None) is decided by the fine-tuning, on the base model
    if granularity == "probe" and r.probe_quotas is not False:
        filled["probe_quotas"] = True  # harden's auto: the analysis' layer quotas with the probe rule
    if granularity == "probe" and v.get("probe_quotas", filled.get("probe_quotas")) and r.head is not False:
        filled["head"] = r.head  # harden's auto (None), decided by the fine-tuning on the base model, as harden does
    return {**filled, **v, "train": train}


def expand_variants(cfg: dict) -> list[dict]:
    """List-valued sweepable keys (eps, share, attack, criterion, select) become one variant each;
    the threat's eps list applies to every variant."""
    out = []
    eps_all = as_list(cfg["threat"]["eps"])
    for v in cfg["variants"]:
        v = with_recipe(dict(v))
        v.setdefault("kind", "finetune")
        v.setdefault("eps", eps_all if len(eps_all) > 1 else eps_all[0])
        axes = [(k, as_list(v[k])) for k in SWEEPABLE if k in v and isinstance(v[k], (list, tuple))]
        if v["kind"] == "standard":  # one model, evaluated at each eps: only eps sweeps apply
            axes = [(k, vals) for k, vals in axes if k == "eps"]
        for combo in itertools.product(*(vals for _, vals in axes)) if axes else [()]:
            w = dict(v)
            suffix = []
            for (k, _), val in zip(axes, combo):
                w[k] = val
                suffix.append(f"{k}{val:g}" if isinstance(val, float) else f"{k}-{val}")
            w["name"] = (
                "-".join([v["name"], *suffix]).replace(":", "_").replace("=", "").replace(",", "_").replace("/", "_")
            )
            w["sweep_of"] = v["name"] if suffix else None
            out.append(w)
    names = [w["name"] for w in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise AdvtuneError(
            f"variant names collide after sweeping: {', '.join(sorted(dup))}; rename the variants (or drop a value "
            "a sweep list repeats)"
        )
    return _resolve_params_like(out)


def _resolve_params_like(out: list[dict]) -> list[dict]:
    """`params_like: NAME` names a variant as written; under a sweep it means NAME's point at the same eps (and the
    same value of any other axis both sweep), which must run first."""
    for i, w in enumerate(out):
        like = w.get("params_like")
        if not like:
            continue
        points = [(j, c) for j, c in enumerate(out) if c["name"] == like]  # a run by its own name (a sweep point)
        points = points or [(j, c) for j, c in enumerate(out) if c["sweep_of"] == like]
        if not points:
            raise AdvtuneError(f"variant {w['name']}: params_like: {like} names no variant; name one listed before it")
        swept = [k for k in SWEEPABLE if len({str(c.get(k)) for _, c in points}) > 1]  # NAME's axes
        points = [(j, c) for j, c in points if all(str(c.get(k)) == str(w.get(k)) for k in swept)]
        if len(points) != 1:
            found = "matches none" if not points else "matches several"
            found += f" of its sweep points (swept: {', '.join(swept)})"
            raise AdvtuneError(f"variant {w['name']}: params_like: {like} {found}; name one variant listed before it")
        j, chosen = points[0]
        if j >= i:
            raise AdvtuneError(
                f"variant {w['name']}: params_like: {like} must run first; list {like} before "
                f"{w['sweep_of'] or w['name']}"
            )
        out[i] = {**w, "params_like": chosen["name"]}
    return out


INT_KEYS = {f.name for f in dataclasses.fields(TrainConfig) if f.type == "int"}
NUMBER_KEYS = INT_KEYS | {f.name for f in dataclasses.fields(TrainConfig) if f.type in ("float", "float | None")}


def train_config(base: dict | None, over: dict | None, seed: int):

    merged = {**(base or {}), **(over or {})}
    for k, v in merged.items():
        if k not in NUMBER_KEYS:  # words (optimizer, schedule, augment, amp) and flags stay as written
            continue
        n = parse_number(v)  # YAML reads 1e-3 as a string; 8/255 is a fraction
        if k in INT_KEYS:
            if n != int(n):
                raise AdvtuneError(f"train.{k} must be an integer, got {v!r}")
            n = int(n)
        merged[k] = n
    return TrainConfig(seed=seed, **merged)


def eps_value(v: Any) -> float:

    return parse_number(v)


def budget_of(v: dict) -> int | None:
    """The variant's training budget in gradient evaluations (None: its epochs), read as the CLI reads --budget."""
    return None if v.get("budget") is None else _as_flag(grad_evals_number, v, "budget")


def _as_flag(parse, v: dict, key: str):
    try:
        return parse(str(v[key]))
    except argparse.ArgumentTypeError as e:
        raise AdvtuneError(f"variant {v['name']}: {key}: {e}") from None


def points_of(v: dict) -> int:
    """Snapshots along the variant's run."""
    n = v.get("points", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise AdvtuneError(
            f"variant {v['name']}: points must be a non-negative integer (snapshots along the run), got {n!r}"
        )
    return n


def params_of(v: dict) -> float | int | None:
    """The variant's parameter budget: a share (< 1) or a count."""
    if v.get("params") is None:
        return None
    return _as_flag(budget_number, v, "params")  # as --params reads it: 1.0 and 2.5 refused, not 1 and 2 entries


def analysis_folder(out: Path, cfg: dict | None, eps: float) -> Path:
    """`analysis/` when the experiment has one eps, else `analysis-eps<eps>/`."""
    single = out / files.ANALYSIS
    per_eps = out / f"analysis-eps{eps:g}"
    if cfg is None:  # reading records: whichever exists
        return per_eps if per_eps.is_dir() else single
    eps_all = {eps_value(e) for e in as_list(cfg["threat"]["eps"])}
    eps_all |= {eps_value(e) for v in cfg["variants"] for e in as_list(v.get("eps", []))}
    return single if eps_all == {eps} else per_eps


# a harden variant's `train:` keys (the recipe's training settings)
RECIPE_TRAIN_KEYS = ("optimizer", "lr", "schedule", "batch_size", "ema", "augment", "regrow")


def harden_recipe(v: dict, evaluation: dict, where: str) -> Recipe:
    """A harden variant's recipe: the keys it sets over `Recipe`'s defaults (its `train:` keys are the
    recipe's optimizer settings); what harden cannot do is refused before anything runs."""
    batch = default(EvaluateRun, "batch_size")
    if not evaluation.get("cascade", True) or evaluation.get("batch_size", batch) != batch:
        raise AdvtuneError(
            f"{where}: a harden variant is evaluated by harden itself (cascade, evaluate's default batch); drop "
            "evaluation.cascade/batch_size or use kind: finetune with recipe: harden"
        )
    train = v.get("train") or {}
    extra = sorted(set(train) - set(RECIPE_TRAIN_KEYS))
    if extra:
        raise AdvtuneError(
            f"{where}: a harden variant's train: takes {', '.join(RECIPE_TRAIN_KEYS)}; not {', '.join(extra)} "
            "(use budget: for its length)"
        )
    given = {**v, **train}
    given.update({k: parse_number(given[k]) for k in ("eps_warmup", "lr") if given.get(k) is not None})
    if given.get("batch_size") is not None:
        given["batch_size"] = int(parse_number(given["batch_size"]))
    if v.get("params") is not None:
        given["params"] = params_of(v)
    return settings_from(Recipe, given)
