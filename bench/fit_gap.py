"""Is a run's robustness short on held-out images only (a generalization gap) or on the images it trained on too?

Round 42 (issue 21): the same attacks on the first N training images a run trained on and on the first N it never
saw (bench/val_select.py's validation tail), for the run's final (averaged) weights and, with --live, for the live
weights of its last checkpoint (no weight average). A model as robust on its training images as on held-out ones
has no generalization gap to close; one under another model on both falls short in what it reaches.

    python bench/fit_gap.py runs/narrow/fullft-s1 runs/narrow/probe10-s1 --eps 8/255 --n 1000 \\
        --attacks pgd:steps=5,apgd-ce --live --out fit-gap.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from advtune import api
from advtune.data.splits import Dataset, TensorData
from advtune.errors import AdvtuneError
from advtune.settings import parse_number
from val_select import emit, unseen_tail


def seen_head(run: Path, n: int) -> Dataset:
    """The dataset with `test` replaced by the first n training images, all of which the run trained on (refused
    where a --val split held some of them out)."""
    config = json.loads((run / "config.json").read_text())
    if (config.get("run") or {}).get("val"):
        raise AdvtuneError(
            f"{run}: held out a validation split (--val) from its training images, so not all of its first {n} were "
            "trained on; check a run without --val"
        )
    data, _ = unseen_tail(run, n)  # (its checks: a finished run folder with unseen images)
    head = TensorData(data.train.x[:n], data.train.y[:n])
    return Dataset(data.name, data.train, head, data.classes, data.mean, data.std, data.source)


def live_weights(run: Path):
    """The run's model with its last checkpoint's live weights (the weights the optimizer moved, before the average
    replaced them), or None where the run kept no checkpoint."""
    path = run / "checkpoint.pt"
    if not path.is_file():
        return None
    model = api.load_model(run)
    state = torch.load(path, map_location="cpu", weights_only=True)  # weights only: no code runs from the file
    model.load_state_dict(state["model"])
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--eps", required=True, help="e.g. 8/255 or 0.3")
    p.add_argument("--n", type=int, default=1000, help="images of each split (default 1000)")
    p.add_argument("--attacks", default="pgd:steps=5,apgd-ce", help="comma-separated; each reported on its own")
    p.add_argument("--live", action="store_true", help="also the last checkpoint's live weights")
    p.add_argument("--out", type=Path, help="append the JSON lines to this file")
    a = p.parse_args(argv)
    eps = parse_number(a.eps)
    attacks = [s for s in split_specs(a.attacks) if s]
    for run in a.runs:
        val, limit = unseen_tail(run, a.n)
        splits = {"train": (seen_head(run, a.n), f"train[0:{a.n}]"), "held-out": (val, f"train[{limit}:{limit + a.n}]")}
        models = {"final": api.load_model(run), **({"live": live_weights(run)} if a.live else {})}
        for weights, model in models.items():
            if model is None:
                print(f"{run}: no checkpoint.pt, no live weights to check", file=sys.stderr)
                continue
            for split, (data, images) in splits.items():
                for attack in attacks:
                    r = api.evaluate(model, data, eps=eps, attacks=attack, limit=a.n, batch_size=500)
                    emit(
                        {
                            "run": str(run),
                            "weights": weights,
                            "split": split,
                            "images": images,
                            "attack": attack,
                            "eps": eps,
                            "clean": r.clean_accuracy,
                            "robust": r.worst_case_accuracy,
                        },
                        a.out,
                    )
    return 0


def split_specs(text: str) -> list[str]:
    """Attack specs separated by commas, a spec's own `key=value` parameters kept with it
    (`pgd:steps=5,apgd-ce` -> ['pgd:steps=5', 'apgd-ce'])."""
    out: list[str] = []
    for part in text.split(","):
        if out and "=" in part and ":" not in part:  # a parameter of the spec before it
            out[-1] += "," + part
        else:
            out.append(part.strip())
    return out


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AdvtuneError as e:
        sys.exit(f"error: {e}")
