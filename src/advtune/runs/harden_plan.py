"""Planning a harden run: everything validated before any work or any file (the budget, the recipe's
parameter budget, the held-out split, the evaluation's attacks), as a `HardenPlan`."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .. import filenames as files
from ..attacks import build_attack, split_attack_list
from ..components import fingerprint, layers, unit_params
from ..distributed import check_global_batch
from ..errors import AdvtuneError
from ..evaluation import SUITES, check_attacks  # --evaluation may name a suite, as advtune evaluate --suite
from ..models import load_model
from ..recipe import Recipe
from ..settings import default, negatable
from ..storage import read_json
from ..threat import ThreatModel
from ..train import TrainConfig, build_objective, check_objective, cost_per_example, probe_stage_attack
from ..train.distill import check_probe_teacher
from ..train.lowrank import (
    adaptable_layers,
    adapter_size,
    budget_ranks,
    own_params,
    refuse_parametrized,
    refuse_tied,
    share_ranks,
)
from ..vulnerability import list_criteria
from .common import example_input, same_setting
from .configs import AnalyzeRun, EvaluateRun, FinetuneRun, HardenRun
from .selecting import budget_after_norms, head_layer, resolve_head, resolve_norms


def default_budget(recipe: Recipe, per_example: float, n_train: int) -> int:
    """The default training budget in gradient evaluations: `recipe.epochs` passes over the data."""
    return int(math.ceil(recipe.epochs * n_train * per_example))


def check_budget(budget: Any, per_example: float, batch_size: int, n_train: int) -> int:
    """A budget must pay for at least one optimizer step."""
    per_step = per_example * min(batch_size, n_train)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise AdvtuneError(f"--budget must be a number of gradient evaluations, got {budget!r}")
    if budget < per_step:
        raise AdvtuneError(
            f"--budget {budget:,} is below one optimizer step ({per_step:,.0f} gradient evaluations: "
            f"{min(batch_size, n_train)} examples x {per_example:g}); raise it"
        )
    return int(budget)


def check_recipe_fits(model, recipe: Recipe, example=None) -> None:
    """Refuse, before any work, a parameter budget that no candidate (a whole layer, or a unit) fits."""
    budget = budget_after_norms(model, recipe.params, recipe.norms)  # the norms extra is paid first
    if recipe.trains_head:  # then the output layer, whole
        budget -= sum(own_params(model.get_submodule(n)) for n in head_layer(model, budget, example))
    if recipe.granularity == "lowrank":
        budget_ranks(model, budget)  # refuses a budget below rank 1 on every layer
        return
    if recipe.granularity == "sparse":  # single entries: any budget left after the norms and the head fits one
        if budget <= 0:
            raise AdvtuneError("--granularity sparse: the norms and the head take the whole budget; raise --params")
        return
    if recipe.granularity == "probe":  # single weight entries once the biases (whole, but under the quotas) are paid
        from ..train.probe import whole_params

        params = dict(model.named_parameters())
        biases = 0 if recipe.quotas else sum(params[n].numel() for n in whole_params(model, ()))
        if budget - biases <= 0:
            raise AdvtuneError(
                "--granularity probe: the biases and normalization layers take the whole budget; raise --params"
            )
        return
    if recipe.granularity == "shares":
        # which layer the shares favour is known only after the analysis; where the best-scored layer's rank-1
        # adapter did not fit, the rule would refuse then: refuse now any budget under the largest such adapter
        modules = dict(model.named_modules())
        scored = [n for n, _ in layers(model, include_output=False)] or adaptable_layers(model)
        need, name = max((adapter_size(modules[n].weight, 1), n) for n in scored)
        if budget < need:
            raise AdvtuneError(
                f"--granularity shares: a budget of {budget:,} entries may pay for no layer (a rank-1 adapter on "
                f"{name}, the largest, takes {need:,}); raise --params"
            )
        share_ranks(model, budget, {})
        return
    whole = recipe.granularity in ("layer", "hybrid")  # hybrid: at least one whole layer must fit
    per_unit = unit_params(model, example)
    candidates = [n for n, _ in layers(model, include_output=False)] or [n for n, _ in layers(model)]
    units = dict(fingerprint(model))
    smallest = min(per_unit[n] * (units[n] if whole else 1) for n in candidates)
    if smallest > budget:
        what = "whole layer" if whole else "unit"
        raise AdvtuneError(
            f"no {what} fits in a budget of {budget:,} parameters (the smallest has {smallest:,}); "
            "raise --params" + (" or use --granularity unit" if whole else "")
        )


@dataclass(frozen=True)
class HardenPlan:
    """A harden run validated before any work: its threat model, budget and training settings."""

    threat: ThreatModel
    budget: int  # fine-tuning gradient evaluations
    train: TrainConfig
    evaluation: str  # the attack list (or suite) the evaluation runs under this threat model
    holdout: int = 0  # training examples held out to choose the checkpoint (0: keep the last)
    recipe: Recipe | None = None  # the run's recipe with its auto settings decided for this model


def resolve_recipe(model, recipe: Recipe, example=None) -> Recipe:
    """The recipe with what it leaves to the model decided (--norms auto: on for a model with normalization
    layers, runs/selecting.py resolve_norms; --probe-quotas auto: on with the probe rule; --head auto: on with its
    quotas where the output layer is cheap): what harden runs and records, so a resume compares what ran."""
    norms = resolve_norms(model, recipe.norms, "analysis", recipe.granularity, recipe.params)
    head = resolve_head(model, recipe.head, recipe.quotas, recipe.params, norms, example)
    return replace(recipe, norms=norms, probe_quotas=recipe.quotas, head=head)


HOLDOUT = 1000  # held-out training examples that choose the checkpoint (at most a tenth of the data)


def with_holdout(ds, run: HardenRun):
    """The dataset with `run.holdout` training examples held out as its validation split (seeded), unless
    it has one already; the split that chooses harden's checkpoint, never analysed or fine-tuned on (the base
    model may have trained on them)."""
    if ds.val is not None and len(ds.val):  # the caller's own split (the Python API's Dataset with val)
        return ds if run.keep_best else replace(ds, val=None)
    n = len(ds.train)
    size = run.holdout if run.holdout is not None else min(HOLDOUT, n // 10)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise AdvtuneError(f"--holdout must be a number of training examples >= 0, got {size!r}")
    if run.holdout is not None and size >= n:
        raise AdvtuneError(f"--holdout {size} leaves no training data (it has {n} examples); hold out fewer")
    return ds.split_validation(size, run.seed) if size and run.keep_best else ds


def check_analysis_stage(recipe: Recipe, threat: ThreatModel) -> None:
    """The analysis stage's own settings (its criterion, attack and size), refused before the folder is made."""
    if recipe.criterion not in list_criteria():
        raise AdvtuneError(f"unknown --criterion {recipe.criterion!r}; valid: {', '.join(list_criteria())}")
    n = recipe.analysis_limit
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise AdvtuneError(f"--analysis-limit must be a positive number of training examples, got {n!r}")
    try:
        build_attack(recipe.analysis_attack, threat)
    except AdvtuneError as e:  # harden takes three attack lists: say which one is wrong
        raise AdvtuneError(f"--analysis-attack: {e}") from None


