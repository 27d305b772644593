"""The public API for your own model and data: evaluate, analyze, harden, fit (see docs/api.md).

Every function takes any `nn.Module` whose input is pixels in [0, 1] (normalisation, if any, is the
model's first layer), with or without BatchNorm, on the model's device; and `data` as an ``(x, y)``
pair of tensors, any iterable of ``(x, y)`` batches (a DataLoader), or an advtune dataset. The data
goes through one input adapter (`advtune.inputs`), so mistakes are one-line `AdvtuneError`s.

These functions leave the model in the mode they found it, and (except `fit`) never change its
weights: `harden` returns a hardened copy.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .attacks import Attack, build_attack, logits_of, split_attack_list
from .components import Selection
from .cost import CostMeter
from .data import Dataset
from .devices import eval_mode, model_device, model_dtype, require_module, resolve_device
from .errors import AdvtuneError
from .evaluation import SUITES, EvalResult, robust_accuracy, suite, with_compile
from .inputs import as_tensor_data, batches, check_devices, check_joinable, data_device, resolve_split, validation_split
from .keywords import keyword_errors, unexpected_keyword
from .models import load_model as _load_model
from .models import model_identity, unwrapped
from .models import save_model as _save_model
from .recipe import Recipe
from .runs.analyze import analyze_model
from .runs.common import overfit_guard
from .runs.configs import AnalyzeRun, HardenRun
from .runs.harden import HardenResult, harden_model
from .seeding import make_generator, preserved_rng, seed_everything
from .settings import default
from .threat import ThreatModel
from .train import History, Objective, TrainConfig
from .train import fit as _fit
from .vulnerability import (
    VulnerabilityMap,
)


def _threat(eps: float, norm: str) -> ThreatModel:
    return ThreatModel(norm, eps)  # validates norm and eps with one-line errors


def _seed(seed: Any, batch_size: Any = None) -> int | None:
    """The keywords every call shares, checked in the API's words (the commands' checks name their flags); the seed
    as a plain int (a numpy integer is recorded as a number)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63):
        raise AdvtuneError(f"seed must be an integer in [0, 2^63) or None (nondeterministic), got {seed!r}")
    whole = isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool)
    if batch_size is not None and (not whole or batch_size < 1):
        raise AdvtuneError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    return None if seed is None else int(seed)


def _attacks(attacks: str | Attack | Sequence[Attack], threat: ThreatModel) -> list[Attack]:
    """A suite name ("standard", "quick"), a comma list of specs ("apgd-ce,apgd-t"), or attack objects."""
    if isinstance(attacks, str):
        if not attacks.strip():  # the command's words ("--attacks ... or --suite") read as no Python
            raise AdvtuneError(
                "attacks is empty: give attacks='standard', a list such as 'fgsm,pgd:steps=40', or attacks"
            )
        if attacks in SUITES:
            return suite(attacks, threat)
        return [build_attack(s, threat) for s in split_attack_list(attacks)]
    built = [attacks] if not isinstance(attacks, (list, tuple)) else list(attacks)
    for a in built:
        if isinstance(getattr(a, "threat", None), ThreatModel) and a.threat != threat:
            raise AdvtuneError(
                f"attack {getattr(a, 'spec', a)!r} was built for {a.threat}, but eps/norm say {threat}; "
                f"build it with ThreatModel.{threat.norm}(eps) (or pass attacks by name)"
            )
    return built


