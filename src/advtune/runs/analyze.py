"""`advtune analyze`: score every component of a trained run under an attack, on training data,
and measure how concentrated the adversarial errors are."""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .. import filenames as files
from ..attacks import Attack, build_attack
from ..cost import CostMeter, PassCounter
from ..devices import resolve_device
from ..distributed import all_sum, rank_and_world
from ..errors import AdvtuneError
from ..metrics import adversarial_examples, correct
from ..patch import state_sha256
from ..records import AnalyzeSummary  # the summary record, in records.py: the report reads it
from ..seeding import seed_everything
from ..settings import default
from ..threat import ThreatModel
from ..vulnerability import (
    ConcentrationCurve,
    ScoreTable,
    check_share,
    concentration_curve,
    layer_scores,
    list_criteria,
    rank_agreement,
    score_many,
    sharded,
)
from ..vulnerability.table import nan_to_none
from .common import (
    dataset_of,
    load_base,
    refuse_same_folder,
)
from .configs import AnalyzeRun
from .record import RunDir, refuse_taken_out

log = logging.getLogger(__name__)


def check_analysis(run: AnalyzeRun) -> None:
    """The analysis settings, refused in one line before any work."""
    if run.eps is None:
        raise AdvtuneError("analyze needs --eps (e.g. 0.3 for MNIST, 8/255 for CIFAR-10)")
    if run.granularity not in ("channel", "unit"):
        raise AdvtuneError(
            f"granularity {run.granularity!r} is not supported; use channel (= unit). "
            "Per-layer figures come with every analysis (layers-*.json)"
        )
    unknown = [c for c in run.criteria if c not in list_criteria()]
    if unknown or not run.criteria:
        raise AdvtuneError(
            f"unknown criterion {unknown[0] if unknown else '(none)'}; valid: {', '.join(list_criteria())}"
        )
    twice = sorted({c for c in run.criteria if list(run.criteria).count(c) > 1})
    if twice:  # (the scoring refused it, after the attack and with --out made)
        raise AdvtuneError(f"--criteria lists {', '.join(twice)} twice; give each once")
    if run.limit <= 0 or run.curve_limit < 0 or run.batch_size <= 0:
        raise AdvtuneError("--limit and --batch-size must be positive and --curve-limit non-negative")
    check_curve_flags(run)
    seeds = list(run.random_seeds)  # (what torch's manual_seed takes: -2^63 .. 2^64 - 1)
    bad = any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or not -(2**63) <= s < 2**64 for s in seeds)
    if bad or len(set(seeds)) < len(seeds):  # a repeated seed draws one random control twice: a smaller spread
        raise AdvtuneError(f"--random-seeds must be distinct integers (64-bit), got {','.join(map(str, seeds))}")


def check_curve_flags(run: AnalyzeRun) -> None:
    """--shares and --random-seeds only shape the concentration curve: with --curve-limit 0 (no curve) they were
    dropped without a word."""
    given = []
    for key in ("shares", "random_seeds"):
        value = getattr(run, key)
        if not isinstance(value, (list, tuple)):
            raise AdvtuneError(f"--{key.replace('_', '-')} must be a list, e.g. 0.05,0.1 (got {value!r})")
        if tuple(value) != tuple(default(AnalyzeRun, key)):
            given.append(f"--{key.replace('_', '-')}")
    if run.curve_limit == 0 and given:
        raise AdvtuneError(
            f"{' and '.join(given)} shape{'s' if len(given) == 1 else ''} the concentration curve, which "
            f"--curve-limit 0 skips: drop {' and '.join(given)} or give --curve-limit N"
        )
    if not run.shares:
        raise AdvtuneError("--shares is empty; give e.g. 0.01,0.05,0.1,1")
    for share in run.shares:  # before the attack and the scoring, not after them (the curve checks them too)
        check_share(share, "each --shares value")


@dataclass
class Analysis:
    """What the analysis computed: the summary record, one score table and (when measured) one
    concentration curve per criterion."""

    summary: AnalyzeSummary
    tables: dict[str, ScoreTable]
    curves: dict[str, ConcentrationCurve]


