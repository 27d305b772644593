"""The sparse rule (#21, round 14): single weight entries in every conv/linear layer, a fixed mask.

Every layer is owed a share of the budget by its vulnerability score (as the shares rule, water-filled where a
share pays for the whole layer); within a layer, its share goes to the entries where the adversarial loss is
most sensitive: the largest summed squared gradients, an empirical Fisher of the adversarial loss
(:func:`advtune.vulnerability.entries.entry_fisher`). Fixed sparse masks chosen by Fisher information are the
FISH mask of Sung, Nair & Raffel (2021), which matched full fine-tuning at ~0.5% of the parameters on GLUE;
here the mask is chosen on adversarial, not clean, examples. Unlike a low-rank adapter, every selected entry
is a full-rank degree of freedom, and what trains is exactly what changes: the trainable parameters and the
changed entries are the same number. The Trainable of train/selection.py applies it as masked gradients plus
a bit-exact restore of every other entry (its partial-mask path), so the model keeps its architecture.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import AdvtuneError
from .lowrank import adaptable_layers, own_params

SPARSE_FORMAT = "advtune-sparse-selection/1"


def _layer_params(model: nn.Module, layer: str) -> list[tuple[str, nn.Parameter]]:
    """A module's own parameters by qualified name (weight first, then bias)."""
    module = model.get_submodule(layer)
    return [(f"{layer}.{n}" if layer else n, p) for n, p in module.named_parameters(recurse=False)]


