"""Run a YAML experiment: one base model, one evaluation protocol, a list of variants side by side.

    name: mnist-claim
    base: {dataset: mnist, model: small-cnn, train: {epochs: 2}}        # or base: {pretrained: runs/x}
    threat: {norm: linf, eps: 0.3}                                       # eps may be a list (a sweep)
    evaluation: {attacks: "apgd-ce,apgd-t", limit: 1000}                 # or suite: standard
    analysis: {attack: "pgd:steps=20", limit: 2000, curve_limit: 1000}
    variants:
      - {name: standard, kind: standard}
      - {name: pgd-at, kind: train, attack: "pgd:steps=10", train: {epochs: 3}}
      - {name: full-ft, kind: finetune, select: all, attack: "pgd:steps=10"}
      - {name: sel, kind: finetune, select: top, share: [0.05, 0.1, 0.2]}   # list -> one variant each
      - {name: random, kind: finetune, select: random, share: 0.1}

Every variant is recorded under `<out>/<variant>/` (a normal run folder plus `eval-protocol.json`);
a finished variant is skipped when the experiment is run again, an interrupted one resumes from its
checkpoint. `<out>/results.json` and `results.csv` hold one row per variant.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import itertools
import logging
import math
from pathlib import Path
from typing import Any

import yaml

from .. import filenames as files
from ..distributed import on_main
from ..errors import AdvtuneError
from ..hardening import Recipe
from ..settings import check_keys, keys
from ..train import TrainConfig
from ..utils import atomic_write_json, atomic_write_text, parse_number, read_json
from . import analyze as analyze_job
from . import evaluate as evaluate_job
from . import finetune as finetune_job
from . import train as train_job
from .analyze import AnalyzeRun
from .common import list_snapshots
from .evaluate import EvaluateRun
from .finetune import FinetuneRun
from .train import TrainRun

log = logging.getLogger(__name__)

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
    | {"name", "kind", "notes", "reference", "recipe", "params_like"}
)
KINDS = ("standard", "train", "finetune")
SWEEPABLE = ("eps", "share", "attack", "criterion", "select", "params", "budget")
EVAL_NAME = "protocol"


def load_config(path: str | Path) -> dict:
    """Parse and validate an experiment YAML; errors name the line or the key."""

    path = Path(path)
    if not path.is_file():
        raise AdvtuneError(f"experiment config not found: {path}")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise AdvtuneError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    return validate_config(cfg, str(path))


def validate_config(cfg: Any, where: str = "config") -> dict:
    cfg = copy.deepcopy(check_keys(cfg, TOP_KEYS, where))
    for key in ("base", "threat", "evaluation", "variants"):
        if key not in cfg:
            raise AdvtuneError(f"{where}: missing required key {key!r}")
    check_keys(cfg["base"], BASE_KEYS, f"{where}: base")
    check_keys(cfg["base"].get("train"), TRAIN_KEYS, f"{where}: base.train")
    check_keys(cfg["threat"], THREAT_KEYS, f"{where}: threat")
    check_keys(cfg["evaluation"], EVAL_KEYS, f"{where}: evaluation")
    check_keys(cfg.get("analysis"), ANALYSIS_KEYS, f"{where}: analysis")
    if "pretrained" not in cfg["base"] and not {"dataset", "model"} <= set(cfg["base"]):
        raise AdvtuneError(f"{where}: base needs either pretrained: <run folder> or dataset: and model:")
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
        if not v.get("name"):
            raise AdvtuneError(f"{vw}: every variant needs a name")
        if v.get("kind", "finetune") not in KINDS:
            raise AdvtuneError(f"{vw}: unknown kind {v.get('kind')!r}; valid: {', '.join(KINDS)}")
        if v["name"] in seen:
            raise AdvtuneError(f"{vw}: variant name {v['name']!r} used twice")
        seen.add(v["name"])
        _check_numbers(v, vw)
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise AdvtuneError(f"{where}: seed must be an integer in [0, 2^63), got {seed!r}")
    return cfg


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
        for val in _as_list(v[key]):
            try:
                n = parse_number(val)
            except AdvtuneError:
                raise AdvtuneError(f"{where}: {key} must be a number, got {val!r}") from None
            if not math.isfinite(n) or not ok(n):
                raise AdvtuneError(f"{where}: {key} = {val!r} is out of range")


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def with_recipe(v: dict) -> dict:
    """`recipe: harden` fills a fine-tuning variant with `advtune harden`'s default recipe (the keys the
    variant sets itself win), so an experiment measures exactly what the command runs."""
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
        **(v.get("train") or {}),
    }
    return {**filled, **v, "train": train}


def expand_variants(cfg: dict) -> list[dict]:
    """List-valued sweepable keys (eps, share, attack, criterion, select) become one variant each;
    the threat's eps list applies to every variant."""
    out = []
    eps_all = _as_list(cfg["threat"]["eps"])
    for v in cfg["variants"]:
        v = with_recipe(dict(v))
        v.setdefault("kind", "finetune")
        v.setdefault("eps", eps_all if len(eps_all) > 1 else eps_all[0])
        axes = [(k, _as_list(v[k])) for k in SWEEPABLE if k in v and isinstance(v[k], (list, tuple))]
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
        raise AdvtuneError(f"variant names collide after sweeping: {', '.join(sorted(dup))}; rename the variants")
    return out


