"""Re-check a frontier's curves with the full standard suite and a transfer attack (issue 21, item 6).

A frontier measures every checkpoint with its protocol (APGD-CE + APGD-T with 3 targets): strong, and white-box
only. Parameter-efficient adversarial tuning can mask gradients, so the points a table states are re-evaluated
here on the same test images with the standard suite (APGD-CE, APGD-T with 9 targets, Square with 5000
queries) plus a transfer attack (APGD-CE crafted on another robust model, tried on this one), cascaded, with
the masking gate. Which checkpoint: each curve's best on the frontier's own protocol (--point best, what the
issue asks: a masked curve's best point is where an optimistic number would sit) or its last (--point last).
The records merge by variant into --out, so the variants can be re-checked one session at a time:

    python bench/recheck.py runs/frontier-cifar10-resnet shares-norms-fgsm-rs full-ft-lr3e-3 --eps 8/255 \\
        --transfer runs/frontier-cifar10-resnet/full-ft-lr3e-3,runs/frontier-cifar10-resnet/shares-norms-fgsm-rs \\
        --out docs/results/frontier-cifar10-resnet-recheck.json

The transfer source of a variant is the first of --transfer that is not the variant itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from advtune import api
from advtune.data import load_dataset
from advtune.errors import AdvtuneError
from advtune.settings import parse_number
from advtune.storage import atomic_write_json, read_json

SUITE = "apgd-ce,apgd-t,square"  # the standard suite: APGD-T with its 9 targets, Square 5000 queries


def frontier_point(variant: Path, point: str) -> tuple[Path, dict]:
    """The checkpoint folder to re-check and its record on the frontier's protocol."""
    folders = [*sorted((variant / "snapshots").glob("step-*")), variant]
    measured = [(f, read_json(f / "eval-protocol.json")) for f in folders if (f / "eval-protocol.json").exists()]
    if not measured:
        raise AdvtuneError(f"{variant}: no eval-protocol.json; run the frontier first (bench/frontier.py)")
    if point == "last":
        return measured[-1]
    return max(measured, key=lambda fr: fr[1]["worst_case_accuracy"])  # first of equals: the cheaper point


def transfer_source(variant: Path, sources: list[Path]) -> Path | None:
    return next((s for s in sources if s.resolve() != variant.resolve()), None)


def recheck(variant: Path, point: str, eps: float, sources: list[Path], n: int, suite: str = SUITE) -> dict:
    folder, frontier = frontier_point(variant, point)
    source = transfer_source(variant, sources)
    attacks = suite + (f",transfer:source={source}" if source else "")
    model = api.load_model(folder)
    config = read_json(folder / "config.json")
    data = load_dataset(config["dataset"]["name"], config["run"].get("data_dir"), download=False)
    t0 = time.perf_counter()
    result = api.evaluate(model, data, eps=eps, attacks=attacks, limit=n, batch_size=500)
    cost = read_json(folder / "cost.json") if (folder / "cost.json").exists() else {}
    record = result.to_json()
    return {
        "variant": variant.name,
        "checkpoint": folder.name if folder != variant else "final",
        "point": point,
        "train_grad_evals": cost.get("grad_evals"),
        "frontier_protocol": {
            "attacks": frontier["attacks"],
            "robust": frontier["worst_case_accuracy"],
            "clean": frontier["clean_accuracy"],
        },
        "transfer_source": str(source) if source else None,
        "standard_suite": record,
        "robust": record["worst_case_accuracy"],
        "clean": record["clean_accuracy"],
        "gate": "passed" if not record["suspect"] else "flagged",
        "seconds": round(time.perf_counter() - t0, 1),
    }


def merge(out: Path, rows: list[dict], frontier: Path) -> dict:
    """The --out file with these rows replacing the ones of the same variant (the others kept)."""
    old = read_json(out) if out.exists() else {"schema": 1, "kind": "recheck", "frontier": frontier.name, "points": []}
    if old.get("frontier") != frontier.name:
        theirs = old.get("frontier")
        raise AdvtuneError(f"{out} holds re-checks of {theirs!r}, not {frontier.name!r}; give another --out")
    names = {r["variant"] for r in rows}
    old["points"] = [p for p in old["points"] if p["variant"] not in names] + rows
    return old


def line(r: dict) -> str:
    acc = r["standard_suite"]["accuracy"]
    steps = ", ".join(f"{k.split(':')[0]} {v:.1%}" for k, v in acc.items())
    return (
        f"{r['variant']:<26} {r['checkpoint']:<13} frontier {r['frontier_protocol']['robust']:.1%} -> "
        f"{steps}; worst {r['robust']:.1%}, clean {r['clean']:.1%}, gate {r['gate']} ({r['seconds']:.0f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("frontier", type=Path, help="the frontier's run folder, e.g. runs/frontier-cifar10-resnet")
    p.add_argument("variants", nargs="+", help="variant names (folders of the frontier)")
    p.add_argument("--eps", required=True, help="the frontier's eps, e.g. 8/255 or 0.3")
    p.add_argument("--n", type=int, default=1000, help="first N test images (default 1000, the frontier's)")
    p.add_argument("--point", choices=("best", "last"), default="best")
    p.add_argument("--attacks", default=SUITE, help=f"before the transfer attack (default: {SUITE})")
    p.add_argument("--transfer", default="", help="comma list of robust run folders to craft transfer attacks on")
    p.add_argument("--out", type=Path, help="merge the records into this JSON file")
    a = p.parse_args(argv)
    eps = parse_number(a.eps)
    sources = [Path(s) for s in a.transfer.split(",") if s]
    for s in sources:
        if not (s / "model.safetensors").exists():
            raise AdvtuneError(f"--transfer {s}: not a run folder with a saved model")
    variants = [a.frontier / v for v in a.variants]
    for v in variants:  # every name checked before hours of evaluation
        frontier_point(v, a.point)
    rows = []
    for v in variants:
        rows.append(recheck(v, a.point, eps, sources, a.n, a.attacks))
        print(line(rows[-1]), flush=True)
        if a.out:  # after each variant: an interrupted re-check keeps what it finished
            atomic_write_json(a.out, merge(a.out, rows[-1:], a.frontier))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AdvtuneError as e:
        sys.exit(f"recheck: {e}")
