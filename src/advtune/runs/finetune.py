"""`advtune finetune`: adversarial fine-tuning of a trained run: all parameters, a selection of
components, or a random control, through the one training loop."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .. import filenames as files
from ..attacks import build_attack
from ..cost import CostMeter
from ..devices import model_device, resolve_device
from ..distributed import broadcast, on_main
from ..errors import AdvtuneError
from ..metrics import accuracy, quick_robust_acc
from ..models import load_model
from ..patch import cpu_state, state_sha256, write_patch
from ..recipe import Recipe
from ..records import Record
from ..seeding import seed_everything
from ..storage import read_json
from ..threat import ThreatModel
from ..train import TrainConfig, build_objective, check_objective, fit
from ..train.config import inert_regrow
from ..train.keep_best import KeepBest
from ..train.lowrank import check_adapter_lr_ratio, selection_from_json
from ..train.sparse import SparseEntries
from ..vulnerability.entries import entry_fisher
from .analysis_source import check_select_exists
from .common import (
    check_val,
    close_training_folder,
    dataset_of,
    example_input,
    fit_in_folder,
    fit_steps,
    guard_on,
    load_base,
    open_training_folder,
    overfit_guard,
    refuse_same_folder,
    resolve_eps_warmup,
    snapshot_steps,
    spaced_steps,
    with_budget,
)
from .configs import FinetuneRun
from .record import RunDir, check_resume_overwrite, refuse_taken_out, replaced_when_all_done
from .selecting import (
    check_selection_flags,
    describe_selection,
    inert_selection_settings,
    make_selection,
    resolve_head,
    resolve_norms,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneSummary(Record):
    """What `advtune finetune` returns and writes to summary.json (`FinetuneSummary.read` reads it back)."""

    SCHEMA = 1
    KIND = "finetune-summary"
    OMIT_NONE = ("pgd10_acc_quick", "pgd10_examples", "checkpoints")  # the monitor was off: the record has no such keys

    test_acc: float | None  # clean accuracy on the test split (None: no test data, the Python API)
    test_examples: int
    epochs: int
    stopped: str | None
    final: dict  # the last epoch's record
    selection: dict | None  # what was trained (None: every parameter)
    cost: dict
    pgd10_acc_quick: float | None = None  # the quick PGD-10 monitor (not the honest protocol), if on
    pgd10_examples: int | None = None
    checkpoints: dict | None = None  # --keep-best: the held-out curve and the step kept


def both(first, second):  # one on_step callback that calls two (either may be None)
    if first is None:
        return second

    def on_step(model, step, meter):
        first(model, step, meter)
        second(model, step, meter)

    return on_step


def trained_words(selection: dict | None) -> str:
    """What a fine-tuning trained, in words, from its selection record."""
    if not selection:
        return "all parameters"
    if selection.get("kind") in ("lowrank", "hybrid"):
        whole = f"{len(selection.get('whole', []))} whole layers + " if selection.get("whole") else ""
        adapted = len(selection.get("ranks", {}))
        norms = f" + {len(selection['norms'])} normalization layers" if selection.get("norms") else ""
        return f"{whole}low-rank adapters on {adapted} layers{norms}, {selection['trainable_params']:,} params"
    if selection.get("kind") == "sparse":
        norms = f" + {len(selection['norms'])} normalization layers" if selection.get("norms") else ""
        layers = len(selection.get("params_by_layer") or {}) - len(selection.get("whole") or [])
        head = " + the output layer whole" if selection.get("whole") else ""
        return f"single entries of {layers} layers{head}{norms}, {selection['trainable_params']:,} params"
    return f"{selection['units']} units, {selection['trainable_params']:,} params"


def check_finetune(run: FinetuneRun, say: bool = True) -> FinetuneRun:
    """The fine-tuning settings, refused in one line before any work; the eps ramp resolved (said in the log unless
    `say` is off: an experiment checks its variants long before they run)."""
    ramp = _asked_ramp(run)
    run = replace(run, train=run.train or TrainConfig(epochs=1), eps_warmup=resolve_eps_warmup(ramp, run.attack, False))
    if run.eps is None:
        raise AdvtuneError("finetune needs --eps (e.g. 0.3 for MNIST, 8/255 for CIFAR-10)")
    check_objective(run.attack, ThreatModel(run.norm, run.eps), run.attack_mode)  # before the base
    check_val(run.val)
    check_resume_overwrite(run.resume, run.overwrite)
    if run.granularity == "probe" and run.select == "random":
        raise AdvtuneError(
            "--select random with --granularity probe: the probe rule's mask comes from its probe, never from "
            "--select; for a random control of the same size use --granularity sparse --select random"
        )
    check_probe_rule(run)
    if run.probe_quotas and run.granularity != "probe":
        raise AdvtuneError(
            f"--probe-quotas shapes the probe rule's mask: use it with --granularity probe, not {run.granularity}"
        )
    if run.head and run.granularity == "probe" and not run.probe_quotas:
        raise AdvtuneError(
            "--head with the probe rule needs --probe-quotas: its global ranking lets the output layer's entries "
            "compete in the mask; add --probe-quotas or drop --head"
        )
    if run.train.regrow and run.granularity not in ("probe", "sparse"):
        raise AdvtuneError("--regrow moves a mask of single weight entries: use it with --granularity probe or sparse")
    if run.train.regrow and guard_on(run.guard, run.attack):  # its rollback would bring back an older mask's weights
        raise AdvtuneError(
            "--regrow with the overfitting guard (on by default for fgsm training): the guard's rollback restores "
            "weights trained under an earlier mask; give --no-guard or drop --regrow"
        )
    inert = inert_regrow(run.train)
    if inert:  # how a mask moves, on a mask that stays put: it would be ignored
        flag = "--" + inert[0].replace("_", "-")
        raise AdvtuneError(f"{flag} sets how --regrow's mask moves; a fixed mask has none: drop it, or add --regrow")
    if isinstance(run.monitor_test, bool) or not isinstance(run.monitor_test, int) or run.monitor_test < 0:
        raise AdvtuneError(f"--monitor-test must be a number of test examples >= 0 (0: off), got {run.monitor_test!r}")
    if isinstance(run.keep_best, bool) or not isinstance(run.keep_best, int) or run.keep_best < 0:
        raise AdvtuneError(
            f"--keep-best must be a number of checkpoints >= 0 (0: keep the last), got {run.keep_best!r}"
        )
    if run.train.epochs == 0 and run.budget is None:
        raise AdvtuneError(
            "--epochs 0 would save the base model unchanged; fine-tune for at least 1 epoch (or give --budget)"
        )
    if say:  # the default ramp said once the settings pass (not above a refusal)
        resolve_eps_warmup(ramp, run.attack, True)
    return run


def _asked_ramp(run: FinetuneRun) -> float | None:
    """--eps-warmup as given; with the probe rule unset, the recipe's 15% (its ramp must end inside the probe)."""
    if run.eps_warmup is None and run.granularity == "probe":
        return Recipe().eps_warmup
    return run.eps_warmup


