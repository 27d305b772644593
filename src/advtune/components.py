"""A model's components and selections of them.

A *component* is one output channel of a ``Conv2d`` or one output unit of a ``Linear`` layer
(``Component("net.conv1", 17)``, written ``net.conv1[17]``), or a whole such layer
(``Component("net.conv1", None)``, written ``net.conv1``). Module names are the qualified names of
``model.named_modules()``. Only ``Conv2d`` and ``Linear`` layers have components; modules whose
class is called ``Normalize`` (advtune's pixel-space normalisation layer) are skipped with
everything below them, so a user's own ``nn.Module`` works as well as advtune's models.

A :class:`Selection` is a set of components. ``Selection.masks(model)`` turns it into boolean
masks over parameters: for a selected unit ``c`` of a layer, ``weight[c]`` and ``bias[c]`` of that
layer, plus ``weight[c]`` / ``bias[c]`` of the BatchNorm that *follows* it (see
:func:`followers` for the rule).

The output layer
    The *output layer* is the last Conv2d/Linear (see :func:`output_layer`); its units are the
    logits. Patching a logit trivially "repairs" an error, so vulnerability scoring leaves it out
    of the candidates by default (``include_output=False`` there). Plain enumeration
    (:func:`enumerate_components`, :meth:`Selection.everything`) includes it by default, because
    a selection that trains "everything" must train the classifier too.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .devices import eval_mode, model_device
from .errors import AdvtuneError

log = logging.getLogger(__name__)

SELECTION_FORMAT = "advtune.selection/1"
Granularity = Literal["unit", "channel", "layer"]
_GRANULARITIES = ("unit", "channel", "layer")
_COMPONENT_RE = re.compile(r"^(?P<module>[^\[\]]*)(?:\[(?P<unit>\d+)\])?$")


# ---------------------------------------------------------------- Component


@dataclass(frozen=True)
class Component:
    """One output unit (``unit`` = channel of a Conv2d, output unit of a Linear) or, with
    ``unit=None``, a whole layer. Sortable: by module name, whole layer before its units."""

    module: str
    unit: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.module, str):
            raise AdvtuneError(f"Component.module must be a module name (str), got {type(self.module).__name__}")
        if self.unit is not None and (isinstance(self.unit, bool) or not isinstance(self.unit, int) or self.unit < 0):
            raise AdvtuneError(f"Component.unit must be a non-negative int or None (whole layer), got {self.unit!r}")

    def _key(self) -> tuple[str, int]:
        # None sorts before unit 0 (None and int are not comparable, so compare a proxy).
        return (self.module, -1 if self.unit is None else self.unit)

    def __lt__(self, other: Component) -> bool:
        if not isinstance(other, Component):
            return NotImplemented
        return self._key() < other._key()

    def __le__(self, other: Component) -> bool:
        if not isinstance(other, Component):
            return NotImplemented
        return self._key() <= other._key()

    def __gt__(self, other: Component) -> bool:
        if not isinstance(other, Component):
            return NotImplemented
        return self._key() > other._key()

    def __ge__(self, other: Component) -> bool:
        if not isinstance(other, Component):
            return NotImplemented
        return self._key() >= other._key()

    def __str__(self) -> str:
        return self.module if self.unit is None else f"{self.module}[{self.unit}]"

    @classmethod
    def parse(cls, text: str) -> Component:
        """Inverse of ``str()``: ``"net.conv1[17]"`` -> ``Component("net.conv1", 17)``."""
        if not isinstance(text, str):
            raise AdvtuneError(f"a component is written as 'module[unit]' or 'module', got {text!r}")
        m = _COMPONENT_RE.match(text.strip())
        if m is None:
            raise AdvtuneError(
                f"cannot parse component {text!r}; write it as 'net.conv1[17]' (one unit) or 'net.conv1' (whole layer)"
            )
        unit = m.group("unit")
        return cls(m.group("module"), None if unit is None else int(unit))


def parse_component(text: str) -> Component:
    return Component.parse(text)


# ---------------------------------------------------------------- layers


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear))


def unit_count(module: nn.Module) -> int:
    """Units of a Conv2d (output channels) or Linear (output features) layer."""
    return int(module.out_channels if isinstance(module, nn.Conv2d) else module.out_features)


def _all_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv2d/Linear layers in registration order, skipping `Normalize` modules and their children."""
    if not isinstance(model, nn.Module):
        raise AdvtuneError(f"expected a torch.nn.Module, got {type(model).__name__}")
    skipped: list[str] = []
    out = []
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") or s == "" for s in skipped):
            continue
        if type(module).__name__ == "Normalize":
            skipped.append(name)
            continue
        if _is_layer(module):
            out.append((name, module))
    return out