def analyze_model(model, x: Tensor, y: Tensor, run: AnalyzeRun, attack: Attack | None = None) -> Analysis:
    """The analysis itself (the one implementation behind `advtune analyze`, `advtune.analyze` and
    harden's first stage): attack the first max(limit, curve_limit) examples of (x, y) once, score the
    first `limit` under every criterion, and measure the concentration curve on the first
    `curve_limit`. Every pass through the model is counted. `attack` overrides `run.attack` (an object
    from the Python API)."""
    check_analysis(run)
    seed_everything(run.seed)
    threat = ThreatModel(run.norm, run.eps)
    attack = attack if attack is not None else build_attack(run.attack, threat)
    meter = CostMeter()
    meter.measure_model(model, tuple(x.shape[1:]))
    counter = PassCounter()  # every example through the model: attack, criteria, curves
    meter.start()
    # one attack run serves every criterion and the curves: adversarials are computed once, here
    x, y = x[: max(run.limit, run.curve_limit)], y[: max(run.limit, run.curve_limit)]
    with counter.attached(model):
        x_adv = adversarial_examples(model, attack, x, y, run.batch_size, run.seed)
        clean_ok, adv_ok = correct(model, x, y, run.batch_size), correct(model, x_adv, y, run.batch_size)
    meter.add_counted(counter)
    n_score = min(run.limit, len(x))
    with counter.attached(model):
        tables = score_many(
            model, (x[:n_score], y[:n_score], x_adv[:n_score]), None, list(run.criteria), batch_size=run.batch_size
        )
    if sharded(-(-n_score // run.batch_size), rank_and_world()[1]):  # each rank scored its share: all of them
        counter.grad, counter.fwd = (int(v) for v in all_sum(counter.take()))
    meter.add_counted(counter)
    per_criterion: dict[str, Any] = {}
    curves = {}
    for name, table in tables.items():
        per_criterion[name] = {"components": len(table), "top10": [(str(c), s) for c, s in table.ranked()[:10]]}
        if run.curve_limit:
            n = min(run.curve_limit, len(x))
            with counter.attached(model):
                curve = concentration_curve(
                    model,
                    (x[:n], y[:n], x_adv[:n]),
                    None,
                    table,
                    run.shares,
                    run.random_seeds,
                    batch_size=run.batch_size,
                )
            curves[name] = curve
            per_criterion[name]["curve"] = curve.rows()
            per_criterion[name]["adversarial_errors"] = curve.n_errors
    agreement = None
    if "restoration" in tables:
        # None where undefined (one table's scores all equal: NaN), so the record reads back and says so
        agreement = {
            k: nan_to_none(rank_agreement(t, tables["restoration"])) for k, t in tables.items() if k != "restoration"
        }
    meter.stop()
    meter.add_counted(counter)
    summary = AnalyzeSummary(
        n_score,
        float(clean_ok[:n_score].float().mean()),
        float(adv_ok[:n_score].float().mean()),
        getattr(attack, "spec", type(attack).__name__),
        threat.to_json(),
        per_criterion,
        meter.to_json(),
        agreement,
    )
    return Analysis(summary, tables, curves)


def write_analysis(rd: RunDir, analysis: Analysis) -> None:
    """An analysis' records: score tables (JSON + CSV), per-layer figures, curves, plots, cost, summary."""
    for name, table in analysis.tables.items():
        rd.write_json(files.scores(name), table.to_json())
        table.to_csv(rd.file(files.scores(name, "csv")))
        rd.write_json(files.layer_scores(name), layer_scores(table))
    if analysis.curves:
        rd.write_json(files.CONCENTRATION, {k: c.to_json() for k, c in analysis.curves.items()})
    _analysis_plots(rd, analysis.tables, analysis.curves)
    rd.write_json(files.COST, analysis.summary.cost)
    rd.write_json(files.SUMMARY, analysis.summary.to_json())
    rd.done()


def run(run: AnalyzeRun) -> AnalyzeSummary:
    """`advtune analyze`: the analysis of a run folder's model into `run.out`."""
    check_analysis(run)
    threat = ThreatModel(run.norm, run.eps)
    attack = build_attack(run.attack, threat)  # refused before the base and the data are read
    refuse_same_folder(run.out, run.base, run.data_dir)
    refuse_taken_out(run.out, resume=False, overwrite=run.overwrite, resumable=False)  # before the base and the data
    device = resolve_device(run.device)
    model, meta, base_cfg = load_base(run.base, device)
    ds = dataset_of(base_cfg, meta, run.data_dir, limit=max(run.limit, run.curve_limit))
    rd = RunDir.create(run.out, overwrite=run.overwrite, resumable=False)  # all validated: only now create
    rd.write_config(
        {
            "command": "analyze",
            "run": run.to_json(),
            "seed": run.seed,
            "base": str(run.base),
            "model_state_sha256": state_sha256(model.state_dict()),  # what a --select of this folder is checked with
            "dataset": ds.describe(),
            "split": "train",
            "threat": threat.to_json(),
            "attack": attack.spec,
            "device": str(device),
        }
    )
    x, y = ds.train.take(max(run.limit, run.curve_limit)).tensors(device)
    analysis = analyze_model(model, x, y, run)
    write_analysis(rd, analysis)
    return analysis.summary


def _analysis_plots(rd: RunDir, tables: dict, curves: dict) -> None:
    from ..report import plot_concentration, plot_unit_scores  # matplotlib only where figures are drawn

    if curves:
        plot_concentration({k: c.to_json() for k, c in curves.items()}, rd.file("concentration.png"))
    plot_unit_scores({k: t.to_json() for k, t in tables.items()}, rd.file("layers.png"))
