"""Is a run's robustness short on held-out images only (a generalization gap) or on the images it trained on too?

Round 42 (issue 21): the same attacks on the first N training images a run trained on and on the first N it never
saw (bench/val_select.py's validation tail), for the run's final (averaged) weights and, with --live, for the live
weights of its last checkpoint (no weight average). A model as robust on its training images as on held-out ones
has no generalization gap to close; one under another model on both falls short in what it reaches. The first N
images must all have been trained on: a run that held images out (--val, --keep-best, harden) is refused, and so is
an N above its training count, and a run of less than one pass over its data (cost.json's examples).

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
from advtune.attacks import split_attack_list
from advtune.data.splits import Dataset, TensorData
from advtune.errors import AdvtuneError
from advtune.settings import parse_number
from val_select import emit, unseen_tail, writable_out


def seen_head(run: Path, n: int) -> Dataset:
    """The dataset with `test` replaced by the first n training images, all of which the run trained on: refused where
    the run held some of its images out (--val, --keep-best, harden's hold-out), trained on fewer than n or made less
    than one pass over them."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise AdvtuneError(f"--n must be a positive number of images, got {n!r}")
    data, _ = unseen_tail(run, n)  # (its checks first: a finished run folder with unseen images)
    config = json.loads((run / "config.json").read_text())
    settings, dataset = config.get("run") or {}, config.get("dataset") or {}
    held = [k for k in ("val", "keep_best") if settings.get(k)] + (["holdout"] if settings.get("holdout") else [])
    if dataset.get("val") or held or config.get("command") == "harden":
        raise AdvtuneError(
            f"{run}: held out images of its training data ({', '.join(held) or 'a validation split'}), so not all of "
            f"its first {n} were trained on; check a finetune or train run without --val, --keep-best or --holdout"
        )
    if dataset.get("train") is not None and n > dataset["train"]:
        raise AdvtuneError(f"{run}: trained on {dataset['train']} images, fewer than --n {n}; ask for fewer")
    cost = json.loads((run / "cost.json").read_text()) if (run / "cost.json").is_file() else {}
    examples = cost.get("examples")
    probe = (config.get("selection") or {}).get("probe") or {}
    if examples is not None and probe.get("grad_evals") and cost.get("grad_evals"):
        # the probe rule's cost meter starts with its probe's counts: the masked stage's own share of the examples
        examples = round(examples * (1 - probe["grad_evals"] / cost["grad_evals"]))
    if dataset.get("train") and examples is not None and examples < dataset["train"]:
        raise AdvtuneError(
            f"{run}: trained on {examples} examples{' after its probe' if probe else ''}, less than one pass over its "
            f"{dataset['train']} images, so not all of its first images were trained on; check a run of at least one "
            "epoch"
        )
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
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:  # e.g. a low-rank run: its checkpoint holds the adapters, not merged weights
        raise AdvtuneError(
            f"{run}: its checkpoint's weights do not fit its saved model ({type(e).__name__}); drop --live"
        ) from None
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--eps", required=True, help="e.g. 8/255 or 0.3")
    p.add_argument("--n", type=int, default=1000, help="images of each split (default 1000)")
    p.add_argument("--attacks", default="pgd:steps=5,apgd-ce", help="comma-separated; each reported on its own")
    p.add_argument("--live", action="store_true", help="also the last checkpoint's live weights")
    p.add_argument("--out", type=Path, help="append the JSON lines to this file")
    a = p.parse_args(argv)
    eps = parse_number(a.eps)
    a.out = writable_out(a.out)
    attacks = split_attack_list(a.attacks)
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


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AdvtuneError as e:
        sys.exit(f"error: {e}")