def layers(model: nn.Module, *, include_output: bool = True) -> list[tuple[str, nn.Module]]:
    """The model's Conv2d and Linear layers as ``(qualified name, module)``, in registration order.

    ``include_output=False`` drops the output layer (the last one, see :func:`output_layer`).
    Raises AdvtuneError when the model has none.
    """
    found = _all_layers(model)
    if not found:
        raise AdvtuneError(
            f"{type(model).__name__} has no Conv2d or Linear layer, so it has no components to "
            "score or select; advtune works on CNNs/MLPs built from nn.Conv2d and nn.Linear"
        )
    return found if include_output else found[:-1]


def output_layer(model: nn.Module, example_input: torch.Tensor | None = None) -> str:
    """Name of the output (classifier) layer: the last Conv2d/Linear to *run* when ``example_input``
    is given, else the last one *registered* (the same for Sequential models and models that
    define their head last)."""
    if example_input is not None:
        return trace(model, example_input).layer_order[-1]
    return layers(model)[-1][0]


def fingerprint(model: nn.Module) -> list[tuple[str, int]]:
    """``[(layer name, out units), ...]``: what a selection or score table must match to be reused."""
    return [(name, unit_count(m)) for name, m in layers(model)]


def enumerate_components(
    model: nn.Module, granularity: Granularity = "unit", *, include_output: bool = True
) -> list[Component]:
    """Every component of the model in layer order: one per unit (``"unit"``, alias ``"channel"``) or
    one per layer (``"layer"``, ``unit=None``). ``include_output=False`` leaves out the output layer."""
    if granularity not in _GRANULARITIES:
        raise AdvtuneError(f"unknown granularity {granularity!r}; use one of {', '.join(_GRANULARITIES)}")
    found = layers(model, include_output=include_output)
    if granularity == "layer":
        return [Component(name, None) for name, _ in found]
    return [Component(name, c) for name, m in found for c in range(unit_count(m))]


# ---------------------------------------------------------------- tracing / BatchNorm followers


@dataclass(frozen=True)
class Trace:
    """What one forward pass revealed: Conv2d/Linear layers in execution order (first call of each),
    and which BatchNorm directly consumes which layer's output."""

    layer_order: tuple[str, ...]
    followers: Mapping[str, str]
    calls: Mapping[str, int]


def trace(model: nn.Module, example_input: torch.Tensor) -> Trace:
    """Run one clean forward (eval mode, no grad) with hooks on every module and record:
    - the execution order of Conv2d/Linear layers;
    - followers: a BatchNorm whose input tensor *is* (Python identity) a layer's output tensor and
      whose ``num_features`` equals that layer's out units (the trace rule of :func:`followers`).
    Hooks are removed whatever happens."""
    known = dict(_all_layers(model))
    if not known:
        layers(model)  # raises the no-layers error
    names = {id(m): n for n, m in model.named_modules()}
    order: list[str] = []
    calls: dict[str, int] = {}
    last_output: dict[int, str] = {}  # id(output tensor) -> producing layer
    keep: list[torch.Tensor] = []  # keeps outputs alive so ids stay unique during the forward
    follow: dict[str, str] = {}

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        name = names.get(id(module))
        if name is None:
            return
        if name in known:
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                order.append(name)
            if isinstance(output, torch.Tensor):
                last_output[id(output)] = name
                keep.append(output)
        elif isinstance(module, _BatchNorm) and args and isinstance(args[0], torch.Tensor):
            src = last_output.get(id(args[0]))
            if src is not None and module.num_features == unit_count(known[src]):
                follow.setdefault(src, name)

    handles = []
    try:
        for m in model.modules():
            handles.append(m.register_forward_hook(hook))
        dev = model_device(model)
        with torch.no_grad(), eval_mode(model):
            model(example_input.to(dev))
    finally:
        for h in handles:
            h.remove()
    return Trace(tuple(order), dict(follow), dict(calls))


