"""How a run's `--select`, `--params`, `--granularity`, `--norms` and `--head` become what it trains: a
Selection of units or layers, or a LowRank of adapters (with whole layers and normalization layers), checked
against the model; and how the records describe it. Used by finetune, harden and the experiments."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..components import model_params, output_layer
from ..errors import AdvtuneError
from ..recipe import GRANULARITIES, HEAD_GRANULARITIES, NORMS_GRANULARITIES, PROBE_SHARE, check_probe_share_used
from ..settings import default
from ..train.lowrank import (
    LowRank,
    budget_ranks,
    hybrid_ranks,
    norm_layers,
    norm_params,
    own_params,
    refuse_parametrized,
    refuse_tied,
    share_ranks,
    uniform_ranks,
)
from ..train.sparse import SparseEntries, random_entries, sparse_selection
from ..vulnerability import (
    ScoreTable,
    check_params,
    check_share,
    rank_layers,
    select_layers,
    select_quota,
    select_random,
    select_top,
    select_top_layers,
)
from .analysis_source import read_table, scored_other_model
from .configs import FinetuneRun


def make_selection(
    model,
    select: str | ScoreTable,
    share: float,
    criterion: str,
    per_layer: bool,
    seed: int,
    params: float | None = None,
    granularity: str = "unit",
    example_input=None,
    norms: bool = False,
    head: bool = False,
    entry_scores: dict | Callable[[], dict] | None = None,
):
    """Resolve `--select` into a Selection (None means everything: the full-network path).

    select: all | random | layers:<name,...> | an analyze folder (or score file) | a ScoreTable. With `params`, a
    random or analysed selection fills a parameter budget instead of a share of components;
    granularity=layer picks whole layers from the analysis (best summed score first). `norms`: the
    normalization layers' scale and shift train too, paid out of `params` (the adapter and sparse rules only).
    `head`: the output layer trains whole, paid out of `params` (hybrid, shares, sparse and probe on an analysis only).
    `entry_scores`: the per-entry scores granularity=sparse ranks entries by (vulnerability.entries), or a function
    that computes them, called only once the budget is known to fit (and only for granularity=sparse)."""
    if select != "all":
        refuse_parametrized(model)
        refuse_tied(model)
    from_analysis = isinstance(select, ScoreTable) or analysed(select)
    if head and isinstance(select, SparseEntries) and not select.whole:  # the probe's mask, taken without its head
        raise AdvtuneError("--head: this mask does not train the output layer whole; take the mask with --head")
    random_entries_control = select == "random" and granularity == "sparse"  # the sparse/probe rules' control
    if head and (granularity not in HEAD_GRANULARITIES or not from_analysis) and not random_entries_control:
        raise AdvtuneError(
            "--head trains the output layer whole next to the other layers' adapters: use it with an analysis "
            f"(--select <analyze folder>) and --granularity {', '.join(HEAD_GRANULARITIES)}, or in the random "
            "control of single entries (--select random --granularity sparse)"
        )
    selection = _make_selection(
        model, select, share, criterion, per_layer, seed, params, granularity, example_input, norms, head, entry_scores
    )
    if norms and not isinstance(selection, (LowRank, SparseEntries)):
        raise AdvtuneError(
            "--norms trains the normalization layers next to low-rank adapters or sparse entries: use it with "
            f"--granularity {', '.join(NORMS_GRANULARITIES)} and an analysis (or --select lowrank); unit selections "
            "already train the BatchNorm that follows each selected unit"
        )
    return selection


def check_selection_flags(
    select: str,
    budgeted: bool,
    granularity: str,
    probe: float = PROBE_SHARE,
    *,
    per_layer: bool = False,
    share: float | None = None,
    criterion: str | None = None,
    probe_quotas: bool = False,
) -> None:
    """A fine-tuning's selection flags that the others would ignore, refused before the data loads: the --select
    sources that take no budget or granularity (--params 0.05 with the default --select all trained every
    parameter), --probe without the probe rule, an analysis' budgeted granularities without --params
    (`budgeted`: --params is given), --per-layer or a --share other than the default where no share of
    components is taken, and a --criterion other than the default where no score table is read (the probe rule
    reads one only for its quotas); None: not given. A value that restates the default changes nothing and
    passes. The probe rule takes its mask from its probe, whatever --select is."""
    check_probe_share_used(probe, granularity)
    share_set, criterion_set = (
        v is not None and v != default(FinetuneRun, k) for k, v in (("share", share), ("criterion", criterion))
    )
    reads_table = analysed(select) and (granularity != "probe" or probe_quotas)
    if criterion_set and not reads_table:
        why = f"--select {select} reads none"
        if analysed(select):
            why = "the probe rule reads it only with --probe-quotas"
        raise AdvtuneError(f"--criterion chooses an analysis' score table, but {why}: drop --criterion")
    check_select_source(select, budgeted, granularity)
    check_share_used(select, budgeted, granularity, per_layer, share_set)


def inert_selection_settings(recorded: dict) -> set[str]:
    """The selection settings of a recorded fine-tuning (its config.json `run`) that its other settings left
    without effect: --share, --per-layer or --criterion where check_selection_flags refuses them today. A run
    started before they were refused (2026-12-06) resumes without them: each is one that check_selection_flags
    refuses with it and passes without it, so one rule decides both."""

    def refused(**given) -> bool:
        try:
            check_selection_flags(
                recorded.get("select", default(FinetuneRun, "select")),
                recorded.get("params") is not None,
                recorded.get("granularity", "unit"),
                # the probe stage records the rule's --probe with granularity unit: only the rule's own is checked
                recorded.get("probe", PROBE_SHARE) if recorded.get("granularity") == "probe" else PROBE_SHARE,
                probe_quotas=bool(recorded.get("probe_quotas", False)),
                **given,
            )
        except AdvtuneError:
            return True
        return False

    keys = [
        k
        for k in ("share", "per_layer", "criterion")
        if recorded.get(k, default(FinetuneRun, k)) != default(FinetuneRun, k)
    ]
    if not keys or refused():
        return set()  # nothing set, or refused for another reason: the usual comparison says what changed
    return {k for k in keys if refused(**{k: recorded[k]})}


def check_select_source(select: str, budgeted: bool, granularity: str) -> None:
    """--params and --granularity only where --select has a budget or an analysis to spend them on."""
    if granularity == "probe":
        return
    if analysed(select):
        check_budget_given(granularity, budgeted)
        return
    text = str(select)
    if text == "random":
        if granularity not in ("unit", "sparse"):
            raise AdvtuneError(
                f"--select random is the control of the unit rule (or of --granularity sparse); --granularity "
                f"{granularity} ranks an analysis: give --select <analyze folder>"
            )
        return
    if text == "lowrank":  # the budget's ranks: --params is its size, no granularity
        if granularity != "unit":
            raise AdvtuneError(f"--select lowrank takes no --granularity (got {granularity}); drop it")
        return
    if text.startswith("layers:") and not [n for n in text[len("layers:") :].split(",") if n.strip()]:
        raise AdvtuneError(
            f"--select {text!r} names no layer: give layers:<name,...> (a wrong name is answered with the layers)"
        )
    what = "every parameter" if text == "all" else f"what it names ({text})"
    if budgeted:
        raise AdvtuneError(
            f"--params budgets a selection, but --select {text} trains {what}: give --select <analyze folder>, "
            "random or lowrank with --params, or drop --params"
        )
    if granularity != "unit":
        raise AdvtuneError(
            f"--granularity {granularity} chooses within an analysis, but --select {text} trains {what}: give "
            "--select <analyze folder>, or drop --granularity"
        )


def check_share_used(select: str, budgeted: bool, granularity: str, per_layer: bool, share_set: bool) -> None:
    """--share and --per-layer only act where the top share of units is taken (an analysis or random, the unit
    rule, no --params); elsewhere they were dropped without a word."""
    if not (per_layer or share_set):
        return
    takes_share = not budgeted and granularity == "unit" and (analysed(select) or str(select) == "random")
    if takes_share:
        return
    flag = " and ".join(f for f, given in (("--per-layer", per_layer), ("--share", share_set)) if given)
    why = (
        "--params sets the size instead"
        if budgeted
        else f"--granularity {granularity} takes no share of units"
        if granularity != "unit"
        else f"--select {select} takes no share of components"
    )
    raise AdvtuneError(
        f"{flag}: only for the top share of units (--select <analyze folder> or random, without --params); "
        f"{why}: drop {flag}"
    )


def check_budget_given(granularity: str, budgeted: bool) -> None:
    """The rules that spend a parameter budget (whole layers, quotas, adapters, entries) need one: without it
    --granularity layer took the top share of units instead."""
    if granularity in (*NORMS_GRANULARITIES, "quota", "layer") and not budgeted:
        raise AdvtuneError(f"--granularity {granularity} needs a parameter budget (--params)")


def analysed(select: Any) -> bool:
    """--select names an analysis (a folder or a score file), not all/random/lowrank/layers."""
    text = str(select)
    return text not in ("all", "random") and not text.startswith(("lowrank", "layers:"))


def _make_selection(
    model, select, share, criterion, per_layer, seed, params, granularity, example_input, norms, head=False, entry=None
):

    if params is None:
        check_share(share)
    else:
        check_params(params, model)
    if granularity not in GRANULARITIES:
        raise AdvtuneError(f"granularity {granularity!r}: use {', '.join(GRANULARITIES)}")
    if isinstance(select, SparseEntries):  # a mask chosen already (the probe rule's, runs/probe.py)
        select.validate(model)
        return select
    if granularity == "probe":
        raise AdvtuneError(
            "--granularity probe trains a whole-network probe first and takes its mask from it: run it through "
            "`advtune finetune` or `advtune harden` (runs.finetune.finetune_folder, runs.harden.harden_model)"
        )
    if isinstance(select, ScoreTable):  # an analysis already in memory (harden)
        return select_from_table(
            select, model, share, per_layer, params, granularity, example_input, seed, norms, head, entry
        )
    if select == "all":
        return None
    if select == "lowrank" or select.startswith("lowrank:"):
        return lowrank_selection(model, select, params, seed, norms=norms)
    if select.startswith("layers:"):
        return select_layers(model, [n for n in select[len("layers:") :].split(",") if n])
    if select == "random":
        if granularity == "sparse":  # the sparse rule's control: random entries, as many
            if params is None:
                raise AdvtuneError("--select random --granularity sparse needs a parameter budget (--params)")
            budget, exclude = budget_after_norms(model, params, norms), [output_layer(model, example_input)]
            fixed = head_layer(model, budget, example_input) if head else []  # as the rule it controls
            return random_entries(model, budget, seed, exclude, norms_of(model, norms), fixed)
        if params is not None:
            return select_random(model, params=params, seed=seed, example_input=example_input)
        return select_random(model, share=share, seed=seed, per_layer=per_layer, example_input=example_input)
    table = read_table(select, criterion)
    return select_from_table(
        table, model, share, per_layer, params, granularity, example_input, seed, norms, head, entry
    )


NORMS_AUTO_SHARE = 0.25  # auto --norms: on only where the normalization layers cost at most this share of --params


def resolve_norms(model, norms: bool | None, select: Any, granularity: str, params) -> bool:
    """--norms as given, or (None: auto) on where it applies and is cheap: the probe rule, or a selection that
    trains low-rank adapters (an analysis with an adapter granularity, or --select lowrank), within a parameter
    budget, on a model with normalization layers whose scale and shift cost at most a quarter of that budget. On the
    residual CIFAR-10 frontier it was the best single lever (docs/RESULTS.md, round 7); a model without
    normalization layers (small-cnn) is unchanged."""
    if norms is not None:
        return bool(norms)
    if isinstance(select, SparseEntries):  # a mask chosen already: its normalization layers are in it or not
        return bool(select.norms)
    if params is None or not norm_layers(model):
        return False
    if granularity == "probe":  # its mask never depends on --select: the norms train where the model has them
        adapters = True
    elif isinstance(select, ScoreTable):
        adapters = granularity in NORMS_GRANULARITIES
    else:
        text = str(select)
        adapters = (
            text.startswith("lowrank")
            or (text == "random" and granularity == "sparse")  # the sparse rule's control: as the rule
            or (granularity in NORMS_GRANULARITIES and text not in ("all", "random") and not text.startswith("layers:"))
        )
    return adapters and norm_params(model) <= NORMS_AUTO_SHARE * check_params(params, model)


def norms_of(model, norms: bool) -> tuple[str, ...]:
    """The normalization layers the norms extra trains (none when it is off); refused on a model without any."""
    if not norms:
        return ()
    found = tuple(norm_layers(model))
    if not found:
        raise AdvtuneError("--norms: the model has no normalization layer with a scale and shift to train")
    return found


def budget_after_norms(model, params, norms: bool) -> int:
    """The parameter budget (entries) left for the selection once the norms extra, if on, is paid."""
    budget = check_params(params, model)
    if not norms_of(model, norms):
        return budget
    cost = norm_params(model)
    if cost >= budget:
        raise AdvtuneError(
            f"--norms: the normalization layers have {cost:,} parameters, the whole budget of {budget:,} or more; "
            "raise --params"
        )
    return budget - cost


def head_layer(model, budget: int, example_input=None) -> list[str]:
    """[the output layer] for --head, refused where it alone costs the whole budget."""
    name = output_layer(model, example_input)
    cost = own_params(model.get_submodule(name))
    if cost >= budget:
        raise AdvtuneError(
            f"--head: the output layer {name} has {cost:,} parameters, the whole budget of {budget:,} or more; "
            "raise --params"
        )
    return [name]


HEAD_AUTO_SHARE = 0.25  # auto --head: on only where the output layer costs at most this share of what the norms leave


def resolve_head(model, head: bool | None, quotas: bool, params, norms: bool, example_input=None) -> bool:
    """--head as given, or (None: auto) on with the probe rule's quotas, which give the output layer nothing (the
    analysis scores no output layer; whole, it gained +0.7 on MNIST's validation split, docs/RESULTS.md round 21),
    where the output layer costs at most a quarter of the budget the norms leave: a tiny budget keeps the quotas
    for the scored layers. harden and an experiment's `recipe: harden` variant decide it here alike."""
    if head is not None:
        return bool(head)
    if not quotas or params is None:
        return False
    left = budget_after_norms(model, params, norms)
    return own_params(model.get_submodule(output_layer(model, example_input))) <= HEAD_AUTO_SHARE * left


