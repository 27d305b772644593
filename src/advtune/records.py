"""Typed records: a record file is a frozen dataclass with a schema version and one JSON reader/writer.

    @dataclass(frozen=True)
    class HardenSummary(Record):
        SCHEMA = 1                  # bumped when a field changes meaning or goes away
        KIND = "harden-summary"     # what the file is (None: a part of another record, e.g. a frontier point)
        eps: float
        ...

`to_json()` is `{"schema": 1, "kind": "harden-summary", **fields}`; `HardenSummary.read(path)` builds
the dataclass back, each field checked against its annotation (int, float, str, bool, dict, list,
tuple, X | None, dict[str, X], list[X], a nested Record, a TypedDict for a dict of known keys). A
missing or malformed field is one line naming the file and the field,

    runs/x/summary.json: field 'budget' is "abc", not an integer (the record is incomplete or corrupt; ...)

A field with a default may be missing (records written before it existed). A file without "schema"
(written before records had versions) is read as schema 1 if its fields fit; a schema newer than the
code knows asks for a newer advtune. `upgrade` is where a future schema brings an older record up to
date.

Also here: the job summaries a report reads (`AnalyzeSummary`, `HardenSummary`), which must sit below
the report; the other records live with what they record (`cost.CostRecord`, `frontier.FrontierPoint`,
`runs.train.TrainSummary`, `runs.finetune.FinetuneSummary`)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypedDict, TypeVar, Union

from .errors import AdvtuneError
from .storage import read_json
from .version import VERSION

R = TypeVar("R", bound="Record")


def show(value: Any) -> str:
    """A value as a message shows it: JSON, cut at 40 characters."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def problem(path: Any, what: str, rerun: str | None = None) -> AdvtuneError:
    """The one-line error of a record file that is incomplete or corrupt; `rerun`: the command that
    completes it."""
    fix = f"re-run `{rerun}` to complete it" if rerun else "re-create it or delete the run"
    return AdvtuneError(f"{path}: {what} (the record is incomplete or corrupt); {fix}")


class Bad(Exception):
    """A field that does not fit its type, found while checking (`check` turns it into a `problem`)."""

    def __init__(self, what: str, where: str = "") -> None:
        super().__init__(what)
        self.what, self.where = what, where  # the message, and the field it is about


def _bad(value: Any, where: str, words: str) -> Bad:
    what = f"field '{where}' is {show(value)}, not {words}" if where else f"{show(value)} is not {words}"
    return Bad(what, where)


