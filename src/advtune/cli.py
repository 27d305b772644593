"""`advtune train | evaluate | analyze | finetune | harden | experiment | report | info | apply | export | demo`.

Thin: each subcommand is its entry in cli_text's HELP and DESCRIPTION, `add_<cmd>_parser(p)` (its own flags on the
parser that `build_parser` makes with those texts and ends with the general flags) + `run_<cmd>(args) -> int`.
The flags of a job are derived from its config dataclass (`advtune.settings`: declared once, with help and
defaults), the run function builds that config from the flags (`from_args`) and calls the job's `run`, then prints.
A YAML `--config` gives defaults, flags override them. AdvtuneErrors print as one line naming flags, exit 2.
The commands on finished run folders (report, info, apply, export) are defined in cli_folders.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from .cli_folders import (
    add_apply_parser,
    add_export_parser,
    add_info_parser,
    add_report_parser,
    run_apply,
    run_export,
    run_info,
    run_report,
)
from .cli_text import DESCRIPTION, HELP, OTHER_NAME, OUT_OF_MEMORY_FIX
from .errors import AdvtuneError
from .keywords import speaking_flags
from .settings import Parser, add_flags, apply_yaml_defaults, from_args, home, seed_number

log = logging.getLogger("advtune")


DIST_BACKEND_HELP = "under torchrun: the process group's backend (default: auto = nccl on GPUs, gloo on CPU)"


NO_COMPUTE = ("report", "info", "apply")  # read records or add tensors: a --seed or --device would be ignored


def _common(p: argparse.ArgumentParser, name: str = "") -> None:
    g = p.add_argument_group("general")
    g.add_argument("--config", help="YAML file of defaults for this command's flags (flags override it)")
    if name in NO_COMPUTE:
        g.add_argument("--quiet", action="store_true", help="no progress bars or info logging")
        g.add_argument("--verbose", action="store_true", help="debug logging")
        return
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:<i> (default: auto)")
    if "--seed" not in p._option_string_actions:  # a command whose seed means something else defines its own
        g.add_argument("--seed", type=seed_number, default=0, help="random seed, an integer in [0, 2^63) (default: 0)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or info logging")
    g.add_argument("--verbose", action="store_true", help="debug logging")
    backends = ("auto", "gloo", "nccl")
    g.add_argument("--dist-backend", default="auto", choices=backends, help=DIST_BACKEND_HELP)


def _train_config(args, base):
    """The TrainConfig of a job from the training flags (defaults from the job's own, `base`). --epochs with
    --budget is refused, as harden refuses it: the budget's steps decide the length (a run started so resumes)."""
    if getattr(args, "budget", None) is not None and args.epochs != base.epochs and not args.resume:
        raise AdvtuneError(f"--epochs {args.epochs:g} and --budget both set how long it runs; give one of them")
    return from_args(type(base), args, seed=args.seed, steps=base.steps)


# ---------------------------------------------------------------- train


def add_train_parser(p) -> None:
    from .runs.configs import TrainRun
    from .train import TrainConfig
    from .train.config import REGROW_HOW

    groups = {g: p.add_argument_group(g) for g in ("data", "training", "adversarial training", "output")}
    add_flags(p, TrainRun, groups=groups)
    # levers of adapters or a mask
    fine_tuning = {"adapter_lr_ratio", "regrow", *REGROW_HOW}
    add_flags(p, TrainConfig, groups=groups, exclude=fine_tuning)


def run_train(args) -> int:
    from .runs import train as train_job
    from .runs.configs import TrainRun

    run = from_args(TrainRun, args, train=_train_config(args, _default(TrainRun)))
    summary = train_job.run(run)
    print(f"test accuracy: {100 * summary.test_acc:.2f}% ({summary.test_examples} examples)  -> {args.out}")
    return 0


def _default(cls):
    """The TrainConfig default of a job config class (its `train` field)."""
    import dataclasses

    return next(f.default for f in dataclasses.fields(cls) if f.name == "train")


# ---------------------------------------------------------------- evaluate


def attack_names() -> list[str]:
    """The built-in attacks' names, read from the attack modules' source (no torch for --help; a new
    attack needs no edit here). `advtune.list_attacks()` also has attacks registered at run time."""
    from .registry import registered_in_source

    here, marks = Path(__file__).resolve().parent, ("register", "register_attack")
    return registered_in_source(here / "attacks", marks) + registered_in_source(here / "evaluation", marks)


def add_evaluate_parser(p) -> None:
    from .runs.configs import EvaluateRun

    p.description = p.description.format(attacks=", ".join(attack_names()) or "see docs/attacks.md")
    add_flags(p, EvaluateRun, required={"eps"})
    p.add_argument("--limit", type=int, help=argparse.SUPPRESS)  # only to point at --limit-test


def run_evaluate(args) -> int:
    from .runs import evaluate as evaluate_job
    from .runs.configs import EvaluateRun
    from .runs.evaluate import format_evaluation

    if args.limit is not None:
        raise AdvtuneError(
            f"evaluate reads test examples: use --limit-test {args.limit} (--limit means training examples everywhere)"
        )
    if not args.attacks and not args.suite:
        raise AdvtuneError("give --attacks (e.g. fgsm,pgd:steps=40) or --suite standard")
    record = evaluate_job.run(from_args(EvaluateRun, args))
    print(format_evaluation(record))
    print(f"-> {record['path']}" + (f" (+ {record['plot']})" if record.get("plot") else ""))
    return 0


# ---------------------------------------------------------------- analyze


def criterion_names() -> list[str]:
    """The built-in criteria, read from the vulnerability modules' source like attack_names()."""
    from .registry import registered_in_source

    return registered_in_source(Path(__file__).resolve().parent / "vulnerability", ("register_criterion",))


def add_analyze_parser(p) -> None:
    from .runs.configs import AnalyzeRun

    p.description = p.description.format(criteria=", ".join(criterion_names()) or "see docs/usage.md")
    add_flags(p, AnalyzeRun, required={"eps"})


def run_analyze(args) -> int:
    from .report.analysis_notes import agreement_words
    from .runs import analyze as analyze_job
    from .runs.configs import AnalyzeRun

    s = analyze_job.run(from_args(AnalyzeRun, args)).to_json()
    print(
        f"scored {s['examples_scored']} training examples: clean {100 * s['clean_acc']:.1f}%, "
        f"under {s['attack']} {100 * s['adv_acc']:.1f}%"
    )
    for name, c in s["criteria"].items():
        line = f"  {name:17s} top: {', '.join(n for n, _ in c['top10'][:5])}"
        if "curve" in c:
            pts = {round(r["share"], 4): r for r in c["curve"] if round(r["share"], 4) in (0.01, 0.05, 0.1)}
            ctrl = " (random {:.0f}%)"  # no random seeds: no control measured (nan), none said
            at = [f"{100 * k:g}%: {100 * v['repaired']:.0f}%" + ctrl.format(100 * v["random_mean"]) * (
                v.get("random_mean") == v.get("random_mean")) for k, v in pts.items()]  # fmt: skip
            line += "\n  " + " " * 17 + " errors repaired by restoring top " + "; ".join(at)
        print(line)
    for k, v in s.get("rank_agreement_with_restoration", {}).items():
        print(f"  rank agreement of {k} with restoration (Spearman): {agreement_words(v)}")
    curve = ", concentration.json/png" if args.curve_limit else ""  # --curve-limit 0 writes no curve
    print(f"-> {args.out} (scores-*.json/csv, layers-*.json{curve}, layers.png)")
    return 0


# ---------------------------------------------------------------- finetune


def add_finetune_parser(p) -> None:
    from .runs.configs import FinetuneRun

    groups = {g: p.add_argument_group(g) for g in ("selection", "attack", "data", "training", "output")}
    add_flags(p, FinetuneRun, groups=groups, required={"eps"})
    # no attacked validation after each epoch in a fine-tuning (--keep-best has its own): no --val-attack-limit
    add_flags(p, type(_default(FinetuneRun)), base=_default(FinetuneRun), groups=groups, exclude={"val_attack_limit"})


def run_finetune(args) -> int:
    from .runs import finetune as finetune_job
    from .runs.configs import FinetuneRun

    s = finetune_job.run(from_args(FinetuneRun, args, train=_train_config(args, _default(FinetuneRun)))).to_json()
    what = finetune_job.trained_words(s.get("selection"))
    q, c = s.get("pgd10_acc_quick"), s.get("checkpoints") or {}  # c: --keep-best's choice, and what it cost
    quick = f", PGD-10 (quick, {s.get('pgd10_examples')} ex.) {100 * q:.2f}%" if q is not None else ""
    kept = f"step {c.get('chosen_step') or 'last'} of {len(c.get('curve', []))} held-out points" if c else ""
    kept = f"; kept {kept} (choosing cost {c.get('grad_evals', 0):,} gradient evaluations)" if c else ""
    print(f"fine-tuned {what}: clean test accuracy {100 * s['test_acc']:.2f}%{quick}{kept}  -> {args.out}")
    return 0


# ---------------------------------------------------------------- experiment


def add_experiment_parser(p) -> None:
    # not dest "config": that is the general --config (a YAML of this command's flag defaults)
    p.add_argument("experiment", metavar="CONFIG", help="experiment YAML (examples: configs/ in the source repository)")
    p.add_argument("--seed", type=seed_number, help="replaces the YAML's seed: (default: the YAML's, else 0)")
    p.add_argument("--out", required=True, help="experiment folder (runs/<name>)")
    p.add_argument("--only", help="comma list of variant names to run")
    report_help = "write the report afterwards (default: yes)"
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True, help=report_help)


