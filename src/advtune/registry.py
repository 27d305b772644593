"""The one registry of named plug-ins (attacks, criteria, models, objectives, datasets) and the one
parser of the spec grammar `name[:key=value,...]` that attacks and training objectives share.

    ATTACKS = Registry("attack", valid="valid attacks")
    @ATTACKS.register("pgd", random_start=True)      # decorator form; `fixed` = arguments the name implies
    class PGD: ...
    ATTACKS.get("pgd"), ATTACKS.fixed("pgd"), ATTACKS.names()

    name, raw = parse_spec("pgd:steps=40,step=2/255", "attack")    # ("pgd", {"steps": "40", "step_size": "2/255"})
    kwargs = convert_params(name, raw, PGD, skip=("threat",))     # {"steps": 40, "step_size": 0.00784...}

Only the standard library and `advtune.errors` are imported here, so that every layer may use it.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from fractions import Fraction
from pathlib import Path
from typing import Any, Generic, TypeVar

from .errors import AdvtuneError

T = TypeVar("T")
_MISSING: Any = object()

# spec keys that stand for another (both attacks and objectives take `step` for `step_size`)
ALIASES: dict[str, str] = {"step": "step_size"}


class Registry(MutableMapping[str, T], Generic[T]):
    """Names -> plug-ins of one kind, in registration order.

    `register(name, obj, **fixed)` adds one (refusing a name already taken); `fixed` are keyword
    arguments that the name implies (e.g. `fgsm-rs` = FGSM with `random_start=True`), see `fixed(name)`.
    `get(name)` raises a one-line AdvtuneError listing the valid names (with a `default`, it is
    `Mapping.get`). It is also a mapping (`in`, iteration, `pop`, item assignment), so code and tests
    that used the plain dicts the registries were before keep working.
    """

    def __init__(self, kind: str, *, valid: str = "valid") -> None:
        self.kind = kind  # what one entry is called in messages: "attack", "model", ...
        self.valid = valid  # how the list of names is introduced in the unknown-name error
        self._items: dict[str, T] = {}
        self._fixed: dict[str, dict[str, Any]] = {}

    def register(self, name: str, obj: Any = _MISSING, /, **fixed: Any) -> Any:
        """Add `obj` under `name` and return it; without `obj`, a decorator that does so."""
        if obj is _MISSING:

            def decorate(target: T) -> T:
                self.register(name, target, **fixed)
                return target

            return decorate
        if not isinstance(name, str) or not name.strip():
            raise AdvtuneError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._items:
            raise AdvtuneError(f"{self.kind} name {name!r} is already registered; pick another name")
        self._items[name] = obj
        self._fixed[name] = dict(fixed)
        return obj

    def unregister(self, name: str) -> None:
        """Remove `name` if it is registered (tests that register a plug-in clean up with it)."""
        self._items.pop(name, None)
        self._fixed.pop(name, None)

    def get(self, name: str, default: Any = _MISSING) -> Any:  # type: ignore[override]
        """The entry under `name`; unknown: an AdvtuneError naming the valid ones (or `default` if given)."""
        if name in self._items:
            return self._items[name]
        if default is not _MISSING:
            return default
        raise AdvtuneError(f"unknown {self.kind} {name!r}; {self.valid}: {', '.join(self._items)}")

    def fixed(self, name: str) -> dict[str, Any]:
        """The keyword arguments `name` implies (a copy; empty for most entries)."""
        self.get(name)
        return dict(self._fixed.get(name, {}))

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._items)

    # the mapping protocol (item assignment replaces an entry and clears its fixed arguments)
    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __setitem__(self, name: str, obj: T) -> None:
        self._items[name] = obj
        self._fixed[name] = {}

    def __delitem__(self, name: str) -> None:
        del self._items[name]
        self._fixed.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"


def parse_spec(text: str, what: str) -> tuple[str, dict[str, str]]:
    """`name` or `name:key=value,key=value` -> (name, {key: raw value}); `what` ("attack", "objective")
    names the kind in errors. The name and keys are stripped and lower-cased, `step` is `step_size`,
    empty items are skipped (`pgd:steps=3,` is fine); values are stripped, otherwise kept as written
    (see `convert_params`). A value holds no comma; the first `:` ends the name, the first `=` a key."""
    if not isinstance(text, str) or not text.strip():
        raise AdvtuneError(f"{what} spec must be a non-empty string like 'name' or 'name:key=value', got {text!r}")
    spec = text.strip()
    head, _, rest = spec.partition(":")
    name = head.strip().lower()
    if not name:
        raise AdvtuneError(f"{what} spec {spec!r} has no name before ':'; write name:key=value, e.g. pgd:steps=10")
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip().lower()
        key = ALIASES.get(key, key)
        if not key:
            raise AdvtuneError(f"{name}: parameter {item!r} has no name; write key=value, like steps=10")
        if not eq or not raw.strip():
            raise AdvtuneError(f"{name}: parameter {item!r} needs a value, like steps=10")
        if key in params:
            raise AdvtuneError(f"{name}: parameter {key!r} given twice in {spec!r}")
        params[key] = raw.strip()
    return name, params


def settable_params(target: Callable[..., Any], skip: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
    """name -> (type annotation, default) of what a spec may set on `target`: a dataclass's init fields,
    or a function's keyword-only parameters; `skip` left out. A missing annotation is the default's type."""
    skip = set(skip)
    plain_class = isinstance(target, type) and not dataclasses.is_dataclass(target)
    try:  # a class that is no dataclass: the annotations of its __init__
        hints = typing.get_type_hints(target.__init__ if plain_class else target)
    except (NameError, TypeError):  # an annotation that does not resolve here: go by the defaults
        hints = {}
    if dataclasses.is_dataclass(target):
        found = [(f.name, f.default) for f in dataclasses.fields(target) if f.init]
    else:
        found = [
            (p.name, p.default)
            for p in inspect.signature(target).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
    out: dict[str, tuple[Any, Any]] = {}
    for name, default in found:
        if name in skip:
            continue
        missing = default is dataclasses.MISSING or default is inspect.Parameter.empty
        hint = hints.get(name, str if missing or default is None else type(default))
        out[name] = (hint, dataclasses.MISSING if missing else default)
    return out


def convert_params(
    name: str,
    raw: Mapping[str, str],
    target: Callable[..., Any],
    *,
    skip: Iterable[str] = (),
    title: str | None = None,
    fold_case: bool = False,
) -> dict[str, Any]:
    """The raw values of a parsed spec converted by `target`'s parameter types (`settable_params`):
    integers, floats (fractions like `2/255` too), booleans (true/false/yes/no/1/0), `none` for an
    optional parameter, strings (lower-cased with `fold_case`). Unknown keys are refused, listing the
    valid ones ("<title>" names the plug-in in that message, when given)."""
    params = settable_params(target, skip)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in params:
            valid = ", ".join(params) or "(none)"
            where = f"unknown {title} parameter" if title else f"{name}: unknown parameter"
            raise AdvtuneError(f"{where} {key!r}; valid parameters: {valid}")
        out[key] = convert_value(name, key, value, params[key][0], fold_case=fold_case)
    return out


def convert_value(name: str, key: str, raw: str, hint: Any, *, fold_case: bool = False) -> Any:
    """One spec value by its annotation `hint` (see `convert_params`)."""
    types = typing.get_args(hint) or (hint,)
    low = raw.lower()
    if type(None) in types and low == "none":
        return None
    try:
        if bool in types:
            if low in ("true", "yes", "1"):
                return True
            if low in ("false", "no", "0"):
                return False
            raise ValueError(raw)
        if int in types:
            return int(raw)
        if float in types:
            return float(Fraction(raw)) if "/" in raw else float(raw)
    except (ValueError, ZeroDivisionError):
        kind = next(getattr(t, "__name__", str(t)) for t in types if t is not type(None))
        raise AdvtuneError(
            f"{name}: {key}={raw!r} is not a valid {kind}; e.g. {key}="
            f"{ {'int': '10', 'float': '0.01', 'bool': 'true'}.get(kind, 'ce') }"
        ) from None
    return low if fold_case else raw


def registered_in_source(folder: Path, callees: tuple[str, ...]) -> list[str]:
    """The names a plug-in package registers, read from its source with ast (nothing imported, so a
    command's --help needs no torch): the first string argument of every call to one of `callees`
    (decorators included), module by module in the order the package's `__init__.py` imports them,
    stacked decorators bottom-up (their order of registration); a bare decorator on a class (`@register_criterion`)
    registers the class' own `name = "..."`."""
    import ast

    def tree(path: Path) -> ast.Module | None:
        try:
            return ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError):
            return None

    init = tree(folder / "__init__.py")
    order = [n.module for n in ast.walk(init) if isinstance(n, ast.ImportFrom) and n.level == 1] if init else []
    names: list[str] = []
    for module in dict.fromkeys(order):  # first import of each module, in order
        if not module or not (folder / f"{module}.py").is_file() or module in ("registry", "_common"):
            continue
        for stmt in getattr(tree(folder / f"{module}.py"), "body", []):
            decorators = getattr(stmt, "decorator_list", [])
            if isinstance(stmt, ast.ClassDef) and any(getattr(d, "id", None) in callees for d in decorators):
                named = [
                    a.value.value
                    for a in stmt.body
                    if isinstance(a, ast.Assign)
                    and any(getattr(t, "id", None) == "name" for t in a.targets)
                    and isinstance(a.value, ast.Constant)
                    and isinstance(a.value.value, str)
                ]
                names += [n for n in named[:1] if n not in names]
            calls = [*reversed(decorators), *(n for n in ast.walk(stmt) if not any(n is d for d in decorators))]
            for call in calls:
                callee = getattr(call, "func", None)
                if (
                    isinstance(call, ast.Call)
                    and getattr(callee, "id", getattr(callee, "attr", None)) in callees
                    and call.args
                    and isinstance(call.args[0], ast.Constant)
                    and isinstance(call.args[0].value, str)
                    and call.args[0].value not in names
                ):
                    names.append(call.args[0].value)
    return names
