"""Attack specs: `"pgd:steps=40,step=0.01,restarts=5"` -> a configured attack.

Each attack class registers itself where it is defined, with the `@register("name", **fixed)` class
decorator, so a new attack is one file (plus its import in `attacks/__init__.py`). The registry and
the spec grammar are the project's one `advtune.registry.Registry` and `parse_spec`.

A spec is `name[:key=value,...]`. Values are parsed by the attack's field type: integers, floats
(fractions like `2/255` allowed), booleans (`true`/`false`), strings, or `none` for optional fields.
`step` is an alias for `step_size`. Every attack's `.spec` round-trips: `build_attack(a.spec, a.threat) == a`.
"""

from __future__ import annotations

from ..errors import AdvtuneError
from ..registry import ALIASES, Registry, convert_params, parse_spec, settable_params  # noqa: F401  (ALIASES: re-exported)
from ..threat import ThreatModel
from ._common import Attack

# name -> attack class; `REGISTRY.fixed(name)`: the keyword arguments the name implies (not settable in a spec)
REGISTRY: Registry[type] = Registry("attack", valid="valid attacks")


def register(name: str, **fixed):
    """Class decorator: make the attack class (a frozen dataclass with a `threat` field) buildable
    from specs as `name`; `fixed` are keyword arguments the name implies (not settable in the spec)."""

    def decorate(cls: type) -> type:
        register_attack(name, cls, **fixed)
        return cls

    return decorate


def register_attack(name: str, cls: type, **fixed) -> None:
    """Add an attack class (a frozen dataclass with a `threat` field) under `name`."""
    REGISTRY.register(name, cls, **fixed)


def unregister_attack(name: str) -> None:
    """Remove attack `name` if registered (for tests that register one of their own)."""
    REGISTRY.unregister(name)


def list_attacks() -> list[str]:
    """The registered attack names, in registry order."""
    return REGISTRY.names()


def attack_class(name: str) -> type:
    """The class behind `name` (its `norms` and `supports_target` attributes say what it can do)."""
    return REGISTRY.get(name)


def attack_params(name: str) -> dict[str, object]:
    """Settable parameters of attack `name` and their defaults (`threat` and the fixed ones excluded)."""
    return {k: default for k, (_, default) in settable_params(REGISTRY.get(name), _skip(name)).items()}


def build_attack(spec: str, threat: ThreatModel) -> Attack:
    """Parse `spec` and build the attack for `threat`; raises AdvtuneError on any bad name or value."""
    if not isinstance(threat, ThreatModel):  # build_attack("pgd", 0.1) crashed on the number's missing fields
        raise AdvtuneError(f"build_attack needs a ThreatModel (e.g. ThreatModel.linf(0.3)), got {threat!r}")
    if not isinstance(spec, str):
        raise AdvtuneError(f"an attack spec is a string such as 'pgd:steps=10', got {spec!r}")
    name, raw = parse_spec(spec, "attack")
    cls = REGISTRY.get(name)
    kwargs = convert_params(name, raw, cls, skip=_skip(name), fold_case=True)  # loss names: any case
    step, span = kwargs.get("step_size"), threat.upper - threat.lower
    if threat.norm == "linf" and isinstance(step, (int, float)) and step >= span:  # pgd:step=2 meant steps=2
        count = "steps" in attack_params(name) and float(step).is_integer()
        raise AdvtuneError(
            f"attack {spec!r}: step size {step:g} spans the whole pixel range [{threat.lower:g}, {threat.upper:g}] "
            f"(eps {threat.eps:.4g}); `step` is the step size (e.g. step=2/255)"
            + (f": for {step:g} iterations write steps={int(step)}" if count else "")
        )
    return cls(threat=threat, **REGISTRY.fixed(name), **kwargs)


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


def _skip(name: str) -> tuple[str, ...]:
    return ("threat", *REGISTRY.fixed(name))