def _join(at: str, name: str) -> str:
    return f"{at}.{name}" if at else name


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _words(tp: Any) -> str:
    """What a type means in a message ("a number", "an object or null")."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_words(a) for a in args)
    simple = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    if tp in simple:
        return simple[tp]
    if tp is dict or origin is dict or typing.is_typeddict(tp) or (isinstance(tp, type) and issubclass(tp, Record)):
        return "an object"
    if tp in (list, tuple) or origin in (list, tuple):
        return "a list" if origin is not tuple or args[-1:] == (...,) else f"a list of {len(args)} items"
    return "anything"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _value(value: Any, tp: Any, where: str) -> Any:
    """`value` checked against the annotation `tp` (where: its place in the record, for the message);
    returns it as the record holds it (nested records built, lists of a tuple field as tuples)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for a in options[:-1]:
            try:
                return _value(value, a, where)
            except Bad:
                continue
        try:
            return _value(value, options[-1], where)
        except Bad as e:
            if e.where != where:  # a part of the value is wrong: say which
                raise
            raise _bad(value, where, _words(tp)) from None
    if tp is type(None):
        if value is not None:
            raise _bad(value, where, "null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(value, where, _words(tp))
        return value
    if tp is int:
        if isinstance(value, float) and not isinstance(value, bool) and math.isfinite(value) and value == int(value):
            return int(value)  # 2e4 written by hand
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad(value, where, _words(tp))
        return value
    if tp is float:
        if not _number(value):
            raise _bad(value, where, _words(tp))
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _bad(value, where, _words(tp))
        return value
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.build(value, where)
    if typing.is_typeddict(tp):
        if not isinstance(value, dict):
            raise _bad(value, where, _words(tp))
        hints, out = _hints(tp), dict(value)
        missing = sorted(tp.__required_keys__ - value.keys())
        if missing:
            raise Bad(f"missing field '{_join(where, missing[0])}'", _join(where, missing[0]))
        for key, kt in hints.items():
            if key in value:
                out[key] = _value(value[key], kt, _join(where, key))
        return out
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise _bad(value, where, _words(tp))
        if not args:
            return value
        return {k: _value(v, args[1], _join(where, str(k))) for k, v in value.items()}
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _bad(value, where, _words(tp))
        if origin is tuple and args and args[-1] is not ...:
            if len(value) != len(args):
                raise _bad(value, where, _words(tp))
            items = [_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        elif args:
            items = [_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        else:
            items = list(value)
        return tuple(items) if tp is tuple or origin is tuple else items
    return value


def check(value: Any, tp: Any, path: Any, *, rerun: str | None = None, at: str = "") -> Any:
    """`value` (read from the file `path`) checked against the type `tp`: a one-line `problem` naming
    the file and the field if it does not fit; `at`: where the value sits in the file."""
    try:
        return _value(value, tp, at)
    except Bad as e:
        raise problem(path, e.what, rerun) from None


def check_schema(data: Any, path: Any, schema: int, kind: str | None, *, rerun: str | None = None) -> int:
    """The schema version of a record (1 when it has none: written before versions), refused when
    newer than `schema` (what this code knows) or when the file is another kind of record."""
    if not isinstance(data, dict):
        raise problem(path, f"{show(data)} is not an object", rerun)
    version = data.get("schema", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise problem(path, f"field 'schema' is {show(version)}, not a schema version (1, 2, ...)", rerun)
    if version > schema:
        raise AdvtuneError(
            f"{path}: field 'schema' is {version}, newer than this advtune ({VERSION}) reads "
            f"({kind or 'record'} schema {schema}); upgrade advtune (pip install -U advtune) to read it"
        )
    if kind is not None and "kind" in data and data["kind"] != kind:
        raise problem(path, f"field 'kind' is {show(data['kind'])}, not {show(kind)}: another record", rerun)
    return version


class Record:
    """A typed record: mixed into a frozen dataclass with `SCHEMA` (its version) and `KIND` (its name
    in the file; None for a record that is only ever part of another, which is written without a
    header). `OMIT_NONE` names fields left out of the file while None (optional parts)."""

    SCHEMA: ClassVar[int] = 1
    KIND: ClassVar[str | None] = None
    OMIT_NONE: ClassVar[tuple[str, ...]] = ()

    def fields_json(self) -> dict:
        """The fields as the file holds them (no header)."""
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.name in self.OMIT_NONE:
                continue
            out[f.name] = _plain(value)
        return out

    def to_json(self) -> dict:
        head = {"schema": self.SCHEMA, "kind": self.KIND} if self.KIND is not None else {}
        return {**head, **self.fields_json()}

    @classmethod
    def upgrade(cls, data: dict, schema: int) -> dict:
        """An older schema's record brought up to this one (nothing yet: every record is at schema 1)."""
        return data

    @classmethod
    def build(cls: type[R], data: Any, at: str = "") -> R:
        """The record from its fields (`at`: where it sits in the file); raises `Bad`."""
        if not isinstance(data, dict):
            raise _bad(data, at, "an object")
        hints, kwargs = _hints(cls), {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if not f.init:
                continue
            where = _join(at, f.name)
            if f.name in data:
                kwargs[f.name] = _value(data[f.name], hints[f.name], where)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise Bad(f"missing field '{where}'", where)
        return cls(**kwargs)

    @classmethod
    def from_json(cls: type[R], data: Any, path: Any = "record", *, rerun: str | None = None, at: str = "") -> R:
        """The record from what its file (`path`, for messages) holds; `rerun`: the command that
        completes an incomplete record, for the message; `at`: where the record sits in the file."""
        if cls.KIND is not None and not at:
            data = cls.upgrade(data, check_schema(data, path, cls.SCHEMA, cls.KIND, rerun=rerun))
        try:
            return cls.build(data, at)
        except Bad as e:
            raise problem(path, e.what, rerun) from None

    @classmethod
    def read(cls: type[R], path: str | Path, *, rerun: str | None = None) -> R:
        """The record in the file `path` (a one-line error if it is missing, not JSON, or does not fit)."""
        what = (cls.KIND or cls.__name__).replace("-", " ")
        return cls.from_json(read_json(path, what), path, rerun=rerun)


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.fields_json()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- the job summaries a report reads


@dataclasses.dataclass(frozen=True)
class AnalyzeSummary(Record):
    """What `advtune analyze` returns and writes to summary.json."""

    SCHEMA = 1
    KIND = "analyze-summary"
    OMIT_NONE = ("rank_agreement_with_restoration",)

    examples_scored: int
    clean_acc: float  # on the scored training examples
    adv_acc: float  # under the analysis attack
    attack: str
    threat: dict
    criteria: dict  # per criterion: components, top10, and the concentration curve when measured
    cost: dict  # the CostMeter record (cost.json)
    rank_agreement_with_restoration: dict[str, float | None] | None = None  # Spearman per criterion (None: undefined)


class RobustnessCore(TypedDict):
    clean_acc: float
    robust_acc: float  # worst case of the evaluation


class Robustness(RobustnessCore, total=False):
    """A harden record's robustness before (or after) hardening."""

    suspect: list[str]  # the masking gate's findings
    accuracy: dict[str, float]  # per attack (after hardening)


class HardenCostCore(TypedDict):
    base_training_grad_evals: int | None  # None: the base run has no cost.json
    analysis_grad_evals: int  # with the sparse rule's entry scoring (selection.scoring), when it ran
    finetune_grad_evals: int
    harden_grad_evals: int  # analysis + fine-tuning + choosing the checkpoint


class HardenCost(HardenCostCore, total=False):
    analysis_wall_s: float
    finetune_wall_s: float
    checkpoint_grad_evals: int  # choosing the checkpoint on the held-out split
    checkpoint_wall_s: float  # its time (records before it: absent)
    evaluation_grad_evals: int


class HardenSelection(TypedDict, total=False):
    trainable_params: int
    param_share: float
    by_layer: dict[str, tuple[int, int]] | None  # {layer: (units trained, units)}
    params_by_layer: dict[str, int]


class HardenRecipe(TypedDict, total=False):
    eps_warmup: float


@dataclasses.dataclass(frozen=True)
class HardenSummary(Record):
    """What `advtune harden` returns and writes to summary.json (each figure from its own record)."""

    SCHEMA = 1
    KIND = "harden-summary"
    OMIT_NONE = ("report", "checkpoints", "at_reference")

    eps: float
    norm: str
    base: str
    architecture: str | None
    before: Robustness | None  # clean_acc, robust_acc (worst case of the evaluation), suspect (the gate)
    after: Robustness | None  # the same after hardening, plus the per-attack accuracy (None: no test data)
    test_examples: int
    evaluation: str  # the attack list of the evaluation
    selection: HardenSelection | None  # what was trained: components, units, parameters (per layer too)
    trainable_params: int | None
    param_share: float | None
    recipe: HardenRecipe | None
    budget: int  # fine-tuning gradient evaluations
    cost: HardenCost  # base training, analysis, fine-tuning and evaluation gradient evaluations, wall times
    concentration: list | None  # the analysis' concentration curve
    analysis_examples: int | None = None  # training examples the analysis scored
    checkpoints: dict | None = None  # the held-out curve and the step kept (None: the last was kept)
    at_reference: dict | None = None  # the frontier's references for this setting: AT, and full fine-tuning (tuned)
    report: str | None = None  # report.html, once written


def model_label(meta: dict | None) -> str | None:
    """A model's name in words from its model.json: the zoo's architecture, or your factory's spec (file.py:factory);
    None for neither."""
    meta = meta if isinstance(meta, dict) else {}
    factory = meta.get("factory") if isinstance(meta.get("factory"), dict) else {}
    return meta.get("architecture") or factory.get("spec")
