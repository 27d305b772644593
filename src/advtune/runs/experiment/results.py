"""An experiment's results: one row per variant read from its records (the config it ran, its
cost, its evaluation; nothing recomputed), the frontier's points, results.{json,csv}, the terminal
table and `advtune info` of an experiment folder."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ... import filenames as files
from ...cost import CostRecord
from ...errors import AdvtuneError
from ...frontier import Frontier, FrontierPoint
from ...settings import default
from ...storage import atomic_write_json, atomic_write_text, read_json
from ...train.config import REGROW_HOW, TrainConfig
from ..common import list_snapshots, whole_training_cost
from .config import EVAL_NAME
from .variants import RECIPE_TRAIN_KEYS, analysis_folder, eps_value, expand_variants

SELECTIVE = ("finetune", "harden")  # kinds that start from the base model (its cost counts)


def what_ran(folder: Path, kind: str, v: dict) -> dict:
    """What a variant ran, as its run folder's config.json recorded it (defaults resolved by the job
    itself, so a row never guesses one): select, share, params, granularity, criterion, attack,
    eps_warmup, budget, limit, and the training settings that tell two recipes apart (optimizer, lr,
    schedule, batch_size, ema, augment, regrow)."""
    if kind == "standard" or not (folder / files.CONFIG).is_file():
        return {}
    run = read_json(folder / files.CONFIG, "config").get("run", {})
    if kind == "train":
        train = _trained(run.get("train") or {})
        return {"attack": run.get("adversarial"), "eps_warmup": run.get("eps_warmup"), **_cost_keys(run), **train}
    if kind == "harden":
        r = run.get("recipe", {})
        keys = ("granularity", "criterion", "attack", "eps_warmup", "params", "norms", "head")
        quotas = r.get("granularity") == "probe" and r.get("probe_quotas", False) is not False  # None: harden's auto
        ran = {"select": "top", "share": None, **{k: r.get(k) for k in keys}, "probe_quotas": quotas}
        # harden moves its mask the finetune defaults' way (its recipe has no regrow_every / regrow_score / ...)
        return {**ran, **_cost_keys(run), **_trained(r)}
    select = str(run.get("select", "all"))
    adapters = select == "lowrank" or select.startswith("lowrank:")  # adapters on every layer, no analysis
    probe = run.get("granularity") == "probe"
    if probe:  # the probe's mask, whatever --select said (`all` read as full fine-tuning)
        select, adapters = "top", False
    elif adapters:
        select = "lowrank"
    elif select not in ("all", "random") and not select.startswith("layers:"):
        select = "top"  # an analysis folder
    by_share = select in ("top", "random") and run.get("params") is None
    granular = select == "top" or (select == "random" and run.get("granularity") == "sparse")  # + the sparse control
    quotas = bool(run.get("probe_quotas")) and granular  # the probe reads the analysis (its criterion) only so
    return {
        "select": select,
        "share": run.get("share") if by_share else None,
        "params": run.get("params"),
        "granularity": "lowrank" if adapters else run.get("granularity") if granular else None,
        "norms": run.get("norms"),
        "head": run.get("head"),
        "probe_quotas": quotas,
        "criterion": run.get("criterion") if select == "top" and (quotas or not probe) else None,
        "attack": run.get("attack"),
        "eps_warmup": run.get("eps_warmup"),
        **_cost_keys(run),
        **_trained(run.get("train") or {}),
    }


def _cost_keys(run: dict) -> dict:
    return {"budget": run.get("budget"), "limit": run.get("limit")}


# how a variant trained, in its row: harden's recipe keys and how a moving mask moved
TRAIN_KEYS = (*RECIPE_TRAIN_KEYS, *REGROW_HOW)


def _trained(train: dict) -> dict:
    """The training settings a run recorded (a train/finetune run's `train` block, harden's recipe); a regrow_ setting
    the record lacks where the mask moved is the default it ran."""
    moved = {k: default(TrainConfig, k) for k in TRAIN_KEYS if k.startswith("regrow_")} if train.get("regrow") else {}
    return {k: train.get(k, moved.get(k)) for k in TRAIN_KEYS}


def collect_results(out: Path, variants: list[dict], base_dir: Path, base_limit: int | None = None) -> list[dict]:
    """One row per variant from its records (nothing is recomputed: the report reads these)."""
    rows = []
    base_cost = read_cost(base_dir)  # the standard row's own record
    # what a fine-tuned model's total counts for its base: {} where that is not the base's whole training (weights
    # brought in, a fine-tuned base): None in the rows, "not recorded" in the report, never a zero
    base_whole = whole_training_cost(base_dir)
    for v in variants:
        folder = out / v["name"]
        ev_path = folder / files.evaluation(EVAL_NAME)
        if not ev_path.is_file():
            continue
        ev = read_json(ev_path, "evaluation")
        kind = v["kind"]
        ran = what_ran(folder, kind, v)
        cost = base_cost if kind == "standard" else read_cost(folder, required=True)
        analysis_cost = {}
        if kind == "harden":
            analysis_cost = read_cost(folder / files.ANALYSIS, required=True)
        elif kind == "finetune" and ran.get("select") == "top":
            a = analysis_folder(out, None, eps_value(v["eps"]))
            analysis_cost = read_cost(a) if a.is_dir() else {}
        summary = read_json(folder / files.SUMMARY, "summary") if (folder / files.SUMMARY).is_file() else {}
        sel = summary.get("selection") or {}
        selective = kind in SELECTIVE
        # harden's held-out checkpoint choice (PGD on its held-out split) is part of its cost, as harden counts it
        held_out = (summary.get("cost") or {}).get("checkpoint_grad_evals", 0) if kind == "harden" else 0
        choice = (summary.get("checkpoints") or {}) if kind == "harden" else {}  # its wall time and FLOPs
        cost = {
            **cost,
            "grad_evals": cost.get("grad_evals", 0) + (held_out or 0),
            "wall_s": cost.get("wall_s", 0.0) + choice.get("wall_s", 0.0),
            "flops": cost.get("flops", 0.0) + choice.get("flops", 0.0),
        }
        row = {
            "variant": v["name"],
            "kind": kind,
            "sweep_of": v.get("sweep_of"),
            "eps": eps_value(v["eps"]),
            "select": ran.get("select"),
            "share": ran.get("share"),
            "params_budget": (sel.get("trainable_params") if v.get("params_like") else ran.get("params")),
            "params_like": v.get("params_like"),
            "granularity": ran.get("granularity"),
            "norms": bool(ran.get("norms")),  # the normalization layers trained too (--norms)
            "head": bool(ran.get("head")),  # the output layer trained whole (--head)
            "probe_quotas": bool(ran.get("probe_quotas")),  # the probe rule's mask within the analysis' layer quotas
            "criterion": ran.get("criterion"),
            "attack": ran.get("attack"),
            # how it trained (records from before these columns: None), so two variants that differ only there
            # are told apart in results.json / results.csv (the report's description names a moving mask)
            **{k: ran.get(k) for k in TRAIN_KEYS},
            "clean_acc": ev["clean_accuracy"],
            "robust_acc": ev["worst_case_accuracy"],
            **{f"acc[{k}]": a for k, a in ev["accuracy"].items()},
            "suspect": "; ".join(ev.get("suspect", [])),
            "grad_evals": cost.get("grad_evals", 0),
            # the standard row of a base brought in (--weights, a fine-tuned base): its training is not in its record
            **({"base_recorded": bool(base_whole)} if kind == "standard" else {}),
            # the sparse rule's entry scoring is part of choosing what trains: counted with the analysis
            "analysis_grad_evals": analysis_cost.get("grad_evals", 0) + (sel.get("scoring") or {}).get("grad_evals", 0),
            "base_grad_evals": (base_whole.get("grad_evals", 0) if base_whole else None) if selective else 0,
            "wall_s": cost.get("wall_s", 0.0),
            "analysis_wall_s": analysis_cost.get("wall_s", 0.0) + (sel.get("scoring") or {}).get("wall_s", 0.0),
            "base_wall_s": (base_whole.get("wall_s", 0.0) if base_whole else None) if selective else 0.0,
            "flops": cost.get("flops", 0.0),
            "trainable_params": sel.get("trainable_params") or cost.get("trainable_params"),
            "total_params": cost.get("total_params"),
            "epochs": summary.get("epochs"),
            "stopped": summary.get("stopped"),
            "eval_examples": ev.get("examples"),
            "eval_attacks": ",".join(ev.get("attacks", [])),
            "eval_grad_evals": sum(ev.get("grad_evals", {}).values()),
            # None where the record has no model size (an old cost.json): never a count read as a share
            "param_share": (sel.get("trainable_params") or cost.get("trainable_params") or 0) / cost["total_params"]
            if cost.get("total_params")
            else None,
            "reference": bool(v.get("reference", kind == "train" and bool(ran.get("attack")))),
            # what the variant was, for the report's rows: its data, budget, warm-up and where its units sit
            "train_examples": ran.get("limit", base_limit) if kind != "standard" else base_limit,
            "budget": ran.get("budget") if kind != "standard" else None,
            "eps_warmup": float(ran.get("eps_warmup") or 0.0) if kind != "standard" else None,
            "selected_by_layer": sel.get("by_layer"),
            # the model harden returns (the held-out choice among its checkpoints) cost its choice too: its point
            # on the frontier sits after the last snapshot's
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
                ev, cost = read_json(e, "evaluation"), read_cost(snap, required=True)
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


def read_cost(folder: Path, required: bool = False) -> dict:
    """A run folder's cost.json, checked (`CostRecord`); {} when it has none, unless `required` (a variant that trained:
    its row would read a cost of 0 and win every comparison of cost)."""
    p = folder / files.COST
    if required and not p.is_file():
        raise AdvtuneError(
            f"{p} is missing: {folder.name}'s cost is not recorded, and its row would read 0; delete {folder} to run "
            "it again (or restore the file)"
        )
    return CostRecord.read(p).to_json() if p.is_file() else {}


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


def frontier_points(rows: list[dict]) -> list[FrontierPoint]:
    """One point per (variant, checkpoint) with the cost counted the same way on every curve:
    total = this run's training + the base model's training (fine-tuning) + the analysis (selective)."""
    out = []
    for r in rows:
        for p in r.get("curve") or []:
            extra = (r.get("base_grad_evals") or 0) + (r.get("analysis_grad_evals") or 0)
            out.append(
                FrontierPoint(
                    variant=r["variant"],
                    kind=r["kind"],
                    select=r.get("select"),
                    eps=r["eps"],
                    reference=r.get("reference", False),
                    step=p["step"],
                    train_grad_evals=p["grad_evals"],
                    base_grad_evals=r.get("base_grad_evals") or 0,
                    analysis_grad_evals=r.get("analysis_grad_evals") or 0,
                    total_grad_evals=p["grad_evals"] + extra if r["kind"] != "standard" else p["grad_evals"],
                    wall_s=p["wall_s"],
                    clean_acc=p["clean_acc"],
                    robust_acc=p["robust_acc"],
                    trainable_params=r.get("trainable_params"),
                    param_share=r.get("param_share"),
                    suspect=p.get("suspect", ""),
                )
            )
    return out


def write_results(out: Path, rows: list[dict], variants: list[str] | None = None) -> None:
    """results.json/csv and the frontier; `variants`: every variant the config names, so the report says which
    have no row yet (left out with --only, or not run to its evaluation yet: an interrupted experiment) instead of
    judging the rest as if complete."""
    done = {r["variant"] for r in rows}
    unfinished = [v for v in variants or [] if v not in done]
    atomic_write_json(out / files.RESULTS, {"rows": rows, "not_finished": unfinished})
    atomic_write_text(
        out / files.RESULTS_CSV,
        _csv([{k: v for k, v in r.items() if k not in ("curve", "selected_by_layer")} for r in rows]),
    )
    points = frontier_points(rows)
    if any(p.step is not None for p in points):
        atomic_write_json(out / files.FRONTIER, Frontier(tuple(points)).to_json())
        atomic_write_text(out / "frontier.csv", frontier_csv(points))


def frontier_csv(points: list[FrontierPoint]) -> str:
    """frontier.csv: one row per point, the columns of frontier.json."""
    return _csv([p.to_json() for p in points])


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
    base = next((r.get("base_grad_evals") for r in rows if r.get("base_grad_evals")), None)  # the report's basis
    if base:
        lines.append(
            f"(grad evals: each variant's own training; the report's totals add the base's {base:,} to a fine-tuning)"
        )
    return "\n".join(lines)


def experiment_info(folder: str | Path) -> dict:
    """What an experiment folder recorded: its config, the variants' result rows, its files."""
    folder = Path(folder)
    record = read_json(folder / files.EXPERIMENT, "experiment record")
    results = read_json(folder / files.RESULTS, "results") if (folder / files.RESULTS).is_file() else {}
    return {
        "run": str(folder),
        "kind": "experiment",
        "experiment": record,
        "rows": results.get("rows", []),
        "not_finished": results.get("not_finished") or [],
        "files": sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")),
    }


