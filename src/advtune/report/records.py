"""The fields a report reads from each record file that has no typed record, checked as the file is
read: a record that lacks a field, or holds it in the wrong form, is one line naming the file, the
field and the command that completes the records, e.g.

    runs/x/results.json: missing field 'rows[1].kind' (the record is incomplete or corrupt);
    re-run `advtune experiment CONFIG --out runs/x` to complete it

(one line), instead of a KeyError from deep inside a plot. Typed records (advtune.records: a harden
or analysis summary.json, frontier.json) are read by their own class, with the same messages."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..records import problem, show
from ..storage import read_json


@dataclass(frozen=True)
class Kind:
    """What a field must hold: `words` for the message ("a number"), `ok` the check."""

    words: str
    ok: Callable[[Any], bool]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


ANY = Kind("anything", lambda v: True)
NUMBER = Kind("a number", _number)
COUNT = Kind("a whole number", lambda v: _number(v) and math.isfinite(v) and v == int(v))
TEXT = Kind("a string", lambda v: isinstance(v, str))
OBJECT = Kind("an object", lambda v: isinstance(v, dict))
LIST = Kind("a list", lambda v: isinstance(v, list))


def nullable(kind: Kind) -> Kind:
    """`kind`, or null."""
    return Kind(f"{kind.words} or null", lambda v: v is None or kind.ok(v))


def list_of(kind: Kind) -> Kind:
    """A list whose every item is `kind`."""
    return Kind(f"a list of {kind.words} items", lambda v: isinstance(v, list) and all(kind.ok(x) for x in v))


def object_of(kind: Kind) -> Kind:
    """An object whose every value is `kind`."""
    return Kind(
        f"an object of {kind.words} values", lambda v: isinstance(v, dict) and all(kind.ok(x) for x in v.values())
    )


# {layer: [units trained, units in the layer]}
UNITS = object_of(
    Kind("[units trained, units]", lambda p: isinstance(p, list) and len(p) == 2 and all(map(COUNT.ok, p)))
)


def field(record: Any, name: str, path: Path, kind: Kind = ANY, *, rerun: str, at: str = "", required: bool = True):
    """`record[name]`, checked to be `kind`; `at` is where `record` sits in the file ("rows[2]", "after"),
    for the message. A field that is not `required` may be absent (None is returned)."""
    where = f"{at}.{name}" if at else name
    if not isinstance(record, dict):
        raise problem(path, f"'{at}' is {show(record)}, not an object" if at else "not an object", rerun)
    if name not in record:
        if required:
            raise problem(path, f"missing field '{where}'", rerun)
        return None
    value = record[name]
    if not kind.ok(value):
        raise problem(path, f"field '{where}' is {show(value)}, not {kind.words}", rerun)
    return value


def require(record: Any, path: Path, spec: Mapping[str, Kind], *, rerun: str, at: str = "") -> dict:
    """Check every field of `spec` ({name: kind}) in `record`; returns the record. A dotted name reaches
    into nested objects ("after.robust_acc"); a trailing "?" marks a field that may be absent, as may
    its parents ("selection.by_layer?": no selection, or one without by_layer, is fine)."""
    for name, kind in spec.items():
        optional = name.endswith("?")
        *parents, last = name.rstrip("?").split(".")
        r, where = record, at
        for part in parents:
            r = field(
                r, part, path, nullable(OBJECT) if optional else OBJECT, rerun=rerun, at=where, required=not optional
            )
            where = f"{where}.{part}" if where else part
            if r is None:
                break
        else:
            field(r, last, path, kind, rerun=rerun, at=where, required=not optional)
    return record


def read_record(path: Path, what: str, spec: Mapping[str, Kind], *, rerun: str) -> dict:
    """A record file (a JSON object), with the fields of `spec` checked (`require`)."""
    return require(read_json(path, what), path, spec, rerun=rerun)


def require_each(items: Any, path: Path, spec: Mapping[str, Kind], *, rerun: str, at: str) -> list:
    """Check `spec` in every object of a list (`at`: the list's field, "rows" -> "rows[3].eps")."""
    for i, item in enumerate(items):
        require(item, path, spec, rerun=rerun, at=f"{at}[{i}]")
    return items


def read_unfinished(path: Path, *, rerun: str) -> list[str]:
    """The variants an experiment's results.json names as having no row yet (none in a file from before the field)."""
    return read_record(path, "results", RESULTS, rerun=rerun).get("not_finished") or []


def read_results(path: Path, *, rerun: str) -> list[dict]:
    """The rows of an experiment's results.json, each checked (`RESULT_ROW`, and every "acc[attack]"
    column a number)."""
    rows = read_record(path, "results", RESULTS, rerun=rerun)["rows"]
    require_each(rows, path, RESULT_ROW, rerun=rerun, at="rows")
    for i, r in enumerate(rows):
        require(r, path, {k: NUMBER for k in r if k.startswith("acc[")}, rerun=rerun, at=f"rows[{i}]")
    return rows


def read_scores(folder: Path, *, rerun: str) -> dict[str, dict]:
    """Every scores-<criterion>.json of an analysis folder: {criterion: table}, each checked (`SCORES`)."""
    return {
        p.stem[len("scores-") :]: read_record(p, "scores", SCORES, rerun=rerun)
        for p in sorted(folder.glob("scores-*.json"))
    }


def read_curves(path: Path, *, rerun: str) -> dict[str, dict]:
    """concentration.json: {criterion: curve}, each curve checked (`CURVE`)."""
    curves = read_json(path, "concentration")
    if not OBJECT.ok(curves):
        raise problem(path, f"{show(curves)} is not an object of curves", rerun)
    for name, curve in curves.items():
        require(curve, path, CURVE, rerun=rerun, at=name)
    return curves


# ---------------------------------------------------------------- what each report reads from each file

RESULTS = {"rows": list_of(OBJECT), "not_finished?": list_of(TEXT)}  # results.json of an experiment
RESULT_ROW = {  # one variant's row in results.json (fields from before a column existed may be absent)
    "variant": TEXT,
    "kind": TEXT,
    "eps": NUMBER,
    "clean_acc": NUMBER,
    "robust_acc": NUMBER,
    "grad_evals": nullable(NUMBER),
    **{
        f"{k}?": nullable(NUMBER)
        for k in (
            "analysis_grad_evals",
            "base_grad_evals",
            "wall_s",
            "analysis_wall_s",
            "base_wall_s",
            "share",
            "params_budget",
            "trainable_params",
            "param_share",
            "train_examples",
            "budget",
            "epochs",
            "lr",
            "batch_size",
            "ema",
            "regrow",
            "regrow_every",
            "regrow_rate",
            "regrow_end",
        )
    },
    **{
        f"{k}?": nullable(TEXT)
        for k in ("select", "attack", "criterion", "granularity", "params_like")
        + ("optimizer", "schedule", "augment", "regrow_score", "regrow_moments", "regrow_pool", "regrow_drop")
    },
    "selected_by_layer?": nullable(UNITS),
}
EXPERIMENT = {  # experiment.json: the experiment's config, for the report's setup lines
    "config?": OBJECT,
    **{f"config.{k}?": nullable(OBJECT) for k in ("base", "evaluation", "threat")},
}
ANALYSIS_CONFIG = {"run?": OBJECT, "run.eps?": nullable(NUMBER)}  # an analysis folder's config.json
SCORES = {"components": list_of(TEXT), "scores": list_of(nullable(NUMBER))}  # scores-<criterion>.json (NaN: null)
CURVE = {  # one criterion's curve in concentration.json
    "n_errors": NUMBER,
    "n_samples": NUMBER,
    "shares": list_of(NUMBER),
    "repaired": list_of(nullable(NUMBER)),
    "random_mean": list_of(nullable(NUMBER)),
    "random_std": list_of(nullable(NUMBER)),
    "random_seeds": LIST,
}
SELECTION = {"components": list_of(TEXT)}  # selection.json


def trained_units(selection: dict) -> list[str]:
    """The units ("layer[unit]") and whole layers a selection.json trains. A rule that trains single weight entries
    or low-rank directions (its record has a `kind`) trains only its `whole` layers whole: its `components` name
    every layer it touches, and ringing every unit of those would say it trained them all."""
    if selection.get("kind"):
        return [str(n) for n in selection.get("whole") or []]
    return list(selection["components"])