def check_harden_settings(run: HardenRun) -> tuple[ThreatModel, str, TrainConfig]:
    """What harden's settings alone decide, refused before the base or the data are read (plan_harden checks the
    rest against the model and data): the threat, the evaluation's attacks (Square dropped for l2) and the training
    settings."""
    if isinstance(run.keep_best, bool) or not isinstance(run.keep_best, int) or run.keep_best < 0:
        raise AdvtuneError(f"--keep-best must be a number of checkpoints >= 0, got {run.keep_best!r}")
    if run.eps is None:
        raise AdvtuneError("harden needs --eps (e.g. 0.3 or 0.1 for MNIST, 8/255 for CIFAR-10)")
    if run.keep_best == 0 and run.holdout:  # nothing would be chosen on it: the images would be lost to training
        raise AdvtuneError(
            f"--holdout {run.holdout} chooses between checkpoints, but --keep-best 0 keeps the last: "
            "drop --holdout or give --keep-best N"
        )
    # new runs only: a run started before these were refused resumes with the flags it was started with
    if not run.resume and run.holdout == 0 and run.keep_best not in (0, default(HardenRun, "keep_best")):
        raise AdvtuneError(
            f"--keep-best {run.keep_best} chooses between checkpoints on the held-out split, but --holdout 0 holds "
            "none out (the last weights are kept): drop --keep-best or give --holdout N"
        )
    if not run.resume and run.budget is not None and run.recipe.epochs != default(Recipe, "epochs"):
        raise AdvtuneError(
            f"--epochs {run.recipe.epochs:g} and --budget both set how long the fine-tuning runs; give one of them"
        )
    threat = ThreatModel(run.norm, run.eps)  # refuses eps <= 0 and eps beyond the pixel range
    if run.limit_test is not None and (isinstance(run.limit_test, bool) or run.limit_test < 1):
        raise AdvtuneError(f"--limit-test must be a positive number of test examples, got {run.limit_test}")
    check_analysis_stage(run.recipe, threat)
    check_objective(run.recipe.attack, threat)  # the training attack: its spec, before the base or the data
    evaluation = run.evaluation
    if evaluation not in SUITES:
        specs = split_attack_list(evaluation)
        if threat.norm != "linf" and evaluation == default(HardenRun, "evaluation"):
            # the default's Square is linf-only (as in the standard suite); one named in --evaluation is refused below
            specs = [a for a in specs if not a.strip().lower().startswith("square")] or specs
        try:  # each spec, and none twice (refused at the evaluation, after the whole fine-tuning, before)
            check_attacks([build_attack(spec, threat) for spec in specs])
        except AdvtuneError as e:
            raise AdvtuneError(f"--evaluation: {e}") from None
        evaluation = ",".join(specs)
    train = TrainConfig(
        epochs=1,
        batch_size=run.recipe.batch_size,
        optimizer=run.recipe.optimizer,
        lr=run.recipe.lr,
        schedule=run.recipe.schedule,
        ema=run.recipe.ema,
        augment=run.recipe.augment,
        regrow=run.recipe.regrow,
        seed=run.seed,
    )  # validates lr, optimizer, schedule, batch, ema, augment
    check_global_batch(run.recipe.batch_size)  # torchrun: before anything is written
    return threat, evaluation, train


