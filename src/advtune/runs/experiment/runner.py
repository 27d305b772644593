"""Running an experiment: the base model, the analyses, every variant through its job's own code
(train, finetune, harden: the CLI's, with the job config built from the variant's keys over the
config's declared defaults), the protocol on each variant and on its snapshots, then the results.
Resumable: a finished variant is skipped, an interrupted one resumes from its checkpoint."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from ... import filenames as files
from ...attacks import split_attack_list
from ...distributed import on_main
from ...errors import AdvtuneError
from ...settings import default, parse_number, settings_from
from ...storage import atomic_write_json, atomic_write_text, file_sha256, read_json
from .. import analyze as analyze_job
from .. import evaluate as evaluate_job
from .. import finetune as finetune_job
from .. import harden as harden_job
from .. import train as train_job
from ..common import list_snapshots
from ..configs import AnalyzeRun, EvaluateRun, FinetuneRun, HardenRun, TrainRun
from ..probe import probe_folder
from .config import ANALYSIS_KEYS, EVAL_NAME, load_config, validate_config
from .rerun import SETTINGS, refuse_changed_variants, refuse_other_setup, resolved_settings
from .results import collect_results, write_results
from .variants import (
    analysis_folder,
    budget_of,
    eps_value,
    expand_variants,
    harden_recipe,
    params_of,
    points_of,
    train_config,
)

log = logging.getLogger(__name__)


@dataclass
class Experiment:
    """One experiment run: its validated config and where things go."""

    cfg: dict
    out: Path
    seed: int
    device: str
    data_dir: str | None
    norm: str
    base_dir: Path
    analyses: dict[float, Path] = field(default_factory=dict)

    @property
    def base(self) -> dict:
        return self.cfg["base"]

    @property
    def evaluation(self) -> dict:
        return self.cfg["evaluation"]


def run(
    config: str | Path | dict,
    out: str | Path,
    *,
    device: str | None = None,
    only: list[str] | None = None,
    source: str | None = None,
    seed: int | None = None,
) -> list[dict]:
    """Run every variant not yet finished, evaluate it with the protocol, write results.{json,csv}. `source` says
    where a config given as a dict came from (recorded in experiment.json); `seed` replaces the config's seed:."""
    cfg = load_config(config) if not isinstance(config, dict) else validate_config(config)
    if seed is not None:
        cfg["seed"] = seed
    out = Path(out)
    ex = Experiment(
        cfg,
        out,
        int(cfg.get("seed", 0)),
        device or cfg.get("device", "auto"),
        cfg.get("data_dir") or cfg["base"].get("data_dir"),
        cfg["threat"].get("norm", "linf"),
        Path(cfg["base"]["pretrained"]) if cfg["base"].get("pretrained") else out / "standard",
    )
    every = expand_variants(cfg)  # the rows report them all, not only --only's
    variants = _chosen(every, only)
    # everything is validated before the first write: a refused re-run leaves the folder as it was
    held = sorted(x.name for x in out.iterdir()) if out.is_dir() else []
    copied = held == ["standard"] and not cfg["base"].get("pretrained")  # a committed base copied in (base-models/)
    if out.is_file() or (held and not (out / files.EXPERIMENT).is_file() and not copied):
        raise AdvtuneError(  # a run or harden folder: its report and records would be written over
            f"--out {out} exists and is not an experiment folder (no {files.EXPERIMENT}); choose a new --out"
        )
    if copied and not (out / files.EXPERIMENT).is_file():
        _check_copied_base(out / "standard", cfg)
    refuse_other_setup(out, ex.seed, cfg)
    refuse_changed_variants(out, every)
    if cfg["base"].get("pretrained") and not (ex.base_dir / files.WEIGHTS).is_file():
        raise AdvtuneError(f"base.pretrained: {ex.base_dir} holds no trained model; train it first or fix the path")
    base_then = _recorded_base(out)
    _refuse_other_base(ex, base_then, every)  # before the base trains again
    on_main(lambda: out.mkdir(parents=True, exist_ok=True))  # torchrun: rank 0 alone creates folders
    record = {"config": cfg, "source": str(config) if not isinstance(config, dict) else source}
    atomic_write_json(out / files.EXPERIMENT, {**record, "base_sha256": base_then} if base_then else record)
    _train_base(ex)
    atomic_write_json(out / files.EXPERIMENT, {**record, "base_sha256": file_sha256(ex.base_dir / files.WEIGHTS)})
    _check_on_the_model(ex, variants)
    for v in every:  # every finished control
        if _finished(out / v["name"]):
            _refuse_stale_control(ex, v, out / v["name"])
    recorded = read_json(out / SETTINGS, "variant settings") if (out / SETTINGS).is_file() else {}
    for v in variants:
        folder = out / v["name"]
        if _finished(folder):
            _refuse_stale_control(ex, v, folder)  # its rule may have run again just now
            log.info("variant %s: finished earlier, skipped", v["name"])
            continue
        # a variant recorded but with nothing of it on disk (refused, or its folder deleted) starts afresh
        recorded[v["name"]] = resolved_settings(v)
        atomic_write_json(out / SETTINGS, recorded)
        model_dir = JOBS[v["kind"]](ex, v, folder)
        _evaluate_variant(ex, v, folder, model_dir)
    rows = collect_results(out, every, ex.base_dir, ex.base.get("limit"))
    write_results(out, rows, [v["name"] for v in every])
    return rows