INT_KEYS = {f.name for f in dataclasses.fields(TrainConfig) if f.type == "int"}


def _train_config(base: dict | None, over: dict | None, seed: int):

    merged = {**(base or {}), **(over or {})}
    for k, v in merged.items():
        if k in ("optimizer", "schedule"):
            continue
        n = parse_number(v)  # YAML reads 1e-3 as a string; 8/255 is a fraction
        if k in INT_KEYS:
            if n != int(n):
                raise AdvtuneError(f"train.{k} must be an integer, got {v!r}")
            n = int(n)
        merged[k] = n
    return TrainConfig(seed=seed, **merged)


def _eps_value(v: Any) -> float:

    return parse_number(v)


def run(
    config: str | Path | dict, out: str | Path, *, device: str | None = None, only: list[str] | None = None
) -> list[dict]:
    """Run every variant not yet finished, evaluate it with the protocol, write results.{json,csv}."""

    cfg = load_config(config) if not isinstance(config, dict) else validate_config(config)
    out = Path(out)
    on_main(lambda: out.mkdir(parents=True, exist_ok=True))  # torchrun: rank 0 alone creates folders
    seed = int(cfg.get("seed", 0))
    device = device or cfg.get("device", "auto")
    data_dir = cfg.get("data_dir") or cfg["base"].get("data_dir")
    norm = cfg["threat"].get("norm", "linf")
    ev = cfg["evaluation"]
    variants = expand_variants(cfg)
    _refuse_changed_variants(out, variants)  # before anything of a finished experiment is rewritten
    atomic_write_json(
        out / files.EXPERIMENT, {"config": cfg, "source": str(config) if not isinstance(config, dict) else None}
    )
    if only:
        missing = [o for o in only if o not in {v["name"] for v in variants}]
        if missing:
            raise AdvtuneError(
                f"--only {missing[0]!r}: no such variant; variants: {', '.join(v['name'] for v in variants)}"
            )
        variants = [v for v in variants if v["name"] in only]

    def finished(folder: Path) -> bool:
        return (folder / files.SUMMARY).is_file() and (folder / files.evaluation(EVAL_NAME)).is_file()

    def started(folder: Path) -> bool:
        return (folder / files.CONFIG).is_file()

    # the base model: a pretrained run, or trained here once
    base = cfg["base"]
    if base.get("pretrained"):
        base_dir = Path(base["pretrained"])
        if not (base_dir / files.WEIGHTS).is_file():
            raise AdvtuneError(f"base.pretrained: {base_dir} holds no trained model; train it first or fix the path")
    else:
        base_dir = out / "standard"
        if not (base_dir / files.SUMMARY).is_file():
            log.info("experiment %s: training the base model", cfg.get("name", out.name))
            train_job.run(
                TrainRun(
                    dataset=base["dataset"],
                    model=base["model"],
                    out=str(base_dir),
                    data_dir=data_dir,
                    limit=base.get("limit"),
                    limit_test=base.get("limit_test"),
                    device=device,
                    train=_train_config(base.get("train"), None, seed),
                    resume=started(base_dir),
                    overwrite=base_dir.exists() and not started(base_dir),
                )
            )
    analysis_cfg = cfg.get("analysis") or {}
    analyses: dict[float, Path] = {}

    def analysis_for(eps: float) -> Path:
        if eps in analyses:
            return analyses[eps]
        folder = analysis_folder(out, cfg, eps)
        if (folder / files.SUMMARY).is_file() and read_json(folder / files.SUMMARY, "analysis summary")["threat"][
            "eps"
        ] != eps:
            raise AdvtuneError(f"{folder} was analysed at another eps; delete it or use a new --out")
        if not (folder / files.SUMMARY).is_file():
            kw = {
                k: tuple(analysis_cfg[k]) if k in ("criteria", "shares", "random_seeds") else analysis_cfg[k]
                for k in ANALYSIS_KEYS
                if k in analysis_cfg
            }
            analyze_job.run(
                AnalyzeRun(
                    base=str(base_dir),
                    out=str(folder),
                    eps=eps,
                    norm=norm,
                    seed=seed,
                    data_dir=data_dir,
                    device=device,
                    overwrite=folder.exists(),
                    **kw,
                )
            )
        analyses[eps] = folder
        return folder

    # each variant's resolved settings, as first run: a re-run with other settings is refused, never mixed in
    settings_file = out / "variant-settings.json"
    recorded = read_json(settings_file, "variant settings") if settings_file.is_file() else {}
    for v in variants:
        folder = out / v["name"]
        # a variant run with other settings was refused up front (_refuse_changed_variants); one recorded but
        # with nothing of it on disk (refused, or its folder deleted) starts afresh with the settings it has now
        if finished(folder):
            log.info("variant %s: finished earlier, skipped", v["name"])
            continue
        recorded[v["name"]] = _settings(v)
        atomic_write_json(settings_file, recorded)
        eps = _eps_value(v["eps"])
        kind = v["kind"]
        if kind == "standard":
            model_dir = base_dir
        elif kind == "train":
            model_dir = folder
            if not (folder / files.SUMMARY).is_file():
                train_job.run(
                    TrainRun(
                        dataset=base.get("dataset") or _base_dataset(base_dir),
                        model=v.get("model") or base.get("model") or _base_model(base_dir),
                        out=str(folder),
                        data_dir=data_dir,
                        limit=v.get("limit", base.get("limit")),
                        limit_test=base.get("limit_test"),
                        device=device,
                        adversarial=v.get("attack"),
                        norm=norm,
                        eps=eps if v.get("attack") else None,
                        attack_mode=v.get("attack_mode", "eval"),
                        eps_warmup=float(v.get("eps_warmup", 0.0)),
                        guard=v.get("guard"),
                        train=_train_config(base.get("train"), v.get("train"), seed),
                        budget=_budget(v),
                        points=_points(v),
                        resume=started(folder),
                        overwrite=folder.exists() and not started(folder),
                    )
                )
        else:
            model_dir = folder
            if not (folder / files.SUMMARY).is_file():
                select = v.get("select", "top")
                if select == "top":
                    select = str(analysis_for(eps))
                if v.get("params_like"):  # the control: as many trainable parameters as another variant's selection
                    v = {**v, "params": _trainable_of(out, v["params_like"], v["name"])}
                finetune_job.run(
                    FinetuneRun(
                        base=str(base_dir),
                        out=str(folder),
                        eps=eps,
                        select=select,
                        share=float(v.get("share", 0.1)),
                        criterion=v.get("criterion", "taylor"),
                        per_layer=bool(v.get("per_layer", False)),
                        attack=v.get("attack", "pgd:steps=10"),
                        norm=norm,
                        attack_mode=v.get("attack_mode", "eval"),
                        guard=v.get("guard"),
                        eps_warmup=float(v.get("eps_warmup", 0.0)),
                        train=_train_config({"epochs": 1}, v.get("train"), seed),
                        data_dir=data_dir,
                        limit=v.get("limit", base.get("limit")),
                        limit_test=base.get("limit_test"),
                        params=_params(v),
                        granularity=v.get("granularity", "unit"),
                        budget=_budget(v),
                        points=_points(v),
                        monitor_test=0,
                        device=device,
                        resume=started(folder),
                        overwrite=folder.exists() and not started(folder),
                    )
                )

        def protocol(run_dir: Path, record_dir: Path) -> dict:
            return evaluate_job.run(
                EvaluateRun(
                    run=str(run_dir),
                    eps=(eps,),
                    attacks=ev.get("attacks"),
                    suite=ev.get("suite"),
                    norm=norm,
                    limit_test=ev.get("limit_test", ev.get("limit", 1000)),
                    batch_size=ev.get("batch_size", 256),
                    cascade=bool(ev.get("cascade", True)),
                    name=EVAL_NAME,
                    record_dir=str(record_dir),
                    seed=seed,
                    data_dir=data_dir,
                    device=device,
                )
            )

        # the curve: every snapshot along the run gets the same protocol (resumable: done ones are kept)
        snaps = list_snapshots(folder) if kind != "standard" else []
        for i, (step, snap) in enumerate(snaps):
            if not (snap / files.evaluation(EVAL_NAME)).is_file():
                log.info("variant %s: evaluating snapshot %d/%d (step %d)", v["name"], i + 1, len(snaps), step)
                protocol(snap, snap)
        final_snap = _same_point(folder, snaps)
        if final_snap is not None:  # the run ended on its last snapshot: that evaluation is the final one
            atomic_write_text(
                folder / files.evaluation(EVAL_NAME), (final_snap / files.evaluation(EVAL_NAME)).read_text()
            )
            record = read_json(final_snap / files.evaluation(EVAL_NAME), "evaluation")  # what every rank can read
        else:
            record = protocol(model_dir, folder)
        if kind == "standard" and model_dir != folder:
            _link_standard(folder, model_dir)
        log.info(
            "variant %s: clean %.2f%%, worst case %.2f%%",
            v["name"],
            100 * record["clean_accuracy"],
            100 * record["worst_case_accuracy"],
        )
    rows = collect_results(out, expand_variants(cfg), base_dir, base.get("limit"))
    write_results(out, rows)
    return rows


