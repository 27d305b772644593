"""The commands on finished run folders: `advtune report`, `info`, `apply` and `export` (cli.py registers them).

Each is `add_<cmd>_parser(p)` + `run_<cmd>(args) -> int`, as the jobs' in cli.py; they live here so cli.py keeps
room for new jobs (no module over 500 lines)."""

from __future__ import annotations

import json
from pathlib import Path

from . import filenames as files
from .errors import AdvtuneError
from .settings import add_flags, from_args, home

# ---------------------------------------------------------------- report


def add_report_parser(p) -> None:
    p.add_argument("folders", nargs="+", help="run folders written by advtune")


def run_report(args) -> int:
    from .report import write_harden_report, write_report, write_run_report
    from .runs.info import format_info, run_info

    for folder in map(home, args.folders):
        path = Path(folder)
        if (path / files.EXPERIMENT).is_file() or (path / files.RESULTS).is_file():
            paths = write_report(path)
        elif (path / files.SUMMARY).is_file() and (path / files.ANALYSIS).is_dir():  # a harden folder
            paths = write_harden_report(path)
        elif (path / files.CONFIG).is_file():
            info = run_info(path)
            paths = write_run_report(path, format_info(info), info.get("metrics", []))
        elif path.is_dir():
            raise AdvtuneError(
                f"{folder} has no results.json (an experiment) nor config.json (a run); pass a folder written by "
                "advtune train, finetune, analyze, harden or experiment"
            )
        else:
            raise AdvtuneError(f"run folder {folder} not found; pass the --out folder of an earlier advtune command")
        print(f"report: {paths['html']} and {paths['md']}")
    return 0


# ---------------------------------------------------------------- info


def add_info_parser(p) -> None:
    p.add_argument("run", help="run folder")
    p.add_argument("--json", action="store_true", help="print the raw record as JSON")


def run_info(args) -> int:
    from .runs.info import format_info
    from .runs.info import run_info as info_of

    args.run = home(args.run)
    if (Path(args.run) / files.EXPERIMENT).is_file() and not (Path(args.run) / files.CONFIG).is_file():
        from .runs.experiment import experiment_info, format_experiment_info

        info = experiment_info(args.run)
        print(json.dumps(info, indent=2) if args.json else format_experiment_info(info))
        return 0
    info = info_of(args.run)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


# ---------------------------------------------------------------- apply, export


def add_apply_parser(p) -> None:
    from .runs.configs import ApplyRun

    add_flags(p, ApplyRun, required={"out"})


def run_apply(args) -> int:
    from .runs import apply as apply_job
    from .runs.configs import ApplyRun

    r = apply_job.run(from_args(ApplyRun, args))
    print(
        f"applied {args.patch} ({r['patch_bytes']:,} bytes, {r['changed_entries']:,} of {r['total_entries']:,} "
        f"entries) to {args.base}: sha256 {r['result_sha256'][:12]}... as recorded -> {args.out}"
    )
    return 0


def add_export_parser(p) -> None:
    from .runs.configs import ExportRun

    add_flags(p, ExportRun, required={"out"})


def run_export(args) -> int:
    from .runs import export as export_job
    from .runs.configs import ExportRun

    r = export_job.run(from_args(ExportRun, args))
    line = f"exported {args.run} as {r['format']} ({r['bytes']:,} bytes) -> {args.out}"
    if "check" in r:
        c = r["check"]
        line += (
            f"\n  checked with onnxruntime on {c['examples']} test examples: clean max |logit diff| "
            f"{c['clean']['max_abs_diff']:.1e}, agreement {100 * c['clean']['agreement']:.2f}%; under "
            f"{c['attack']}: {c['adversarial']['max_abs_diff']:.1e}, {100 * c['adversarial']['agreement']:.2f}% "
            f"-> {args.out}.check.json"
        )
    print(line)
    return 0
