"""The robustness-per-compute frontier of one setting (issue 8): `advtune experiment CONFIG` with
snapshots along every run, the strong protocol on each snapshot, then the report, and the frontier
data (JSON/CSV) and plot published to docs/results/ for docs/RESULTS.md. Resumable: re-running skips
every finished run and every evaluated snapshot.

    .venv/bin/python bench/frontier.py configs/frontier-mnist-eps0.3.yaml [--out runs/frontier-mnist-eps0.3]
        [--only standard,pgd-at] [--seed N] [--publish [--replace]]

--seed N replays the whole setting under another seed (the standard model, the analysis and every run), as
the experiment `<name>-seedN` in runs/<name>-seedN: the spread of a curve across seeds, next to the published one.

--publish updates the published frontier: this run's curves replace those of the same name and the published
curves this run lacks are kept (a machine that holds only a few variants does not drop the others), provided
both start from the same standard model; --replace publishes this run's curves alone.

Settings shipped: configs/frontier-*.yaml (MNIST eps 0.1 / 0.2 / 0.3, CIFAR-10 on a VGG and on preact-resnet20).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from advtune.errors import AdvtuneError
from advtune.frontier import Frontier, as_points, findings, merge_curves
from advtune.report import write_report
from advtune.report.comparable import frontier_notes
from advtune.report.experiment_plots import plot_frontier, variant_colors
from advtune.runs.experiment import format_results, frontier_csv, load_config, run, validate_config
from advtune.storage import atomic_write_json, atomic_write_text, read_json

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--out", help="experiment folder (default: runs/<config name>)")
    ap.add_argument("--only", help="comma list of variants to run now (the others are kept as they are)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, help="replay the setting under this seed, as the experiment <name>-seed<N>")
    ap.add_argument(
        "--publish",
        action="store_true",
        help="update docs/results/<name>.{json,csv,png}: this run's curves replace those of the same name, the "
        "published curves this run lacks are kept",
    )
    ap.add_argument("--replace", action="store_true", help="with --publish: publish this run's curves alone")
    ap.add_argument(
        "--publish-as",
        help="with --publish: publish under this name (docs/results/<name>.*) instead of the config's, e.g. curves "
        "from another base model than the published ones (bench/base-models/README.md)",
    )
    args = ap.parse_args()
    if (args.replace or args.publish_as) and not args.publish:
        raise AdvtuneError("--replace and --publish-as only change what --publish writes; add --publish")
    if args.publish_as is not None and (not args.publish_as or "/" in args.publish_as or args.publish_as[0] == "."):
        raise AdvtuneError(f"--publish-as {args.publish_as!r}: give a plain file name, e.g. frontier-cifar10-resnet-b")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(args.config)
    if args.seed is not None:
        cfg = seeded(cfg, args.seed, args.config)
    out = Path(args.out or ROOT / "runs" / cfg["name"])
    t = time.perf_counter()
    rows = run(
        args.config if args.seed is None else cfg,
        out,
        device=args.device,
        only=[o.strip() for o in args.only.split(",")] if args.only else None,
        source=None if args.seed is None else f"{args.config} --seed {args.seed}",
    )
    paths = write_report(out)
    print(format_results(rows))
    if (out / "frontier.json").is_file():
        points = read_json(out / "frontier.json", "frontier")["points"]
        print("\n".join("* " + line.replace("**", "") for line in frontier_notes(points, rows)))  # as the report
        if args.publish:
            name = args.publish_as or cfg["name"]
            publish(points, ROOT / "docs" / "results" / name, name, replace=args.replace)
    print(f"\nreport: {paths['html']}  ({time.perf_counter() - t:.0f} s this run)")


def seeded(cfg: dict, seed: int, where: str) -> dict:
    """The setting replayed under another seed, named apart so its runs and records never mix with the
    original's; the seed is validated as a config's own is, before anything is written."""
    return validate_config({**cfg, "seed": seed, "name": f"{cfg['name']}-seed{seed}"}, where)


def print_findings(points) -> None:
    print("\n".join("* " + line.replace("**", "") for line in findings(points)))


def publish(points: list[dict], dest: Path, title: str, replace: bool) -> None:
    """Write dest.{json,csv,png}: this run's curves merged into the published ones (or alone)."""

    # not with_suffix: a name like frontier-mnist-eps0.2 has a dot of its own (it once wrote frontier-mnist-eps0.*)
    def beside(ext: str) -> Path:
        return dest.parent / f"{dest.name}{ext}"

    published = beside(".json")
    kept: list[str] = []
    if published.is_file() and not replace:
        points, kept = merge_curves(read_json(published, "published frontier")["points"], points)
    merged = Frontier(tuple(as_points(points, "this run's frontier")))
    atomic_write_json(published, merged.to_json())
    atomic_write_text(beside(".csv"), frontier_csv(list(merged.points)))
    names = list(dict.fromkeys(p.variant for p in merged.points))
    plot_frontier([p.to_json() for p in merged.points], beside(".png"), title=title, colors=variant_colors(names))
    also = f" (kept from the published file: {', '.join(kept)})" if kept else ""
    print(f"published to {dest}.{{json,csv,png}}{also}")
    if kept:  # the findings of what was published, not only of this run
        print_findings(list(merged.points))


if __name__ == "__main__":
    try:
        main()
    except AdvtuneError as e:  # bad input: one line, as `advtune experiment` says it
        raise SystemExit(f"frontier: error: {e}") from None
