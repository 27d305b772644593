"""Choose between finished runs on held-out *training* images, never on the test split (issue 21).

A frontier trains on the first `limit` training images (`limit: 45000` on CIFAR-10); the rest of the
training set is never seen by any variant, so it is a validation split every variant shares. This
script evaluates each run folder's model (and, with --snapshots, each checkpoint the curve kept) on
the first N of those unseen images with the frontier's protocol, and prints a table and one JSON line
per model, so a default can be chosen without looking at test numbers.

    python bench/val_select.py runs/frontier-cifar10-resnet/{harden,harden-norms} --eps 8/255 --n 1000
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

from advtune import api
from advtune.data.splits import Dataset, TensorData
from advtune.errors import AdvtuneError
from advtune.provenance import versions
from advtune.runs.common import dataset_of
from advtune.settings import parse_number


def _largest_limit(run: Path, config: dict) -> int | None:
    """The most training images any stage behind `run` saw (the run's own --limit, its base's, the base's base...):
    the validation tail starts after all of them. None: some stage trained on all of them, or on what is not known
    (weights brought in with --weights, or a base whose record is gone)."""
    limits, seen = [], set()
    while config is not None and str(run) not in seen:
        seen.add(str(run))
        settings = config.get("run") or {}
        limits.append(None if settings.get("weights") else settings.get("limit"))
        base = config.get("base")
        base = Path(base) if isinstance(base, str) and base else None
        if base is not None and not base.is_absolute():
            base = Path(config.get("working_dir") or ".") / base
        if base is not None and not (base / "config.json").is_file():
            limits.append(None)  # its base's images are unknown
        if base is None or not (base / "config.json").is_file():
            break
        run, config = base, json.loads((base / "config.json").read_text())
    return None if any(x is None for x in limits) else max(limits)


def unseen_tail(run: Path, n: int) -> tuple[Dataset, int]:
    """The dataset with `test` replaced by the first n training images beyond the run's `limit`."""
    if not (run / "config.json").is_file() or not (run / "model.json").is_file():
        raise AdvtuneError(f"{run}: not a finished run folder (no config.json or model.json); check the path")
    config = json.loads((run / "config.json").read_text())
    limit = _largest_limit(run, config)
    meta = json.loads((run / "model.json").read_text())
    ds = dataset_of(config, meta, None, download=False)  # by its spec: a file dataset's name is no loader's
    if not limit or limit + n > len(ds.train):
        raise AdvtuneError(
            f"{run}: trained on {limit or 'all (or an unknown share)'} of {len(ds.train)} training images; no {n} "
            "unseen ones to validate on (train with --limit, or ask for fewer with --n)"
        )
    tail = TensorData(ds.train.x[limit : limit + n], ds.train.y[limit : limit + n])
    return Dataset(ds.name, ds.train, tail, ds.classes, ds.mean, ds.std, ds.source), limit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--eps", required=True, help="e.g. 8/255 or 0.3")
    p.add_argument("--n", type=int, default=1000, help="unseen training images (default 1000)")
    p.add_argument("--attacks", default="apgd-ce,apgd-t:n_target_classes=3", help="the frontier's protocol")
    p.add_argument("--snapshots", action="store_true", help="also every snapshot of each run's curve")
    p.add_argument("--snapshot", help="only this snapshot of each run (e.g. step-0001501), not the final model")
    p.add_argument("--out", type=Path, help="append the JSON lines to this file")
    a = p.parse_args(argv)
    eps = parse_number(a.eps)
    a.out = writable_out(a.out)
    for run in a.runs:
        data, limit = unseen_tail(run, a.n)
        folders = sorted((run / "snapshots").glob("step-*")) if a.snapshots and (run / "snapshots").is_dir() else []
        chosen = [*folders, run]
        if a.snapshot:
            chosen = [run / "snapshots" / a.snapshot]
            if not (chosen[0] / "model.json").exists():
                raise AdvtuneError(f"{run}: no snapshot {a.snapshot} (see {run / 'snapshots'})")
        for folder in chosen:
            model = api.load_model(folder)
            t0 = time.perf_counter()
            r = api.evaluate(model, data, eps=eps, attacks=a.attacks, limit=a.n, batch_size=500)
            cost = json.loads((folder / "cost.json").read_text()) if (folder / "cost.json").exists() else {}
            line = {
                "run": str(run),
                "model": folder.name if folder != run else "final",
                "val_images": f"train[{limit}:{limit + a.n}]",
                "attacks": a.attacks,
                "eps": eps,
                "clean": r.clean_accuracy,
                "robust": r.worst_case_accuracy,
                "grad_evals": cost.get("grad_evals"),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            emit(line, a.out)
    return 0


def emit(line: dict, out: Path | None, *, echo: bool = True) -> None:
    """One result as a JSON line on stdout (`echo`), and appended to `out` when given, with what made it (the script,
    its arguments, when, the versions and git commit): two sessions' lines in one file stay apart. One write of a
    whole line, so an interruption leaves no half line."""
    if echo:
        print(json.dumps(line), flush=True)
    if out:
        record = {**line, "recorded": provenance()}
        with Path(out).open("a") as f:
            f.write(json.dumps(record) + "\n")


@functools.lru_cache(maxsize=1)
def _versions() -> dict:
    return versions()


def provenance() -> dict:
    return {
        "script": Path(sys.argv[0]).name,
        "argv": sys.argv[1:],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
    }


def writable_out(out: str | Path | None, flag: str = "--out") -> Path | None:
    """`--out`'s folder made and checked before any work (a missing one failed after it, with a traceback)."""
    if out is None:
        return None
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdvtuneError(f"cannot write {flag} {out} ({e.strerror or e}); pick a writable path") from None
    if out.is_dir() or not os.access(out if out.exists() else out.parent, os.W_OK):  # nothing made before the work
        raise AdvtuneError(f"cannot write {flag} {out} (a folder, or not writable); pick a writable path")
    return out


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AdvtuneError as e:
        sys.exit(f"error: {e}")
