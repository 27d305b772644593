"""Re-check a frontier's curves with the full standard suite and a transfer attack (issue 21, item 6).

A frontier measures every checkpoint with its protocol (APGD-CE + APGD-T with 3 targets): strong, and white-box
only. Parameter-efficient adversarial tuning can mask gradients, so the points a table states are re-evaluated
here on the same test images with the standard suite (APGD-CE, APGD-T with 9 targets, Square with 5000
queries) plus a transfer attack (APGD-CE crafted on another robust model, tried on this one), cascaded, with
the masking gate. Which checkpoint: each curve's best on the frontier's own protocol (--point best, what the
issue asks: a masked curve's best point is where an optimistic number would sit), its last (--point last) or
one by its snapshot name (--point step-0001501: the point a table states).
The records merge by variant into --out, so the variants can be re-checked one session at a time:

    python bench/recheck.py runs/frontier-cifar10-resnet shares-norms-fgsm-rs full-ft-lr3e-3 \\
        --transfer runs/frontier-cifar10-resnet/full-ft-lr3e-3,runs/frontier-cifar10-resnet/shares-norms-fgsm-rs \\
        --out docs/results/frontier-cifar10-resnet-recheck.json

The transfer source of a variant is the first of --transfer that is not the variant itself. Eps, norm, test
images and seed are those of the frontier's record (--eps and --n, if given, must agree with them).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from advtune import api
from advtune.devices import resolve_device
from advtune.errors import AdvtuneError
from advtune.runs.common import dataset_of, load_base
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
    if point != "best":  # a snapshot by name: the point a table states (e.g. at AT's 25% budget)
        named = [fr for fr in measured if fr[0].name == point]
        if not named:
            known = ", ".join(f.name for f, _ in measured if f != variant)
            raise AdvtuneError(f"--point {point}: no measured snapshot of that name in {variant} (measured: {known})")
        return named[0]
    return max(measured, key=lambda fr: fr[1]["worst_case_accuracy"])  # first of equals: the cheaper point


def transfer_source(variant: Path, sources: list[Path]) -> Path | None:
    """The first source that is neither the variant nor one of its snapshots (absolute, so records compare)."""
    own = variant.resolve()
    return next((s.resolve() for s in sources if s.resolve() != own and own not in s.resolve().parents), None)


def check_setting(frontier: dict, eps: float | None, n: int | None) -> tuple[float, str, int, int]:
    """eps, norm, images and seed of the frontier's own record; a different --eps or --n is refused, so a
    re-check always compares like with like."""
    threat, examples = frontier["threat"], frontier["examples"]
    if eps is not None and abs(eps - threat["eps"]) > 1e-9:
        raise AdvtuneError(f"--eps {eps:g}: the frontier was measured at eps {threat['eps']:g}; leave --eps out")
    if n is not None and n != examples:
        raise AdvtuneError(f"--n {n}: the frontier was measured on {examples} test images; leave --n out")
    return threat["eps"], threat["norm"], examples, frontier["seed"]


def recheck(variant: Path, point: str, sources: list[Path], suite: str = SUITE, eps=None, n=None, device="cpu") -> dict:
    folder, frontier = frontier_point(variant, point)
    eps, norm, n, seed = check_setting(frontier, eps, n)
    source = transfer_source(variant, sources)
    if sources and source is None:
        print(f"recheck: {variant.name}: every --transfer source is this variant; no transfer attack", file=sys.stderr)
    attacks = suite + (f",transfer:source={source}" if source else "")
    model, meta, config = load_base(str(folder), device)
    data = dataset_of(config, meta, None, download=False)
    t0 = time.perf_counter()
    result = api.evaluate(model.eval(), data, eps=eps, norm=norm, attacks=attacks, limit=n, batch_size=500, seed=seed)
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
        "evaluation": record,
        "robust": record["worst_case_accuracy"],
        "clean": record["clean_accuracy"],
        "gate": "passed" if not record["suspect"] else "flagged",
        "seconds": round(time.perf_counter() - t0, 1),
    }


def read_out(out: Path, frontier: Path) -> dict:
    """The --out file's records, or a new empty one; a file of another kind or frontier is refused."""
    name = frontier.resolve().name
    old = read_json(out) if out.exists() else {"schema": 1, "kind": "recheck", "frontier": name, "points": []}
    if not isinstance(old, dict) or old.get("kind") != "recheck" or old.get("frontier") != name:
        theirs = old.get("frontier") if isinstance(old, dict) else None
        raise AdvtuneError(f"{out} holds no re-checks of {name!r} (it has {theirs!r}); give another --out")
    return old


def merge(out: Path, rows: list[dict], frontier: Path) -> dict:
    """The --out file with these rows replacing the ones of the same variant and point (the others kept)."""
    old = read_out(out, frontier)
    keys = {(r["variant"], r["point"]) for r in rows}
    old["points"] = [p for p in old["points"] if (p["variant"], p["point"]) not in keys] + rows
    return old


def line(r: dict) -> str:
    acc = r["evaluation"]["accuracy"]
    steps = ", ".join(f"{k.split(':')[0]} {v:.1%}" for k, v in acc.items())
    return (
        f"{r['variant']:<26} {r['checkpoint']:<13} frontier {r['frontier_protocol']['robust']:.1%} -> "
        f"{steps}; worst {r['robust']:.1%}, clean {r['clean']:.1%}, gate {r['gate']} ({r['seconds']:.0f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("frontier", type=Path, help="the frontier's run folder, e.g. runs/frontier-cifar10-resnet")
    p.add_argument("variants", nargs="+", help="variant names (folders of the frontier)")
    p.add_argument("--eps", help="only checked: eps, norm, images and seed are the frontier's own")
    p.add_argument("--n", type=int, help="only checked: the frontier's first N test images")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:<i>")
    p.add_argument("--point", default="best", help="best | last | a snapshot's name, e.g. step-0001501")
    p.add_argument("--attacks", default=SUITE, help=f"before the transfer attack (default: {SUITE})")
    p.add_argument("--transfer", default="", help="comma list of robust run folders to craft transfer attacks on")
    p.add_argument("--out", type=Path, help="merge the records into this JSON file")
    a = p.parse_args(argv)
    # the attacks' progress (each attack's start, survivors, time) in the log, as bench/frontier.py does
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    eps = parse_number(a.eps) if a.eps else None
    sources = [Path(s) for s in a.transfer.split(",") if s]
    for s in sources:
        if not (s / "model.safetensors").exists():
            raise AdvtuneError(f"--transfer {s}: not a run folder with a saved model")
    variants = [a.frontier / v for v in a.variants]
    for v in variants:  # every name, setting and the --out file checked before hours of evaluation
        check_setting(frontier_point(v, a.point)[1], eps, a.n)
    if a.out:
        read_out(a.out, a.frontier)
    device = resolve_device(a.device)
    rows = []
    for v in variants:
        rows.append(recheck(v, a.point, sources, a.attacks, eps, a.n, device))
        print(line(rows[-1]), flush=True)
        if a.out:  # after each variant: an interrupted re-check keeps what it finished
            atomic_write_json(a.out, merge(a.out, rows[-1:], a.frontier))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AdvtuneError as e:
        sys.exit(f"recheck: {e}")