def check_probe_rule(run: FinetuneRun) -> None:
    """The probe rule's settings (runs/probe.py), refused with the others before the data loads; `run`'s eps ramp
    resolved. --probe with another granularity would be ignored: refused, as --probe-quotas."""
    share = run.probe
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
        raise AdvtuneError(f"--probe must be a share of the budget in (0, 1), got {share!r}")
    if run.granularity != "probe":  # the probe stage itself (granularity unit, its share kept): a --probe given
        return  # with another granularity is refused by check_selection_flags
    if run.budget is None:
        raise AdvtuneError("--granularity probe pays its probe out of the budget: give --budget")
    if run.params is None:
        raise AdvtuneError("--granularity probe needs a parameter budget for its mask (--params, e.g. 0.1)")
    ramp = run.eps_warmup or 0.0
    if not share > ramp:
        raise AdvtuneError(
            f"--probe {share:g} must be larger than --eps-warmup {ramp:g}: the eps ramp has to end within the probe; "
            "raise --probe or lower --eps-warmup"
        )


@dataclass
class Finetuning:
    """A fine-tuning prepared and validated, before any folder exists: what `finetune_model` trains."""

    run: FinetuneRun  # eps ramp resolved
    cfg: TrainConfig  # steps set from the budget
    threat: ThreatModel
    objective: object
    selection: object  # a Selection, or None: every parameter
    selection_info: dict | None
    example: object  # one training input, for the traced BN rule and the parameter counts