def run_experiment(args) -> int:
    from .runs.experiment import format_results, run

    only = [o.strip() for o in args.only.split(",")] if args.only else None
    device = None if args.device == "auto" else args.device
    args.out = home(args.out)  # the report below reads it too
    rows = run(home(args.experiment), args.out, device=device, only=only, seed=args.seed)
    print(format_results(rows))
    if args.report:
        from .report import write_report

        paths = write_report(args.out)
        print(f"report: {paths['html']}")
    return 0


# ---------------------------------------------------------------- harden


def add_harden_parser(p) -> None:
    from .recipe import Recipe
    from .runs.configs import HardenRun

    add_flags(p, HardenRun, required={"eps"})
    add_flags(p, Recipe)


def run_harden(args) -> int:
    from .recipe import Recipe
    from .runs import harden as harden_job
    from .runs.configs import HardenRun
    from .runs.harden import format_summary

    s = harden_job.run(from_args(HardenRun, args, recipe=from_args(Recipe, args)))
    print(format_summary(s))
    print(f"-> {args.out} (hardened model, records, report.html)")
    return 0


# ---------------------------------------------------------------- demo


def add_demo_parser(p) -> None:
    from .runs.configs import DemoConfig

    add_flags(p, DemoConfig)


def run_demo(args) -> int:
    from .runs import demo as demo_job
    from .runs.configs import DemoConfig

    demo_job.run(from_args(DemoConfig, args))
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
    "apply": (add_apply_parser, run_apply),
    "export": (add_export_parser, run_export),
    "demo": (add_demo_parser, run_demo),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the named command's parser is built in full (the others are
    one-line entries), so `advtune --help` never imports torch."""
    from . import __version__

    parser = Parser(
        prog="advtune",
        description="Make CNNs robust by adversarially fine-tuning only their most vulnerable components.",
    )
    parser.add_argument("--version", action="version", version=f"advtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    wanted = None if argv is None else next((a for a in argv if a in COMMANDS), "")
    for name, (add, _) in COMMANDS.items():
        if wanted is None or name == wanted:
            p = sub.add_parser(name, help=HELP[name], description=DESCRIPTION[name])
            add(p)
            _common(p, name)
        else:
            sub.add_parser(name, help=HELP[name])
    return parser


def _setup_logging(args) -> None:
    from .progress import set_progress

    verbose = getattr(args, "verbose", False)
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 logs progress and info
    if rank > 0:
        level = max(level, logging.WARNING)
    # the time on every line: a log read hours later says when each stage ran, and whether the job has stalled
    where = "" if rank == 0 else f"[rank {rank}] "
    fmt = f"%(asctime)s {where}%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%Y-%m-%d %H:%M:%S", force=True)
    # --verbose: advtune's own debug lines (a library's, matplotlib's font search, drowned them)
    logging.getLogger("advtune").setLevel(logging.DEBUG if verbose and rank == 0 else logging.NOTSET)
    set_progress(not getattr(args, "quiet", False) and rank == 0)
    # results and stage lines printed to a file (nohup, a scheduler) appear as they happen, not at the end or never
    if hasattr(sys.stdout, "reconfigure") and not sys.stdout.line_buffering:
        sys.stdout.reconfigure(line_buffering=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a scheduler's time limit, `docker stop`, a closed terminal) handled as Ctrl-C: the same
    message, and where an --overwrite's old run is kept; it ended the process without a word."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


def _terminated(signum: int, frame) -> None:
    import signal

    signal.signal(signum, signal.SIG_DFL)  # a second one while the message prints ends the process
    raise Terminated(signum)


def _handle_termination() -> dict:
    """SIGTERM and SIGHUP raise Terminated where they would end the process (their default action): `nohup` (SIGHUP
    ignored) and a handler of the caller's are kept. Returns the handlers replaced (to give back)."""
    import signal

    replaced = {}
    for sig in (getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)):
        try:
            if signal.getsignal(sig) is signal.SIG_DFL:
                replaced[sig] = signal.signal(sig, _terminated)
        except ValueError:  # not the main thread: signals stay as they are
            break
    return replaced