class SparseEntries:
    """A fixed mask of parameter entries: `entries` maps a parameter's qualified name to a bool mask of its shape
    (CPU). `whole` (the output layer with --head) and `norms` (the normalization layers' scale and shift) are
    recorded by name and have full masks in `entries` too."""

    kind = "sparse"

    def __init__(self, entries: Mapping[str, Tensor], whole: Sequence[str] = (), norms: Sequence[str] = ()) -> None:
        self.entries = {n: m.detach().to("cpu", torch.bool) for n, m in entries.items() if bool(m.any())}
        self.whole = tuple(whole)
        self.norms = tuple(norms)

    # -- what Trainable reads
    def masks(self, model: nn.Module, example_input: Tensor | None = None) -> dict[str, Tensor]:
        self.validate(model)
        return {n: m.clone() for n, m in self.entries.items()}

    def is_everything(self, model: nn.Module) -> bool:
        params = dict(model.named_parameters())
        return set(self.entries) == set(params) and all(bool(m.all()) for m in self.entries.values())

    def validate(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, m in self.entries.items():
            p = params.get(name)
            if p is None or tuple(p.shape) != tuple(m.shape):
                found = "absent" if p is None else f"of shape {tuple(p.shape)}"
                raise AdvtuneError(
                    f"sparse selection names {name} of shape {tuple(m.shape)}, but the model's is {found}; the "
                    "selection was made for a different model"
                )

    # -- what the records read
    def trainable_params(self, model: nn.Module | None = None, example_input: Tensor | None = None) -> int:
        return int(sum(int(m.sum()) for m in self.entries.values()))

    def changed_entries(self, model: nn.Module | None = None) -> int:
        """Entries that can change: the trainable ones (a sparse mask has no factors)."""
        return self.trainable_params()

    def layers_touched(self, model: nn.Module) -> list[str]:
        return [n for n in adaptable_layers(model) if any(k in self.entries for k, _ in _layer_params(model, n))]

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return (
            f"SparseEntries({self.trainable_params():,} entries of {len(self.entries)} parameters; layers whole: "
            f"{', '.join(self.whole) or 'none'}; norms: {len(self.norms)})"
        )

    def by_layer(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """``{layer: (selected entries, the layer's entries)}`` for every conv/linear layer: for a sparse mask the
        share of a layer it trains is a share of entries (the reports draw it as the units' share of a unit rule)."""
        out = {}
        for name in adaptable_layers(model):
            named = _layer_params(model, name)
            picked = sum(int(self.entries[p].sum()) for p, _ in named if p in self.entries)
            out[name] = (picked, sum(p.numel() for _, p in named))
        return out

    def n_units(self, model: nn.Module) -> int:
        """Output units (rows) of the conv/linear layers with at least one selected entry."""
        touched = 0
        for name in adaptable_layers(model):
            for pname, p in _layer_params(model, name):
                m = self.entries.get(pname)
                if m is not None and pname.endswith("weight"):
                    touched += int(m.reshape(p.shape[0], -1).any(1).sum())
        return touched

    def params_by_layer(self, model: nn.Module, example_input: Tensor | None = None) -> dict[str, int]:
        """``{layer: its selected entries}`` for the conv/linear layers it touches."""
        out = {}
        for name in adaptable_layers(model):
            n = sum(int(self.entries[p].sum()) for p, _ in _layer_params(model, name) if p in self.entries)
            if n:
                out[name] = n
        return out

    # -- serialisation: the flat indices of each parameter's selected entries
    def to_json(self) -> dict:
        return {
            "format": SPARSE_FORMAT,
            "kind": self.kind,
            "components": sorted({n.rpartition(".")[0] for n in self.entries}),  # the modules it touches
            "whole": list(self.whole),
            "norms": list(self.norms),
            "shapes": {n: list(m.shape) for n, m in self.entries.items()},
            "entries": {n: m.flatten().nonzero().flatten().tolist() for n, m in self.entries.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping) -> SparseEntries:
        try:
            if data.get("format") != SPARSE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, not {SPARSE_FORMAT!r}")
            entries = {}
            for name, shape in data["shapes"].items():
                m = torch.zeros(math.prod(shape), dtype=torch.bool)
                listed = data["entries"][name]
                if not all(isinstance(i, int) and not isinstance(i, bool) for i in listed):
                    raise ValueError(f"an index of {name} is not a whole number")  # torch would truncate 1.5 to 1
                idx = torch.tensor(listed, dtype=torch.long)
                if len(idx) and int(idx.min()) < 0:
                    raise ValueError(f"a negative index in {name}")
                m[idx] = True
                entries[name] = m.reshape(shape)
            return cls(entries, tuple(data.get("whole", ())), tuple(data.get("norms", ())))
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise AdvtuneError(
                f"a sparse selection.json is malformed ({e}); re-run the fine-tuning that wrote it"
            ) from None


def layer_quotas(sizes: Mapping[str, int], scores: Mapping[str, float], budget: int) -> dict[str, int]:
    """Each layer's share of `budget` entries by its score (negative counts as 0; all zero: equal shares),
    water-filled: a layer whose share pays for all its entries takes them all and the rest goes to the others;
    what rounding leaves goes to the best-scored layers with room. Never more than the budget in all."""
    score = {n: max(float(scores.get(n, 0.0)), 0.0) for n in sizes}
    if not any(score.values()):
        score = dict.fromkeys(sizes, 1.0)
    quota = dict.fromkeys(sizes, 0)
    full: list[str] = []
    while True:
        rest = [n for n in sizes if n not in full and score[n] > 0]
        left = budget - sum(sizes[n] for n in full)
        total = sum(score[n] for n in rest)
        if not rest or total <= 0:
            break
        paid = [n for n in rest if score[n] / total * left >= sizes[n]]
        if not paid:
            for n in rest:
                quota[n] = int(score[n] / total * left)
            break
        full += paid
    for n in full:
        quota[n] = sizes[n]
    left = budget - sum(quota.values())
    for n in sorted(sizes, key=lambda k: -score[k]):  # the rounding remainder
        if left <= 0:
            break
        extra = min(left, sizes[n] - quota[n]) if score[n] > 0 else 0
        quota[n] += extra
        left -= extra
    return quota


def sparse_selection(
    model: nn.Module,
    budget: int,
    layer_scores: Mapping[str, float],
    fisher: Mapping[str, Tensor],
    whole: Sequence[str] = (),
    norms: Sequence[str] = (),
) -> SparseEntries:
    """The sparse rule: `budget` entries (what is left once the norms are paid) shared out by the layers'
    scores (:func:`layer_quotas`); `whole` layers (the output layer with --head) are paid first and train
    whole; within every other layer its quota goes to its largest `fisher` entries (weight and bias ranked
    together). `norms`: these normalization layers' scale and shift train whole (paid by the caller)."""
    entries: dict[str, Tensor] = {}
    for layer in (*whole, *norms):
        for pname, p in _layer_params(model, layer):
            entries[pname] = torch.ones(p.shape, dtype=torch.bool)
    left = budget - sum(own_params(model.get_submodule(n)) for n in whole)
    names = [n for n in adaptable_layers(model) if n not in whole]
    scored = {n: layer_scores[n] for n in names if n in layer_scores and math.isfinite(layer_scores[n])}
    if not scored:
        raise AdvtuneError("the sparse rule needs the analysis' layer scores; none of the model's layers has one")
    sizes = {n: own_params(model.get_submodule(n)) for n in scored}
    for layer, k in layer_quotas(sizes, scored, max(left, 0)).items():
        if k <= 0:
            continue
        named = _layer_params(model, layer)
        missing = [n for n, _ in named if n not in fisher]
        if missing:
            raise AdvtuneError(f"the sparse rule has no entry scores for {missing[0]}; re-run the scoring")
        flat = torch.cat([fisher[n].detach().flatten().float().cpu() for n, _ in named])
        chosen = torch.zeros(len(flat), dtype=torch.bool)
        chosen[torch.topk(flat, k).indices] = True
        start = 0
        for pname, p in named:
            entries[pname] = chosen[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
    if not any(m.any() for n, m in entries.items() if n.rpartition(".")[0] in scored):
        raise AdvtuneError(
            f"a budget of {budget:,} entries leaves the sparse rule nothing for the scored layers; raise --params"
        )
    return SparseEntries(entries, whole, norms)


def random_entries(
    model: nn.Module,
    budget: int,
    seed: int,
    exclude: Sequence[str] = (),
    norms: Sequence[str] = (),
    whole: Sequence[str] = (),
) -> SparseEntries:
    """The sparse rule's random control: `budget` entries drawn uniformly from the conv/linear layers' weights and
    biases (`exclude`: the output layer, which the sparse rule does not score), so that each layer gets entries in
    proportion to its size instead of its score, and no Fisher ranks them; `norms` train whole as in the rule, and
    `whole` layers (the output layer, as the rule's --head trains it) train whole, paid out of `budget` first: the
    control then differs from the rule only in which hidden entries train."""
    entries: dict[str, Tensor] = {}
    for layer in (*whole, *norms):
        for pname, p in _layer_params(model, layer):
            entries[pname] = torch.ones(p.shape, dtype=torch.bool)
    budget -= sum(own_params(model.get_submodule(n)) for n in whole)
    layers = [layer for layer in adaptable_layers(model) if layer not in exclude and layer not in whole]
    named = [(n, p) for layer in layers for n, p in _layer_params(model, layer)]
    total = sum(p.numel() for _, p in named)
    if budget <= 0 or not named:
        raise AdvtuneError(f"a budget of {budget:,} entries leaves the random sparse control nothing; raise --params")
    chosen = torch.zeros(total, dtype=torch.bool)
    chosen[torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))[: min(budget, total)]] = True
    start = 0
    for pname, p in named:
        entries[pname] = chosen[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    return SparseEntries(entries, tuple(whole), norms)
