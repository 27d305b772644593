"""Attack specs: `"pgd:steps=40,step=0.01,restarts=5"` -> a configured attack.

Each attack class registers itself where it is defined, with the `@register("name", **fixed)` class
decorator, so a new attack is one file (plus its import in `attacks/__init__.py`).

A spec is `name[:key=value,...]`. Values are parsed by the attack's field type: integers, floats
(fractions like `2/255` allowed), booleans (`true`/`false`), strings, or `none` for optional fields.
`step` is an alias for `step_size`. Every attack's `.spec` round-trips: `build_attack(a.spec, a.threat) == a`.
"""

from __future__ import annotations

import dataclasses
import typing
from fractions import Fraction

from ..errors import AdvtuneError
from ..threat import ThreatModel
from ._common import Attack

# name -> (class, fixed keyword arguments that the name implies; they are not settable in the spec)
REGISTRY: dict[str, tuple[type, dict]] = {}
ALIASES = {"step": "step_size"}


def register(name: str, **fixed):
    """Class decorator: make the attack class (a frozen dataclass with a `threat` field) buildable
    from specs as `name`; `fixed` are keyword arguments the name implies (not settable in the spec)."""

    def decorate(cls: type) -> type:
        register_attack(name, cls, **fixed)
        return cls

    return decorate


def register_attack(name: str, cls: type, **fixed) -> None:
    """Add an attack class (a frozen dataclass with a `threat` field) under `name`."""
    if name in REGISTRY:
        raise AdvtuneError(f"attack name {name!r} is already registered; pick another name")
    REGISTRY[name] = (cls, dict(fixed))


def list_attacks() -> list[str]:
    """The registered attack names, in registry order."""
    return list(REGISTRY)


def attack_class(name: str) -> type:
    """The class behind `name` (its `norms` and `supports_target` attributes say what it can do)."""
    return _lookup(name)[0]


def attack_params(name: str) -> dict[str, object]:
    """Settable parameters of attack `name` and their defaults (`threat` and the fixed ones excluded)."""
    cls, fixed = _lookup(name)
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name != "threat" and f.name not in fixed}


def build_attack(spec: str, threat: ThreatModel) -> Attack:
    """Parse `spec` and build the attack for `threat`; raises AdvtuneError on any bad name or value."""
    if not isinstance(spec, str) or not spec.strip():
        raise AdvtuneError(f"attack spec must be a non-empty string like 'pgd:steps=40', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    cls, fixed = _lookup(name)
    allowed = attack_params(name)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, object] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, raw = item.partition("=")
        key = ALIASES.get(key.strip().lower(), key.strip().lower())
        if not eq or not raw.strip():
            raise AdvtuneError(f"{name}: parameter {item!r} needs a value, like steps=10")
        if key not in allowed:
            valid = ", ".join(allowed) or "(none)"
            raise AdvtuneError(f"{name}: unknown parameter {key!r}; valid parameters: {valid}")
        if key in kwargs:
            raise AdvtuneError(f"{name}: parameter {key!r} given twice in {spec!r}")
        kwargs[key] = _parse(name, key, raw.strip(), hints[key])
    return cls(threat=threat, **fixed, **kwargs)


def split_attack_list(text: str) -> list[str]:
    """`fgsm,pgd:steps=40,restarts=2,apgd-ce` -> ["fgsm", "pgd:steps=40,restarts=2", "apgd-ce"]:
    a comma-separated item with `=` and no `:` is one more parameter of the attack before it."""
    specs: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item:
            if not specs:
                raise AdvtuneError(f"attack list {text!r} starts with a parameter; write name:key=value")
            specs[-1] += "," + item
        else:
            specs.append(item)
    if not specs:
        raise AdvtuneError("no attack given; e.g. --attacks fgsm,pgd:steps=40 or --suite standard")
    return specs


def _lookup(name: str) -> tuple[type, dict]:
    if name not in REGISTRY:
        raise AdvtuneError(f"unknown attack {name!r}; valid attacks: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def _parse(name: str, key: str, raw: str, hint) -> object:
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
        kind = next(t.__name__ for t in types if t is not type(None))
        raise AdvtuneError(
            f"{name}: {key}={raw!r} is not a valid {kind}; e.g. {key}="
            f"{ {'int': '10', 'float': '0.01', 'bool': 'true'}.get(kind, 'ce') }"
        ) from None
    return low  # strings (loss names) are case-insensitive