def plan_harden(model, ds, run: HardenRun) -> HardenPlan:
    """Validate everything a harden run needs, before anything is written or computed."""
    threat, evaluation, train = check_harden_settings(run)
    ds = with_holdout(ds, run)
    layers(model)  # a model with no Conv2d/Linear layer has nothing to select
    refuse_parametrized(model)
    refuse_tied(model)
    example = example_input(model, ds)
    recipe = resolve_recipe(model, run.recipe, example)
    check_recipe_fits(model, recipe, example)
    if probe_stage_attack(recipe.attack) is not None and recipe.granularity != "probe":
        raise AdvtuneError("distill:teacher=probe needs the probe rule (--granularity probe); or give a model folder")
    # distill:teacher=probe: all of it refused now, not after the analysis and probe; no teacher before the probe
    teaching = check_probe_teacher(recipe.attack, run.out or None)
    objective = build_objective(
        teaching or recipe.attack, threat, "eval", recipe.eps_warmup, model=model, load_model=load_model
    )
    per_example = cost_per_example(objective, model, example)
    budget = run.budget if run.budget is not None else default_budget(run.recipe, per_example, len(ds.train))
    budget = check_budget(budget, per_example, run.recipe.batch_size, len(ds.train))
    return HardenPlan(threat, budget, train, evaluation, len(ds.val) if ds.val is not None else 0, recipe)


# what a harden run recorded before these settings existed ran as (its --resume compares with them)
HARDEN_DEFAULTS = {"holdout": 0, "keep_best": 0}
RECIPE_DEFAULTS = {
    "ema": 0.0,
    "norms": False,
    "head": False,
    "probe": 0.2,
    "probe_quotas": False,
    "augment": "none",
    "regrow": 0.0,
}