def format_experiment_info(info: dict) -> str:
    cfg = info["experiment"].get("config", {})
    threat = cfg.get("threat", {})
    try:  # the runs a sweep makes, as the rows count them ("5 variants, 7 finished" compared YAML entries)
        planned = f"{len(expand_variants(cfg))} runs"
    except (AdvtuneError, KeyError, TypeError, AttributeError):
        planned = f"{len(cfg.get('variants', []))} variants"
    lines = [
        f"experiment {info['run']}   name {cfg.get('name', '?')}   "
        f"source {info['experiment'].get('source') or '(dict)'}",
        f"threat     {threat.get('norm', 'linf')} eps={threat.get('eps')}   {planned}, {len(info['rows'])} finished",
    ]
    if info.get("not_finished"):
        lines.append(f"not finished {', '.join(map(str, info['not_finished']))}")
    if info["rows"]:
        try:
            lines += ["", format_results(info["rows"]), ""]
        except (KeyError, TypeError, ValueError) as e:  # a row of another shape: one line, not a traceback
            raise AdvtuneError(
                f"{info['run']}: results.json has a row of an unexpected shape ({type(e).__name__}: {e}); re-run "
                "`advtune experiment` to rewrite it, or `advtune info --json` for the raw records"
            ) from None
    lines.append("files      " + ", ".join(info["files"]))
    return "\n".join(lines)