def decided(model, ds, run: FinetuneRun, chosen) -> FinetuneRun:
    """`run` with its auto settings decided for this model (--norms and --head: None in an API call or an
    experiment's `recipe: harden` variant), as harden decides its recipe's: what is recorded, so a resume compares
    what ran. `chosen`: the selection source (run.select, or what overrides it)."""
    norms = resolve_norms(model, run.norms, chosen, run.granularity, run.params)
    head = run.head
    if head is None:  # auto: on with the probe's quotas where the output layer is cheap (runs/selecting.py)
        quotas = run.granularity == "probe" and bool(run.probe_quotas)
        head = resolve_head(model, None, quotas, run.params, norms, example_input(model, ds))
    return replace(run, norms=norms, head=head)


def prepare_finetune(model, ds, run: FinetuneRun, select=None) -> Finetuning:
    """Objective, selection and steps, validated (`select` overrides `run.select`, e.g. a ScoreTable in memory)."""
    run = check_finetune(run)
    chosen = run.select if select is None else select
    run = decided(model, ds, run, chosen)
    cfg = run.train
    seed_everything(cfg.seed)
    threat = ThreatModel(run.norm, run.eps)
    objective = build_objective(run.attack, threat, run.attack_mode, run.eps_warmup, model=model, load_model=load_model)
    example = example_input(model, ds)  # the traced BN rule, as fit uses it
    if run.keep_best and (ds.val is None or len(ds.val) == 0):
        raise AdvtuneError("--keep-best chooses on held-out training examples: give --val N (e.g. --val 1000)")
    if run.granularity == "sparse":  # no adapters to speed up: refused before the scoring's work
        check_adapter_lr_ratio(cfg.adapter_lr_ratio, None)
    cfg = with_budget(cfg, run.budget, objective, len(ds.train), model, example)
    snapshot_steps(cfg, len(ds.train), run.points)  # validates points
    seed = cfg.seed or 0
    scoring: dict = {}
    selection = None
    if run.granularity == "sparse" and run.resume:  # rank 0 decides, so every rank takes the same branch
        selection = broadcast(on_main(lambda: recorded_sparse(model, run)))  # the mask the checkpoint trained with
    if selection is not None:
        scoring = recorded_scoring(run)
    else:
        selection = make_selection(
            model,
            chosen,
            run.share,
            run.criterion,
            run.per_layer,
            seed,
            run.params,
            run.granularity,
            example,
            run.norms,
            run.head,
            lambda: sparse_scores(model, ds, threat, seed, scoring),  # called once the budget is checked
        )
    check_adapter_lr_ratio(cfg.adapter_lr_ratio, selection)  # the loop checks it too: here before any folder
    info = describe_selection(selection, model, example, chosen) if selection is not None else None
    if info is not None and scoring:
        info["scoring"] = scoring
    return Finetuning(run, cfg, threat, objective, selection, info, example)


SPARSE_SCORING = ("pgd:steps=10", 1024)  # the analysis' default attack, on this many training examples


