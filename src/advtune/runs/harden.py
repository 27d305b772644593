"""`advtune harden`: the method as one command, with the best measured recipe as its default.

    analysis (which components does the attack exploit?) -> a selection within a parameter budget ->
    adversarial fine-tuning of only that selection (eps ramped up) -> the strong evaluation with the
    gradient-masking gate, before and after -> a report of what it did and what it cost.

The default recipe (`Recipe`) is the one measured on the frontier (docs/RESULTS.md, "The recipe"):
every default there says where its number comes from. This module works on run folders (the CLI);
`advtune.hardening.harden` works on an in-memory model and data (the Python API).

Output folder:
    config.json, summary.json, report.html/.md    the harden record
    analysis/                                     the vulnerability analysis (an `advtune analyze` run)
    model.safetensors, model.json, cost.json,     the hardened model (an `advtune finetune` run, so
    metrics.jsonl, selection.json, checkpoint.pt  `evaluate`, `info` and `--resume` work on it)
    eval-protocol.json, eval-base.json            the strong evaluation after and before"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .. import filenames as files
from ..attacks import build_attack, split_attack_list
from ..components import layers
from ..distributed import check_global_batch
from ..errors import AdvtuneError
from ..hardening import (
    check_budget,
    check_recipe_fits,
    default_budget,
)
from ..report import write_harden_report
from ..threat import ThreatModel
from ..train import TrainConfig, build_objective, cost_per_example
from ..utils import atomic_write_bytes, read_json, resolve_device
from . import analyze as analyze_job
from . import evaluate as evaluate_job
from . import finetune as finetune_job
from .analyze import AnalyzeRun
from .common import (
    dataset_of,
    load_base,
    refuse_same_folder,
)
from .configs import HardenRun
from .evaluate import EvaluateRun
from .finetune import FinetuneRun
from .record import RunDir, open_run

log = logging.getLogger(__name__)


def run(run: HardenRun) -> HardenSummary:
    """Harden the model of a run folder into `run.out`; returns the summary record."""

    # -- validate everything before anything is created or replaced
    if run.eps is None:
        raise AdvtuneError("harden needs --eps (e.g. 0.3 or 0.1 for MNIST, 8/255 for CIFAR-10)")
    threat = ThreatModel(run.norm, run.eps)  # refuses eps <= 0 and eps beyond the pixel range
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

    per_example = cost_per_example(objective, model, example)
    budget = run.budget if run.budget is not None else default_budget(run.recipe, per_example, len(ds.train))
    check_budget(budget, per_example, run.recipe.batch_size, len(ds.train))

    for spec in split_attack_list(run.evaluation):
        build_attack(spec, threat)
    cfg = TrainConfig(
        epochs=1,
        batch_size=run.recipe.batch_size,
        optimizer=run.recipe.optimizer,
        lr=run.recipe.lr,
        schedule=run.recipe.schedule,
        seed=run.seed,
    )  # validates lr, optimizer, schedule, batch
    out = Path(run.out)
    if out.exists() and run.resume and (out / files.CONFIG).is_file():
        saved = read_json(out / files.CONFIG, "harden config").get("run", {})
        now = run.to_json()
        changed = [k for k in now if k not in ("resume", "overwrite", "device") and saved.get(k) != now[k]]
        if changed:
            raise AdvtuneError(
                f"--resume with different settings ({', '.join(changed)}); use the original flags or a new --out"
            )
    check_global_batch(run.recipe.batch_size)  # torchrun: before anything is written
    rd = RunDir.create(out, resume=run.resume, overwrite=run.overwrite)
    if not rd.file(files.CONFIG).is_file():
        rd.write_config(
            {
                "command": "harden",
                "run": run.to_json(),
                "seed": run.seed,
                "base": str(run.base),
                "threat": threat.to_json(),
                "dataset": ds.describe(),
                "device": str(device),
                "budget": budget,
            }
        )

    print(
        f"advtune harden: {meta.get('architecture')} from {run.base}, {threat}, "
        f"{len(ds.train):,} training examples, budget {budget:,} gradient evaluations"
    )
    # -- 1. the vulnerability analysis
    analysis = out / files.ANALYSIS
    # --limit caps the analysis too (it scores the first training examples)
    n_analysis = min(run.recipe.analysis_limit, len(ds.train))
    if not (analysis / files.SUMMARY).is_file():
        print(
            f"[1/4] analysis: {run.recipe.criterion} scores under {run.recipe.analysis_attack} on "
            f"{n_analysis} training examples"
        )
        analyze_job.run(
            AnalyzeRun(
                base=run.base,
                out=str(analysis),
                eps=run.eps,
                attack=run.recipe.analysis_attack,
                norm=run.norm,
                criteria=(run.recipe.criterion,),
                limit=n_analysis,
                curve_limit=min(n_analysis, 1000),
                seed=run.seed,
                data_dir=run.data_dir,
                device=run.device,
                overwrite=analysis.exists(),
            )
        )
    a_sum = read_json(analysis / files.SUMMARY, "analysis summary")
    # -- 2 + 3. selection and selective fine-tuning (a finetune run in the same folder)
    ft = FinetuneRun(
        base=run.base,
        out=str(out / "finetune"),
        eps=run.eps,
        select=str(analysis),
        criterion=run.recipe.criterion,
        params=run.recipe.params,
        granularity=run.recipe.granularity,
        attack=run.recipe.attack,
        norm=run.norm,
        eps_warmup=run.recipe.eps_warmup,
        train=cfg,
        data_dir=run.data_dir,
        limit=run.limit,
        limit_test=run.limit_test,
        monitor_test=0,
        budget=budget,
        device=run.device,
        resume=(out / "finetune" / files.CONFIG).is_file(),
        overwrite=False,
    )

    print(
        f"[2/4] selection: whole {run.recipe.granularity}s by {run.recipe.criterion}, at most "
        f"{100 * run.recipe.params:g}% of the parameters"
        if run.recipe.params < 1
        else (
            f"[2/4] selection: {run.recipe.granularity}s by {run.recipe.criterion}, at most {run.recipe.params:,} "
            "parameters"
        )
    )
    ft_dir = out / "finetune"
    if not (ft_dir / files.SUMMARY).is_file():
        print(
            f"[3/4] fine-tuning the selection with {run.recipe.attack}, eps ramped over the first "
            f"{100 * run.recipe.eps_warmup:g}% of {budget:,} gradient evaluations"
        )
        finetune_job.run(ft)
    ft_sum = read_json(ft_dir / files.SUMMARY, "fine-tuning summary")
    # -- 4. the strong evaluation, before and after, on the same test examples
    print(f"[4/4] evaluation: worst case of {run.evaluation} on {len(ds.test)} test examples, masking gate on")

    def protocol(model_dir: Path, name: str) -> dict:
        path = out / files.evaluation(name)
        if path.is_file():
            return read_json(path, "evaluation")
        return evaluate_job.run(
            EvaluateRun(
                run=str(model_dir),
                eps=(run.eps,),
                attacks=run.evaluation,
                norm=run.norm,
                limit_test=run.limit_test,
                cascade=True,
                name=name,
                record_dir=str(out),
                seed=run.seed,
                data_dir=run.data_dir,
                device=run.device,
            )
        )

    before = protocol(Path(run.base), "base")
    after = protocol(ft_dir, "protocol")
    summary = summarise(run, meta, base_cfg, a_sum, ft_sum, before, after, budget)
    rd.write_json(files.SUMMARY, summary.to_json())
    rd.done()
    _publish_model(ft_dir, out)

    paths = write_harden_report(out)
    return replace(summary, report=str(paths["html"]))


def _publish_model(ft_dir: Path, out: Path) -> None:
    """The hardened model at the top of the harden folder, so `advtune evaluate/info OUT` work on it."""

    for name in (files.WEIGHTS, files.MODEL_META, files.COST, files.SELECTION, files.METRICS):
        src = ft_dir / name
        if src.is_file():
            atomic_write_bytes(out / name, src.read_bytes())


@dataclass(frozen=True)
class HardenSummary:
    """What `advtune harden` returns and writes to summary.json (each figure from its own record)."""

    eps: float
    norm: str
    base: str
    architecture: str | None
    before: dict  # clean_acc, robust_acc (worst case of the evaluation), suspect (the gate's findings)
    after: dict  # the same after hardening, plus the per-attack accuracy
    test_examples: int
    evaluation: str  # the attack list of the evaluation
    selection: dict  # what was trained: components, units, parameters (per layer too)
    trainable_params: int | None
    param_share: float | None
    recipe: dict
    budget: int  # fine-tuning gradient evaluations
    cost: dict  # base training, analysis, fine-tuning and evaluation gradient evaluations, wall times
    concentration: list | None  # the analysis' concentration curve
    analysis_examples: int | None = None  # training examples the analysis scored
    report: str | None = None  # report.html, once written

    def to_json(self) -> dict:
        d = asdict(self)
        if self.report is None:
            d.pop("report")
        return d


def summarise(
    run: HardenRun, meta: dict, base_cfg: dict, a_sum: dict, ft_sum: dict, before: dict, after: dict, budget: int
) -> HardenSummary:
    """The harden record: robustness before/after and every cost, each from its own record."""

    base_cost_file = Path(run.base) / files.COST
    base_cost = read_json(base_cost_file, "base cost") if base_cost_file.is_file() else {}
    sel = ft_sum.get("selection") or {}
    ft_cost = ft_sum.get("cost", {})
    a_cost = a_sum.get("cost", {})
    record = {
        "eps": run.eps,
        "norm": run.norm,
        "base": str(run.base),
        "architecture": meta.get("architecture"),
        "before": {
            "clean_acc": before["clean_accuracy"],
            "robust_acc": before["worst_case_accuracy"],
            "suspect": before.get("suspect", []),
        },
        "after": {
            "clean_acc": after["clean_accuracy"],
            "robust_acc": after["worst_case_accuracy"],
            "accuracy": after["accuracy"],
            "suspect": after.get("suspect", []),
        },
        "test_examples": after["examples"],
        "evaluation": run.evaluation,
        "selection": sel,
        "trainable_params": sel.get("trainable_params"),
        "param_share": sel.get("param_share"),
        "recipe": run.recipe.to_json(),
        "budget": budget,
        "cost": {
            "base_training_grad_evals": base_cost.get("grad_evals"),
            "analysis_grad_evals": a_cost.get("grad_evals", 0),
            "finetune_grad_evals": ft_cost.get("grad_evals", 0),
            "harden_grad_evals": a_cost.get("grad_evals", 0) + ft_cost.get("grad_evals", 0),
            "analysis_wall_s": a_cost.get("wall_s", 0.0),
            "finetune_wall_s": ft_cost.get("wall_s", 0.0),
            "evaluation_grad_evals": sum(after.get("grad_evals", {}).values())
            + sum(before.get("grad_evals", {}).values()),
        },
        "concentration": a_sum.get("criteria", {}).get(run.recipe.criterion, {}).get("curve"),
        "analysis_examples": a_sum.get("examples_scored"),
    }
    return HardenSummary(**record)


def format_summary(summary: HardenSummary) -> str:
    """What `advtune harden` prints at the end."""
    s = summary.to_json()
    sel = s.get("selection") or {}
    layers = ", ".join(f"{n} ({u}/{t} units)" for n, (u, t) in (sel.get("by_layer") or {}).items() if u)
    c = s["cost"]
    lines = [
        f"hardened {s['architecture']} at {s['norm']} eps={s['eps']:g} "
        f"({s['test_examples']} test examples, worst case of {s['evaluation']}):",
        f"  before: clean {100 * s['before']['clean_acc']:.2f}%, robust {100 * s['before']['robust_acc']:.2f}%",
        f"  after:  clean {100 * s['after']['clean_acc']:.2f}%, robust {100 * s['after']['robust_acc']:.2f}%",
        f"  trained {sel.get('trainable_params', 0):,} parameters ({100 * (s.get('param_share') or 0):.2f}% of the "
        f"model): {layers}",
        f"  cost: analysis {c['analysis_grad_evals']:,} + fine-tuning {c['finetune_grad_evals']:,} gradient "
        "evaluations "
        f"({c['analysis_wall_s'] + c['finetune_wall_s']:.0f} s); the base model's training took "
        f"{c['base_training_grad_evals'] or 0:,}",
    ]
    if s["after"].get("suspect"):
        lines.append("  !! the gradient-masking gate flagged the hardened model: " + "; ".join(s["after"]["suspect"]))
    else:
        lines.append("  masking gate: passed")
    return "\n".join(lines)
