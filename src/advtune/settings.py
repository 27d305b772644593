"""Settings declared once: a job's frozen config dataclass is the schema; CLI flags and YAML keys are
derived from its fields (name, type, default, help), so a new setting is one field.

    @dataclass(frozen=True)
    class EvaluateRun:
        run: str = setting(help="run folder of the model to evaluate", positional=True)
        limit: int | None = setting(1000, help="first N test examples")

`add_flags(parser, EvaluateRun)` adds `run` and `--limit` (with "(default: 1000)" in the help);
`from_args(EvaluateRun, args)` builds the config from the parsed flags; `keys(EvaluateRun)` are the
YAML keys, and `check_keys` refuses an unknown key with a did-you-mean. No torch here: the CLI's
help stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from .errors import AdvtuneError

_MISSING = dataclasses.MISSING


# ---------------------------------------------------------------- value parsers (argparse types)


def parse_number(text: str | float | int) -> float:
    """A float that may be written as a fraction: `0.3`, `8/255` (eps in pixel units)."""
    from fractions import Fraction

    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    try:
        s = str(text).strip()
        return float(Fraction(s)) if "/" in s else float(s)
    except (ValueError, ZeroDivisionError):
        raise AdvtuneError(f"not a number: {text!r} (a plain number or a fraction: 0.1, 8/255, 5.4e5)") from None


def number(text: str) -> float:
    """A float that may be written as a fraction: `0.3`, `8/255` (the CLI's type for such flags)."""
    try:
        return parse_number(text)
    except AdvtuneError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def negatable(f: Any, default: Any) -> bool:
    """Whether a boolean setting has a `--no-` form: one that is on by default, or auto (`bool | None`);
    a plain switch (off by default) is only `--flag`."""
    return default is True or str(f.type) == "bool | None"


def number_list(text: str) -> tuple[float, ...]:
    """`0.1,0.2,8/255` -> (0.1, 0.2, 0.0314...)."""
    return tuple(number(t) for t in str(text).split(",") if t.strip())


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers") from None


def str_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in str(text).split(",") if t.strip())