def _recorded_base(out: Path) -> str | None:
    """The sha256 of the base weights the experiment's variants ran from (recorded since round 47; None before)."""
    path = out / files.EXPERIMENT
    return read_json(path, "experiment record").get("base_sha256") if path.is_file() else None


def _refuse_other_base(ex: Experiment, then: str | None, variants: list[dict]) -> None:
    """Started variants trained from the base as it was (`then`, its recorded sha256): a base retrained or replaced in
    place since (a `pretrained:` run trained again), or gone (`standard/` deleted: refused before it trains again),
    would report rows from two bases as one."""
    started = [v["name"] for v in variants if v["kind"] != "standard" and (ex.out / v["name"] / files.CONFIG).is_file()]
    now = file_sha256(ex.base_dir / files.WEIGHTS)
    if then and started and now != then:
        said = "is gone" if now is None else f"changed (its weights' sha256 was {then[:12]}..., now {now[:12]}...)"
        raise AdvtuneError(
            f"the base model {ex.base_dir} {said} since {', '.join(started)} in {ex.out} trained from it; its rows "
            "would mix two bases: restore it, or use a new --out"
        )


def _refuse_stale_control(ex: Experiment, v: dict, folder: Path) -> None:
    """A finished `params_like` control sized to another variant's selection that has run again since with another
    count (its folder deleted to re-run it) no longer matches it: refused, never reported as its control."""
    like = v.get("params_like")
    if not like or not (ex.out / like / files.SUMMARY).is_file() or not (folder / files.CONFIG).is_file():
        return
    ran = (read_json(folder / files.CONFIG, "config").get("run") or {}).get("params")
    now = _trainable_of(ex.out, like, v["name"])
    if ran is not None and int(ran) != now:
        raise AdvtuneError(
            f"variant {v['name']} was sized like {like}'s selection when it held {int(ran):,} trainable parameters, "
            f"now {now:,} ({like} ran again since): delete {folder} to run the control again"
        )


def _check_on_the_model(ex: Experiment, variants: list[dict]) -> None:
    """What a fine-tuning variant's own selection asks of the model (a low-rank rank that fits, layers it has), checked
    once the base exists and before any variant trains (it was refused when its turn came, after the others had
    trained). Analysis-based selections are checked by the jobs themselves (they need the analysis first)."""
    from ...models import load_model
    from ..selecting import make_selection

    pending = [
        v
        for v in variants
        if v["kind"] == "finetune"
        and not _finished(ex.out / v["name"])
        and str(v.get("select", "")).startswith(("lowrank", "layers:"))
    ]
    model = load_model(ex.base_dir)[0] if pending else None
    for v in pending:  # the jobs' own rule (its parsing of the spec, its checks), on the base model
        try:
            make_selection(model, str(v["select"]), default(FinetuneRun, "share"), "taylor", False, 0, params_of(v))
        except AdvtuneError as e:
            raise AdvtuneError(f"variant {v['name']}: {e}") from None


def _chosen(variants: list[dict], only: list[str] | None) -> list[dict]:
    if not only:
        return variants
    missing = [o for o in only if o not in {v["name"] for v in variants}]
    if missing:
        raise AdvtuneError(
            f"--only {missing[0]!r}: no such variant; variants: {', '.join(v['name'] for v in variants)}"
        )
    return [v for v in variants if v["name"] in only]


