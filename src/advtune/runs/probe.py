"""The probe rule (#21, RESULTS round 18) as two fine-tuning stages, each an `advtune finetune` run folder
(harden: its probe/ and finetune/; `advtune finetune --granularity probe --out OUT`: OUT.probe and OUT):

    probe/      the whole network, adversarially fine-tuned for the first --probe share of the budget (the eps ramp
                rescaled to end where the one-stage ramp ends, so the probe must be longer than the ramp)
    finetune/   the mask: the weight entries the probe moved most within --params (biases and, with the norms,
                the normalization layers whole, paid first: train/probe.py); every other entry back to the base's
                value; then the rest of the budget within the mask at the full eps, from a fresh seed (the probe's
                batches are not replayed), fresh Adam moments and a fresh weight average

The probe is paid out of the budget: the second stage's cost meter starts with the probe's counts, so its cost.json
(and harden's finetune_grad_evals) is the cost of both stages. Each stage resumes from its own folder; a finished
probe is read back, and its mask recomputed from the same weights is the same mask.
On the residual CIFAR-10 network (validation, 540k gradient evaluations) the rule reached 27.2% / 28.2% (two
seeds) against the Fisher-masked and adapter rules' 22-24%, at equal compute (docs/RESULTS.md, round 18).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .. import filenames as files
from ..devices import model_device
from ..distributed import broadcast, on_main
from ..errors import AdvtuneError
from ..models import load_model
from ..patch import cpu_state, state_sha256
from ..storage import read_json
from ..train import TrainConfig
from ..train.config import REGROW_HOW
from ..train.distill import check_probe_teacher, with_probe_teacher
from ..train.lowrank import adaptable_layers, norm_params, refuse_parametrized, refuse_tied
from ..train.probe import movement_mask, movement_scores, start_weights, whole_params
from ..train.sparse import SparseEntries, sparse_selection
from ..vulnerability import check_params, rank_layers
from .common import check_same_base, check_same_run, example_input
from .configs import FinetuneRun
from .finetune import FinetuneSummary, check_probe_rule, finetune_folder, finetune_model, prepare_finetune
from .selecting import analysed, head_layer, inert_selection_settings, norms_of, read_table, resolve_norms

PROBE = files.PROBE  # harden's sub-folder of the probe stage (`advtune finetune` keeps it next to its --out)
# the cost counters the second stage's meter starts from (the per-example FLOPs it measures itself)
COUNTERS = (
    "wall_s",
    "examples",
    "attack_grad_evals",
    "update_grad_evals",
    "forward_evals",
    "partial_passes",
    "partial_grad_evals",
    "peak_memory_bytes",  # the meter keeps the larger of this and its own (the probe's whole-network peak)
)


@dataclass
class Probed:
    """The probe stage done: the masked stage's start weights (a copy; the base is untouched), its mask, its
    settings, and what the probe cost."""

    start: object
    mask: SparseEntries
    run: FinetuneRun  # the masked stage: the budget the probe left, eps at full from its first step, the next seed
    spent: dict  # the probe's counters, which the masked stage's cost meter starts from
    base_state: dict  # the base's weights (the masked stage's patch is from them, not from its start)


def probe_settings(ft: FinetuneRun, folder: Path | None) -> FinetuneRun:
    """The probe stage: every parameter for ft.probe of the budget, the eps ramp over its first eps_warmup/probe.
    In a folder it resumes what is there (`ft.overwrite`: starts it again)."""
    check_probe_rule(ft)  # as check_finetune does before the data loads; again here for direct callers (bench/)
    share, ramp = ft.probe, ft.eps_warmup or 0.0
    teaching = check_probe_teacher(ft.attack, None if folder is None else str(folder))  # the probe: no teacher yet
    return replace(
        ft,
        out=str(folder) if folder else "",
        attack=teaching or ft.attack,
        select="all",
        granularity="unit",
        train=without_regrow(ft.train),  # the probe trains every entry: no mask to move
        params=None,
        norms=False,
        head=False,
        budget=int(share * ft.budget),
        eps_warmup=ramp / share,
        keep_best=0,
        points=0,
        probe_quotas=False,  # how the mask is taken from it: the same probe either way
        monitor_test=0,  # no look at the test split between the stages
        resume=bool(folder) and (folder / files.CONFIG).is_file() and not ft.overwrite,
        overwrite=bool(folder) and ft.overwrite,
    )


def without_regrow(train: TrainConfig) -> TrainConfig:
    """`train` with the moving mask's settings at their defaults (the probe's settings are the same whatever the
    masked stage's --regrow, so one probe serves both and its recorded settings match on --resume)."""
    fixed = TrainConfig()
    moves = ("regrow", *REGROW_HOW)
    return replace(train, **{k: getattr(fixed, k) for k in moves})


def probe_folder(out: str | Path) -> Path:
    """Where `advtune finetune --granularity probe --out OUT` keeps its probe stage: next to OUT (OUT itself is
    created only once the mask is known, with the settings it trains with)."""
    out = Path(out)
    return out.with_name(out.name + ".probe")