def _check_model(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """One forward on two examples before any work: a model that cannot take the inputs or does not return (N,
    classes) logits, or labels past its outputs, are one-line errors (not a traceback from inside the work)."""
    check_devices(model_device(model))  # a meta model ran the forward and failed later, inside torch
    with eval_mode(model), torch.no_grad():
        classes = logits_of(model, x[:2].to(model_dtype(model))).shape[1]
    if len(y) and int(y.max()) >= classes:
        raise AdvtuneError(f"labels must be in [0, {classes - 1}] for a model of {classes} outputs, got {int(y.max())}")


def _check_float32(model: nn.Module, what: str) -> None:
    """Training keeps float32 master weights (reduced precision is autocast's job, `amp=`), and its data
    pipeline feeds float32 batches: another dtype would fail deep inside the first convolution."""
    require_module(model)  # a state_dict or a function failed inside with an AttributeError
    dtypes = {t.dtype for t in model.parameters() if t.is_floating_point()} - {torch.float32}
    if dtypes:
        raise AdvtuneError(
            f"{what} trains float32 weights, but the model has {', '.join(sorted(map(str, dtypes)))} ones: call "
            "model.float() first "
            "(for reduced precision on a GPU: TrainConfig(amp='bf16'))"
        )


def _take(
    model: nn.Module, data: Any, limit: int | None, what: str, threat: ThreatModel | None = None, batch_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """The first `limit` examples of `data` as validated tensors on the model's device."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise AdvtuneError(f"limit must be a positive integer or None, got {limit!r}")
    device, dtype = model_device(model), model_dtype(model)
    lower, upper = (threat.lower, threat.upper) if threat is not None else (0.0, 1.0)
    xs, ys, n = [], [], 0
    for x, y in batches(data, batch_size, lower=lower, upper=upper, what=what):
        if limit is not None:
            x, y = x[: limit - n], y[: limit - n]
        xs.append(x.to(device=device, dtype=dtype))
        ys.append(y.to(device=device, dtype=torch.long))
        n += len(y)
        if limit is not None and n >= limit:
            break
    if n == 0:
        raise AdvtuneError(f"{what} is empty; check the split, the DataLoader or the limit")
    check_joinable(xs, what)
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------- evaluate


@keyword_errors(suite="attacks", limit_test="limit")
def evaluate(
    model: nn.Module,
    data: Any,
    *,
    eps: float,
    norm: str = "linf",
    attacks: str | Attack | Sequence[Attack] = "standard",
    limit: int | None = 1000,
    batch_size: int | None = None,
    seed: int | None = 0,
    cascade: bool = True,
    gate: bool = True,
    compile: bool | None = None,
) -> EvalResult:
    """Clean and worst-case robust accuracy of `model` on `data` (an advtune Dataset: its test split).

    attacks: "standard" (APGD-CE, APGD-T, Square: AutoAttack without FAB), "quick" (FGSM, PGD-20),
    a comma list of attack specs such as "apgd-ce,apgd-t:n_target_classes=3", or attack objects.
    cascade: each attack runs only on the examples still robust (AutoAttack's protocol; the worst case
    is the same, per-attack numbers become cumulative). gate: the gradient-masking checks, whose
    findings land in `result.suspect` (empty means passed). Examples beyond `limit` are not read.
    batch_size: None = 256 on the CPU, 1000 on a GPU (halved where it runs out of memory). compile: how Square queries
    the model, as the command's --compile / --no-compile (None: decided by the query load, compiled on the CPU).
    """
    threat, seed = _threat(eps, norm), _seed(seed, batch_size)
    if compile not in (None, True, False):
        raise AdvtuneError(f"compile must be True, False or None (auto), got {compile!r}")
    chosen = with_compile(_attacks(attacks, threat), compile, "compile=")
    data = resolve_split(data, "test")
    check_devices(model_device(model), data_device(data))  # before the generator is made on the model's device
    return robust_accuracy(
        model,
        data,
        chosen,
        batch_size=batch_size,
        generator=make_generator(seed, model_device(model)),
        limit=limit,
        cascade=cascade,
        gate=gate,
    )


# ---------------------------------------------------------------- analyze


@keyword_errors(criteria="criterion")
def analyze(
    model: nn.Module,
    data: Any,
    *,
    eps: float,
    norm: str = "linf",
    attack: str | Attack | None = None,
    criterion: str = "taylor",
    limit: int | None = None,
    curve: bool = True,
    shares: Sequence[float] | None = None,
    batch_size: int | None = None,
    seed: int | None = 0,
) -> VulnerabilityMap:
    """Score every conv channel and hidden linear unit of `model` by how much it carries the adversarial
    perturbation, on `data` (an advtune Dataset: its *training* split; keep the test split for the
    evaluation). criterion: "taylor" (default), "activation-shift" or "restoration".
    curve: also measure the concentration curve, on the first 1000 of the same examples (as the command's
    --curve-limit). The defaults (attack, limit,
    shares, batch size) are `advtune analyze`'s; the work is its too (`runs.analyze.analyze_model`)."""
    if not isinstance(curve, bool):  # curve="no" read as true
        raise AdvtuneError(f"curve must be True or False, got {curve!r}")
    if shares is not None and not curve:
        raise AdvtuneError("shares= shapes the concentration curve, which curve=False skips: drop one of them")
    threat, seed = _threat(eps, norm), _seed(seed, batch_size)
    if shares is not None and (isinstance(shares, (str, numbers.Number)) or not hasattr(shares, "__iter__")):
        raise AdvtuneError(f"shares must be a list of shares in (0, 1], e.g. [0.01, 0.1, 1], got {shares!r}")
    if attack is not None and not isinstance(attack, (str, Attack)):
        raise AdvtuneError(f"attack must be a spec such as 'pgd:steps=20' or an attack object, got {attack!r}")
    atk = attack if attack is not None else default(AnalyzeRun, "attack")
    atk = build_attack(atk, threat) if isinstance(atk, str) else atk
    if getattr(atk, "threat", threat) != threat:
        raise AdvtuneError(f"the attack was built for {atk.threat}, but eps/norm say {threat}")
    limit = limit if limit is not None else default(AnalyzeRun, "limit")
    x, y = _take(model, resolve_split(data, "train"), limit, "data", threat)
    settings = AnalyzeRun(
        base="",
        out="",
        eps=eps,
        norm=norm,
        attack=getattr(atk, "spec", type(atk).__name__),
        criteria=(criterion,),
        limit=len(x),
        curve_limit=min(len(x), default(AnalyzeRun, "curve_limit")) if curve else 0,  # as the command's
        shares=tuple(shares) if shares is not None else default(AnalyzeRun, "shares"),
        batch_size=batch_size if batch_size is not None else default(AnalyzeRun, "batch_size"),
        seed=seed,
    )
    _check_model(model, x, y)
    with preserved_rng():  # the command's code seeds the global state: the caller's is given back
        result = analyze_model(model, x, y, settings, attack=atk)
    s = result.summary
    return VulnerabilityMap(
        result.tables[criterion],
        threat,
        s.attack,
        s.examples_scored,
        s.clean_acc,
        s.adv_acc,
        s.cost["grad_evals"],
        result.curves.get(criterion),
        model,
        x[:1].detach().clone(),  # a copy: a view would keep the whole analysed batch alive with the map
    )


# ---------------------------------------------------------------- harden and fit


@keyword_errors(Recipe)  # a recipe's fields too
def harden(
    model: nn.Module,
    data: Any,
    *,
    eps: float,
    norm: str = "linf",
    test: Any = None,
    budget: int | None = None,
    recipe: Recipe | None = None,
    evaluation: str | Sequence[str | Attack] | None = None,
    limit: int | None = None,
    limit_test: int | None = None,
    holdout: int | None = None,
    keep_best: int | None = None,
    seed: int | None = 0,
) -> HardenResult:
    """`advtune harden` in memory: analyse, select the most vulnerable parts (by default the weight entries a short
    whole-network probe moves, and the output layer where it is cheap) within the recipe's parameter budget,
    adversarially fine-tune only those for `budget` gradient evaluations (default: the recipe's passes over the data),
    and evaluate before and after with the strong protocol on `test` (an advtune Dataset gives both: train for the
    work, test for the evaluation). The same code as the command (`runs.harden.harden_model`): the same settings give
    the same weights. limit: the first N training examples only. holdout, keep_best: as the command's, training
    examples held out (default: a Dataset's own `val` split, else 1000, at most a tenth; 0: none) to keep the best of
    `keep_best` checkpoints (default 4; 0: the last).
    Returns a `HardenResult`; `.model` is the hardened copy, `model` itself is untouched."""
    _check_float32(model, "harden")
    threat = _threat(eps, norm)  # before the data are read
    seed = _seed(seed)
    for name, value, least in (
        ("limit", limit, 1),
        ("limit_test", limit_test, 1),
        ("holdout", holdout, 0),
        ("keep_best", keep_best, 0),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least):
            kind = "a positive integer" if least else "an integer >= 0"
            raise AdvtuneError(f"{name} must be {kind} or None (the default), got {value!r}")
    own_val = data.val if isinstance(data, Dataset) and data.val is not None and len(data.val) else None
    if own_val is not None and holdout is not None:  # two held-out splits: which one chooses was a guess
        raise AdvtuneError(
            f"the dataset holds out its own val split ({len(own_val)} examples), which chooses the checkpoint: "
            "drop holdout=, or pass a Dataset without val"
        )
    if recipe is not None and not isinstance(recipe, Recipe):  # a dict crashed deep in the plan
        raise AdvtuneError(f"recipe must be an advtune.Recipe (e.g. Recipe(params=0.2)), got {type(recipe).__name__}")
    evaluation = _evaluation_spec(evaluation, threat)
    train = as_tensor_data(resolve_split(data, "train"), what="train", limit=limit)
    if test is None and isinstance(data, Dataset):
        test = data.test
    run = HardenRun(
        base="(in memory)",
        out="",
        eps=eps,
        norm=norm,
        budget=budget,
        recipe=recipe or Recipe(),
        limit=limit,
        limit_test=limit_test if limit_test is not None else default(HardenRun, "limit_test"),
        holdout=None if holdout is None else int(holdout),
        keep_best=int(keep_best) if keep_best is not None else default(HardenRun, "keep_best"),
        evaluation=evaluation if evaluation is not None else default(HardenRun, "evaluation"),
        seed=seed,
    )
    # only what the evaluation uses is read: a DataLoader over a large test set stops at the limit
    limited = (
        as_tensor_data(resolve_split(test, "test"), what="test", limit=run.limit_test) if test is not None else None
    )
    name = data.name if isinstance(data, Dataset) else "in-memory"
    ds = Dataset(name, train, limited, [], (), (), val=own_val)
    _check_model(model, train.take(2).tensors(model_device(model))[0], train.y)
    if limited is not None:  # a test split the model cannot take failed deep in the evaluation, after the training
        _check_model(model, limited.take(2).tensors(model_device(model))[0], limited.y)
    # a zoo model by its name (its frontier references are found by it), another by its class
    meta = {"architecture": type(unwrapped(model)).__name__, **model_identity(model)}
    flags = [p.requires_grad for p in model.parameters()]
    try:  # the copy harden trains starts with every parameter trainable, as the command's loaded model does
        model.requires_grad_(True)  # (a frozen one was left out of the probe, then trained in the masked stage)
        with preserved_rng():
            return harden_model(model, meta, ds, run)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def _evaluation_spec(evaluation: Any, threat: ThreatModel) -> str | None:
    """harden's `evaluation`: a suite, a spec list, or a list of attacks (specs or attack objects, built for the
    run's threat) as `evaluate(attacks=...)` takes."""
    if evaluation is None or isinstance(evaluation, str):
        return evaluation
    if not isinstance(evaluation, (list, tuple)) or not evaluation:
        raise AdvtuneError(f"evaluation must be a suite, a spec list or a list of attacks, got {evaluation!r}")
    specs = []
    for a in evaluation:
        if not isinstance(a, (str, Attack)):
            raise AdvtuneError(f"evaluation holds {type(a).__name__}; give attacks or their specs (e.g. 'apgd-ce')")
        if isinstance(a, Attack) and getattr(a, "threat", threat) != threat:
            raise AdvtuneError(f"the attack {a.spec} was built for {a.threat}, but eps/norm say {threat}")
        specs.append(a if isinstance(a, str) else a.spec)
    return ",".join(specs)


@keyword_errors(TrainConfig, "resume", out="checkpoint_dir")
def fit(
    model: nn.Module,
    data: Any,
    objective: Objective | None = None,
    config: TrainConfig | None = None,
    *,
    selection: Selection | None = None,
    val: Any = None,
    guard: bool | None = None,
    **kwargs: Any,
) -> History:
    """Train `model` in place (advtune's one training loop) and return its per-epoch history.

    objective: `clean()` (default), `adversarial(PGD(ThreatModel.linf(0.3), steps=10), eps_warmup=0.3)`,
    `trades(threat)`. selection: train only these components (every other weight stays bit-exact).
    guard: the catastrophic-overfitting guard (PGD-10 on 512 training images after each epoch; a collapse restores
    the best weights and stops), as the commands' --guard: None turns it on for FGSM-type training only.
    Further keywords go to `advtune.train.fit` (checkpoint_dir, resume, meter, callbacks, ...). The model is left
    in the mode it was given in."""
    if objective is not None and not all(hasattr(objective, a) for a in ("attack_grad_evals", "describe")):
        hint = "; wrap an attack: adversarial(PGD(threat, steps=10))" if isinstance(objective, Attack) else ""
        hint += "; pass the config as config=TrainConfig(...)" if isinstance(objective, TrainConfig) else ""
        raise AdvtuneError(f"objective must be an advtune objective, got {type(objective).__name__}{hint}")
    config = kwargs.pop("cfg", config)  # advtune.train.fit's name for it (with both, a TypeError from Python)
    takes = set(inspect.signature(_fit).parameters)
    for key in kwargs:  # the rest go to advtune.train.fit: one it does not take names the one meant, as elsewhere
        if key not in takes:
            raise TypeError(unexpected_keyword(fit, key, takes | {"guard", "val", "selection"}, (TrainConfig,), {}))
    if config is not None and not isinstance(config, TrainConfig):
        raise AdvtuneError(f"config must be a TrainConfig, got {type(config).__name__}")
    _check_float32(model, "fit")
    train = as_tensor_data(resolve_split(data, "train"), what="train")  # fit reads it so too: validated once
    _check_model(model, train.take(2).tensors(model_device(model))[0], train.y)
    # the guard watches adversarial training (an attack's, TRADES', the local objective's), FGSM's by default
    attack = getattr(objective, "attack", None)
    threat = getattr(attack, "threat", None) or getattr(objective, "threat", None)
    if guard not in (None, True, False) or (guard and threat is None):
        raise AdvtuneError(f"guard=True/False/None watches adversarial training (an attack's objective), got {guard!r}")
    cfg = config or TrainConfig()
    meter = kwargs.setdefault("meter", CostMeter())  # one meter: the guard's PGD counted, as the command counts it
    watch = overfit_guard(guard, getattr(attack, "spec", ""), threat, train, model_device(model), cfg.seed, meter)
    if watch and cfg.regrow:  # as finetune refuses it: the rollback would bring back weights of an earlier mask
        raise AdvtuneError("regrow with the overfitting guard (on for FGSM training): pass guard=False or drop regrow")
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or ()), *watch]
    val = validation_split(val)
    # the global stream (dropout, a shuffled val DataLoader) seeded from the config as `advtune train` seeds it, the
    # caller's given back; val read once here (fit reads an iterable so too), checked like the training data
    with eval_mode(model), preserved_rng():  # fit sets train mode; the block gives the caller's modes back
        seed_everything((config or TrainConfig()).seed)
        if val is not None:
            val = as_tensor_data(val, what="val")
            if len(val):
                _check_model(model, val.take(2).tensors(model_device(model))[0], val.y)
        return _fit(
            model,
            train,
            objective,
            config,
            selection=selection,
            val=val,
            **kwargs,
        )


# ---------------------------------------------------------------- models on disk


def save_model(model: nn.Module, path: str | Path, meta: dict | None = None) -> Path:
    """Write `model.safetensors` (weights only) and `model.json` into the folder `path`. A model from
    advtune's zoo or from a `--model file.py:factory` spec can be rebuilt by `load_model`."""
    if not isinstance(model, nn.Module) or (meta is not None and not isinstance(meta, dict)):
        raise AdvtuneError(
            f"save_model(model, path, meta): an nn.Module and a dict, got {type(model).__name__}, {type(meta).__name__}"
        )
    check_devices(model_device(model))  # a meta model has no weights to write
    return _save_model(path, model, dict(meta or {}))


@keyword_errors()
def load_model(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The model saved in the folder `path` (a run folder or `save_model`'s), in eval mode. Weights are
    read with safetensors: loading never executes code from the file."""
    model, _ = _load_model(path, resolve_device(device) if isinstance(device, str) else device)
    return model.eval()


__all__ = ["VulnerabilityMap", "analyze", "evaluate", "fit", "harden", "load_model", "save_model"]