def _static_followers(model: nn.Module) -> dict[str, str]:
    found = dict(_all_layers(model))
    out: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (a, ma), (b, mb) in zip(children, children[1:]):
            full_a = f"{parent_name}.{a}" if parent_name else a
            if full_a in found and isinstance(mb, _BatchNorm) and mb.num_features == unit_count(ma):
                out[full_a] = f"{parent_name}.{b}" if parent_name else b
    return out


def followers(model: nn.Module, example_input: torch.Tensor | None = None) -> dict[str, str]:
    """``{layer name: name of the BatchNorm that follows it}``.

    The rule. With ``example_input``: a BatchNorm *follows* a Conv2d/Linear when, in a traced forward,
    its input is exactly that layer's output tensor and ``num_features`` equals the layer's out
    units (robust to any registration order). Without it: the next module registered in the same
    parent right after the layer is a BatchNorm with matching ``num_features`` (true for
    ``Sequential(conv, bn, ...)``, torchvision-style ResNet blocks and pre-activation blocks, where
    ``bn2`` follows ``conv1``). Pass an example input for models whose forward order differs
    from their registration order, and for a pre-activation ResNet's stem conv (normalised by the first block's
    ``bn1``, which only the trace sees).
    """
    if example_input is not None:
        return dict(trace(model, example_input).followers)
    return _static_followers(model)


# ---------------------------------------------------------------- Selection


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


