"""An experiment's YAML: its keys (the job configs' fields), validation with one-line errors, the
recipe fill-in and the sweep expansion. Variants become job configs in `runner.py` through the
configs' own defaults (`settings_from`): a key a variant does not set means the CLI's default."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

from ...attacks import build_attack
from ...data import list_datasets
from ...data.loading import dataset_key
from ...errors import AdvtuneError
from ...keywords import FLAG
from ...models import ARCHITECTURES, is_factory_spec
from ...recipe import ADAPTER_GRANULARITIES, PROBE_SHARE, Recipe
from ...settings import (
    check_keys,
    check_values,
    default,
    keys,
    parse_number,
    read_yaml,
    settings_from,
)
from ...threat import ThreatModel
from ...train.config import TrainConfig, inert_regrow
from ...train.objectives import check_objective
from ...vulnerability import list_criteria
from ..analyze import check_analysis, check_curve_flags
from ..common import guard_on
from ..configs import AnalyzeRun, EvaluateRun, FinetuneRun, TrainRun
from ..evaluate import attacks_for
from ..finetune import check_finetune
from ..selecting import check_selection_flags
from .variants import (
    as_list,
    budget_of,
    eps_value,
    expand_variants,
    harden_recipe,
    params_of,
    points_of,
    train_config,
)

TOP_KEYS = {"name", "base", "threat", "evaluation", "analysis", "variants", "seed", "device", "data_dir", "notes"}
# YAML keys are the config dataclasses' fields (advtune.settings): a new setting needs no edit here.
# `only` names the fields a section may set (the experiment sets the others itself).
BASE_KEYS = keys(TrainRun, only={"dataset", "model", "train", "limit", "limit_test", "data_dir"}) | {"pretrained"}
THREAT_KEYS = {"norm", "eps"}
EVAL_KEYS = keys(EvaluateRun, only={"attacks", "suite", "limit_test", "batch_size", "cascade"}) | {
    "limit"
}  # limit: the
# older name of limit_test, still read
ANALYSIS_KEYS = keys(
    AnalyzeRun, only={"attack", "criteria", "limit", "curve_limit", "shares", "random_seeds", "batch_size"}
)
TRAIN_KEYS = keys(TrainConfig, exclude={"seed"})
# a variant: the fine-tuning (or training) settings it may change, and the experiment's own keys
VARIANT_KEYS = (
    keys(
        FinetuneRun,
        exclude={
            "base",
            "out",
            "norm",
            "data_dir",
            "limit_test",
            "val",
            "monitor_test",
            "device",
            "resume",
            "overwrite",
        },
    )
    | keys(TrainRun, only={"model"})
    | keys(Recipe, only={"analysis_attack", "analysis_limit"})  # kind: harden
    | {"name", "kind", "notes", "reference", "recipe", "params_like"}
)
KINDS = ("standard", "train", "finetune", "harden")
EVAL_NAME = "protocol"


def load_config(path: str | Path) -> dict:
    """Parse and validate an experiment YAML; errors name the line or the key."""

    return validate_config(read_yaml(Path(path), "experiment config"), str(path))


def _check_names(base: dict, where: str) -> None:
    """A misspelt dataset or zoo model, before the experiment's folder records its base (a typo recorded there made
    the corrected rerun into the same --out a different experiment)."""
    name = base.get("dataset")
    if isinstance(name, str) and dataset_key(name) is None and os.sep not in name and not name.endswith(".npz"):
        if not (Path(base.get("data_dir") or ".") / name).exists() and not Path(name).exists():
            raise AdvtuneError(f"{where}: base: unknown dataset {name!r}; valid: {', '.join(list_datasets())}")
    model = base.get("model")
    if isinstance(model, str) and not is_factory_spec(model):
        try:
            ARCHITECTURES.get(model)
        except AdvtuneError as e:
            raise AdvtuneError(f"{where}: base: {e}") from None


def validate_config(cfg: Any, where: str = "config") -> dict:
    cfg = copy.deepcopy(check_keys(cfg, TOP_KEYS, where))
    for key in ("base", "threat", "evaluation", "variants"):
        if key not in cfg:
            raise AdvtuneError(f"{where}: missing required key {key!r}")
    for key in ("base", "threat", "evaluation"):  # an empty section is YAML's null: one line, not a traceback
        if not isinstance(cfg[key], dict):
            raise AdvtuneError(f"{where}: {key} must be a mapping of its keys, got {cfg[key]!r}")
    check_keys(cfg["base"], BASE_KEYS, f"{where}: base")
    check_keys(cfg["base"].get("train"), TRAIN_KEYS, f"{where}: base.train")
    _check_train(cfg["base"].get("train"), None, f"{where}: base.train")
    check_keys(cfg["threat"], THREAT_KEYS, f"{where}: threat")
    check_keys(cfg["evaluation"], EVAL_KEYS, f"{where}: evaluation")
    if isinstance(cfg["evaluation"].get("attacks"), list):  # a YAML list stands for the comma list (as the CLI's)
        cfg["evaluation"]["attacks"] = ",".join(str(a) for a in cfg["evaluation"]["attacks"])
    check_values(EvaluateRun, cfg["evaluation"], f"{where}: evaluation")  # `cascade: "false"` is a string
    check_values(TrainConfig, cfg["base"].get("train") or {}, f"{where}: base.train")
    if cfg.get("device") is not None and not isinstance(cfg["device"], str):  # (null: auto)
        raise AdvtuneError(f"{where}: device must be auto, cpu, cuda or cuda:<i>, got {cfg['device']!r}")
    check_keys(cfg.get("analysis"), ANALYSIS_KEYS, f"{where}: analysis")
    if cfg.get("analysis"):  # what the analysis would ignore, before the base model trains
        given = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg["analysis"].items() if k in ANALYSIS_KEYS}
        try:
            check_curve_flags(settings_from(AnalyzeRun, given, base="", out=""))
        except AdvtuneError as e:
            raise AdvtuneError(f"{where}: analysis: {e}") from None
    if "pretrained" not in cfg["base"] and not {"dataset", "model"} <= set(cfg["base"]):
        raise AdvtuneError(f"{where}: base needs either pretrained: <run folder> or dataset: and model:")
    _check_names(cfg["base"], where)
    if "eps" not in cfg["threat"]:
        raise AdvtuneError(f"{where}: threat needs eps (e.g. 0.3 or [0.1, 0.2, 0.3])")
    if not cfg["evaluation"].get("attacks") and not cfg["evaluation"].get("suite"):
        raise AdvtuneError(f"{where}: evaluation needs attacks: or suite:")
    if not isinstance(cfg["variants"], list) or not cfg["variants"]:
        raise AdvtuneError(f"{where}: variants must be a non-empty list")
    seen = set()
    for i, v in enumerate(cfg["variants"]):
        vw = f"{where}: variants[{i}]" + (f" ({v.get('name')})" if isinstance(v, dict) and v.get("name") else "")
        check_keys(v, VARIANT_KEYS, vw)
        check_keys(v.get("train"), TRAIN_KEYS, f"{vw}.train")
        if isinstance(v, dict):  # training from scratch starts from the base's settings, fine-tuning from 1 epoch
            check_values(TrainConfig, v.get("train") or {}, f"{vw}.train")
            scratch = v.get("kind") == "train"
            _check_train(cfg["base"].get("train") if scratch else {"epochs": 1}, v.get("train"), f"{vw}.train")
        if not v.get("name"):
            raise AdvtuneError(f"{vw}: every variant needs a name")
        if not isinstance(v["name"], str):
            raise AdvtuneError(f'{vw}: a variant\'s name is a folder name: quote it, e.g. name: "{v["name"]}"')
        reserved = v["name"].startswith("analysis") or v["name"] in (".", "..")
        reserved = reserved or v["name"].endswith((".probe", ".json", ".csv", ".html", ".md", ".png"))
        if reserved or "/" in v["name"] or (v["name"] == "standard" and v.get("kind") != "standard"):
            raise AdvtuneError(
                f"{vw}: the name {v['name']!r} is taken by the experiment's own folders and files (standard, "
                "analysis*, *.probe, *.json, ...) or is not a folder name; rename the variant"
            )
        if v.get("kind", "finetune") not in KINDS:
            raise AdvtuneError(f"{vw}: unknown kind {v.get('kind')!r}; valid: {', '.join(KINDS)}")
        if v["name"] in seen:
            raise AdvtuneError(f"{vw}: variant name {v['name']!r} used twice")
        seen.add(v["name"])
        _check_numbers(v, vw)
    base_train = train_config(cfg["base"].get("train"), None, 0)
    levers = [k for k, off in (("adapter_lr_ratio", 1), ("regrow", 0)) if getattr(base_train, k) != off]
    for lever in levers + inert_regrow(base_train):  # (how a mask moves, too)
        raise AdvtuneError(f"{where}: base.train: {lever} is a fine-tuning lever; set it in a variant's train:")
    try:
        expanded = expand_variants(cfg)
    except AdvtuneError as e:  # (names colliding after a sweep: named with the file, as every other check)
        raise AdvtuneError(f"{where}: {e}") from None
    for w in expanded:  # a harden variant's recipe, as each sweep point will build it
        # every kind of KINDS has its settings class here (a new kind without one fails, never checked as train's)
        kind = {"standard": TrainRun, "train": TrainRun, "finetune": FinetuneRun, "harden": Recipe}[w["kind"]]
        check_values(kind, w, f"{where}: variant {w['name']}")  # a typo in a choice, a quoted switch
        if w["kind"] == "harden":
            harden_recipe(w, cfg["evaluation"], f"{where}: variant {w['name']}")
        if w["kind"] == "finetune" and w.get("select") == "random" and w.get("granularity") == "probe":
            raise AdvtuneError(
                f"{where}: variant {w['name']}: select: random with granularity: probe; the probe rule's mask comes "
                "from its probe, never from select: give the random control granularity: sparse (a variant of its own)"
            )
        if w["kind"] == "finetune":  # the flags its selection would ignore, refused before any variant runs
            try:
                budgeted = w.get("params") is not None or bool(w.get("params_like"))  # params_like: known later
                probe = w.get("probe", PROBE_SHARE)
                probe = parse_number(probe) if isinstance(probe, str) else probe
                check_selection_flags(
                    w.get("select", "top"),
                    budgeted,
                    w.get("granularity", "unit"),
                    probe,
                    per_layer=w.get("per_layer") is True,
                    share=w.get("share"),
                    criterion=w.get("criterion"),
                    probe_quotas=bool(w.get("probe_quotas")),
                )
            except AdvtuneError as e:
                raise AdvtuneError(f"{where}: variant {w['name']}: {e}") from None
        if w["kind"] == "finetune" and w.get("granularity") == "probe" and w.get("head") and not w.get("probe_quotas"):
            raise AdvtuneError(
                f"{where}: variant {w['name']}: head: true with granularity: probe needs probe_quotas: true "
                "(the global ranking lets the output layer's entries compete in the mask)"
            )
        if train_config(None, w.get("train"), 0).adapter_lr_ratio != 1 and not trains_adapters(w):
            raise AdvtuneError(
                f"{where}: variant {w['name']}: adapter_lr_ratio scales low-rank adapters' rate, and this variant "
                "trains none: use it with kind: finetune and granularity lowrank, hybrid or shares (or select: lowrank)"
            )
        # harden's recipe refuses its own (harden_recipe above); a fine-tuning variant's here, before any variant runs
        moving = w["kind"] == "finetune" and w.get("granularity") in ("probe", "sparse") and w.get("select") != "all"
        if w["kind"] != "harden" and train_config(None, w.get("train"), 0).regrow and not moving:
            raise AdvtuneError(
                f"{where}: variant {w['name']}: regrow moves a mask of single entries: use it with kind: finetune "
                "and granularity probe or sparse, or kind: harden"
            )
        inert = inert_regrow(train_config(None, w.get("train"), 0))
        if inert:  # how a mask moves, on a mask that stays put
            raise AdvtuneError(
                f"{where}: variant {w['name']}: train: {inert[0]} sets how regrow's mask moves and does nothing on "
                "a fixed one: drop it, or set regrow"
            )
        if moving and train_config(None, w.get("train"), 0).regrow and guard_on(w.get("guard"), w.get("attack") or ""):
            raise AdvtuneError(
                f"{where}: variant {w['name']}: regrow with the overfitting guard (on for fgsm training): its rollback "
                "restores weights trained under an earlier mask; set guard: false or drop regrow"
            )
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise AdvtuneError(f"{where}: seed must be an integer in [0, 2^63), got {seed!r}")
    check_runnable(cfg, where)
    return cfg


# what a variant of each kind does not use: refused (they were dropped without a word, and a sweep over one ran
# the same job twice)
SELECTION_KEYS = {"select", "share", "per_layer", "criterion", "params", "granularity", "norms", "head", "probe"}
SELECTION_KEYS |= {"probe_quotas", "keep_best", "params_like"}
IGNORED_BY_KIND = {
    "train": SELECTION_KEYS | {"analysis_attack", "analysis_limit"},
    "finetune": {"model", "analysis_attack", "analysis_limit"},
    "harden": {"select", "share", "per_layer", "points", "keep_best", "attack_mode", "guard", "params_like", "model"},
    "standard": VARIANT_KEYS - {"name", "kind", "eps", "notes", "reference"},  # the base model, evaluated
}


def check_runnable(cfg: dict, where: str) -> None:
    """What the jobs would refuse only once they run (after the base model trained and the variants before them
    ran, hours in): the threat, the evaluation's attacks, the analysis' criteria, the limits, each variant's
    attack, numbers and the keys its kind ignores, checked on the config alone."""
    norm = cfg["threat"].get("norm", "linf")
    eps_all = [eps_value(e) for e in as_list(cfg["threat"]["eps"])]
    try:
        for e in eps_all:
            ThreatModel(norm, e)
        ev = cfg["evaluation"]
        given = {k: ev[k] for k in ("attacks", "suite") if ev.get(k)}
        for e in eps_all:
            attacks_for(settings_from(EvaluateRun, given, run="", norm=norm), e)
    except AdvtuneError as e:
        raise AdvtuneError(f"{where}: threat/evaluation: {e}") from None
    analysis = cfg.get("analysis") or {}
    if "criteria" in analysis and not isinstance(analysis["criteria"], list):
        raise AdvtuneError(f"{where}: analysis.criteria must be a list, e.g. [taylor]; got {analysis['criteria']!r}")
    try:  # the analysis job's own checks and its attack, as it will run at each eps
        given = {k: tuple(v) if isinstance(v, list) else v for k, v in analysis.items() if k in ANALYSIS_KEYS}
        for e in eps_all:
            run = settings_from(AnalyzeRun, given, base="", out="", eps=e, norm=norm)
            check_analysis(run)
            build_attack(run.attack, ThreatModel(norm, e))
    except (AdvtuneError, TypeError) as e:
        raise AdvtuneError(f"{where}: analysis: {e}") from None
    computed = set(analysis.get("criteria") or default(AnalyzeRun, "criteria"))
    batch = (cfg["evaluation"] or {}).get("batch_size")
    if batch is not None:
        _positive_int(batch, f"{where}: evaluation.batch_size")
    for section, key in (
        ("base", "limit"),
        ("base", "limit_test"),
        ("evaluation", "limit_test"),
        ("evaluation", "limit"),
    ):
        _positive_int((cfg.get(section) or {}).get(key), f"{where}: {section}.{key}")
    for w in expand_variants(cfg):
        vw = f"{where}: variant {w['name']}"
        ignored = sorted(k for k in IGNORED_BY_KIND.get(w["kind"], ()) if k in w and w[k] is not None)
        if w.get("recipe") == "harden":  # the recipe fills a fine-tuning variant's selection keys itself
            ignored = [k for k in ignored if k not in SELECTION_KEYS]
        if ignored:
            raise AdvtuneError(f"{vw}: a {w['kind']} variant does not use {', '.join(ignored)}; drop them")
        _positive_int(w.get("limit"), f"{vw}: limit")
        points_of(w)
        params_of(w)
        budget_of(w)
        if w["kind"] == "finetune" and w.get("keep_best"):
            raise AdvtuneError(
                f"{vw}: keep_best needs a held-out split, which an experiment's finetune has not; use kind: harden "
                "(it holds one out) or drop keep_best"
            )
        criterion = w.get("criterion") or default(FinetuneRun, "criterion")
        if w["kind"] == "finetune" and w.get("select", "top") == "top" and criterion not in computed:
            raise AdvtuneError(  # the shared analysis computes only its criteria: the variant reads one of them
                f"{vw}: criterion {criterion!r} is not among the analysis' criteria ({', '.join(sorted(computed))}); "
                "add it to analysis.criteria or pick one of them"
            )
        if w["kind"] == "harden" and w.get("criterion") is not None and w["criterion"] not in list_criteria():
            raise AdvtuneError(f"{vw}: unknown criterion {w['criterion']!r}; valid: {', '.join(list_criteria())}")
        for key in ("attack", "analysis_attack"):
            if w.get(key) and w["kind"] in ("train", "finetune", "harden"):
                try:
                    check_objective(str(w[key]), ThreatModel(norm, eps_value(w["eps"])))
                except AdvtuneError as e:
                    raise AdvtuneError(f"{vw}: {key}: {e}") from None
        if w["kind"] == "finetune":  # the fine-tuning's own checks, as it will run (its analysis a placeholder)
            select = w.get("select", "top")
            numbers = {k: parse_number(w[k]) for k in ("share", "eps_warmup", "probe") if isinstance(w.get(k), str)}
            run = settings_from(
                FinetuneRun,
                {**w, **numbers},
                base="",
                out="",
                eps=eps_value(w["eps"]),
                select="analysis" if select == "top" else select,
                norm=norm,
                train=train_config({"epochs": 1}, w.get("train"), 0),
                params=1 if w.get("params_like") else params_of(w),  # the other variant's count, known later
                budget=budget_of(w),
                points=points_of(w),
                monitor_test=0,
            )
            try:
                check_finetune(run, say=False)
            except AdvtuneError as e:  # its words name flags: here they are the variant's keys
                raise AdvtuneError(f"{vw}: {FLAG.sub(_as_key, str(e))}") from None


# the settings a fine-tuning variant writes as keys: its flags, and its train: block's
VARIANT_FIELDS = {f.name for f in dataclasses.fields(FinetuneRun)} | {f.name for f in dataclasses.fields(TrainConfig)}


def _as_key(flag: re.Match) -> str:
    """A flag a job's message names, as the variant's key (`--no-guard`: `guard: false`); another text kept."""
    name = flag[1].replace("-", "_")
    if name.startswith("no_") and name[3:] in VARIANT_FIELDS:
        return f"{name[3:]}: false"
    return name if name in VARIANT_FIELDS else flag[0]


def _positive_int(value: Any, where: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise AdvtuneError(f"{where} must be a positive whole number of examples, got {value!r}")


def trains_adapters(v: dict) -> bool:
    """Whether a (recipe-filled) variant fine-tunes low-rank adapters: what adapter_lr_ratio needs."""
    select = str(v.get("select", "top"))
    if v.get("kind", "finetune") != "finetune" or select in ("all", "random") or select.startswith("layers:"):
        return False
    return select.startswith("lowrank") or v.get("granularity", "unit") in ADAPTER_GRANULARITIES


def _check_train(base: Any, over: Any, where: str) -> None:
    """A train: block's values make a TrainConfig (a typo in a word or a number fails here, before any run)."""
    try:
        train_config(base if isinstance(base, dict) else None, over if isinstance(over, dict) else None, 0)
    except AdvtuneError as e:
        raise AdvtuneError(f"{where}: {e}") from None


def _check_numbers(v: dict, where: str) -> None:
    """Numbers in a variant are numbers (YAML gives strings for typos like `0,1` or `ten`)."""

    rules = {
        "share": lambda n: 0 < n <= 1,
        "eps_warmup": lambda n: 0 <= n < 1,
        "params": lambda n: n > 0,
        "budget": lambda n: n >= 1,
        "eps": lambda n: 0 < n < 1e6,
    }
    for key, ok in rules.items():
        if key not in v:
            continue
        for val in as_list(v[key]):
            try:
                n = parse_number(val)
            except AdvtuneError:
                raise AdvtuneError(f"{where}: {key} must be a number, got {val!r}") from None
            if not math.isfinite(n) or not ok(n):
                raise AdvtuneError(f"{where}: {key} = {val!r} is out of range")