def main(argv: Sequence[str] | None = None) -> int:
    # the command line's own process (tests call main([...]) and keep their signals); under torchrun every rank
    # says it was interrupted, the failing rank's error above it
    replaced = _handle_termination() if argv is None else {}
    try:
        code = _main(argv)
    finally:
        import signal

        for sig, handler in replaced.items():
            signal.signal(sig, handler)
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a torchrun worker whose work is done and written leaves now: gloo's threads can abort the
        # interpreter's own shutdown ("terminate called without an active exception"), which torchrun
        # would report as a failed run
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    return code


@speaking_flags()  # the checks shared with the API name settings as this command's flags
def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    try:
        apply_yaml_defaults(parser, COMMANDS, argv)
        first = next((i for i, a in enumerate(argv) if a in COMMANDS), 0)
        if first and argv[0] not in ("-h", "--help", "--version"):  # `advtune --quiet info RUN`
            raise AdvtuneError(f"flags go after the command: advtune {argv[first]} ... {' '.join(argv[:first])}")
        args, extra = parser.parse_known_args(argv)
        if extra:  # parse_args's own check, said by the command's parser: "advtune train: error: ..."
            commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
            command = getattr(args, "command", None)
            hints = [
                f"{flag} is {OTHER_NAME[command, flag]} here"
                for flag in dict.fromkeys(a.split("=")[0] for a in extra)
                if (command, flag) in OTHER_NAME
            ]  # the same idea is spelled differently across commands
            hint = f" ({'; '.join(hints)})" if hints else ""
            commands.get(command, parser).error(f"unrecognized arguments: {' '.join(extra)}{hint}")
        _setup_logging(args)
        from .distributed import session  # torch: only once a command runs, never for --help

        # under torchrun rank 0 prints the results; the other ranks only print errors
        quiet_rank = contextlib.redirect_stdout(io.StringIO()) if os.environ.get("RANK", "0") != "0" else None
        with session(getattr(args, "dist_backend", "auto"), getattr(args, "device", "auto")):
            with quiet_rank or contextlib.nullcontext():
                return COMMANDS[args.command][1](args)
    except AdvtuneError as e:
        where = f" (rank {os.environ['RANK']})" if os.environ.get("RANK") not in (None, "0") else ""
        print(f"advtune: error{where}: {e}{_replaced()}", file=sys.stderr)
        return 2
    except Exception as e:  # out of memory in training or analysis (evaluation retries smaller), or your model's code
        from .devices import out_of_memory
        from .factories import user_code_line

        oom = isinstance(e, RuntimeError) and out_of_memory(e)  # its fix first, even raised inside your forward
        yours = None if oom else user_code_line(e)  # a traceback through the job named advtune's lines, not yours
        if not (oom or yours):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        where = f" (rank {os.environ['RANK']})" if os.environ.get("RANK") not in (None, "0") else ""
        fix = OUT_OF_MEMORY_FIX.get(next((a for a in argv if a in COMMANDS), None), OUT_OF_MEMORY_FIX[None])
        msg = f"your model raised {type(e).__name__}: {first} ({yours})" if yours else f"out of memory ({first}); {fix}"
        print(f"advtune: error{where}: {msg}{_replaced()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # records are written atomically at the end: an interruption leaves the previous ones whole
        again = "rerun (train, finetune, harden: --resume; analyze: --overwrite; demo, experiment: the same command)"
        by = f" by {e.name}" if isinstance(e, Terminated) else ""
        print(f"advtune: interrupted{by}; nothing half-written left: {again}{_replaced()}", file=sys.stderr)
        return 128 + e.signum if isinstance(e, Terminated) else 130


def _replaced() -> str:
    """Where a run an --overwrite was replacing is kept (only a command that opened a run folder can have one)."""
    record = sys.modules.get("advtune.runs.record")
    return record.replaced_note() if record is not None else ""


if __name__ == "__main__":
    sys.exit(main())