def seed_number(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer seed") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"seed {v} is out of range: use an integer in [0, 2^63)")
    return v


def grad_evals_number(text: str) -> int:
    """A compute budget in gradient evaluations: a whole positive number, written as the user likes (540000,
    5.4e5, 540_000)."""
    v = number(text)
    if not math.isfinite(v) or v <= 0 or v != int(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole positive number of gradient evaluations")
    return int(v)


def budget_number(text: str) -> float | int:
    """A parameter budget: a share in (0, 1) or a whole number of entries (finite, positive)."""
    v = number(text)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive finite number (a share < 1 or a count of entries)"
        )
    if v == 1 and text.strip() != "1":  # "1.0" is a share of 1 to its writer, one entry to the rule: refused
        raise argparse.ArgumentTypeError(f"{text!r}: a share must be below 1 (give 1 for one entry, or select all)")
    if v >= 1 and v != int(v):
        raise argparse.ArgumentTypeError(f"{text!r}: a count of parameter entries must be whole (or give a share < 1)")
    return v if v < 1 else int(v)


# annotation (as written, `from __future__ import annotations`) -> parser
_TYPES: dict[str, Callable[[str], Any]] = {
    "int": int,
    "int | None": int,
    "float": number,
    "float | None": number,
    "str": str,
    "str | None": str,
    "tuple[float, ...]": number_list,
    "tuple[int, ...]": int_list,
    "tuple[str, ...]": str_list,
}


# ---------------------------------------------------------------- declaring


def setting(
    default: Any = _MISSING,
    *,
    help: str,
    type: Callable[[str], Any] | None = None,
    choices: Iterable[str] | None = None,
    group: str | None = None,
    positional: bool = False,
    cli: bool = True,
    metavar: str | None = None,
) -> Any:
    """A config field with what the CLI and YAML need: help text, parser, choices, group.
    `cli=False`: not a flag of its own (set by the command, e.g. --device and --seed are shared)."""
    meta = {
        "help": help,
        "type": type,
        "choices": tuple(choices) if choices else None,
        "group": group,
        "positional": positional,
        "cli": cli,
        "metavar": metavar,
    }
    return dataclasses.field(default=default, metadata=meta)


def _fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show(v: Any) -> str:
    if isinstance(v, tuple):
        return ",".join(_show(x) for x in v) or "none"
    if isinstance(v, float):
        return f"{v:g}"
    return "none" if v is None else str(v)


def add_flags(
    parser,
    cls,
    *,
    base: Any = None,
    exclude: Iterable[str] = (),
    only: Iterable[str] | None = None,
    groups: Mapping[str, Any] | None = None,
    required: Iterable[str] = (),
) -> None:
    """Add one flag per field of `cls` (defaults from the `base` instance when given). Nested config
    dataclasses are not flattened here: call add_flags for them too. `groups` maps a field's group
    name to an argparse group; `required` makes flags required whatever their default."""
    exclude, required = set(exclude), set(required)
    keep = set(only) if only is not None else None
    groups = dict(groups or {})
    for f in _fields(cls):
        m = f.metadata
        if not m["cli"] or f.name in exclude or (keep is not None and f.name not in keep):
            continue
        default = getattr(base, f.name) if base is not None else f.default
        target = parser
        if m["group"]:
            if m["group"] not in groups:
                groups[m["group"]] = parser.add_argument_group(m["group"])
            target = groups[m["group"]]
        kw: dict[str, Any] = {"help": m["help"]}
        if m["positional"]:
            target.add_argument(f.name, **kw)
            continue
        kind = str(f.type)
        must = f.name in required or (default is _MISSING and f.default_factory is _MISSING)
        if kind.startswith("bool"):
            if negatable(f, default):
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["action"] = "store_true"
        else:
            kw["type"] = m["type"] or _TYPES.get(kind) or str
            if m["choices"]:
                kw["choices"] = m["choices"]
            if m["metavar"]:
                kw["metavar"] = m["metavar"]
        if must:
            kw["required"] = True
        else:
            kw["default"] = None if default is _MISSING else default
            if "(default" not in m["help"] and kw.get("action") != "store_true":  # a switch is off by default
                kw["help"] = f"{m['help']} (default: {_show(kw['default'])})"
        action = target.add_argument(flag_name(f.name), **kw)
        action.auto = kind == "bool | None"  # a switch with an auto value: null in a --config YAML means auto
        action.nullable = "None" in kind  # null in a --config YAML is a value (limit_test: all; seed: random)


def from_args(cls, args: argparse.Namespace, **given: Any):
    """`cls` built from the parsed flags (every field whose name the namespace has) and `given`."""
    values = {f.name: home(getattr(args, f.name)) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(given)
    return cls(**values)


def home(value: Any) -> Any:
    """A path the shell did not expand (`--out=~/x`, a YAML `out: ~/x`) with `~` expanded: it made a folder named
    `~` in the working directory. Other values unchanged (no setting's own value starts with `~`)."""
    if isinstance(value, str) and (value == "~" or value.startswith(("~/", "~" + os.sep)) or re.match(r"~\w+/", value)):
        return os.path.expanduser(value)
    return value


def default(cls, name: str) -> Any:
    """The declared default of field `name` of the config `cls`: the API's keywords read their
    defaults here, so the CLI, the API and YAML share one declaration."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise AdvtuneError(f"{cls.__name__}.{name} has no default")
    raise AdvtuneError(f"{cls.__name__} has no field {name!r}")


def settings_from(cls, values: dict, **fixed: Any):
    """`cls` from the keys of `values` it has (the others keep their declared defaults) and `fixed`:
    how an experiment variant becomes a job config, so a key it does not set means the CLI default."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in values.items() if k in names}, **fixed})


# ---------------------------------------------------------------- the command line


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, but a line never breaks inside a hyphenated name (`activation-\nshift` could not be copied)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        return textwrap.fill(
            " ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
        )


class Parser(argparse.ArgumentParser):
    """argparse's own errors (a missing command, an unknown flag, a bad value or choice) as one line that
    points at --help, instead of the whole usage block; exit status 2 as argparse's. --help is unchanged.
    The root parser and, through add_subparsers, every command's parser are of this class. No abbreviated flags:
    `--limit 5` was taken as `--limit-test 5` where a command has no --limit, and `--share` as `--shares`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):  # `--epoch 1`: the flag meant, as config keys are answered
            message += "".join(f" (did you mean {m}?)" for m in self._close_flags(message))
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _close_flags(self, message: str) -> list[str]:
        import difflib

        known = {o for a in self._actions for o in a.option_strings}
        for action in self._actions:  # the root parser reports a command's unknown flags: look in the commands too
            for sub in (
                (getattr(action, "choices", None) or {}).values()
                if isinstance(action, argparse._SubParsersAction)
                else ()
            ):
                known |= {o for a in sub._actions for o in a.option_strings}
        given = [t.split("=")[0] for t in message.split(":", 1)[1].split(" (")[0].split() if t.startswith("--")]
        return [m for t in given for m in difflib.get_close_matches(t, sorted(known), n=1, cutoff=0.8)]


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's contents; a missing, unreadable, non-text or malformed file is a one-line error."""
    import yaml

    if not path.is_file():
        raise AdvtuneError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise AdvtuneError(f"{path} is not a YAML text file (not UTF-8 text; a weights file by mistake?)") from None
    except OSError as e:
        raise AdvtuneError(f"cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise AdvtuneError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None


def apply_yaml_defaults(parser: argparse.ArgumentParser, commands: Iterable[str], argv: list[str]) -> None:
    """`--config FILE`: timm's two stages, YAML gives the command's defaults and explicit flags override
    them; a key that is not a flag of the command, or a value its flag refuses, is one line."""
    command = next((a for a in argv if a in commands), None)
    pre = Parser(prog="advtune" + (f" {command}" if command else ""), add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    path = Path(home(known.config))
    values = read_yaml(path, "config file") or {}
    if not isinstance(values, dict):
        raise AdvtuneError(f"{path} must be a mapping of flag names to values")
    if command is None:
        raise AdvtuneError(f"--config needs a command, e.g. advtune train --config {path}")
    subparser = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    actions = {a.dest: a for a in subparser._actions}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            close = difflib.get_close_matches(dest, sorted(actions), n=1)
            raise AdvtuneError(
                f"{path}: unknown key {key!r}" + (f"; did you mean {close[0].replace('_', '-')!r}?" if close else "")
            )
        action = actions[dest]
        switch = isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction))
        if switch and not isinstance(value, bool) and not (value is None and getattr(action, "auto", False)):
            raise AdvtuneError(f"{path}: {key} is a switch: write true or false, got {value!r}")  # "false" is truthy
        # `out:` or `lr:` with nothing after it; null stays where the setting takes it (or the default is null)
        nullable = getattr(action, "nullable", True) or action.default is None
        if value is None and not switch and (action.required or not nullable):
            raise AdvtuneError(f"{path}: {key} has no value; give one or drop the key")
        if isinstance(value, list):  # a YAML list stands for the flag's comma list
            value = ",".join(str(v) for v in value)
        if not switch and isinstance(value, bool):
            raise AdvtuneError(f"{path}: {key} takes a value, not {str(value).lower()}")
        if not switch and action.type is None and value is not None and not isinstance(value, str):  # `device: 1`
            value = str(value)
        if action.type is not None and value is not None and not isinstance(value, bool):
            try:
                value = action.type(str(value))
            except (argparse.ArgumentTypeError, ValueError) as e:
                raise AdvtuneError(f"{path}: {key}: {e}") from None
        if action.choices is not None and value not in action.choices:
            raise AdvtuneError(f"{path}: {key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
        defaults[dest] = value
    subparser.set_defaults(**defaults)
    for action in subparser._actions:  # a required flag given by the YAML is no longer required
        if action.dest in defaults:
            action.required = False


# ---------------------------------------------------------------- YAML keys


def keys(cls, *, only: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> set[str]:
    """The YAML keys of a config: its field names, or the `only` ones (which must be fields), minus
    those in `exclude` (the caller sets them itself)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = (set(only) | set(exclude)) - names if only is not None else set(exclude) - names
    if unknown:  # a renamed field must not silently drop a YAML key
        raise AdvtuneError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return (names if only is None else set(only)) - set(exclude)


def check_values(cls, values: dict, where: str) -> None:
    """The values a YAML mapping gives `cls`'s fields, checked as the CLI checks its flags: a switch takes true or
    false (a quoted "false" or "no" is a string, and truthy), a field with choices one of them."""
    for f in dataclasses.fields(cls):
        value = values.get(f.name)
        if value is None:
            continue
        if str(f.type).replace(" ", "") in ("bool", "bool|None", "<class'bool'>") and not isinstance(value, bool):
            raise AdvtuneError(f"{where}: {f.name} is a switch: write true or false, got {value!r}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise AdvtuneError(f"{where}: {f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_keys(d: Any, allowed: set[str], where: str) -> dict:
    """`d` must be a mapping whose keys are all in `allowed`; an unknown key gets a did-you-mean."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise AdvtuneError(f"{where} must be a mapping, got {type(d).__name__}")
    for k in d:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(sorted(allowed))}"
            raise AdvtuneError(f"{where}: unknown key {k!r}{hint}")
    return d