def _check_copied_base(folder: Path, cfg: dict) -> None:
    """A standard model copied into a new experiment's folder (bench/base-models/README.md) is its base: only a run of
    the base the config describes (dataset, model, training subset), and its own evaluation kept only where it
    measured what this experiment measures (the threat, the attacks, the images; with several eps it is no row)."""
    if not (folder / files.WEIGHTS).is_file() or not (folder / files.CONFIG).is_file():
        raise AdvtuneError(f"{folder} holds no trained run: copy a whole run folder there, or remove it")
    ran = read_json(folder / files.CONFIG, "copied base config").get("run") or {}
    base = cfg["base"]
    for key in ("dataset", "model", "limit"):
        if ran.get(key) != base.get(key):
            raise AdvtuneError(
                f"{folder} is a run of {key} {ran.get(key)!r}, this experiment's base {base.get(key)!r}: copy the "
                "base its config describes, or remove it"
            )
    record = folder / files.evaluation(EVAL_NAME)
    eps = cfg["threat"]["eps"]
    if not record.is_file() or (isinstance(eps, list) and len(eps) > 1):
        return
    kept, ev = read_json(record, "evaluation"), cfg.get("evaluation") or {}
    threat = kept.get("threat") or {}
    value = eps_value(eps[0] if isinstance(eps, list) else eps)
    attacks = split_attack_list(ev["attacks"]) if ev.get("attacks") else None  # a suite: not compared, not kept
    want = (
        cfg["threat"].get("norm", "linf"),
        attacks,
        ev.get("limit_test", ev.get("limit", default(EvaluateRun, "limit_test"))),
    )
    same = (threat.get("norm"), kept.get("attacks"), kept.get("examples")) == want
    if not same or not math.isclose(float(threat.get("eps", -1)), value, rel_tol=1e-9):
        raise AdvtuneError(
            f"{record} measured {kept.get('attacks')} at {threat.get('norm')} eps {threat.get('eps')} on "
            f"{kept.get('examples')} images, not what this experiment measures: delete that file to evaluate the "
            "copied model under this experiment"
        )


def _finished(folder: Path) -> bool:
    return (folder / files.SUMMARY).is_file() and (folder / files.evaluation(EVAL_NAME)).is_file()


def _folder_flags(folder: Path) -> dict:
    """Resume a started run (the probe rule's starts in its probe folder, next to it); replace a folder that holds
    no started run."""
    started = (folder / files.CONFIG).is_file() or (probe_folder(folder) / files.CONFIG).is_file()
    return {"resume": started, "overwrite": folder.exists() and not started}


def _train_base(ex: Experiment) -> None:
    """The base model, trained here once unless the experiment names a pretrained run."""
    base = ex.base
    if base.get("pretrained") or (ex.base_dir / files.SUMMARY).is_file():
        return
    log.info("experiment %s: training the base model", ex.cfg.get("name", ex.out.name))
    train_job.run(
        TrainRun(
            dataset=base["dataset"],
            model=base["model"],
            out=str(ex.base_dir),
            data_dir=ex.data_dir,
            limit=base.get("limit"),
            limit_test=base.get("limit_test"),
            device=ex.device,
            train=train_config(base.get("train"), None, ex.seed),
            **_folder_flags(ex.base_dir),
        )
    )


def _analysis_for(ex: Experiment, eps: float) -> Path:
    """The experiment's shared analysis at `eps` (run once, the first time a variant needs it)."""
    if eps in ex.analyses:
        return ex.analyses[eps]
    folder = analysis_folder(ex.out, ex.cfg, eps)
    summary = folder / files.SUMMARY
    if summary.is_file() and read_json(summary, "analysis summary")["threat"]["eps"] != eps:
        raise AdvtuneError(f"{folder} was analysed at another eps; delete it or use a new --out")
    if not summary.is_file():
        given = ex.cfg.get("analysis") or {}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if k in ANALYSIS_KEYS}
        analyze_job.run(
            AnalyzeRun(
                base=str(ex.base_dir),
                out=str(folder),
                eps=eps,
                norm=ex.norm,
                seed=ex.seed,
                data_dir=ex.data_dir,
                device=ex.device,
                overwrite=folder.exists(),
                **kw,
            )
        )
    ex.analyses[eps] = folder
    return folder