def sparse_scores(model, ds, threat, seed: int, record: dict) -> dict:
    """The per-entry scores the sparse rule ranks entries by (vulnerability.entries), with what computing them cost
    written into `record` for the records; that cost (about 2% of harden's default budget on CIFAR-10) is counted
    with the analysis'. Under torchrun rank 0 scores and every rank gets its scores, so all train the same mask."""
    spec, n = SPARSE_SCORING
    start = time.perf_counter()

    def score() -> tuple[dict, int]:
        fisher, evals = entry_fisher(model, ds.train, build_attack(spec, threat), n=n, seed=seed)
        return {k: v.cpu() for k, v in fisher.items()}, evals

    # rank 0 scores (an error there stops every rank with its message), and every rank gets its scores
    fisher, evals = broadcast(on_main(score))
    record.update(
        attack=spec, examples=min(n, len(ds.train)), grad_evals=evals, wall_s=round(time.perf_counter() - start, 3)
    )
    return fisher  # on the CPU, where the masks are built


def recorded_sparse(model, run: FinetuneRun):
    """The sparse mask of the run being resumed (its selection.json), so that a resume trains the mask the
    checkpoint was trained with and pays no second scoring; None when there is none to reuse."""
    if run.granularity != "sparse" or not run.resume or not run.out:
        return None
    chosen = Path(run.out) / files.SELECTION
    if not chosen.is_file():
        return None
    selection = selection_from_json(read_json(chosen, "selection"), model)
    return selection if isinstance(selection, SparseEntries) else None


def recorded_scoring(run: FinetuneRun) -> dict:
    """What the resumed run's scoring cost, from its config.json (it is not paid again)."""
    config = Path(run.out) / files.CONFIG
    if not config.is_file():
        return {}
    return dict((read_json(config, "run config").get("selection") or {}).get("scoring") or {})


def finetune_model(
    model,
    ds,
    job: Finetuning,
    rd: RunDir | None = None,
    meta: dict | None = None,
    config: dict | None = None,
    spent: dict | None = None,
    base_state: dict | None = None,
) -> FinetuneSummary:
    """Adversarial fine-tuning of `model` in place (the one implementation behind `advtune finetune`,
    harden's fine-tuning stage and experiment variants). With a run folder `rd`, it checkpoints there
    (and resumes from it with run.resume), writes metrics and cost as it goes, and saves snapshots
    (a loadable model with `meta` and the run's `config`). `spent`: cost counters of an earlier stage
    of the same fine-tuning (the probe rule's probe) that its cost meter starts from; `base_state`: the base's
    weights where `model` does not start at them (what a --regrow mask's dropped entries return to)."""
    run, cfg = job.run, job.cfg
    meter = CostMeter().load_json(spent or {})
    callbacks = overfit_guard(run.guard, run.attack, job.threat, ds.train, model_device(model), cfg.seed, meter)
    snaps = snapshot_steps(cfg, len(ds.train), run.points)
    snap_meta = {k: v for k, v in (meta or {}).items() if k not in ("parameters", "tensors", "training")}
    in_folder = fit_in_folder(rd, meter, snap_meta, config or {}, snaps, run.resume)
    keep = None
    if run.keep_best:
        steps = spaced_steps(fit_steps(cfg, len(ds.train)), run.keep_best, after=run.eps_warmup)  # after the ramp
        spec = "pgd:steps=10"
        keep = KeepBest(
            ds.val,
            build_attack(spec, job.threat),
            steps,
            label=spec,
            folder=rd.path if rd else None,
            batch_size=cfg.eval_batch_size,
            seed=cfg.seed or 0,
            masks=(lambda: job.selection.entries) if cfg.regrow else None,  # the mask moves: each point's is kept
        )
        in_folder["on_step"] = both(in_folder.get("on_step"), keep)
    history = fit(
        model,
        ds.train,
        job.objective,
        cfg,
        val=ds.val,
        selection=job.selection,
        meter=meter,
        callbacks=callbacks,
        desc="finetune",
        base_state=base_state,
        **in_folder,
    )
    if keep is not None:  # the best held-out point's weights, not the last
        chosen = keep.restore(model)
        if chosen is not None and hasattr(job.selection, "factors"):  # low-rank: the kept point's adapters
            job.selection.factors = keep.best_factors  # (None when measured before a resume: a dense patch)
        if keep.kept_masks is not None:  # a moving mask: the kept point's
            job.selection.entries.update(keep.kept_masks)
        log.info("kept the checkpoint of step %s (best held-out robust accuracy of %d)", chosen, len(keep.curve))
    if cfg.regrow and job.selection_info is not None:  # the mask moved: the rows it touches now, and (a global pool)
        job.selection_info["units"] = job.selection.n_units(model)  # its layers' counts
        job.selection_info["by_layer"] = job.selection.by_layer(model)
        job.selection_info["params_by_layer"] = job.selection.params_by_layer(model)
    # monitoring after training: not counted as training cost
    test_acc = accuracy(model, ds.test, cfg.eval_batch_size) if ds.test is not None else None
    quick, n_quick = None, None
    if run.monitor_test and ds.test is not None:
        n_quick = min(run.monitor_test, len(ds.test))
        quick = quick_robust_acc(model, ds.test.take(n_quick), job.threat, cfg.seed)
    summary = FinetuneSummary(
        test_acc,
        len(ds.test) if ds.test is not None else 0,
        len(history.epochs),
        history.stopped,
        history.last,
        job.selection_info,
        meter.to_json(),
        quick,
        n_quick,
        keep.record() if keep is not None else None,
    )
    if rd is not None:
        rd.write_metrics(history.epochs)
    return summary


