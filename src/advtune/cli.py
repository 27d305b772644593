"""`advtune train | info | evaluate | analyze | finetune | harden | experiment | report | demo`.

Thin: each subcommand is `add_<cmd>_parser` + `run_<cmd>(args) -> int`, which builds the API's
config objects and calls the API. A YAML `--config` gives defaults, flags override them.
Errors for people (AdvtuneError) print as one line and exit 2.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import AdvtuneError

log = logging.getLogger("advtune")


def number(text: str) -> float:
    """A float that may be written as a fraction: `0.3`, `8/255`."""
    from .utils import parse_number

    try:
        return parse_number(text)
    except AdvtuneError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def budget_number(text: str) -> float | int:
    """A parameter budget: a share in (0, 1) or a whole number of entries (finite, positive)."""
    import math

    v = number(text)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive finite number (a share < 1 or a count of entries)"
        )
    if v >= 1 and v != int(v):
        raise argparse.ArgumentTypeError(f"{text!r}: a count of parameter entries must be whole (or give a share < 1)")
    return v if v < 1 else int(v)


def seed_number(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer seed") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"seed {v} is out of range: use an integer in [0, 2^63)")
    return v


def number_list(text: str) -> list[float]:
    return [number(t) for t in text.split(",") if t.strip()]


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("general")
    g.add_argument("--config", help="YAML file of defaults for this command's flags (flags override it)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:<i> (default: auto)")
    g.add_argument("--seed", type=seed_number, default=0, help="random seed, an integer in [0, 2^63) (default: 0)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or info logging")
    g.add_argument("--verbose", action="store_true", help="debug logging")


def _data_args(p: argparse.ArgumentParser, dataset_required: bool = True) -> None:
    from .data import list_datasets

    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=dataset_required, help="one of: " + ", ".join(list_datasets()))
    g.add_argument(
        "--data-dir", help="folder holding <dataset>/ (default: $ADVTUNE_DATA, cache, ../shared/data, download)"
    )
    g.add_argument("--limit", type=int, help="use only the first N training examples")
    g.add_argument("--limit-test", type=int, help="use only the first N test examples")


def _train_args(p: argparse.ArgumentParser, epochs: int = 2, lr: float = 1e-3) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    g.add_argument("--lr", type=number, default=lr)
    g.add_argument("--momentum", type=number, default=0.9)
    g.add_argument("--weight-decay", type=number, default=0.0)
    g.add_argument(
        "--schedule",
        choices=["constant", "cosine", "step", "onecycle", "ssfd"],
        default="constant",
        help="learning-rate schedule; ssfd = slow start, fast decay (default: constant)",
    )
    g.add_argument("--warmup-epochs", type=number, default=0.0)
    g.add_argument(
        "--val", type=number, default=0, help="hold out N training examples (or a fraction < 1) for validation"
    )
    g.add_argument(
        "--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (default: each epoch)"
    )
    g.add_argument(
        "--budget",
        type=int,
        help="train for this many gradient evaluations (attack steps + update, per example) instead of --epochs",
    )
    g.add_argument(
        "--points", type=int, default=0, help="save this many snapshots along the run under snapshots/ (default: 0)"
    )
    g.add_argument("--out", required=True, help="run folder to write (runs/<name>)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")


def _train_config(args):
    from .train import TrainConfig

    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )


# ---------------------------------------------------------------- train


def add_train_parser(sub) -> None:
    from .models import list_models

    p = sub.add_parser(
        "train",
        help="train a model (standard or adversarial) into a run folder",
        description="Train a model by name on a dataset by name. Writes model.safetensors, "
        "model.json, config.json, metrics.jsonl, cost.json, summary.json to --out.",
    )
    _data_args(p)
    p.add_argument(
        "--model",
        required=True,
        help="one of: " + ", ".join(list_models()) + "; or your own: path/to/file.py:factory or "
        "package.module:factory (a function returning an nn.Module on pixels in [0, 1]; it gets "
        "input_shape= and num_classes= if its signature names them)",
    )
    p.add_argument(
        "--weights",
        help="start from these weights (a .safetensors file of the model's state_dict); "
        "with --epochs 0 the run records the model as it is, for evaluate/analyze/harden",
    )
    _train_args(p)
    a = p.add_argument_group("adversarial training")
    a.add_argument(
        "--adversarial", metavar="ATTACK", help="train on adversarial examples of this attack spec, e.g. pgd:steps=10"
    )
    a.add_argument("--eps", type=number, help="perturbation budget in pixel units, e.g. 0.3 or 8/255")
    a.add_argument("--norm", choices=["linf", "l2"], default="linf")
    a.add_argument("--attack-mode", choices=["eval", "train"], default="eval", help="model mode while the attack runs")
    a.add_argument(
        "--eps-warmup", type=number, default=0.0, help="share of training over which eps ramps up from 0 (e.g. 0.3)"
    )
    a.add_argument(
        "--guard",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="catastrophic-overfitting guard (default: on for FGSM attacks)",
    )
    _common(p)


def run_train(args) -> int:
    from .runs import train as train_job
    from .runs.train import TrainRun

    run = TrainRun(
        dataset=args.dataset,
        model=args.model,
        out=args.out,
        train=_train_config(args),
        weights=args.weights,
        data_dir=args.data_dir,
        limit=args.limit,
        limit_test=args.limit_test,
        val=args.val,
        device=args.device,
        adversarial=args.adversarial,
        norm=args.norm,
        eps=args.eps,
        attack_mode=args.attack_mode,
        eps_warmup=args.eps_warmup,
        guard=args.guard,
        budget=args.budget,
        points=args.points,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    summary = train_job.run(run)
    print(f"test accuracy: {100 * summary['test_acc']:.2f}% ({summary['test_examples']} examples)  -> {args.out}")
    return 0


# ---------------------------------------------------------------- evaluate


def add_evaluate_parser(sub) -> None:
    from .attacks import list_attacks

    p = sub.add_parser(
        "evaluate",
        help="clean and robust accuracy of a run under attacks, with the gradient-masking gate",
        description="Evaluate RUN on its test split. Writes RUN/eval-<name>.json (and .png with --plot). "
        "Attacks: " + ", ".join(list_attacks()),
    )
    p.add_argument("run", help="run folder of the model to evaluate")
    p.add_argument("--attacks", help="comma list of attack specs, e.g. fgsm,pgd:steps=40,restarts=2,apgd-ce,apgd-t")
    p.add_argument(
        "--suite", choices=["standard", "quick"], help="standard = APGD-CE, APGD-T, Square; quick = FGSM, PGD-20"
    )
    p.add_argument(
        "--eps",
        type=number_list,
        required=True,
        help="one eps or a comma list for a curve, e.g. 0.3 or 0.1,0.2,0.3 or 8/255",
    )
    p.add_argument("--norm", choices=["linf", "l2"], default="linf")
    p.add_argument("--limit", type=int, default=1000, help="first N test examples (default: 1000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--cascade",
        action="store_true",
        help="run each attack only on samples still robust (cheaper; per-attack numbers cumulative)",
    )
    p.add_argument("--plot", action="store_true", help="with several eps: write the accuracy-vs-eps PNG")
    p.add_argument("--name", help="name of the record (eval-<name>.json)")
    p.add_argument("--data-dir")
    _common(p)


def run_evaluate(args) -> int:
    from .runs import evaluate as evaluate_job
    from .runs.evaluate import EvaluateRun, format_evaluation

    if not args.attacks and not args.suite:
        raise AdvtuneError("give --attacks (e.g. fgsm,pgd:steps=40) or --suite standard")
    run = EvaluateRun(
        run=args.run,
        eps=tuple(args.eps),
        attacks=args.attacks,
        suite=args.suite,
        norm=args.norm,
        limit=args.limit,
        batch_size=args.batch_size,
        cascade=args.cascade,
        plot=args.plot,
        name=args.name,
        seed=args.seed,
        data_dir=args.data_dir,
        device=args.device,
    )
    record = evaluate_job.run(run)
    print(format_evaluation(record))
    print(f"-> {record['path']}" + (f" (+ {record['plot']})" if record.get("plot") else ""))
    return 0


# ---------------------------------------------------------------- analyze


def add_analyze_parser(sub) -> None:
    from .vulnerability import list_criteria

    p = sub.add_parser(
        "analyze",
        help="vulnerability map of a trained run: per-component scores, per-layer summary, concentration curve",
        description="Score every conv channel / linear unit of BASE under an attack on training data, "
        "write scores (JSON, CSV), per-layer summaries, the concentration curve and plots to --out.",
    )
    p.add_argument("base", help="run folder of the trained model")
    p.add_argument("--attack", default="pgd:steps=20", help="attack spec (default: pgd:steps=20)")
    p.add_argument("--eps", type=number, required=True, help="perturbation budget in pixel units, e.g. 0.3 or 8/255")
    p.add_argument("--norm", choices=["linf", "l2"], default="linf")
    p.add_argument(
        "--criteria", default="activation-shift,taylor,restoration", help="comma list of: " + ", ".join(list_criteria())
    )
    p.add_argument(
        "--granularity", default="channel", help="channel (= unit): one conv channel or linear unit per component"
    )
    p.add_argument("--limit", type=int, default=2000, help="training examples to score (default: 2000)")
    p.add_argument(
        "--curve-limit", type=int, default=1000, help="training examples for the concentration curve (0: skip)"
    )
    p.add_argument(
        "--shares", type=number_list, default=None, help="shares for the concentration curve, e.g. 0.01,0.05,0.1,1"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data-dir")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    _common(p)


def run_analyze(args) -> int:
    from .runs import analyze as analyze_job
    from .runs.analyze import AnalyzeRun

    kw = {"shares": tuple(args.shares)} if args.shares else {}
    run = AnalyzeRun(
        base=args.base,
        out=args.out,
        eps=args.eps,
        attack=args.attack,
        norm=args.norm,
        criteria=tuple(c.strip() for c in args.criteria.split(",") if c.strip()),
        granularity=args.granularity,
        limit=args.limit,
        curve_limit=args.curve_limit,
        batch_size=args.batch_size,
        seed=args.seed,
        data_dir=args.data_dir,
        device=args.device,
        overwrite=args.overwrite,
        **kw,
    )
    s = analyze_job.run(run)
    print(
        f"scored {s['examples_scored']} training examples: clean {100 * s['clean_acc']:.1f}%, under {s['attack']} "
        f"{100 * s['adv_acc']:.1f}%"
    )
    for name, c in s["criteria"].items():
        line = f"  {name:17s} top: {', '.join(n for n, _ in c['top10'][:5])}"
        if "curve" in c:
            pts = {round(r["share"], 4): r for r in c["curve"]}
            at = [
                f"{100 * k:g}%: {100 * v['repaired']:.0f}% (random {100 * v['random_mean']:.0f}%)"
                for k, v in pts.items()
                if k in (0.01, 0.05, 0.1)
            ]
            line += "\n  " + " " * 17 + " errors repaired by restoring top " + "; ".join(at)
        print(line)
    for k, v in s.get("rank_agreement_with_restoration", {}).items():
        print(f"  rank agreement of {k} with restoration (Spearman): {v:.3f}")
    print(f"-> {args.out} (scores-*.json/csv, layers-*.json, concentration.json/png, layers.png)")
    return 0


# ---------------------------------------------------------------- finetune


def add_finetune_parser(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="adversarially fine-tune a trained run: selected components, all, or a random control",
        description="Adversarial fine-tuning of BASE (a run folder) through the one training loop. "
        "--select: all (full-network), random (control), layers:<a,b>, or an `advtune analyze` folder "
        "(top --share of its --criterion ranking).",
    )
    p.add_argument("base", help="run folder of the trained model")
    s = p.add_argument_group("selection")
    s.add_argument("--select", default="all", help="all | random | layers:<name,...> | <analyze folder> (default: all)")
    s.add_argument(
        "--share", type=number, default=0.1, help="share of components to fine-tune, in (0, 1] (default: 0.1)"
    )
    s.add_argument(
        "--criterion", default="taylor", help="score table of the analyze folder to rank by (default: taylor)"
    )
    s.add_argument("--per-layer", action="store_true", help="take the top share within each layer instead of globally")
    s.add_argument(
        "--params",
        type=budget_number,
        help="parameter budget instead of --share: entries (or a share < 1 of the "
        "model's) that the selection may train; with random: the matched control",
    )
    s.add_argument(
        "--granularity",
        choices=["unit", "layer"],
        default="unit",
        help="with --params and an analyze folder: best units, or whole layers (default: unit)",
    )
    a = p.add_argument_group("attack")
    a.add_argument(
        "--attack",
        default="pgd:steps=10",
        help="attack spec (pgd:steps=10, fgsm-rs, fgsm, ...) or trades[:steps=10,beta=6]",
    )
    a.add_argument("--eps", type=number, required=True, help="perturbation budget in pixel units, e.g. 0.3 or 8/255")
    a.add_argument("--norm", choices=["linf", "l2"], default="linf")
    a.add_argument("--attack-mode", choices=["eval", "train"], default="eval")
    a.add_argument(
        "--eps-warmup", type=number, default=0.0, help="share of training over which eps ramps up from 0 (e.g. 0.2)"
    )
    a.add_argument(
        "--guard",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="catastrophic-overfitting guard (default: on for FGSM attacks)",
    )
    a.add_argument("--monitor", type=int, default=500, help="test examples for the quick PGD-10 monitor (0: off)")
    _data_args(p, dataset_required=False)
    p.set_defaults(dataset=None)
    _train_args(p, epochs=1)
    _common(p)


def run_finetune(args) -> int:
    from .runs import finetune as finetune_job
    from .runs.finetune import FinetuneRun

    if args.dataset:
        raise AdvtuneError(
            "finetune uses the base run's dataset; drop --dataset (use --data-dir to point at its files)"
        )
    run = FinetuneRun(
        base=args.base,
        out=args.out,
        eps=args.eps,
        select=args.select,
        share=args.share,
        criterion=args.criterion,
        per_layer=args.per_layer,
        attack=args.attack,
        norm=args.norm,
        attack_mode=args.attack_mode,
        eps_warmup=args.eps_warmup,
        guard=args.guard,
        train=_train_config(args),
        data_dir=args.data_dir,
        limit=args.limit,
        limit_test=args.limit_test,
        val=args.val,
        monitor=args.monitor,
        params=args.params,
        granularity=args.granularity,
        budget=args.budget,
        points=args.points,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    s = finetune_job.run(run)
    sel = s.get("selection")
    what = f"{sel['units']} units, {sel['trainable_params']:,} params" if sel else "all parameters"
    quick = (
        f", PGD-10 (quick, {s['pgd10_examples']} ex.) {100 * s['pgd10_acc_quick']:.2f}%"
        if "pgd10_acc_quick" in s
        else ""
    )
    print(f"fine-tuned {what}: clean test accuracy {100 * s['test_acc']:.2f}%{quick}  -> {args.out}")
    return 0


# ---------------------------------------------------------------- experiment


def add_experiment_parser(sub) -> None:
    p = sub.add_parser(
        "experiment",
        help="run a YAML experiment: variants side by side, resumable",
        description="Run every variant of files.CONFIG not yet finished under --out, evaluate each with the "
        "experiment's protocol, and write results.json / results.csv. Re-running skips finished "
        "variants and resumes an interrupted one.",
    )
    p.add_argument("config", help="experiment YAML (see configs/)")
    p.add_argument("--out", required=True, help="experiment folder (runs/<name>)")
    p.add_argument("--only", help="comma list of variant names to run")
    p.add_argument(
        "--report",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the report afterwards (default: yes)",
    )
    _common(p)


def run_experiment(args) -> int:
    from .runs.experiment import format_results, run

    rows = run(
        args.config,
        args.out,
        device=None if args.device == "auto" else args.device,
        only=[o.strip() for o in args.only.split(",")] if args.only else None,
    )
    print(format_results(rows))
    if args.report:
        from .report import write_report

        paths = write_report(args.out)
        print(f"report: {paths['html']}")
    return 0


# ---------------------------------------------------------------- report


def add_report_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="HTML + Markdown report of an experiment folder",
        description="Write <folder>/report.html (self-contained, plots embedded), report.md and PNGs from the records.",
    )
    p.add_argument("folder", help="experiment folder written by `advtune experiment`")
    _common(p)


def run_report(args) -> int:
    from .report import write_report

    paths = write_report(args.folder)
    print(f"report: {paths['html']} and {paths['md']}")
    return 0


# ---------------------------------------------------------------- info


def add_info_parser(sub) -> None:
    p = sub.add_parser(
        "info",
        help="show what a run recorded",
        description="Config, seed, versions, metrics, cost and evaluations of a run.",
    )
    p.add_argument("run", help="run folder")
    p.add_argument("--json", action="store_true", help="print the raw record as JSON")
    _common(p)


def run_info(args) -> int:
    from .runs.record import format_info
    from .runs.record import run_info as info_of

    info = info_of(args.run)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


# ---------------------------------------------------------------- harden


def add_harden_parser(sub) -> None:
    from .hardening import PROTOCOL, Recipe

    r = Recipe()
    p = sub.add_parser(
        "harden",
        help="make a trained run robust: analysis, selection, selective adversarial fine-tuning, "
        "strong evaluation and report in one command",
        description="The method with the best measured recipe as its default (docs/RESULTS.md): rank the "
        "components of BASE by how much the attack exploits them, adversarially fine-tune only the "
        "best-ranked ones within a parameter budget, evaluate before/after with the strong protocol "
        "and the gradient-masking gate, and write a report to --out.",
    )
    p.add_argument("base", help="run folder of the trained model (from advtune train)")
    p.add_argument("--eps", type=number, required=True, help="perturbation budget in pixel units, e.g. 0.3 or 8/255")
    p.add_argument("--norm", choices=["linf", "l2"], default="linf", help="threat model norm (default: linf)")
    p.add_argument(
        "--budget",
        type=int,
        help=f"training gradient evaluations (default: {r.epochs:g} passes over the "
        "training data with the training attack)",
    )
    p.add_argument(
        "--params",
        type=budget_number,
        default=r.params,
        help=f"parameter budget: share (< 1) or number of parameter entries that may change (default: {r.params})",
    )
    p.add_argument(
        "--granularity",
        choices=["layer", "unit"],
        default=r.granularity,
        help=f"select whole layers or single units (default: {r.granularity})",
    )
    p.add_argument("--attack", default=r.attack, help=f"training attack (default: {r.attack})")
    p.add_argument(
        "--eps-warmup",
        type=number,
        default=r.eps_warmup,
        help=f"share of the fine-tuning over which eps ramps up from 0 (default: {r.eps_warmup})",
    )
    p.add_argument("--lr", type=number, default=r.lr, help=f"learning rate (default: {r.lr})")
    p.add_argument("--limit", type=int, help="use only the first N training examples (default: all)")
    p.add_argument("--limit-test", type=int, default=1000, help="test examples for the evaluation (default: 1000)")
    p.add_argument("--evaluation", default=PROTOCOL, help=f"attack list of the evaluation (default: {PROTOCOL})")
    p.add_argument("--data-dir")
    p.add_argument("--out", required=True, help="folder to write the hardened model and its report to")
    p.add_argument("--resume", action="store_true", help="continue an interrupted harden run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    _common(p)


def run_harden(args) -> int:
    from dataclasses import replace

    from .hardening import Recipe
    from .runs import harden as harden_job
    from .runs.harden import HardenRun, format_summary

    recipe = replace(
        Recipe(),
        params=args.params,
        granularity=args.granularity,
        attack=args.attack,
        eps_warmup=args.eps_warmup,
        lr=args.lr,
    )
    s = harden_job.run(
        HardenRun(
            base=args.base,
            out=args.out,
            eps=args.eps,
            norm=args.norm,
            budget=args.budget,
            recipe=recipe,
            limit=args.limit,
            limit_test=args.limit_test,
            evaluation=args.evaluation,
            seed=args.seed,
            data_dir=args.data_dir,
            device=args.device,
            resume=args.resume,
            overwrite=args.overwrite,
        )
    )
    print(format_summary(s))
    print(f"-> {args.out} (hardened model, records, report.html)")
    return 0


# ---------------------------------------------------------------- demo


def add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="the main job end to end on MNIST", description="Train, attack, analyse, fine-tune, report."
    )
    p.add_argument("--out", default="runs/demo", help="folder for the demo's runs and report (default: runs/demo)")
    p.add_argument("--full", action="store_true", help="real sizes instead of the few-minute CPU demo")
    p.add_argument("--data-dir", help="folder holding mnist/ (default: search, else download)")
    _common(p)


def run_demo(args) -> int:
    from .runs.demo import DemoConfig
    from .runs.demo import run as demo

    demo(DemoConfig(out=args.out, full=args.full, data_dir=args.data_dir, seed=args.seed, device=args.device))
    return 0


# ---------------------------------------------------------------- main


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "train": (add_train_parser, run_train),
    "evaluate": (add_evaluate_parser, run_evaluate),
    "analyze": (add_analyze_parser, run_analyze),
    "finetune": (add_finetune_parser, run_finetune),
    "harden": (add_harden_parser, run_harden),
    "experiment": (add_experiment_parser, run_experiment),
    "report": (add_report_parser, run_report),
    "info": (add_info_parser, run_info),
    "demo": (add_demo_parser, run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="advtune",
        description="Make CNNs robust by adversarially fine-tuning only their most vulnerable components.",
    )
    parser.add_argument("--version", action="version", version=f"advtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def _apply_yaml_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """timm's two stages: YAML gives the subcommand's defaults, explicit flags override them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    import yaml

    path = Path(known.config)
    if not path.is_file():
        raise AdvtuneError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise AdvtuneError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(values, dict):
        raise AdvtuneError(f"{path} must be a mapping of flag names to values")
    command = next((a for a in argv if a in COMMANDS), None)
    if command is None:
        raise AdvtuneError(f"--config needs a command, e.g. advtune train --config {path}")
    subparser = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    actions = {a.dest: a for a in subparser._actions}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            close = difflib.get_close_matches(dest, sorted(actions), n=1)
            raise AdvtuneError(
                f"{path}: unknown key {key!r}" + (f"; did you mean {close[0].replace('_', '-')!r}?" if close else "")
            )
        action = actions[dest]
        if isinstance(value, list):  # a YAML list stands for the flag's comma list
            value = ",".join(str(v) for v in value)
        if action.type is not None and value is not None and not isinstance(value, bool):
            try:
                value = action.type(str(value))
            except (argparse.ArgumentTypeError, ValueError) as e:
                raise AdvtuneError(f"{path}: {key}: {e}") from None
        if action.choices is not None and value not in action.choices:
            raise AdvtuneError(f"{path}: {key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
        defaults[dest] = value
    subparser.set_defaults(**defaults)
    for action in subparser._actions:  # a required flag given by the YAML is no longer required
        if action.dest in defaults:
            action.required = False


def _setup_logging(args) -> None:
    from .utils import set_progress

    level = (
        logging.DEBUG
        if getattr(args, "verbose", False)
        else logging.WARNING
        if getattr(args, "quiet", False)
        else logging.INFO
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    set_progress(not getattr(args, "quiet", False))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        _apply_yaml_defaults(parser, argv)
        args = parser.parse_args(argv)
        _setup_logging(args)
        return COMMANDS[args.command][1](args)
    except AdvtuneError as e:
        print(f"advtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("advtune: interrupted; continue a training run with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
