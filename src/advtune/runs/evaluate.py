"""`advtune evaluate`: a trained run on its test split under an attack list or a suite, at one or
more eps; the record goes to eval-<name>.json."""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from pathlib import Path

from .. import filenames as files
from ..attacks import build_attack, split_attack_list
from ..devices import model_device, resolve_device
from ..distributed import barrier, on_main, rank_and_world
from ..errors import AdvtuneError
from ..evaluation import EvalResult, check_attacks, eps_curve, passed_line, robust_accuracy, suite, with_compile
from ..provenance import versions
from ..records import model_label
from ..seeding import make_generator, seed_everything
from ..storage import atomic_write_json, file_sha256
from ..threat import ThreatModel
from .common import dataset_of, load_base
from .configs import EvaluateRun
from .record import RunDir, open_run

log = logging.getLogger(__name__)


def attacks_for(run: EvaluateRun, eps: float):

    threat = ThreatModel(run.norm, eps)
    if run.suite and run.attacks:
        raise AdvtuneError("give --suite or --attacks, not both")
    if run.suite:
        attacks = suite(run.suite, threat)
    else:  # (a spec given twice: refused here, before the model or the data are read)
        attacks = check_attacks([build_attack(s, threat) for s in split_attack_list(run.attacks or "")])
    return with_compile(attacks, run.compile, "--compile" if run.compile else "--no-compile")  # None: auto


def evaluate_model(model, data, run: EvaluateRun) -> dict:
    """The evaluation record for one model on (x, y): one eps -> robust_accuracy, several -> eps_curve."""

    if not run.eps:
        raise AdvtuneError("evaluate needs --eps (e.g. 0.3, or 0.1,0.2,0.3 for a curve)")
    for e in run.eps:  # validate every eps and spec before any work (a curve's eps 0 is its clean point: no attack)
        if e != 0 or len(run.eps) == 1:
            attacks_for(run, e)
    gen = make_generator(run.seed, model_device(model))
    if len(run.eps) == 1:
        result = robust_accuracy(
            model,
            data,
            attacks_for(run, run.eps[0]),
            batch_size=run.batch_size,
            generator=gen,
            limit=run.limit_test,
            cascade=run.cascade,
        )
        return {"schema": EvalResult.SCHEMA, "kind": "single", **result.to_json(), "_result": result}
    curve = eps_curve(
        model,
        data,
        lambda e: attacks_for(run, e),
        list(run.eps),
        batch_size=run.batch_size,
        generator=gen,
        limit=run.limit_test,
    )
    return {"schema": EvalResult.SCHEMA, "kind": "curve", **curve.to_json(), "mode": "full", "_curve": curve}


