"""`advtune harden`: the method as one command, with the best measured recipe as its default.

    analysis (which components does the attack exploit?) -> a selection within a parameter budget ->
    adversarial fine-tuning of only that selection (eps ramped up) -> the strong evaluation with the
    gradient-masking gate, before and after -> a report of what it did and what it cost.

The default recipe (`Recipe`) is the one measured on the frontier (docs/RESULTS.md, rounds 2-7).
`harden_model` is the one implementation: the CLI (`run`, on run folders), the Python API
(`advtune.harden`, in memory) and experiment variants (`kind: harden`) all call it, so the same
settings give the same weights and records everywhere. Its stages are the other jobs' cores
(`analyze_model`, `finetune_model`, `evaluation_record`).

Output folder (with a run folder):
    config.json, summary.json, report.html/.md    the harden record
    analysis/                                     the vulnerability analysis (an `advtune analyze` run)
    finetune/                                     the fine-tuning (an `advtune finetune` run: resumable)
    model.safetensors, model.json, cost.json,     the hardened model, published from finetune/ (so
    metrics.jsonl, selection.json                 `evaluate`, `info` and `harden --resume` work on it)
    patch.safetensors                             only what changed, for `advtune apply BASE PATCH`
    eval-protocol.json, eval-base.json            the strong evaluation after and before
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from torch import nn

from .. import filenames as files
from ..devices import model_device, resolve_device
from ..evaluation import EvalResult, passed_line  # --evaluation may name a suite, as advtune evaluate --suite
from ..frontier import at_reference
from ..models import load_model
from ..patch import patch_factors, state_sha256, write_patch
from ..recipe import rule_words
from ..records import AnalyzeSummary, HardenSummary, model_label  # in records.py: the report reads them
from ..report.narrative import harden_comparisons
from ..storage import atomic_write_bytes, file_sha256, read_json
from ..train.lowrank import selection_from_json
from ..vulnerability import ScoreTable
from .analyze import analyze_model, write_analysis
from .common import dataset_of, load_base, refuse_same_folder, whole_training_cost, write_config_once
from .configs import HardenRun
from .evaluate import evaluation_record, measurement, write_evaluation
from .finetune import FinetuneSummary, finetune_folder, finetune_model, prepare_finetune
from .harden_plan import (
    HardenPlan,
    analysis_settings,
    check_harden_resume,
    check_harden_settings,
    evaluation_settings,
    finetune_settings,
    plan_harden,
    resolve_recipe,
    with_holdout,
)
from .probe import PROBE, probe_then_mask
from .record import RunDir, check_resume_overwrite, open_run, refuse_taken_out
from .selecting import read_table

log = logging.getLogger(__name__)


@dataclass(repr=False)
class HardenResult:
    """What `harden_model` returns (and `advtune.harden`): the hardened model (a copy; the input
    model is left as it was), the selection it trained and the score table behind it, the
    evaluations before and after (EvalResults, when test data was given and they ran here), and
    the record as summary.json holds it."""

    model: nn.Module
    selection: Any  # a Selection, SparseEntries or LowRank (what the rule trained)
    table: ScoreTable
    before: EvalResult | None
    after: EvalResult | None
    record: HardenSummary
    finetune_cost: dict  # the fine-tuning's cost record (cost.json)

    @property
    def budget(self) -> int:
        return self.record.budget

    @property
    def analysis_grad_evals(self) -> int:
        return self.record.cost["analysis_grad_evals"]

    def summary(self) -> dict:
        """The harden record (summary.json's contents)."""
        return self.record.to_json()

    def __repr__(self) -> str:  # the headline, not the model, the score table and both evaluations in full
        r = self.record

        def acc(x) -> str:
            if not x:
                return "not evaluated"
            gate = f" (masking gate SUSPECT: {', '.join(x['suspect'])})" if x.get("suspect") else ""
            return f"clean {100 * x['clean_acc']:.1f}%, robust {100 * x['robust_acc']:.1f}%{gate}"

        share = f"{100 * r.param_share:.1f}% of the parameters" if r.param_share is not None else "a selection"
        return (
            f"HardenResult({r.norm} eps={r.eps:g}: before {acc(r.before)}; after {acc(r.after)}; trained {share} "
            f"for {r.budget:,} gradient evaluations)"
        )


Hardened = HardenResult  # the name it had


def harden_model(
    model,
    meta: dict,
    ds,
    run: HardenRun,
    *,
    rd: RunDir | None = None,
    base_cost: dict | None = None,
    say: Callable[[str], None] = log.info,
    plan: HardenPlan | None = None,
) -> HardenResult:
    """The one implementation of harden: analysis -> selection within recipe.params -> selective
    adversarial fine-tuning for the budget -> the strong evaluation before and after (when `ds`
    has a test split). `model` is not modified. With a run folder `rd`, every stage records itself
    there and a finished stage is read back instead of run again (resume)."""
    plan = plan or plan_harden(model, ds, run)  # the CLI planned it before creating the folder
    run = replace(run, recipe=plan.recipe or resolve_recipe(model, run.recipe))  # auto settings decided
    ds = with_holdout(ds, run)  # the same split the plan saw
    out = rd.path if rd is not None else None
    recipe = run.recipe
    # -- 1. the vulnerability analysis
    acfg = analysis_settings(run, len(ds.train), out)
    if out is not None and (out / files.ANALYSIS / files.SUMMARY).is_file():
        a_sum = AnalyzeSummary.read(out / files.ANALYSIS / files.SUMMARY).to_json()
        table = read_table(out / files.ANALYSIS, recipe.criterion)
    else:
        say(
            f"[1/4] analysis: {recipe.criterion} scores under {recipe.analysis_attack} on {acfg.limit} "
            "training examples"
        )
        x, y = ds.train.take(acfg.limit).tensors(model_device(model))
        analysis = analyze_model(model, x, y, acfg)
        if rd is not None:
            ard = RunDir.create(acfg.out, overwrite=acfg.overwrite)
            ard.write_config(
                {
                    "command": "analyze",
                    "run": acfg.to_json(),
                    "seed": acfg.seed,
                    "base": str(acfg.base),
                    "dataset": ds.describe(),
                    "split": "train",
                    "threat": plan.threat.to_json(),
                    "attack": analysis.summary.attack,
                    "device": str(model_device(model)),
                    "of": "harden",
                    "model_state_sha256": state_sha256(model.state_dict()),  # as analyze's: --select checks it
                }
            )
            write_analysis(ard, analysis)
        a_sum, table = analysis.summary.to_json(), analysis.tables[recipe.criterion]
    # -- 2 + 3. selection and selective fine-tuning
    what = rule_words(recipe.granularity, recipe.quotas) + (" + the normalization layers" if recipe.norms else "")
    what += " + the output layer whole" if recipe.trains_head else ""
    what += f", the mask moving (--regrow {recipe.regrow:g})" if recipe.regrow else ""
    budget_words = (
        f"{100 * recipe.params:g}% of the parameters" if recipe.params < 1 else f"{recipe.params:,} parameters"
    )
    by = "" if recipe.granularity == "probe" else f" by {recipe.criterion}"  # the probe's words say "moved most"
    say(f"[2/4] selection: {what}{by}, at most {budget_words}")
    ft = finetune_settings(run, plan, out)
    if out is not None and (out / files.FINETUNE / files.SUMMARY).is_file():  # finished earlier: read it back
        hardened, _ = load_model(out / files.FINETUNE, model_device(model))
    else:
        hardened, select, stage = copy.deepcopy(model), table, {}
        ramp = f"eps ramped over the first {100 * recipe.eps_warmup:g}% of {plan.budget:,} gradient evaluations"
        if recipe.granularity == "probe":  # a whole-network probe first; the entries it moved train (runs/probe.py)
            probed = probe_then_mask(
                model, meta, ds, ft, out / PROBE if out else None, lambda m: say(f"[3/4] {m}"), table
            )
            stage = {"base_state": probed.base_state, "spent": probed.spent, "asked": ft}
            hardened, select, ft = probed.start, probed.mask, probed.run
            ramp = f"at the full eps for the {ft.budget:,} gradient evaluations the probe left"
        batches = "" if recipe.augment == "none" else f" on {recipe.augment} batches"
        say(f"[3/4] fine-tuning the selection with {recipe.attack}{batches}, {ramp}")
        if rd is not None:
            finetune_folder(hardened, meta, ds, ft, select=select, **stage)
        else:
            job = prepare_finetune(hardened, ds, ft, select=select)
            ft_sum = finetune_model(hardened, ds, job, spent=stage.get("spent"), base_state=stage.get("base_state"))
            ft_sum = ft_sum.to_json()
            selection = job.selection
    if out is not None:  # the fine-tuning's records are the truth: the same whether run now or earlier
        ft_sum = FinetuneSummary.read(out / files.FINETUNE / files.SUMMARY).to_json()
        chosen = out / files.FINETUNE / files.SELECTION
        selection = selection_from_json(read_json(chosen, "selection"), model) if chosen.is_file() else None
    hardened.eval()
    # -- 4. the strong evaluation, before and after, on the same test examples
    results, records = {}, {}
    if ds.test is not None:
        say(f"[4/4] evaluation: worst case of {plan.evaluation} on {len(ds.test)} test examples, masking gate on")
        for name, m, where in (
            ("base", model, run.base),
            ("protocol", hardened, str(out / files.FINETUNE) if out else ""),
        ):
            path = out / files.evaluation(name) if out is not None else None
            settings = evaluation_settings(run, plan, where, name, out)
            measured = _measured(name, Path(run.base), out) if out is not None else {}
            if path is not None and path.is_file():  # a resume: kept where it measured these settings on these bytes
                saved = read_json(path, "evaluation")
                same = measurement(saved.get("config") or {}) == measurement(settings.to_json())
                if same and saved.get("model_file_sha256") in (None, measured.get("model_file_sha256")):
                    records[name] = saved
                    continue
            rec = evaluation_record(m, ds.test, ds.name, settings)
            results[name] = rec["_result"]
            rec.update(measured)  # the file it measured (the hardened one as published): `info` flags later changes
            records[name] = write_evaluation(rec, path) if path is not None else rec
    before, after = records.get("base"), records.get("protocol")
    record = summarise(run, meta, base_cost or {}, a_sum, ft_sum, before, after, plan.budget, plan.evaluation, ds.name)
    return HardenResult(
        hardened, selection, table, results.get("base"), results.get("protocol"), record, ft_sum.get("cost", {})
    )


def run(run: HardenRun) -> HardenSummary:
    """`advtune harden`: harden the model of a run folder into `run.out`; returns the summary record."""
    # -- validate everything before anything is created or replaced
    check_resume_overwrite(run.resume, run.overwrite)
    check_harden_settings(run)  # what needs neither the model nor the data: before either is read
    open_run(run.base)
    refuse_same_folder(run.out, run.base, run.data_dir)
    refuse_taken_out(run.out, resume=run.resume, overwrite=run.overwrite)  # before the base and the data are read
    device = resolve_device(run.device)
    model, meta, base_cfg = load_base(run.base, device)
    ds = dataset_of(base_cfg, meta, run.data_dir, limit=run.limit, limit_test=run.limit_test)
    plan = plan_harden(model, ds, run)
    run = replace(run, recipe=plan.recipe)  # recorded and compared on --resume as it will run
    out = Path(run.out)
    base_sha256 = file_sha256(Path(run.base) / files.WEIGHTS)
    if run.resume:
        check_harden_resume(out, run, base_sha256)
    fresh = run.resume and not (out / files.CONFIG).is_file()  # said as finetune and train say it (docs/usage.md)
    rd = RunDir.create(out, resume=run.resume, overwrite=run.overwrite)
    if fresh:
        log.warning("--resume: no run in %s yet, starting one", out)
    trained_on = (base_cfg.get("run") or {}).get("limit")  # said once every check passed (never above a refusal)
    if run.limit is None and trained_on and trained_on < len(ds.train):  # images the base kept out (a validation?)
        log.warning(
            "the base trained on the first %d training images; harden uses all %d (--limit %d to match)",
            trained_on,
            len(ds.train),
            trained_on,
        )
    write_config_once(  # a resume adds when it resumed
        rd,
        {
            "command": "harden",
            "run": run.to_json(),
            "seed": run.seed,
            "base": str(run.base),
            "threat": plan.threat.to_json(),
            "dataset": ds.describe(),
            "device": str(device),
            "budget": plan.budget,
            "base_sha256": base_sha256,  # a resume refuses a base retrained in place
        },
    )
    print(
        f"advtune harden: {model_label(meta) or 'the model'} from {run.base}, {plan.threat}, "
        f"{len(ds.train) - plan.holdout:,} training examples"
        + (f" (+ {plan.holdout:,} held out to choose the checkpoint)" if plan.holdout else "")
        + (
            " (too few to hold any out: the last weights are kept)"
            if run.holdout is None and run.keep_best and not plan.holdout
            else ""
        )
        + f", budget {plan.budget:,} gradient evaluations"
    )
    base_cost = whole_training_cost(run.base, base_cfg)  # {}: unrecorded (weights brought in, a fine-tuned base)
    hardened = harden_model(model, meta, ds, run, rd=rd, base_cost=base_cost, say=print, plan=plan)
    rec = hardened.record
    info = {"job": "harden", "base": str(run.base), "eps": run.eps, "norm": run.norm, "recipe": rec.recipe}
    info.update(evaluation=rec.evaluation, test_examples=rec.test_examples, before=rec.before, after=rec.after)
    factors = patch_factors(rd.path / files.FINETUNE / files.PATCH)  # low-rank adapters, as the stage stored them
    write_patch(rd.file(files.PATCH), model, hardened.model, info, factors)  # what a fleet with the base needs
    _publish_model(out / files.FINETUNE, out)
    rd.write_json(files.SUMMARY, rec.to_json())  # last of the records (filenames.py): what says the run is finished
    from ..report import write_harden_report  # matplotlib only where the report is drawn

    paths = write_harden_report(out)
    rd.done()  # only now is a replaced run deleted: a failed publish or report leaves it where the error says
    return replace(hardened.record, report=str(paths["html"]))


def _measured(name: str, base: Path, out: Path) -> dict:
    """Evaluation `name`'s model file with the sha256 of the bytes it measured: the base's, or the hardened model,
    measured in its fine-tuning's folder and published (the same bytes) at the top of `out` when the run ends."""
    recorded, source = (base, base) if name == "base" else (out, out / files.FINETUNE)
    weights = source / files.WEIGHTS
    if not weights.is_file():
        return {}
    return {"model_file": str((recorded / files.WEIGHTS).resolve()), "model_file_sha256": file_sha256(weights)}


def _publish_model(ft_dir: Path, out: Path) -> None:
    """The hardened model at the top of the harden folder, so `advtune evaluate/info OUT` work on it."""

    for name in (files.WEIGHTS, files.MODEL_META, files.COST, files.SELECTION, files.METRICS):
        src = ft_dir / name
        if src.is_file():
            atomic_write_bytes(out / name, src.read_bytes())


def summarise(
    run: HardenRun,
    meta: dict,
    base_cost: dict,
    a_sum: dict,
    ft_sum: dict,
    before: dict | None,
    after: dict | None,
    budget: int,
    evaluation: str | None = None,
    dataset: str | None = None,
) -> HardenSummary:
    """The harden record: robustness before/after (None without test data) and every cost, each
    from its own record."""

    def robustness(ev: dict | None, *extra: str) -> dict | None:
        if ev is None:
            return None
        out = {"clean_acc": ev["clean_accuracy"], "robust_acc": ev["worst_case_accuracy"]}
        out.update({k: ev[k] for k in extra})
        return {**out, "suspect": ev.get("suspect", [])}

    architecture = meta.get("architecture") or (meta.get("factory") or {}).get("spec")
    sel = ft_sum.get("selection") or {}
    scoring = sel.get("scoring") or {}
    ft_cost = ft_sum.get("cost", {})
    a_cost = a_sum.get("cost", {})
    record = {
        "eps": run.eps,
        "norm": run.norm,
        "base": str(run.base),
        "architecture": architecture,
        "before": robustness(before),
        "after": robustness(after, "accuracy"),
        "test_examples": after["examples"] if after else 0,
        "evaluation": evaluation or run.evaluation,
        "selection": sel,
        "trainable_params": sel.get("trainable_params"),
        "param_share": sel.get("param_share"),
        "recipe": run.recipe.to_json(),
        "budget": budget,
        "cost": {
            "base_training_grad_evals": base_cost.get("grad_evals"),
            # the sparse rule's entry scoring is part of choosing what trains: counted with the analysis
            "analysis_grad_evals": a_cost.get("grad_evals", 0) + scoring.get("grad_evals", 0),
            "finetune_grad_evals": ft_cost.get("grad_evals", 0),
            "harden_grad_evals": a_cost.get("grad_evals", 0)
            + scoring.get("grad_evals", 0)
            + ft_cost.get("grad_evals", 0)
            + (ft_sum.get("checkpoints") or {}).get("grad_evals", 0),
            "analysis_wall_s": a_cost.get("wall_s", 0.0) + scoring.get("wall_s", 0.0),
            "finetune_wall_s": ft_cost.get("wall_s", 0.0),
            "checkpoint_grad_evals": (ft_sum.get("checkpoints") or {}).get("grad_evals", 0),
            "checkpoint_wall_s": (ft_sum.get("checkpoints") or {}).get("wall_s", 0.0),
            "evaluation_grad_evals": sum(sum((ev or {}).get("grad_evals", {}).values()) for ev in (before, after)),
        },
        "checkpoints": ft_sum.get("checkpoints"),
        "at_reference": at_reference(dataset, architecture, run.norm, run.eps),
        "concentration": a_sum.get("criteria", {}).get(run.recipe.criterion, {}).get("curve"),
        "analysis_examples": a_sum.get("examples_scored"),
    }
    return HardenSummary(**record)


def format_summary(summary: HardenSummary) -> str:
    """What `advtune harden` prints at the end."""
    s = summary.to_json()
    sel = s.get("selection") or {}
    layers = ", ".join(f"{n} ({u}/{t} units)" for n, (u, t) in (sel.get("by_layer") or {}).items() if u)
    if sel.get("kind") in ("lowrank", "hybrid"):
        adapters = [f"{n} (rank {r} adapter)" for n, r in sel.get("ranks", {}).items()]
        norms = [f"{len(sel['norms'])} normalization layers"] if sel.get("norms") else []
        layers = ", ".join([f"{n} (whole)" for n in sel.get("whole", [])] + adapters + norms)
    if sel.get("kind") == "sparse":
        whole = list(sel.get("whole", []))
        entries = [f"{n} ({k:,} entries)" for n, k in (sel.get("params_by_layer") or {}).items() if n not in whole]
        norms = [f"{len(sel['norms'])} normalization layers"] if sel.get("norms") else []
        scoring, probe = sel.get("scoring") or {}, sel.get("probe") or {}
        layers = ", ".join([f"{n} (whole)" for n in whole] + entries + norms)
        if scoring:
            layers += (
                f"; entries chosen on {scoring['examples']} adversarial training examples "
                f"({scoring['grad_evals']:,} gradient evaluations)"
            )
        if probe:
            layers += (
                f"; entries the whole network's probe moved most (its first {100 * probe['share']:g}% of the budget, "
                f"{probe['grad_evals']:,} gradient evaluations, counted with the fine-tuning)"
            )
    c = s["cost"]
    lines = [
        f"hardened {s['architecture']} at {s['norm']} eps={s['eps']:g} "
        f"({s['test_examples']} test examples, worst case of {s['evaluation']}):",
        *(
            f"  {when} clean {100 * r['clean_acc']:.2f}%, robust {100 * r['robust_acc']:.2f}%"
            if r
            else f"  {when} not evaluated (no test examples)"
            for when, r in (("before:", s["before"]), ("after: ", s["after"]))
        ),
        f"  trained {sel.get('trainable_params', 0):,} parameters ({100 * (s.get('param_share') or 0):.2f}% of the "
        f"model)"
        + (  # adapters: their factors train, the entries of the layers they merge into change
            f", changing {sel['changed_params']:,} entries of the weights"
            if sel.get("changed_params", 0) > sel.get("trainable_params", 0)
            else ""
        )
        + f": {layers}",
        f"  cost: analysis {c['analysis_grad_evals']:,} + fine-tuning {c['finetune_grad_evals']:,}"
        + (f" + choosing the checkpoint {c['checkpoint_grad_evals']:,}" if c.get("checkpoint_grad_evals") else "")
        + " gradient evaluations "
        f"({c['analysis_wall_s'] + c['finetune_wall_s'] + c.get('checkpoint_wall_s', 0.0):.0f} s); the base model's "
        "training "
        + (
            f"took {c['base_training_grad_evals']:,}"
            if c["base_training_grad_evals"] is not None
            else "is not recorded (weights brought in, or a base that was itself fine-tuned)"
        ),
    ]
    lines += [f"  {line}" for line in harden_comparisons(s)]  # the checkpoint kept, AT, full fine-tuning
    gain = 100 * (s["after"]["robust_acc"] - s["before"]["robust_acc"]) if s["after"] and s["before"] else None
    if gain is not None and gain < 1:  # a new-user walk: 0% -> 0% said nothing beyond the numbers
        lines.append(
            f"  !! robustness moved {gain:+.1f} points: this selection did not take here; try more parameters "
            "(--params) or full-network fine-tuning (advtune finetune RUN --select all)"
        )
    if not s["after"]:
        lines.append("  masking gate: not run (no test examples)")
    elif s["after"].get("suspect"):
        lines.append("  !! the gradient-masking gate flagged the hardened model: " + "; ".join(s["after"]["suspect"]))
    else:
        specs = list(s["after"].get("accuracy") or {"apgd-ce": 0, "square": 0})  # (older records: as the suite)
        lines.append("  " + passed_line(specs, probed=bool(s["after"].get("clean_acc", 1))))
    return "\n".join(lines)