def lowrank_selection(
    model, select: str, params: float | None, seed: int, scores: dict | None = None, norms: bool = False
) -> LowRank:
    """`lowrank:rank=R`: adapters of rank R on every conv and linear layer; `lowrank` with a parameter
    budget: ranks that fill it, shared out by the layers' vulnerability scores when given."""
    extra = norms_of(model, norms)
    _, _, arg = select.partition(":")
    if arg:
        key, _, value = arg.partition("=")
        if key.strip() != "rank" or not value.strip().isdigit() or int(value) < 1:
            raise AdvtuneError(
                f"--select {select!r}: write lowrank:rank=<a positive integer>, or lowrank with --params"
            )
        selection = LowRank(uniform_ranks(model, int(value)), seed, norms=extra)
    elif params is None:
        raise AdvtuneError("--select lowrank needs a rank (lowrank:rank=8) or a parameter budget (--params 0.05)")
    else:
        selection = LowRank(budget_ranks(model, budget_after_norms(model, params, norms), scores), seed, norms=extra)
    selection.validate(model)
    return selection


def select_from_table(
    table: ScoreTable,
    model,
    share: float,
    per_layer: bool,
    params=None,
    granularity: str = "unit",
    example_input=None,
    seed: int = 0,
    norms: bool = False,
    head: bool = False,
    entry_scores: dict | Callable[[], dict] | None = None,
):
    """The most vulnerable components of a score table: whole layers (granularity=layer) or units
    within a parameter budget, low-rank adapters on every layer with ranks shared out by the layers'
    summed scores (granularity=lowrank), the best whole layers plus adapters on the others with the budget
    they leave (granularity=hybrid), units in every layer with the budget shared out by the layers' scores
    (granularity=quota), single weight entries of every layer, the budget shared out by the layers' scores and
    the entries ranked by `entry_scores` (granularity=sparse), or the top share of units (globally or per layer).
    `head` (hybrid, shares, sparse): the output layer, which the analysis does not score, trains whole first,
    out of the same budget."""
    check_budget_given(granularity, params is not None)
    table.check_model(model)  # every rule: the budget rules read layer sums by name (another model's: a wrong share)
    if granularity == "sparse":
        if entry_scores is None:
            raise AdvtuneError(
                "--granularity sparse ranks single entries by their adversarial-loss gradients on training examples: "
                "use it through finetune or harden, which compute them"
            )
        budget = budget_after_norms(model, params, norms)
        fixed = head_layer(model, budget, example_input) if head else []
        scores = entry_scores() if callable(entry_scores) else entry_scores  # the costly part: after the checks
        return sparse_selection(model, budget, dict(rank_layers(table)), scores, fixed, norms_of(model, norms))
    if granularity == "lowrank":
        return lowrank_selection(model, "lowrank", params, seed, dict(rank_layers(table)), norms)
    if granularity in ("hybrid", "shares"):
        budget, scores = budget_after_norms(model, params, norms), dict(rank_layers(table))
        fixed = head_layer(model, budget, example_input) if head else []
        if granularity == "hybrid":  # whole layers by score, adapters on the others with what is left
            left = budget - sum(own_params(model.get_submodule(n)) for n in fixed)
            best = [c.module for c in select_top_layers(table, model, left, example_input=example_input)]
            whole = fixed + [n for n in best if n not in fixed]  # a table that scored the head: not twice
            ranks = hybrid_ranks(model, budget, whole, scores)
        else:  # every layer its score's share: whole where that pays for it, else an adapter
            whole, ranks = share_ranks(model, budget, scores, fixed)
        if fixed and whole == fixed and not ranks:
            raise AdvtuneError(
                f"--head: the output layer {fixed[0]} leaves no budget for any other layer, not even a rank-1 "
                "adapter; raise --params"
            )
        selection = LowRank(ranks, seed, tuple(whole), norms_of(model, norms))
        selection.validate(model)
        return selection
    if granularity == "quota":  # units in every layer, the budget shared out by the layers' scores
        selection = select_quota(table, model, params, example_input=example_input)
    elif params is not None and granularity == "layer":
        selection = select_top_layers(table, model, params, example_input=example_input)
    elif params is not None:
        selection = select_top(table, params=params, model=model, example_input=example_input)
    else:
        selection = select_top(table, share, per_layer=per_layer)
    selection.validate(model)
    return selection