def check_harden_resume(out: Path, run: HardenRun, base_sha256: str) -> None:
    """--resume continues the run `out` records only: the same settings (each named with its saved value when not)
    and the same base weights (a base retrained in place would mix two bases' stages)."""
    if not (out / files.CONFIG).is_file():
        return
    recorded = read_json(out / files.CONFIG, "harden config")
    saved, now, working_dir = recorded.get("run", {}), run.to_json(), recorded.get("working_dir")
    saved = {**HARDEN_DEFAULTS, **saved, "recipe": {**RECIPE_DEFAULTS, **(saved.get("recipe") or {})}}
    ignored = ("resume", "overwrite", "device", "out")  # where it runs: a moved harden folder resumes
    changed = [
        k for k in now if k not in ignored and not same_setting(k, saved.get(k), now[k], working_dir=working_dir)
    ]
    if changed:  # the recipe's keys with their saved values: a default may have changed since, not a flag
        recipe = [
            flag_words(k, saved["recipe"].get(k))
            for k in now.get("recipe", {})
            if "recipe" in changed and saved["recipe"].get(k) != now["recipe"][k]
        ]
        said = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed if k != "recipe"]
        said += [f"recipe, saved as {' '.join(recipe)}"] if recipe else []
        raise AdvtuneError(
            f"--resume with different settings ({'; '.join(said)}); use the original flags or a new --out"
        )
    if recorded.get("base_sha256") not in (None, base_sha256):
        raise AdvtuneError(
            f"--resume: the weights of {run.base} changed since {out} started (another model in the same folder); "
            "harden it into a new --out"
        )


def flag_words(key: str, value) -> str:
    """A recorded setting as the flag that gives it back: `--lr 0.003`, `--norms` / `--no-norms`, and
    `without --flag` for a switch that has no `--no-` form."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        if value:
            return flag
        field = next((f for f in fields(Recipe) if f.name == key), None)
        return "--no-" + key.replace("_", "-") if field and negatable(field, field.default) else f"without {flag}"
    return f"{flag} {value}"


# ---------------------------------------------------------------- the stages' settings, from the plan


def analysis_settings(run: HardenRun, n_train: int, out: Path | None) -> AnalyzeRun:
    """The analysis stage: the recipe's criterion under its attack on the first training examples
    (--limit caps it too)."""
    n = min(run.recipe.analysis_limit, n_train)
    return AnalyzeRun(
        base=run.base,
        out=str(out / files.ANALYSIS) if out else "",
        eps=run.eps,
        attack=run.recipe.analysis_attack,
        norm=run.norm,
        criteria=(run.recipe.criterion,),
        limit=n,
        curve_limit=min(n, 1000),
        seed=run.seed,
        data_dir=run.data_dir,
        device=run.device,
        overwrite=bool(out) and (out / files.ANALYSIS).exists(),
    )


def finetune_settings(run: HardenRun, plan: HardenPlan, out: Path | None) -> FinetuneRun:
    """The fine-tuning stage: the recipe on the analysis' selection, for the plan's budget."""
    ft_dir = out / files.FINETUNE if out else None
    return FinetuneRun(
        base=run.base,
        out=str(ft_dir) if ft_dir else "",
        eps=run.eps,
        select=str(out / files.ANALYSIS) if out else "all",  # in memory: the analysis' table is passed in
        criterion=run.recipe.criterion,
        params=run.recipe.params,
        granularity=run.recipe.granularity,
        probe=run.recipe.probe,
        probe_quotas=run.recipe.quotas,
        norms=run.recipe.norms,
        head=run.recipe.trains_head,
        attack=run.recipe.attack,
        norm=run.norm,
        eps_warmup=run.recipe.eps_warmup,
        train=plan.train,
        data_dir=run.data_dir,
        limit=run.limit,
        limit_test=run.limit_test,
        monitor_test=0,
        keep_best=run.keep_best if plan.holdout else 0,
        budget=plan.budget,
        device=run.device,
        resume=bool(ft_dir) and (ft_dir / files.CONFIG).is_file(),
        overwrite=False,
    )


def evaluation_settings(run: HardenRun, plan: HardenPlan, model_dir: str, name: str, out: Path | None) -> EvaluateRun:
    """The strong evaluation, before and after, on the same test examples."""
    suite = plan.evaluation if plan.evaluation in SUITES else None
    return EvaluateRun(
        run=model_dir,
        eps=(run.eps,),
        attacks=None if suite else plan.evaluation,
        suite=suite,
        norm=run.norm,
        limit_test=run.limit_test,
        cascade=True,
        name=name,
        record_dir=str(out) if out else None,
        seed=run.seed,
        data_dir=run.data_dir,
        device=run.device,
    )
