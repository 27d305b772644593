"""`advtune harden`: the method as one command, with the best measured recipe as its default.

    analysis (which components does the attack exploit?) -> a selection within a parameter budget ->
    adversarial fine-tuning of only that selection (eps ramped up) -> the strong evaluation with the
    gradient-masking gate, before and after -> a report of what it did and what it cost.

The default recipe (`Recipe`) is the one measured on the frontier (docs/RESULTS.md, "The recipe"):
every default below says where its number comes from. `harden_run` works on run folders (the CLI);
`harden` works on an in-memory model and data (the Python API) and is what `harden_run` calls.

Output folder:
    config.json, summary.json, report.html/.md    the harden record
    analysis/                                     the vulnerability analysis (an `advtune analyze` run)
    model.safetensors, model.json, cost.json,     the hardened model (an `advtune finetune` run, so
    metrics.jsonl, selection.json, checkpoint.pt  `evaluate`, `info` and `--resume` work on it)
    eval-protocol.json, eval-base.json            the strong evaluation after and before
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .errors import AdvtuneError
from .inputs import as_tensor_data

log = logging.getLogger(__name__)

PROTOCOL = "apgd-ce,apgd-t:n_target_classes=3"   # the strong protocol: worst case of APGD-CE and APGD-T


@dataclass(frozen=True)
class Recipe:
    """The selective adversarial fine-tuning recipe. Defaults = the best measured on the frontier."""

    granularity: str = "layer"          # whole layers, best-ranked first, within the parameter budget
    params: float = 0.05                # parameter budget: at most this share of the entries may change
    criterion: str = "taylor"           # ranking of components (layers: summed unit scores)
    analysis_attack: str = "pgd:steps=10"
    analysis_limit: int = 1000          # training examples scored
    attack: str = "pgd:steps=5"         # the training attack (PGD-5: as good per step as PGD-10 at half the cost)
    eps_warmup: float = 0.3             # eps ramps linearly from 0 over this share of the fine-tuning
    optimizer: str = "adam"
    lr: float = 3e-3                    # a small selection takes a higher rate than full training (1e-3 -> 3e-3)
    schedule: str = "constant"
    batch_size: int = 64                # more, smaller steps for the same gradient evaluations (validation: +5 points)
    epochs: float = 2.0                 # default budget: this many passes over the training split

    def __post_init__(self) -> None:
        if self.granularity not in ("layer", "unit"):
            raise AdvtuneError(f"recipe granularity must be layer or unit, got {self.granularity!r}")
        if not (isinstance(self.params, (int, float)) and 0 < self.params):
            raise AdvtuneError(f"recipe params must be a positive parameter budget, got {self.params!r}")
        if not 0 <= self.eps_warmup < 1:
            raise AdvtuneError(f"eps warm-up must be a share of the fine-tuning in [0, 1), got {self.eps_warmup}")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise AdvtuneError(f"recipe epochs must be positive, got {self.epochs}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise AdvtuneError(f"learning rate must be a positive number, got {self.lr!r}")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class HardenRun:
    """Everything `advtune harden` needs; recorded verbatim in config.json."""

    base: str                           # run folder of the trained model
    out: str
    eps: float | None = None
    norm: str = "linf"
    budget: int | None = None           # training gradient evaluations (default: recipe.epochs of the data)
    recipe: Recipe = Recipe()
    limit: int | None = None            # training examples (analysis and fine-tuning)
    limit_test: int = 1000              # test examples for the strong evaluation
    evaluation: str = PROTOCOL          # attack list of the strong evaluation (worst case per example)
    seed: int = 0
    data_dir: str | None = None
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False

    def to_json(self) -> dict:
        d = asdict(self)
        d["recipe"] = self.recipe.to_json()
        return d


def default_budget(recipe: Recipe, per_example: float, n_train: int) -> int:
    """The default training budget in gradient evaluations: `recipe.epochs` passes over the data."""
    return int(math.ceil(recipe.epochs * n_train * per_example))


def check_budget(budget: Any, per_example: float, batch_size: int, n_train: int) -> int:
    """A budget must pay for at least one optimizer step."""
    per_step = per_example * min(batch_size, n_train)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise AdvtuneError(f"--budget must be a number of gradient evaluations, got {budget!r}")
    if budget < per_step:
        raise AdvtuneError(f"--budget {budget:,} is below one optimizer step ({per_step:,.0f} gradient evaluations: "
                           f"{min(batch_size, n_train)} examples x {per_example:g}); raise it")
    return int(budget)


def check_recipe_fits(model, recipe: Recipe, example=None) -> None:
    """Refuse, before any work, a parameter budget that no candidate (a whole layer, or a unit) fits."""
    from .components import fingerprint, layers, unit_params
    from .vulnerability import check_params

    budget = check_params(recipe.params, model)
    per_unit = unit_params(model, example)
    candidates = [n for n, _ in layers(model, include_output=False)] or [n for n, _ in layers(model)]
    units = dict(fingerprint(model))
    smallest = min(per_unit[n] * (units[n] if recipe.granularity == "layer" else 1) for n in candidates)
    if smallest > budget:
        what = "whole layer" if recipe.granularity == "layer" else "unit"
        raise AdvtuneError(f"no {what} fits in a budget of {budget:,} parameters (the smallest has {smallest:,}); "
                           f"raise --params or use --granularity unit")


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
        out = {"trainable_params": self.finetune_cost.get("trainable_params"), "budget": self.budget,
               "analysis_grad_evals": self.analysis_grad_evals, "finetune_grad_evals": self.finetune_cost.get("grad_evals")}
        for name in ("before", "after"):
            r = getattr(self, name)
            if r is not None:
                out[name] = {"clean_acc": r.clean_accuracy, "robust_acc": r.worst_case_accuracy, "suspect": r.suspect}
        return out


def harden(model, train, test=None, *, eps: float, norm: str = "linf", recipe: Recipe = Recipe(),
           budget: int | None = None, evaluation: str = PROTOCOL, test_limit: int = 1000, seed: int = 0) -> HardenResult:
    """The Python API of `advtune harden`: analysis -> selection within recipe.params -> selective
    adversarial fine-tuning for `budget` gradient evaluations (default: recipe.epochs passes over
    `train`) -> the strong evaluation before and after on `test` (optional).

    model: any nn.Module taking pixels in [0, 1] (advtune's models or your own). train/test: (x, y)
    tensors or advtune TensorData. Returns a HardenResult; `model` itself is not modified."""
    import copy

    from .attacks import build_attack
    from .components import layers
    from .cost import CostMeter
    from .evaluation import robust_accuracy
    from .jobs import build_objective, split_attack_list
    from .metrics import adversarial_examples
    from .threat import ThreatModel
    from .train import TrainConfig, fit, steps_for_budget
    from .utils import make_generator, model_device
    from .vulnerability import score_many, select_top, select_top_layers

    from .train import cost_per_example

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
    cfg = TrainConfig(epochs=1, batch_size=recipe.batch_size, optimizer=recipe.optimizer, lr=recipe.lr,
                      schedule=recipe.schedule, seed=seed,
                      steps=steps_for_budget(budget, objective, recipe.batch_size, len(train), per_example=per_example))
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


def harden_run(run: HardenRun) -> dict:
    """Harden the model of a run folder into `run.out`; returns the summary record."""
    from .jobs import (AnalyzeRun, EvaluateRun, FinetuneRun, analyze_run, build_objective, dataset_of, evaluate_run,
                       load_base, refuse_same_folder)
    from .components import layers
    from .runs import CONFIG, SUMMARY, RunDir, open_run
    from .threat import ThreatModel
    from .train import TrainConfig
    from .utils import read_json, resolve_device

    # -- validate everything before anything is created or replaced
    if run.eps is None:
        raise AdvtuneError("harden needs --eps (e.g. 0.3 or 0.1 for MNIST, 8/255 for CIFAR-10)")
    threat = ThreatModel(run.norm, run.eps)   # refuses eps <= 0 and eps beyond the pixel range
    if run.limit_test is not None and (isinstance(run.limit_test, bool) or run.limit_test < 1):
        raise AdvtuneError(f"--limit-test must be a positive number of test examples, got {run.limit_test}")
    open_run(run.base)
    refuse_same_folder(run.out, run.base)
    device = resolve_device(run.device)
    model, meta, base_cfg = load_base(run.base, device)
    layers(model)  # a model with no Conv2d/Linear layer has nothing to select
    ds = dataset_of(base_cfg, meta, run.data_dir, limit=run.limit, limit_test=run.limit_test)
    example = ds.train.to_float(ds.train.x[:1], device)
    check_recipe_fits(model, run.recipe, example)
    objective = build_objective(run.recipe.attack, threat, "eval", run.recipe.eps_warmup, model=model)
    from .train import cost_per_example

    per_example = cost_per_example(objective, model, example)
    budget = run.budget if run.budget is not None else default_budget(run.recipe, per_example, len(ds.train))
    check_budget(budget, per_example, run.recipe.batch_size, len(ds.train))
    from .evaluation import _check_attacks  # noqa: F401  (the evaluation list is validated by building it)
    from .jobs import split_attack_list
    from .attacks import build_attack

    for spec in split_attack_list(run.evaluation):
        build_attack(spec, threat)
    cfg = TrainConfig(epochs=1, batch_size=run.recipe.batch_size, optimizer=run.recipe.optimizer, lr=run.recipe.lr,
                      schedule=run.recipe.schedule, seed=run.seed)   # validates lr, optimizer, schedule, batch
    out = Path(run.out)
    if out.exists() and run.resume and (out / CONFIG).is_file():
        saved = read_json(out / CONFIG, "harden config").get("run", {})
        now = run.to_json()
        changed = [k for k in now if k not in ("resume", "overwrite", "device") and saved.get(k) != now[k]]
        if changed:
            raise AdvtuneError(f"--resume with different settings ({', '.join(changed)}); use the original flags or a new --out")
    rd = RunDir.create(out, resume=run.resume, overwrite=run.overwrite)
    if not rd.file(CONFIG).is_file():
        rd.write_config({"command": "harden", "run": run.to_json(), "seed": run.seed, "base": str(run.base),
                         "threat": threat.to_json(), "dataset": ds.describe(), "device": str(device), "budget": budget})

    print(f"advtune harden: {meta.get('architecture')} from {run.base}, {threat}, "
          f"{len(ds.train):,} training examples, budget {budget:,} gradient evaluations")
    # -- 1. the vulnerability analysis
    analysis = out / "analysis"
    if not (analysis / SUMMARY).is_file():
        print(f"[1/4] analysis: {run.recipe.criterion} scores under {run.recipe.analysis_attack} on "
              f"{min(run.recipe.analysis_limit, len(ds.train))} training examples")
        analyze_run(AnalyzeRun(base=run.base, out=str(analysis), eps=run.eps, attack=run.recipe.analysis_attack,
                               norm=run.norm, criteria=(run.recipe.criterion,), limit=run.recipe.analysis_limit,
                               curve_limit=min(run.recipe.analysis_limit, 1000), seed=run.seed,
                               data_dir=run.data_dir, device=run.device, overwrite=analysis.exists()))
    a_sum = read_json(analysis / SUMMARY, "analysis summary")
    # -- 2 + 3. selection and selective fine-tuning (a finetune run in the same folder)
    ft = FinetuneRun(base=run.base, out=str(out / "finetune"), eps=run.eps, select=str(analysis),
                     criterion=run.recipe.criterion, params=run.recipe.params, granularity=run.recipe.granularity,
                     attack=run.recipe.attack, norm=run.norm, eps_warmup=run.recipe.eps_warmup, train=cfg,
                     data_dir=run.data_dir, limit=run.limit, limit_test=run.limit_test, monitor=0, budget=budget,
                     device=run.device, resume=(out / "finetune" / CONFIG).is_file(),
                     overwrite=False)
    from .jobs import finetune_run

    print(f"[2/4] selection: whole {run.recipe.granularity}s by {run.recipe.criterion}, at most "
          f"{100 * run.recipe.params:g}% of the parameters" if run.recipe.params < 1 else
          f"[2/4] selection: {run.recipe.granularity}s by {run.recipe.criterion}, at most {run.recipe.params:,} parameters")
    ft_dir = out / "finetune"
    if not (ft_dir / SUMMARY).is_file():
        print(f"[3/4] fine-tuning the selection with {run.recipe.attack}, eps ramped over the first "
              f"{100 * run.recipe.eps_warmup:g}% of {budget:,} gradient evaluations")
        finetune_run(ft)
    ft_sum = read_json(ft_dir / SUMMARY, "fine-tuning summary")
    # -- 4. the strong evaluation, before and after, on the same test examples
    print(f"[4/4] evaluation: worst case of {run.evaluation} on {len(ds.test)} test examples, masking gate on")

    def protocol(model_dir: Path, name: str) -> dict:
        path = out / f"eval-{name}.json"
        if path.is_file():
            return read_json(path, "evaluation")
        return evaluate_run(EvaluateRun(run=str(model_dir), eps=(run.eps,), attacks=run.evaluation, norm=run.norm,
                                        limit=run.limit_test, cascade=True, name=name, record_dir=str(out),
                                        seed=run.seed, data_dir=run.data_dir, device=run.device))

    before = protocol(Path(run.base), "base")
    after = protocol(ft_dir, "protocol")
    summary = summarise(run, meta, base_cfg, a_sum, ft_sum, before, after, budget)
    rd.write_json(SUMMARY, summary)
    rd.done()
    _publish_model(ft_dir, out)
    from .report import write_harden_report

    paths = write_harden_report(out)
    summary["report"] = str(paths["html"])
    return summary


def _publish_model(ft_dir: Path, out: Path) -> None:
    """The hardened model at the top of the harden folder, so `advtune evaluate/info OUT` work on it."""
    from .utils import atomic_write_bytes

    for name in ("model.safetensors", "model.json", "cost.json", "selection.json", "metrics.jsonl"):
        src = ft_dir / name
        if src.is_file():
            atomic_write_bytes(out / name, src.read_bytes())


def summarise(run: HardenRun, meta: dict, base_cfg: dict, a_sum: dict, ft_sum: dict, before: dict, after: dict,
              budget: int) -> dict:
    """The harden record: robustness before/after and every cost, each from its own record."""
    from .runs import COST
    from .utils import read_json

    base_cost_file = Path(run.base) / COST
    base_cost = read_json(base_cost_file, "base cost") if base_cost_file.is_file() else {}
    sel = ft_sum.get("selection") or {}
    ft_cost = ft_sum.get("cost", {})
    a_cost = a_sum.get("cost", {})
    return {
        "eps": run.eps, "norm": run.norm, "base": str(run.base), "architecture": meta.get("architecture"),
        "before": {"clean_acc": before["clean_accuracy"], "robust_acc": before["worst_case_accuracy"],
                   "suspect": before.get("suspect", [])},
        "after": {"clean_acc": after["clean_accuracy"], "robust_acc": after["worst_case_accuracy"],
                  "accuracy": after["accuracy"], "suspect": after.get("suspect", [])},
        "test_examples": after["examples"], "evaluation": run.evaluation,
        "selection": sel, "trainable_params": sel.get("trainable_params"), "param_share": sel.get("param_share"),
        "recipe": run.recipe.to_json(), "budget": budget,
        "cost": {"base_training_grad_evals": base_cost.get("grad_evals"), "analysis_grad_evals": a_cost.get("grad_evals", 0),
                 "finetune_grad_evals": ft_cost.get("grad_evals", 0),
                 "harden_grad_evals": a_cost.get("grad_evals", 0) + ft_cost.get("grad_evals", 0),
                 "analysis_wall_s": a_cost.get("wall_s", 0.0), "finetune_wall_s": ft_cost.get("wall_s", 0.0),
                 "evaluation_grad_evals": sum(after.get("grad_evals", {}).values()) + sum(before.get("grad_evals", {}).values())},
        "concentration": a_sum.get("criteria", {}).get(run.recipe.criterion, {}).get("curve"),
    }


def format_summary(s: dict) -> str:
    """What `advtune harden` prints at the end."""
    sel = s.get("selection") or {}
    layers = ", ".join(f"{n} ({u}/{t} units)" for n, (u, t) in (sel.get("by_layer") or {}).items() if u)
    c = s["cost"]
    lines = [
        f"hardened {s['architecture']} at {s['norm']} eps={s['eps']:g} "
        f"({s['test_examples']} test examples, worst case of {s['evaluation']}):",
        f"  before: clean {100 * s['before']['clean_acc']:.2f}%, robust {100 * s['before']['robust_acc']:.2f}%",
        f"  after:  clean {100 * s['after']['clean_acc']:.2f}%, robust {100 * s['after']['robust_acc']:.2f}%",
        f"  trained {sel.get('trainable_params', 0):,} parameters ({100 * (s.get('param_share') or 0):.2f}% of the model): {layers}",
        f"  cost: analysis {c['analysis_grad_evals']:,} + fine-tuning {c['finetune_grad_evals']:,} gradient evaluations "
        f"({c['analysis_wall_s'] + c['finetune_wall_s']:.0f} s); the base model's training took {c['base_training_grad_evals'] or 0:,}",
    ]
    if s["after"].get("suspect"):
        lines.append("  !! the gradient-masking gate flagged the hardened model: " + "; ".join(s["after"]["suspect"]))
    else:
        lines.append("  masking gate: passed")
    return "\n".join(lines)