def describe_selection(selection, model, example=None, select=None) -> dict:
    """What a selection trains, for the records: components, units, parameters (also per layer); `select`: what
    --select named (an analysis of another model is flagged)."""

    trainable = selection.trainable_params(model, example_input=example)
    extra = {}
    if isinstance(selection, SparseEntries):  # single entries: what trains is what changes
        extra = {
            "kind": "sparse",
            "whole": list(selection.whole),
            "norms": list(selection.norms),
            "changed_params": selection.changed_entries(model),
        }
        if getattr(selection, "probe", None):  # the probe rule's mask: how it was found and what that cost
            extra["probe"] = dict(selection.probe)
    if isinstance(selection, LowRank):  # degrees of freedom differ from the entries that change
        extra = {
            "kind": "hybrid" if selection.whole else "lowrank",
            "ranks": selection.ranks,
            "whole": list(selection.whole),
            "norms": list(selection.norms),
            "changed_params": selection.changed_entries(model),
        }
    # --select's analysis scored another model: recorded, and said once the run folder opens (never above a refusal)
    other = scored_other_model(select, model) if isinstance(select, (str, Path)) and analysed(select) else None
    if other:
        extra["analysis_of_other_model"] = other
    return {
        **extra,
        "components": len(selection),
        "units": selection.n_units(model),
        "trainable_params": trainable,
        "param_share": trainable / model_params(model),
        "by_layer": selection.by_layer(model),
        "params_by_layer": selection.params_by_layer(model, example),
    }
