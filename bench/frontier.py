"""The robustness-per-compute frontier of one setting (issue 8): `advtune experiment CONFIG` with
snapshots along every run, the strong protocol on each snapshot, then the report, and the frontier
data (JSON/CSV) and plot copied to docs/results/ for docs/RESULTS.md. Resumable: re-running skips
every finished run and every evaluated snapshot.

    .venv/bin/python bench/frontier.py configs/frontier-mnist-eps0.3.yaml [--out runs/frontier-mnist-eps0.3]
        [--only standard,pgd-at] [--publish]

Settings shipped: configs/frontier-*.yaml (MNIST eps 0.1 / 0.2 / 0.3, CIFAR-10 on a VGG and on preact-resnet20).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from advtune.errors import AdvtuneError
from advtune.frontier import findings
from advtune.report import write_report
from advtune.runs.experiment import format_results, load_config, run
from advtune.storage import read_json

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--out", help="experiment folder (default: runs/<config name>)")
    ap.add_argument("--only", help="comma list of variants to run now (the others are kept as they are)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--publish", action="store_true", help="copy frontier.json/csv/png to docs/results/<name>-*")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(args.config)
    out = Path(args.out or ROOT / "runs" / cfg["name"])
    t = time.perf_counter()
    rows = run(
        args.config, out, device=args.device, only=[o.strip() for o in args.only.split(",")] if args.only else None
    )
    paths = write_report(out)
    print(format_results(rows))
    if (out / "frontier.json").is_file():
        points = read_json(out / "frontier.json", "frontier")["points"]
        print("\n".join("* " + line.replace("**", "") for line in findings(points)))
        if args.publish:
            dest = ROOT / "docs" / "results"
            for suffix in ("json", "csv", "png"):
                shutil.copyfile(out / f"frontier.{suffix}", dest / f"{cfg['name']}.{suffix}")
            print(f"published to {dest}/{cfg['name']}.{{json,csv,png}}")
    print(f"\nreport: {paths['html']}  ({time.perf_counter() - t:.0f} s this run)")


if __name__ == "__main__":
    try:
        main()
    except AdvtuneError as e:  # bad input: one line, as `advtune experiment` says it
        raise SystemExit(f"frontier: error: {e}") from None