def run(run: FinetuneRun) -> FinetuneSummary:
    """`advtune finetune`: fine-tune the model of a run folder into `run.out`."""
    asked, run = run, check_finetune(run, say=False)  # the default ramp is said once every check below passed
    # the command's own checks, before the base loads (harden's stages do not come here; an experiment's variants do,
    # each when its turn comes: its analysis exists by then)
    if run.keep_best and not run.val:
        raise AdvtuneError("--keep-best chooses on held-out training examples: give --val N (e.g. --val 1000)")
    if run.select == "all" and run.granularity != "probe" and (run.head or run.norms):  # the probe's mask is its own
        raise AdvtuneError(f"--{'head' if run.head else 'norms'} adds to a selection; --select all trains everything")
    # not in check_finetune: harden's selection comes as a table, the probe stage keeps its --probe as unit
    check_selection_flags(
        run.select,
        run.params is not None,
        run.granularity,
        run.probe,
        per_layer=run.per_layer,
        share=run.share,
        criterion=run.criterion,
        probe_quotas=run.probe_quotas,
    )
    check_select_exists(run.select)  # a mistyped analysis folder, before the base and the data load
    words = ("all", "random", "top", "lowrank")
    analysis = run.select if run.select not in words and ":" not in run.select else None  # an analysis folder
    refuse_same_folder(run.out, run.base, analysis, run.data_dir)
    scored = Path(analysis) / files.CONFIG if analysis else None
    if scored is not None and scored.is_file():  # scores of another threat model steer the mask without a word
        recorded = read_json(scored, "analysis config")
        threat = recorded.get("threat") if isinstance(recorded, dict) else None
        norm = threat.get("norm") if isinstance(threat, dict) else None
        if norm not in (None, run.norm):
            log.warning(
                "--select %s scored the model under %s; this fine-tuning attacks under %s", analysis, norm, run.norm
            )
    refuse_taken_out(run.out, resume=run.resume, overwrite=run.overwrite)  # before the base and the data are read
    resolve_eps_warmup(_asked_ramp(asked), run.attack, True)  # every check passed: the default ramp said
    device = resolve_device(run.device)
    model, meta, base_cfg = load_base(run.base, device)
    ds = dataset_of(
        base_cfg,
        meta,
        run.data_dir,
        limit=run.limit,
        limit_test=run.limit_test,
        val=run.val,
        seed=run.train.seed or 0,
    )
    return finetune_folder(model, meta, ds, run)