def _as_started(folder: Path, v: dict) -> dict:
    """The variant's keys over the settings its run started with, when it started: a resume continues
    what ran, even where a default changed since (the keys it sets itself were checked unchanged)."""
    started = folder / files.CONFIG
    return {**(read_json(started, "config").get("run", {}) if started.is_file() else {}), **v}


def _numbers(v: dict, *names: str) -> dict:
    """The variant's numeric keys as numbers (YAML reads 1e-3 as a string; 8/255 is a fraction)."""
    return {k: parse_number(v[k]) for k in names if v.get(k) is not None}


def _run_standard(ex: Experiment, v: dict, folder: Path) -> Path:
    return ex.base_dir  # the base model itself, evaluated at the variant's eps


def _run_train(ex: Experiment, v: dict, folder: Path) -> Path:
    """Training from scratch (standard, or adversarial with `attack`): `advtune train`."""
    if not (folder / files.SUMMARY).is_file():
        base = ex.base
        attack = v.get("attack")
        train_job.run(
            settings_from(
                TrainRun,
                {**_as_started(folder, v), **_numbers(v, "eps_warmup")},
                dataset=base.get("dataset") or _base_dataset(ex.base_dir),
                model=v.get("model") or base.get("model") or _base_model(ex.base_dir),
                out=str(folder),
                data_dir=ex.data_dir,
                limit=v.get("limit", base.get("limit")),
                limit_test=base.get("limit_test"),
                device=ex.device,
                adversarial=attack,
                norm=ex.norm if attack else default(TrainRun, "norm"),  # standard training has no threat
                eps=eps_value(v["eps"]) if attack else None,
                train=train_config(base.get("train"), v.get("train"), ex.seed),
                budget=budget_of(v),
                points=points_of(v),
                **_folder_flags(folder),
            )
        )
    return folder


def _run_finetune(ex: Experiment, v: dict, folder: Path) -> Path:
    """Fine-tuning of the base model (all, random, layers or the analysis' top): `advtune finetune`."""
    if not (folder / files.SUMMARY).is_file():
        eps = eps_value(v["eps"])
        select = v.get("select", "top")  # a variant names what it trains; the experiment's analysis by default
        if select == "top":
            select = str(_analysis_for(ex, eps))
        if v.get("params_like"):  # the control: as many trainable parameters as another variant's selection
            v = {**v, "params": _trainable_of(ex.out, v["params_like"], v["name"])}
            started = (folder / files.CONFIG).is_file()  # a control begun before this rule: resumed as it began
            if select == "random" and v.get("granularity") == "sparse" and "head" not in v and not started:
                v["head"] = _head_of(ex.out, v["params_like"])  # the rule's output layer whole: so the control's
        finetune_job.run(
            settings_from(
                FinetuneRun,
                {**_as_started(folder, v), **_numbers(v, "share", "eps_warmup", "probe")},
                base=str(ex.base_dir),
                out=str(folder),
                eps=eps,
                select=select,
                norm=ex.norm,
                train=train_config({"epochs": 1}, v.get("train"), ex.seed),
                data_dir=ex.data_dir,
                limit=v.get("limit", ex.base.get("limit")),
                limit_test=ex.base.get("limit_test"),
                params=params_of(v),
                budget=budget_of(v),
                points=points_of(v),
                monitor_test=0,
                device=ex.device,
                **_folder_flags(folder),
            )
        )
    return folder


def _run_harden(ex: Experiment, v: dict, folder: Path) -> Path:
    """`advtune harden` itself (its own analysis, fine-tuning and the experiment's protocol as its
    evaluation): the same weights and records as the command with the same settings."""
    if not (folder / files.SUMMARY).is_file():
        ev = ex.evaluation
        harden_job.run(
            HardenRun(
                base=str(ex.base_dir),
                out=str(folder),
                eps=eps_value(v["eps"]),
                norm=ex.norm,
                budget=budget_of(v),
                recipe=harden_recipe(v, ev, f"variant {v['name']}"),
                limit=v.get("limit", ex.base.get("limit")),
                limit_test=ev.get("limit_test", ev.get("limit", default(EvaluateRun, "limit_test"))),
                evaluation=ev.get("suite") or ev["attacks"],
                seed=ex.seed,
                data_dir=ex.data_dir,
                device=ex.device,
                **_folder_flags(folder),
            )
        )
    return folder


JOBS = {"standard": _run_standard, "train": _run_train, "finetune": _run_finetune, "harden": _run_harden}


