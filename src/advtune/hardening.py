"""`advtune harden`: the method as one command, with the best measured recipe as its default.

    analysis (which components does the attack exploit?) -> a selection within a parameter budget ->
    adversarial fine-tuning of only that selection (eps ramped up) -> the strong evaluation with the
    gradient-masking gate, before and after -> a report of what it did and what it cost.

The default recipe (`Recipe`) is the one measured on the frontier (docs/RESULTS.md, "The recipe"):
every default below says where its number comes from. `harden` works on an in-memory model and data (the Python API);
`advtune.runs.harden` runs it on run folders (the CLI) and writes the records below.

Output folder:
    config.json, summary.json, report.html/.md    the harden record
    analysis/                                     the vulnerability analysis (an `advtune analyze` run)
    model.safetensors, model.json, cost.json,     the hardened model (an `advtune finetune` run, so
    metrics.jsonl, selection.json, checkpoint.pt  `evaluate`, `info` and `--resume` work on it)
    eval-protocol.json, eval-base.json            the strong evaluation after and before
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

from .attacks import build_attack, split_attack_list
from .components import fingerprint, layers, unit_params
from .cost import CostMeter
from .errors import AdvtuneError
from .evaluation import robust_accuracy
from .inputs import as_tensor_data
from .metrics import adversarial_examples
from .recipe import PROTOCOL, Recipe
from .threat import ThreatModel
from .train import TrainConfig, build_objective, cost_per_example, fit, steps_for_budget
from .utils import make_generator, model_device
from .vulnerability import check_params, score_many, select_top, select_top_layers

log = logging.getLogger(__name__)


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
    budget = check_params(recipe.params, model)
    per_unit = unit_params(model, example)
    candidates = [n for n, _ in layers(model, include_output=False)] or [n for n, _ in layers(model)]
    units = dict(fingerprint(model))
    smallest = min(per_unit[n] * (units[n] if recipe.granularity == "layer" else 1) for n in candidates)
    if smallest > budget:
        what = "whole layer" if recipe.granularity == "layer" else "unit"
        raise AdvtuneError(
            f"no {what} fits in a budget of {budget:,} parameters (the smallest has {smallest:,}); "
            f"raise --params or use --granularity unit"
        )


@dataclass
class HardenResult:
    """What `harden` returns: the hardened model (a copy; the input model is left as it was), the
    selection it trained, the score table behind it, the evaluations before and after (when test
    data was given), and the costs."""

    model: Any
    selection: Any
    table: Any
    before: Any
    after: Any
    finetune_cost: dict
    analysis_grad_evals: int
    budget: int

    def summary(self) -> dict:
        out = {
            "trainable_params": self.finetune_cost.get("trainable_params"),
            "budget": self.budget,
            "analysis_grad_evals": self.analysis_grad_evals,
            "finetune_grad_evals": self.finetune_cost.get("grad_evals"),
        }
        for name in ("before", "after"):
            r = getattr(self, name)
            if r is not None:
                out[name] = {"clean_acc": r.clean_accuracy, "robust_acc": r.worst_case_accuracy, "suspect": r.suspect}
        return out


def harden(
    model,
    train,
    test=None,
    *,
    eps: float,
    norm: str = "linf",
    recipe: Recipe = Recipe(),
    budget: int | None = None,
    evaluation: str = PROTOCOL,
    test_limit: int = 1000,
    seed: int = 0,
) -> HardenResult:
    """The Python API of `advtune harden`: analysis -> selection within recipe.params -> selective
    adversarial fine-tuning for `budget` gradient evaluations (default: recipe.epochs passes over
    `train`) -> the strong evaluation before and after on `test` (optional).

    model: any nn.Module taking pixels in [0, 1] (advtune's models or your own). train/test: (x, y)
    tensors or advtune TensorData. Returns a HardenResult; `model` itself is not modified."""
    threat = ThreatModel(norm, eps)
    layers(model)
    train = as_tensor_data(train, what="train")
    test = as_tensor_data(test, what="test") if test is not None else None
    device = model_device(model)
    check_recipe_fits(model, recipe, train.to_float(train.x[:1], device))
    attacks = [build_attack(s, threat) for s in split_attack_list(evaluation)]
    hardened = copy.deepcopy(model)
    objective = build_objective(recipe.attack, threat, "eval", recipe.eps_warmup, model=hardened)
    per_example = cost_per_example(objective, hardened, train.to_float(train.x[:1], device))
    budget = budget if budget is not None else default_budget(recipe, per_example, len(train))
    check_budget(budget, per_example, recipe.batch_size, len(train))
    # 1. analysis on training data
    x, y = train.take(recipe.analysis_limit).tensors(device)
    a_attack = build_attack(recipe.analysis_attack, threat)
    x_adv = adversarial_examples(hardened, a_attack, x, y, 256, seed)
    table = score_many(hardened, (x, y, x_adv), None, [recipe.criterion], show_progress=False)[recipe.criterion]
    analysis_ge = len(x) * (int(a_attack.grad_evals()) + 1)
    # 2. selection within the parameter budget
    example = x[:1]
    if recipe.granularity == "layer":
        selection = select_top_layers(table, hardened, recipe.params, example_input=example)
    else:
        selection = select_top(table, params=recipe.params, model=hardened, example_input=example)
    # 3. selective adversarial fine-tuning
    cfg = TrainConfig(
        epochs=1,
        batch_size=recipe.batch_size,
        optimizer=recipe.optimizer,
        lr=recipe.lr,
        schedule=recipe.schedule,
        seed=seed,
        steps=steps_for_budget(budget, objective, recipe.batch_size, len(train), per_example=per_example),
    )
    meter = CostMeter()
    fit(hardened, train, objective, cfg, selection=selection, meter=meter, desc="harden")
    hardened.eval()
    # 4. the strong evaluation, before and after, on the same examples
    before = after = None
    if test is not None:
        xt, yt = test.take(test_limit).tensors(device)
        before = robust_accuracy(model, (xt, yt), attacks, cascade=True, generator=make_generator(seed, device))
        after = robust_accuracy(hardened, (xt, yt), attacks, cascade=True, generator=make_generator(seed, device))
    return HardenResult(hardened, selection, table, before, after, meter.to_json(), analysis_ge, budget)