def finetune_folder(
    model,
    meta: dict,
    ds,
    run: FinetuneRun,
    select=None,
    base_state: dict | None = None,
    spent: dict | None = None,
    asked: FinetuneRun | None = None,
) -> FinetuneSummary:
    """The fine-tuning of `model` (the base run's, with its model.json `meta`) recorded in the run
    folder `run.out`: created only once everything is validated; resumable. `base_state`: the weights
    the patch is taken from when `model` does not start at the base (the probe rule); `spent`: as
    finetune_model's; `asked`: the settings as given, recorded (and compared on --resume) as the run's
    when `run` is a stage derived from them (the probe rule's masked stage, recorded as `stage`)."""
    if run.granularity == "probe" and select is None:  # the probe stage first, then its mask (runs/probe.py)
        from .probe import probe_folder, probe_then_mask

        run, out = check_finetune(run), Path(run.out)
        run = decided(model, ds, run, run.select)  # recorded as decided (the rows of an experiment read it)
        for folder in (out, probe_folder(out)):  # nothing started is continued or replaced unasked
            if folder.is_dir() and any(folder.iterdir()) and not (run.resume or run.overwrite):
                raise AdvtuneError(
                    f"output folder {folder} already exists; pass --resume to continue it or --overwrite to replace it"
                )
        with replaced_when_all_done(probe_folder(out), out):  # --overwrite: the old probe goes with the old run
            p = probe_then_mask(model, meta, ds, run, probe_folder(out), log.info)
            return finetune_folder(p.start, meta, ds, p.run, p.mask, p.base_state, p.spent, run)
    job = prepare_finetune(model, ds, run, select)
    run, cfg = job.run, job.cfg
    base_state = base_state if base_state is not None else cpu_state(model)  # the patch: what changed
    config = {
        "command": "finetune",
        "run": (asked or run).to_json(),
        **({"stage": run.to_json()} if asked is not None else {}),
        "seed": cfg.seed,
        "base": str(run.base),
        "base_sha256": state_sha256(base_state),  # a resume refuses a base retrained in place
        "dataset": ds.describe(),
        "objective": job.objective.describe(),
        "threat": job.threat.to_json(),
        "selection": job.selection_info,
        "guard": guard_on(run.guard, run.attack),
        "device": str(model_device(model)),
        "steps": cfg.steps,
    }
    # everything is validated: only now is it created (a resume may drop the settings its run ignored)
    rd = open_training_folder(asked or run, cfg, config, inert=inert_selection_settings)
    if job.selection is not None:
        rd.write_json(files.SELECTION, job.selection.to_json())
    summary = finetune_model(model, ds, job, rd, meta, config, spent, base_state)
    if cfg.regrow:  # the mask the run ended with (its count kept; each weight's too unless --regrow-pool global)
        rd.write_json(files.SELECTION, job.selection.to_json())
    new_meta = {k: v for k, v in meta.items() if k not in ("parameters", "tensors", "training")}
    new_meta["training"] = {
        "finetuned_from": str(run.base),
        "objective": job.objective.describe(),
        "config": cfg.to_json(),
        "selection": job.selection_info,
        "test_acc": summary.test_acc,
    }
    info = {"job": "finetune", "base": str(run.base), "eps": run.eps, "norm": run.norm, "attack": run.attack}
    info["trainable_params"] = (job.selection_info or {}).get("trainable_params")
    factors = getattr(job.selection, "factors", None)  # low-rank adapters: stored as factors, not weights
    write_patch(rd.file(files.PATCH), base_state, model, {**info, "test_acc": summary.test_acc}, factors)
    close_training_folder(rd, model, new_meta, summary)
    return summary