def _evaluate_variant(ex: Experiment, v: dict, folder: Path, model_dir: Path) -> None:
    """The protocol on every snapshot along the run (resumable: done ones are kept) and on the final
    model (a harden variant's own evaluation is the protocol already)."""
    eps, ev = eps_value(v["eps"]), ex.evaluation

    def protocol(run_dir: Path, record_dir: Path) -> dict:
        return evaluate_job.run(
            EvaluateRun(
                run=str(run_dir),
                eps=(eps,),
                attacks=ev.get("attacks"),
                suite=ev.get("suite"),
                norm=ex.norm,
                limit_test=ev.get("limit_test", ev.get("limit", default(EvaluateRun, "limit_test"))),
                batch_size=ev.get("batch_size", default(EvaluateRun, "batch_size")),
                cascade=bool(ev.get("cascade", True)),
                name=EVAL_NAME,
                record_dir=str(record_dir),
                seed=ex.seed,
                data_dir=ex.data_dir,
                device=ex.device,
            )
        )

    snaps = list_snapshots(folder) if v["kind"] != "standard" else []
    for i, (step, snap) in enumerate(snaps):
        if not (snap / files.evaluation(EVAL_NAME)).is_file():
            log.info("variant %s: evaluating snapshot %d/%d (step %d)", v["name"], i + 1, len(snaps), step)
            protocol(snap, snap)
    final = folder / files.evaluation(EVAL_NAME)
    final_snap = _same_point(folder, snaps)
    if v["kind"] == "harden" and final.is_file():
        record = read_json(final, "evaluation")
    elif final_snap is not None:  # the run ended on its last snapshot: that evaluation is the final one
        atomic_write_text(final, (final_snap / files.evaluation(EVAL_NAME)).read_text())
        record = read_json(final_snap / files.evaluation(EVAL_NAME), "evaluation")  # what every rank can read
    else:
        record = protocol(model_dir, folder)
    if v["kind"] == "standard" and model_dir != folder:
        _link_standard(folder, model_dir)
    log.info(
        "variant %s: clean %.2f%%, worst case %.2f%%",
        v["name"],
        100 * record["clean_accuracy"],
        100 * record["worst_case_accuracy"],
    )


def _trainable_of(out: Path, other: str, me: str) -> int:
    summary = out / other / files.SUMMARY
    if not summary.is_file():
        raise AdvtuneError(
            f"variant {me}: params_like: {other} needs {other} to run first (list it earlier in the config)"
        )
    sel = read_json(summary, "summary").get("selection") or {}
    if not sel.get("trainable_params"):
        raise AdvtuneError(
            f"variant {me}: params_like: {other} trained no selection (select: all?); give params: instead"
        )
    n = int(sel["trainable_params"])
    share = sel.get("param_share")  # adapters near full rank can hold more entries than the model: the model's
    return min(n, round(n / share)) if share else n  # size then, as many as a random control can train


def _head_of(out: Path, other: str) -> bool:
    """Whether `other` (a sparse or probe rule, already run) trained its output layer whole (--head): its random
    control then does too, so the two differ only in which hidden entries train (its head is in the count)."""
    sel = read_json(out / other / files.SUMMARY, "summary").get("selection") or {}
    return sel.get("kind") == "sparse" and bool(sel.get("whole"))  # an entry rule's whole layer is its head


def _same_point(folder: Path, snaps: list[tuple[int, Path]]) -> Path | None:
    """The last snapshot when it is the run's final model (same training cost), else None."""
    if not snaps or not (folder / files.COST).is_file():
        return None
    last = snaps[-1][1]
    final = read_json(folder / files.COST, "cost")
    mine = read_json(last / files.COST, "cost")
    return last if mine.get("grad_evals") == final.get("grad_evals") else None


def _base_dataset(base_dir: Path) -> str:
    return read_json(base_dir / files.CONFIG, "base config")["run"]["dataset"]


def _base_model(base_dir: Path) -> str:
    return read_json(base_dir / files.MODEL_META, "base model")["architecture"]


def _link_standard(folder: Path, model_dir: Path) -> None:
    """The `standard` variant evaluates the base model itself: its folder holds the evaluation and
    points at the model's run folder."""
    atomic_write_json(folder / "variant.json", {"kind": "standard", "model_dir": str(model_dir)})
    src = model_dir / files.SUMMARY
    if src.is_file():
        atomic_write_text(folder / files.SUMMARY, src.read_text())