def _finite(v: dict, key: str) -> float:

    n = parse_number(v[key])
    if not math.isfinite(n) or n <= 0:
        raise AdvtuneError(f"variant {v['name']}: {key} must be a positive finite number, got {v[key]!r}")
    return n


def _settings(v: dict) -> dict:
    """A variant's resolved settings as variant-settings.json records them."""
    return {k: val for k, val in v.items() if k != "sweep_of"}


def _refuse_changed_variants(out: Path, variants: list[dict]) -> None:
    """A variant with something on disk (its run or its evaluation) that was run with other settings
    is refused before anything of the experiment is rewritten: never mixed in."""
    path = out / "variant-settings.json"
    if not path.is_file():
        return
    recorded = read_json(path, "variant settings")
    for v in variants:
        folder = out / v["name"]
        exists = (folder / files.CONFIG).is_file() or (folder / files.evaluation(EVAL_NAME)).is_file()
        if exists and v["name"] in recorded and recorded[v["name"]] != _settings(v):
            raise AdvtuneError(
                f"variant {v['name']} in {out} was run with other settings; use a new --out, "
                f"or delete {folder} to run it again"
            )


def _budget(v: dict) -> int | None:
    return None if v.get("budget") is None else int(_finite(v, "budget"))


def _points(v: dict) -> int:
    n = v.get("points", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise AdvtuneError(
            f"variant {v['name']}: points must be a non-negative integer (snapshots along the run), got {n!r}"
        )
    return n


def _params(v: dict) -> float | int | None:
    if v.get("params") is None:
        return None
    n = _finite(v, "params")
    return n if n < 1 else int(n)


def _trainable_of(out: Path, other: str, me: str) -> int:
    summary = out / other / files.SUMMARY
    if not summary.is_file():
        raise AdvtuneError(
            f"variant {me}: params_like: {other} needs {other} to run first (list it earlier in the config)"
        )
    sel = read_json(summary, "summary").get("selection") or {}
    if not sel.get("trainable_params"):
        raise AdvtuneError(
            f"variant {me}: params_like: {other} trained no selection (select: all?); give params: instead"
        )
    return int(sel["trainable_params"])


def _same_point(folder: Path, snaps: list[tuple[int, Path]]) -> Path | None:
    """The last snapshot when it is the run's final model (same training cost), else None."""
    if not snaps or not (folder / files.COST).is_file():
        return None
    last = snaps[-1][1]
    final = read_json(folder / files.COST, "cost")
    mine = read_json(last / files.COST, "cost")
    return last if mine.get("grad_evals") == final.get("grad_evals") else None


def analysis_folder(out: Path, cfg: dict | None, eps: float) -> Path:
    """`analysis/` when the experiment has one eps, else `analysis-eps<eps>/`."""
    single = out / files.ANALYSIS
    per_eps = out / f"analysis-eps{eps:g}"
    if cfg is None:  # reading records: whichever exists
        return per_eps if per_eps.is_dir() else single
    eps_all = {_eps_value(e) for e in _as_list(cfg["threat"]["eps"])}
    eps_all |= {_eps_value(e) for v in cfg["variants"] for e in _as_list(v.get("eps", []))}
    return single if eps_all == {eps} else per_eps


def _base_dataset(base_dir: Path) -> str:
    return read_json(base_dir / files.CONFIG, "base config")["run"]["dataset"]


def _base_model(base_dir: Path) -> str:
    return read_json(base_dir / files.MODEL_META, "base model")["architecture"]


def _link_standard(folder: Path, model_dir: Path) -> None:
    """The `standard` variant evaluates the base model itself: its folder holds the evaluation and
    points at the model's run folder."""
    atomic_write_json(folder / "variant.json", {"kind": "standard", "model_dir": str(model_dir)})
    src = model_dir / files.SUMMARY
    if src.is_file():
        atomic_write_text(folder / files.SUMMARY, src.read_text())


def collect_results(out: Path, variants: list[dict], base_dir: Path, base_limit: int | None = None) -> list[dict]:
    """One row per variant from its records (nothing is recomputed: the report reads these)."""
    rows = []
    base_cost = _cost(base_dir)
    for v in variants:
        folder = out / v["name"]
        ev_path = folder / files.evaluation(EVAL_NAME)
        if not ev_path.is_file():
            continue
        ev = read_json(ev_path, "evaluation")
        kind = v["kind"]
        cost = base_cost if kind == "standard" else _cost(folder)
        analysis_cost = {}
        if kind == "finetune" and str(v.get("select", "top")) == "top":
            a = analysis_folder(out, None, _eps_value(v["eps"]))
            analysis_cost = _cost(a) if a.is_dir() else {}
        summary = read_json(folder / files.SUMMARY, "summary") if (folder / files.SUMMARY).is_file() else {}
        sel = summary.get("selection") or {}
        row = {
            "variant": v["name"],
            "kind": kind,
            "sweep_of": v.get("sweep_of"),
            "eps": _eps_value(v["eps"]),
            "select": v.get("select", "top") if kind == "finetune" else None,
            "share": float(v.get("share", 0.1))
            if kind == "finetune"
            and v.get("select", "top") in ("top", "random")
            and v.get("params") is None
            and not v.get("params_like")
            else None,
            "params_budget": (sel.get("trainable_params") if v.get("params_like") else v.get("params"))
            if kind == "finetune"
            else None,
            "params_like": v.get("params_like"),
            "granularity": v.get("granularity", "unit")
            if kind == "finetune" and v.get("select", "top") == "top"
            else None,
            "criterion": v.get("criterion", "taylor")
            if kind == "finetune" and v.get("select", "top") == "top"
            else None,
            "attack": v.get("attack")
            if kind == "train"
            else v.get("attack", "pgd:steps=10")
            if kind == "finetune"
            else None,
            "clean_acc": ev["clean_accuracy"],
            "robust_acc": ev["worst_case_accuracy"],
            **{f"acc[{k}]": a for k, a in ev["accuracy"].items()},
            "suspect": "; ".join(ev.get("suspect", [])),
            "grad_evals": cost.get("grad_evals", 0),
            "analysis_grad_evals": analysis_cost.get("grad_evals", 0),
            "base_grad_evals": base_cost.get("grad_evals", 0) if kind == "finetune" else 0,
            "wall_s": cost.get("wall_s", 0.0),
            "analysis_wall_s": analysis_cost.get("wall_s", 0.0),
            "base_wall_s": base_cost.get("wall_s", 0.0) if kind == "finetune" else 0.0,
            "flops": cost.get("flops", 0.0),
            "trainable_params": sel.get("trainable_params") or cost.get("trainable_params"),
            "total_params": cost.get("total_params"),
            "epochs": summary.get("epochs"),
            "stopped": summary.get("stopped"),
            "eval_examples": ev.get("examples"),
            "eval_attacks": ",".join(ev.get("attacks", [])),
            "eval_grad_evals": sum(ev.get("grad_evals", {}).values()),
            "param_share": (sel.get("trainable_params") or cost.get("trainable_params") or 0)
            / max(cost.get("total_params") or 1, 1),
            "reference": bool(v.get("reference", kind == "train" and bool(v.get("attack")))),
            # what the variant was, for the report's rows: its data, budget, warm-up and where its units sit
            "train_examples": v.get("limit", base_limit) if kind != "standard" else base_limit,
            "budget": _budget(v) if kind != "standard" else None,
            "eps_warmup": float(v.get("eps_warmup", 0.0)) if kind != "standard" else None,
            "selected_by_layer": sel.get("by_layer"),
            "curve": _curve(folder, kind, cost, ev),
        }
        rows.append(row)
    return rows


def _curve(folder: Path, kind: str, final_cost: dict, final_eval: dict) -> list[dict]:
    """The run's robustness-vs-compute points: each evaluated snapshot, and the final model when it
    is not its last snapshot. Training cost only; the frontier adds the base and analysis costs."""

    pts = []
    if kind != "standard":
        for step, snap in list_snapshots(folder):
            e = snap / files.evaluation(EVAL_NAME)
            if e.is_file():
                ev, cost = read_json(e, "evaluation"), _cost(snap)
                pts.append(
                    {
                        "step": step,
                        "grad_evals": cost.get("grad_evals", 0),
                        "wall_s": cost.get("wall_s", 0.0),
                        "flops": cost.get("flops", 0.0),
                        "clean_acc": ev["clean_accuracy"],
                        "robust_acc": ev["worst_case_accuracy"],
                        "suspect": "; ".join(ev.get("suspect", [])),
                    }
                )
    if not pts or pts[-1]["grad_evals"] != final_cost.get("grad_evals", 0):
        pts.append(
            {
                "step": None,
                "grad_evals": final_cost.get("grad_evals", 0),
                "wall_s": final_cost.get("wall_s", 0.0),
                "flops": final_cost.get("flops", 0.0),
                "clean_acc": final_eval["clean_accuracy"],
                "robust_acc": final_eval["worst_case_accuracy"],
                "suspect": "; ".join(final_eval.get("suspect", [])),
            }
        )
    return pts


def _cost(folder: Path) -> dict:
    p = folder / files.COST
    return read_json(p, "cost") if p.is_file() else {}


def _csv(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def frontier_points(rows: list[dict]) -> list[dict]:
    """One flat row per (variant, point) with the cost counted the same way on every curve:
    total = this run's training + the base model's training (fine-tuning) + the analysis (selective)."""
    out = []
    for r in rows:
        for p in r.get("curve") or []:
            extra = (r.get("base_grad_evals") or 0) + (r.get("analysis_grad_evals") or 0)
            out.append(
                {
                    "variant": r["variant"],
                    "kind": r["kind"],
                    "select": r.get("select"),
                    "eps": r["eps"],
                    "reference": r.get("reference", False),
                    "step": p["step"],
                    "train_grad_evals": p["grad_evals"],
                    "base_grad_evals": r.get("base_grad_evals") or 0,
                    "analysis_grad_evals": r.get("analysis_grad_evals") or 0,
                    "total_grad_evals": p["grad_evals"] + extra if r["kind"] != "standard" else p["grad_evals"],
                    "wall_s": p["wall_s"],
                    "clean_acc": p["clean_acc"],
                    "robust_acc": p["robust_acc"],
                    "trainable_params": r.get("trainable_params"),
                    "param_share": r.get("param_share"),
                    "suspect": p.get("suspect", ""),
                }
            )
    return out


def write_results(out: Path, rows: list[dict]) -> None:
    atomic_write_json(out / files.RESULTS, {"rows": rows})
    atomic_write_text(
        out / files.RESULTS_CSV,
        _csv([{k: v for k, v in r.items() if k not in ("curve", "selected_by_layer")} for r in rows]),
    )
    points = frontier_points(rows)
    if any(r["step"] is not None for r in points):
        atomic_write_json(out / files.FRONTIER, {"points": points})
        atomic_write_text(out / "frontier.csv", _csv(points))


def format_results(rows: list[dict]) -> str:
    """The terminal table: robustness next to what it cost."""
    lines = [
        f"{'variant':24s} {'clean':>7s} {'robust':>7s} {'grad evals':>12s} {'+analysis':>10s} {'wall s':>8s} "
        f"{'trainable':>10s}  note"
    ]
    for r in rows:
        lines.append(
            f"{r['variant'][:24]:24s} {100 * r['clean_acc']:6.2f}% {100 * r['robust_acc']:6.2f}% "
            f"{r['grad_evals']:12,d} {r['analysis_grad_evals']:10,d} {r['wall_s']:8.1f} "
            f"{r['trainable_params'] or 0:10,d}  " + ("SUSPECT " if r["suspect"] else "") + (r["stopped"] or "")
        )
    return "\n".join(lines)


def experiment_info(folder: str | Path) -> dict:
    """What an experiment folder recorded: its config, the variants' result rows, its files."""
    folder = Path(folder)
    record = read_json(folder / files.EXPERIMENT, "experiment record")
    rows = read_json(folder / files.RESULTS, "results")["rows"] if (folder / files.RESULTS).is_file() else []
    return {
        "run": str(folder),
        "kind": "experiment",
        "experiment": record,
        "rows": rows,
        "files": sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")),
    }


def format_experiment_info(info: dict) -> str:
    cfg = info["experiment"].get("config", {})
    threat = cfg.get("threat", {})
    lines = [
        f"experiment {info['run']}   name {cfg.get('name', '?')}   "
        f"source {info['experiment'].get('source') or '(dict)'}",
        f"threat     {threat.get('norm', 'linf')} eps={threat.get('eps')}   {len(cfg.get('variants', []))} variants, "
        f"{len(info['rows'])} finished",
    ]
    if info["rows"]:
        lines += ["", format_results(info["rows"]), ""]
    lines.append("files      " + ", ".join(info["files"]))
    return "\n".join(lines)