@dataclass(frozen=True)
class Selection:
    """A set of components to train. Build it with :meth:`of`, :meth:`everything` or the
    ``select_*`` functions of :mod:`advtune.vulnerability` so it carries the model's fingerprint,
    which :meth:`validate` checks (a selection made for another model is refused)."""

    components: frozenset[Component]
    fingerprint: tuple[tuple[str, int], ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        comps = self.components
        if isinstance(comps, (str, Component)) or not isinstance(comps, Iterable):
            raise AdvtuneError("Selection.components must be a collection of Component objects")
        comps = frozenset(Component.parse(c) if isinstance(c, str) else c for c in comps)
        bad = [c for c in comps if not isinstance(c, Component)]
        if bad:
            raise AdvtuneError(f"Selection.components holds non-components {bad[:3]!r}; use Component(module, unit)")
        object.__setattr__(self, "components", comps)
        if self.fingerprint is not None:
            object.__setattr__(self, "fingerprint", tuple((str(n), int(u)) for n, u in self.fingerprint))

    # -- construction
    @classmethod
    def of(cls, model: nn.Module, components: Iterable[Component | str]) -> Selection:
        """A selection of ``components`` of ``model``, validated and fingerprinted."""
        sel = cls(frozenset(components), tuple(fingerprint(model)))
        sel.validate(model)
        return sel

    @classmethod
    def everything(cls, model: nn.Module, granularity: Granularity = "layer") -> Selection:
        """Every Conv2d/Linear layer (output layer included) and the BatchNorms that follow them."""
        return cls.of(model, enumerate_components(model, granularity, include_output=True))

    # -- inspection
    def __len__(self) -> int:
        """Number of stored components (a whole-layer component counts once; see :meth:`n_units`)."""
        return len(self.components)

    def __iter__(self):
        return iter(sorted(self.components))

    def __repr__(self) -> str:  # per layer, in order: a frozenset of thousands of components said nothing
        per_layer: dict[str, int] = {}
        for c in sorted(self.components):
            per_layer[c.module] = per_layer.get(c.module, 0) + 1
        shown = ", ".join(f"{m} x{k}" for m, k in list(per_layer.items())[:6]) + (", ..." if len(per_layer) > 6 else "")
        return f"Selection({len(self.components)} components in {len(per_layer)} layers: {shown})"

    def __contains__(self, item: object) -> bool:
        return item in self.components

    def validate(self, model: nn.Module) -> None:
        """Raise AdvtuneError if this selection was made for a different model, or names a layer or
        unit the model does not have."""
        found = dict(layers(model))
        if self.fingerprint is not None and list(self.fingerprint) != fingerprint(model):
            mine = dict(self.fingerprint)
            theirs = dict(fingerprint(model))
            diff = sorted(set(mine.items()) ^ set(theirs.items()))[:4]
            raise AdvtuneError(
                "selection was made for a different model (its layers/unit counts differ, e.g. "
                f"{diff}); re-run the vulnerability analysis on this model"
            )
        for c in self.components:
            if c.module not in found:
                raise AdvtuneError(
                    f"selection names {c.module!r}, which is not a Conv2d/Linear layer of this "
                    f"model (layers: {', '.join(list(found)[:8])}{', ...' if len(found) > 8 else ''}); "
                    "the selection was made for a different model"
                )
            if c.unit is not None and c.unit >= unit_count(found[c.module]):
                raise AdvtuneError(
                    f"selection names unit {c} but {c.module} has only {unit_count(found[c.module])} "
                    "units; the selection was made for a different model"
                )

    def units(self, model: nn.Module) -> dict[str, list[int]]:
        """``{layer: sorted selected unit indices}``; whole-layer components expand to all units."""
        self.validate(model)
        found = dict(layers(model))
        out: dict[str, set[int]] = {}
        for c in self.components:
            s = out.setdefault(c.module, set())
            if c.unit is None:
                s.update(range(unit_count(found[c.module])))
            else:
                s.add(c.unit)
        return {name: sorted(out[name]) for name in found if name in out}

    def expand(self, model: nn.Module) -> Selection:
        """The same selection with whole-layer components expanded to their units."""
        comps = [Component(n, u) for n, us in self.units(model).items() for u in us]
        return Selection(frozenset(comps), tuple(fingerprint(model)))

    def n_units(self, model: nn.Module) -> int:
        return sum(len(us) for us in self.units(model).values())

    def by_layer(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """``{layer: (selected units, total units)}`` for every layer, in registration order."""
        sel = self.units(model)
        return {name: (len(sel.get(name, ())), unit_count(m)) for name, m in layers(model)}

    def is_everything(self, model: nn.Module) -> bool:
        """True when every unit of every layer is selected (the full-training path applies)."""
        return all(s == t for s, t in self.by_layer(model).values())

    # -- masks
    def masks(self, model: nn.Module, example_input: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{parameter qualified name: bool mask of the parameter's shape}``.

        Selected unit ``c`` of a layer marks ``weight[c]`` and ``bias[c]`` of the layer and, when
        affine, ``weight[c]`` / ``bias[c]`` of the BatchNorm that follows it (:func:`followers`;
        ``example_input`` switches to the traced rule). Parameters with no selected entry are
        **absent** from the dict (freeze them); present masks have at least one True entry.
        Names are keys of ``dict(model.named_parameters())``.
        """
        sel = self.units(model)
        found = dict(layers(model))
        modules = dict(model.named_modules())
        follow = followers(model, example_input)
        pnames = _param_names(model)
        out: dict[str, torch.Tensor] = {}

        def mark(module: nn.Module, idx: list[int]) -> None:
            for p in (getattr(module, "weight", None), getattr(module, "bias", None)):
                if not isinstance(p, nn.Parameter) or id(p) not in pnames:
                    continue
                name = pnames[id(p)]
                m = out.get(name)
                if m is None:
                    m = out[name] = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
                m[idx] = True

        for name, idx in sel.items():
            if not idx:
                continue
            mark(found[name], idx)
            bn = follow.get(name)
            if bn is not None and getattr(modules[bn], "affine", False):
                mark(modules[bn], idx)
        return out

    def params_by_layer(self, model: nn.Module, example_input: torch.Tensor | None = None) -> dict[str, int]:
        """``{layer: parameter entries its selected units train}`` (layer weight/bias slices plus the
        following BatchNorm's, as :meth:`masks` marks them)."""
        per_unit = unit_params(model, example_input)
        return {name: len(us) * per_unit[name] for name, us in self.units(model).items()}

    def trainable_params(self, model: nn.Module, example_input: torch.Tensor | None = None) -> int:
        """Number of parameter entries the masks select."""
        return int(sum(int(m.sum()) for m in self.masks(model, example_input).values()))

    # -- serialisation
    def to_json(self) -> dict[str, Any]:
        return {
            "format": SELECTION_FORMAT,
            "components": [str(c) for c in sorted(self.components)],
            "fingerprint": None if self.fingerprint is None else [[n, u] for n, u in self.fingerprint],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], model: nn.Module | None = None) -> Selection:
        """Inverse of :meth:`to_json`; with ``model``, also :meth:`validate` against it."""
        if not isinstance(data, Mapping) or data.get("format") != SELECTION_FORMAT or "components" not in data:
            raise AdvtuneError(
                f"not an advtune selection (expected a JSON object with format {SELECTION_FORMAT!r} "
                "and components); re-create it with Selection.to_json()"
            )
        fp = data.get("fingerprint")
        try:
            fp_t = None if fp is None else tuple((str(n), int(u)) for n, u in fp)
        except (TypeError, ValueError):
            raise AdvtuneError(
                "selection JSON has a malformed fingerprint (expected [[layer, units], ...]); "
                "re-create it with Selection.to_json()"
            ) from None
        sel = cls(frozenset(Component.parse(c) for c in data["components"]), fp_t)
        if model is not None:
            sel.validate(model)
        return sel


def unit_params(model: nn.Module, example_input: torch.Tensor | None = None) -> dict[str, int]:
    """``{layer: parameter entries one of its units owns}``: the unit's weight slice and bias entry,
    plus the weight/bias entries of the BatchNorm that follows the layer (see :func:`followers`).
    This is what selecting the unit makes trainable, so parameter budgets are counted with it."""
    found = layers(model)
    modules = dict(model.named_modules())
    follow = followers(model, example_input)
    out: dict[str, int] = {}
    for name, m in found:
        # from the layer's shape, not `m.weight`: reading a spectral_norm weight in train mode moves its u/v buffers
        per_unit = m.in_channels // m.groups * math.prod(m.kernel_size) if isinstance(m, nn.Conv2d) else m.in_features
        n = per_unit + (1 if getattr(m, "bias", None) is not None else 0)
        bn = follow.get(name)
        if bn is not None and getattr(modules[bn], "affine", False):
            n += 2
        out[name] = n
    return out


def model_params(model: nn.Module) -> int:
    """All parameter entries of the model (the denominator of a parameter share)."""
    return sum(p.numel() for p in model.parameters())


def everything(model: nn.Module) -> Selection:
    return Selection.everything(model)


def select_layers_by_name(model: nn.Module, names: Sequence[str] | str, *, include_output: bool = True) -> list[str]:
    """Resolve layer names or glob patterns (``"net.layer4.*"``) to layer names, in model order."""
    if isinstance(names, str):
        names = [names]
    found = [n for n, _ in layers(model, include_output=include_output)]
    out: list[str] = []
    for pat in names:
        hits = [n for n in found if n == pat or fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise AdvtuneError(f"no Conv2d/Linear layer matches {pat!r}; layers are: {', '.join(found)}")
        out.extend(h for h in hits if h not in out)
    return [n for n in found if n in out]
