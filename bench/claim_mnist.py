"""The method's claim on MNIST (eps = 0.3), side by side in one run: standard model, full PGD-AT,
FGSM-RS AT, full-network adversarial fine-tuning, selective fine-tuning at 5/10/20%, random 10%.

It is `advtune experiment configs/mnist-claim.yaml` plus the report; re-running resumes.
Sizes (documented in the config): full AT on 60k images x 3 epochs; fine-tuning on a 12k subset x 1
epoch; evaluation = worst case of APGD-CE and APGD-T (3 targets) on the first 1000 test images.

    .venv/bin/python bench/claim_mnist.py [--out runs/mnist-claim] [--config configs/mnist-claim.yaml]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from advtune.errors import AdvtuneError
from advtune.report import headline, write_report
from advtune.runs.experiment import format_results, run

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist-claim.yaml"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "mnist-claim"))
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t = time.perf_counter()
    rows = run(args.config, args.out, device=args.device)
    paths = write_report(args.out)
    print(format_results(rows))
    print("\n".join(headline(rows)))
    print(f"\nreport: {paths['html']}  ({time.perf_counter() - t:.0f} s this run)")


if __name__ == "__main__":
    try:
        main()
    except AdvtuneError as e:  # bad input: one line, not a traceback
        sys.exit(f"error: {e}")