def check_probe(model, ds, ft: FinetuneRun, norms: tuple[str, ...], table=None) -> int:
    """Everything the masked stage would refuse, refused before the probe trains (after probe_settings' checks):
    returns the mask's entry budget."""
    refuse_parametrized(model)
    refuse_tied(model)
    if ft.probe_quotas and table is None and not analysed(ft.select):
        raise AdvtuneError(
            "--probe-quotas shares the mask out by an analysis' layer scores: give --select <analyze folder>"
        )
    if ft.keep_best and (ds.val is None or len(ds.val) == 0):
        raise AdvtuneError("--keep-best chooses on held-out training examples: give --val N (e.g. --val 1000)")
    if isinstance(ft.points, bool) or not isinstance(ft.points, int) or ft.points < 0:
        raise AdvtuneError(f"points must be a non-negative integer (snapshots along the run), got {ft.points!r}")
    if ft.probe_quotas:  # another model's analysis would share the mask out by its layers' sums, without a word
        (table if table is not None else read_table(ft.select, ft.criterion)).check_model(model)
    budget = check_params(ft.params, model)
    params = dict(model.named_parameters())
    whole = norm_params(model) if ft.probe_quotas and norms else 0  # quotas rank the biases with the weights
    paid = whole if ft.probe_quotas else sum(params[n].numel() for n in whole_params(model, norms))
    if paid >= budget:
        what = "normalization layers" if ft.probe_quotas else "biases and normalization layers"
        raise AdvtuneError(
            f"--granularity probe: the {what} have {paid:,} parameters, the whole budget of {budget:,} or more; "
            "raise --params"
        )
    if ft.head:  # the output layer whole (quotas only: check_finetune), paid after the norms: refused if it fills it
        head_layer(model, budget - paid, example_input(model, ds))
    return budget


def probe_then_mask(
    model, meta: dict, ds, ft: FinetuneRun, folder: Path | None, say: Callable[[str], None], table=None
) -> Probed:
    """Run (or read back from `folder`) the probe of `model` (left unchanged), take its mask within ft.params and
    put every entry outside it back to the base: the masked stage's start, mask and settings. `table`: the analysis'
    scores for --probe-quotas (default: read from ft.select). Under torchrun rank 0 decides whether a finished probe
    is read back and builds the mask, and every rank trains that mask."""
    first = probe_settings(ft, folder)  # refuses bad settings before any work
    norms = norms_of(model, resolve_norms(model, ft.norms, ft.select, "probe", ft.params))
    budget = check_probe(model, ds, ft, norms, table)
    if ft.probe_quotas and table is None:
        table = read_table(ft.select, ft.criterion)
    scored = {n for n, s in rank_layers(table) if math.isfinite(s)} if ft.probe_quotas else set()
    if ft.probe_quotas and not scored.intersection(adaptable_layers(model)):
        raise AdvtuneError(  # what the quotas' mask would refuse once the probe had trained: refused before it
            "--probe-quotas needs the analysis' layer scores, and none of the model's layers has one: analyse this "
            "model (advtune analyze) or use --no-probe-quotas"
        )
    base_state = cpu_state(model)
    done = broadcast(on_main(lambda: folder is not None and (folder / files.SUMMARY).is_file() and not ft.overwrite))
    if done:  # finished earlier: read back, if it ran with these settings
        recorded = read_json(folder / files.CONFIG, "probe config")
        saved = recorded.get("run", {})
        check_same_run(
            saved, first.to_json(), ignore=inert_selection_settings(saved), working_dir=recorded.get("working_dir")
        )
        check_same_base(recorded, state_sha256(base_state), folder)
        probed, _ = load_model(folder, model_device(model))
        spent = FinetuneSummary.read(folder / files.SUMMARY).cost
    else:
        say(
            f"probe: the whole network for {100 * ft.probe:g}% of the budget (about {first.budget:,} gradient "
            "evaluations, in whole steps), to find the entries that move"
        )
        probed = copy.deepcopy(model)
        if folder is not None:
            spent = finetune_folder(probed, meta, ds, first).cost
        else:
            spent = finetune_model(probed, ds, prepare_finetune(probed, ds, first)).cost

    def mask_of() -> tuple[SparseEntries, int]:
        if not ft.probe_quotas:
            return movement_mask(model, probed, budget, norms)
        left = budget - (norm_params(model) if norms else 0)
        head = head_layer(model, left, example_input(model, ds)) if ft.head else []  # paid inside sparse_selection
        scores = movement_scores(model, probed)
        chosen = sparse_selection(model, left, dict(rank_layers(table)), scores, head, norms)
        # the entries the movement chose: the output layer's (whole with --head) are counted by the selection
        weights = [n for n in scores if n.rpartition(".")[2] == "weight" and n.rpartition(".")[0] not in head]
        return chosen, sum(int(chosen.entries[n].sum()) for n in weights if n in chosen.entries)

    mask, entries = broadcast(on_main(mask_of))
    mask.probe = {  # the selection record says how the mask was found and what finding it cost
        "share": ft.probe,
        "quotas": bool(ft.probe_quotas),
        "grad_evals": spent["grad_evals"],
        "wall_s": spent.get("wall_s", 0.0),
        "weight_entries": entries,
        "folder": str(folder) if folder is not None else None,
    }
    if spent["grad_evals"] >= ft.budget:  # its whole batches overshot a tiny budget: nothing left to the mask
        raise AdvtuneError(
            f"--budget {ft.budget:,}: the probe stage alone spent {spent['grad_evals']:,} gradient evaluations (whole "
            "batches), leaving none to the masked stage; raise --budget (with --overwrite: the probe ran with this one)"
        )
    seed = None if ft.train.seed is None else ft.train.seed + 1  # not the probe's batches again
    rest = replace(
        ft,
        attack=with_probe_teacher(ft.attack, str(folder)) if folder is not None else ft.attack,
        budget=ft.budget - spent["grad_evals"],
        eps_warmup=0.0,
        train=replace(ft.train, seed=seed),
    )
    counts = {k: spent[k] for k in COUNTERS if k in spent}
    return Probed(start_weights(probed, base_state, mask), mask, rest, counts, base_state)