def evaluation_record(model, test, dataset: str, run: EvaluateRun) -> dict:
    """The evaluation of `model` on the test examples `test` (the one implementation behind
    `advtune evaluate`, harden's before/after and every experiment variant): the record as
    eval-<name>.json holds it, plus "_result" (the EvalResult) or "_curve" (an eps curve)."""
    x, y = test.tensors(model_device(model))
    seed_everything(run.seed)
    t0 = time.perf_counter()
    record = evaluate_model(model, (x, y), run)
    config = run.to_json()
    if record["kind"] == "curve":
        config["cascade"] = False  # eps curves always run every attack on every sample
    record.update(
        {
            "run": str(run.run),
            "split": "test",
            "dataset": dataset,
            "examples": len(x),
            "config": config,
            "versions": versions(),
            "processes": rank_and_world()[1],  # torchrun: the examples were split over this many
            "wall_s": time.perf_counter() - t0,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    return record


def record_name(run: EvaluateRun) -> str:
    """eval-<name>.json's name: --name, or one made of the attacks and eps."""
    label = run.name or (
        f"{run.suite or '-'.join(split_attack_list(run.attacks or ''))}-{run.norm}-eps"
        + "_".join(f"{e:.4g}" for e in run.eps)
    )
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)[:120]


def write_evaluation(record: dict, path, plot_title: str | None = None, label: str = "model") -> dict:
    """Write an evaluation record (and, for an eps curve with a title, its plot) to `path`; returns
    the record as written, with "path"."""
    from ..report import plot_eps_curve  # matplotlib only where a figure is drawn

    record = dict(record)
    record.pop("_result", None)
    curve = record.pop("_curve", None)
    if curve is not None and plot_title:
        png = path.with_suffix(".png")
        plot_eps_curve({label: curve}, png, title=plot_title)
        record["plot"] = png.name
    atomic_write_json(path, record)
    barrier()  # under torchrun: every rank returns once rank 0 has written the record
    record["path"] = str(path)
    return record


# what makes two evaluations the same measurement: a record with other values is never replaced without --overwrite
SAME_MEASUREMENT = ("eps", "attacks", "suite", "norm", "limit_test", "cascade", "seed")


def measurement(config: dict) -> dict:
    """The settings of an evaluation record's config that decide its numbers (an eps curve never cascades)."""
    m = {k: config.get(k) for k in SAME_MEASUREMENT}
    m["eps"] = list(m["eps"] or [])
    if isinstance(m["attacks"], str):  # "apgd-ce, apgd-t" and "apgd-ce,apgd-t" are one list
        m["attacks"] = [a.strip() for a in split_attack_list(m["attacks"])]
    if len(m["eps"]) > 1:
        m["cascade"] = False
    return m


def check_record_free(path, run: EvaluateRun, sha256: str | None = None) -> None:
    """Refuse, before any work, to replace an evaluation record that measured something else (a 100-image check
    over an hours-long 1000-image one, or harden's own eval-protocol.json): the same measurement again replaces it.
    In a --record-dir shared by several runs, a record of another model's bytes (`sha256`: this one's) is refused
    too (the default name does not say which run it measured)."""
    if run.overwrite or not path.exists():
        return
    try:
        old = json.loads(path.read_text())
        same = measurement(old.get("config") or {}) == measurement(run.to_json())
        theirs = old.get("model_file_sha256") if run.record_dir else None
    # unreadable (an AdvtuneError is a ValueError: an old record's attack list that no longer parses is one too): not
    # ours to judge, nor to replace unasked
    except (OSError, ValueError, AttributeError, TypeError):
        raise AdvtuneError(
            f"{path} is unreadable (not an evaluation record this version can compare); give --name NAME to write "
            "another, or --overwrite to replace it"
        ) from None
    if not same:
        raise AdvtuneError(
            f"{path} already holds an evaluation with other settings; give --name NAME to keep both, or --overwrite "
            "to replace it"
        )
    if theirs and sha256 and theirs != sha256:
        raise AdvtuneError(
            f"{path} holds the evaluation of another model ({old.get('model_file')}); give --name NAME to keep both, "
            "or --overwrite to replace it"
        )


def check_writable(folder: Path) -> None:
    """Make `folder` if needed and write (and remove) a probe file in it, or refuse in one line."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise AdvtuneError(
            f"cannot write the evaluation record to {folder} ({e.strerror or e}); make it writable or give "
            "--record-dir DIR"
        ) from None


def run(run: EvaluateRun) -> dict:
    """`advtune evaluate`: the model of a run folder on its test split; the record goes to
    eval-<name>.json in the run folder (or `record_dir`)."""
    bs = run.batch_size
    if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):  # before the data is read
        raise AdvtuneError(f"--batch-size must be a positive number of examples per batch, got {bs!r}")
    lt = run.limit_test  # before a record of the same name is judged (it was "already holds ... other settings")
    if lt is not None and (isinstance(lt, bool) or not isinstance(lt, int) or lt < 1):
        raise AdvtuneError(f"limit_test (--limit-test) must be a positive number of examples, got {lt!r}; leave it out")
    if not run.eps:  # (`--eps ""`) before the model, the data and --record-dir
        raise AdvtuneError("evaluate needs --eps (e.g. 0.3, or 0.1,0.2,0.3 for a curve)")
    if len(set(run.eps)) < len(run.eps):  # a curve through one eps twice measured it twice and drew a point
        raise AdvtuneError(f"--eps lists an eps twice ({','.join(f'{e:g}' for e in run.eps)}); give each once")
    for eps in run.eps:  # the eps and the attack specs: built once here to refuse them before the data is read
        if eps != 0 or len(run.eps) == 1:  # a curve's eps 0 is its clean point (no attack)
            attacks_for(run, eps)
    if run.plot and len(run.eps) < 2:  # no curve to draw: it was skipped without a word
        raise AdvtuneError("--plot draws accuracy against eps: give several --eps (e.g. 0.1,0.2,0.3), or drop --plot")
    run_dir = open_run(run.run)  # a typo in RUN is refused before --record-dir is made
    path = (RunDir(run.record_dir) if run.record_dir else run_dir).file(files.evaluation(record_name(run)))
    weights = run_dir.file(files.WEIGHTS)
    measured = {"model_file": str(weights.resolve()), "model_file_sha256": file_sha256(weights)}  # before loading
    check_record_free(path, run, measured["model_file_sha256"])
    on_main(lambda: check_writable(path.parent))  # found out now, not after hours of attacks; every rank refuses
    device = resolve_device(run.device)
    model, meta, base_cfg = load_base(run.run, device)
    ds = dataset_of(base_cfg, meta, run.data_dir, limit=1, limit_test=run.limit_test)
    record = {**evaluation_record(model, ds.test, ds.name, run), **measured}  # `info` says when the file changed
    title = f"{run.run}: accuracy vs eps ({run.norm})" if run.plot else None
    return write_evaluation(record, path, title, model_label(meta) or "model")


def format_evaluation(record: dict) -> str:
    """A terminal table of an evaluation record."""
    lines = []
    if record["kind"] == "single":
        lines.append(
            f"{record['examples']} test examples, {record['threat']['norm']} eps={record['threat']['eps']:.4g}, "
            f"mode {record['mode']}"
            + (
                ": each attack runs on what the ones above left, its accuracy cumulative"
                * (record["mode"] == "cascade")
            )
        )
        lines.append(f"  {'clean':28s} {100 * record['clean_accuracy']:6.2f}%")
        for spec, acc in record["accuracy"].items():
            lines.append(
                f"  {spec:28s} {100 * acc:6.2f}%   grad evals/ex {record['grad_evals_per_example'][spec]:7.1f}   "
                f"{record['wall_time_s'][spec]:6.1f}s   max pert {record['max_perturbation'][spec]:.4g}"
            )
        lines.append(f"  {'worst case over attacks':28s} {100 * record['worst_case_accuracy']:6.2f}%")
        if record.get("total_wall_s") is not None:
            lines.append(f"  {'total time (gate included)':28s} {record['total_wall_s']:6.1f}s")
    else:
        lines.append(
            f"{record['examples']} test examples, accuracy vs eps (monotone: broken at eps_i counts as broken above)"
        )
        lines.append(f"  {'eps':>8s}  {'robust':>7s}  {'raw':>7s}")
        for e, a, r in zip(record["eps"], record["accuracy"], record["raw_accuracy"]):
            lines.append(f"  {e:8.4g}  {100 * a:6.2f}%  {100 * r:6.2f}%")
    if record.get("suspect"):
        lines.append("!! SUSPECT EVALUATION (possible gradient masking): do not call this model robust:")
        lines.extend(f"!!   {s}" for s in record["suspect"])
    else:
        specs = record["accuracy"] if record["kind"] == "single" else record.get("attacks") or []
        flat = [s for one in specs for s in (one if isinstance(one, list) else [one])]  # a curve: a list per eps
        lines.append("  " + passed_line(flat, probed=bool(record.get("clean_accuracy", 1))))
    if record["kind"] == "single" and not any(str(s).lower().startswith("apgd") for s in record["accuracy"]):
        # a new-user walk: the quick suite said 100% of a hardened model that APGD-T put at 59%
        lines.append("  (an upper bound: fixed-step attacks overestimate robustness; the claim is --suite standard)")
    return "\n".join(lines)
