"""Low-rank adapters: a small trainable budget spread over every conv and linear layer.

Each adapted layer's weight W (out x in x k x k, or out x in) becomes W + U @ D reshaped, with
D (rank x fan_in) drawn at random and U (out x rank) starting at zero, so training starts from the
model as it is; W itself stays frozen. `merge` folds U @ D into W and removes the adapters, so the
model keeps its architecture and its state_dict keys. The idea is low-rank adaptation (LoRA, Hu et al.
2021); spreading it over every layer for adversarial fine-tuning is FullLoRA-AT's finding (on vision
transformers, ~5% of the parameters matched full adversarial fine-tuning).

The degrees of freedom are the adapters' entries (sum over layers of rank * (out + fan_in)); every
entry of an adapted weight changes, so a patch of a merged model is dense in those layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import AdvtuneError
from ..patch import merged_weight  # one formula for the merge here and a patch's apply

ADAPTABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def norm_layers(model: nn.Module) -> list[str]:
    """Names of the normalization layers of `model` that have a scale and shift to train, in module order."""
    return [
        n for n, m in model.named_modules() if isinstance(m, NORMS) and any(True for _ in m.parameters(recurse=False))
    ]


def own_params(module: nn.Module) -> int:
    """Entries of a module's own parameters (not its children's): what training it whole trains."""
    return sum(p.numel() for p in module.parameters(recurse=False))


def norm_params(model: nn.Module) -> int:
    """Entries of every normalization layer's scale and shift: what the norms extra trains."""
    return sum(own_params(model.get_submodule(n)) for n in norm_layers(model))


class LowRankDelta(nn.Module):
    """The parametrization W -> W + (up @ down).view_as(W)."""

    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        out, fan_in = weight.shape[0], weight[0].numel()
        down = torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in)
        self.down = nn.Parameter(down.to(weight.device, weight.dtype))
        self.up = nn.Parameter(torch.zeros(out, rank, device=weight.device, dtype=weight.dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.up @ self.down).view_as(weight)


def refuse_parametrized(model: nn.Module) -> None:
    """Refuse, in one line, a conv or linear layer whose weight is computed (spectral_norm, weight_norm: a torch
    parametrization, or the older hooks over `weight_orig` / `weight_g`, `weight_v`): the selective rules train, mask
    and adapt the plain `weight` parameter, which such a layer lacks (its unit masks trained only the bias, its
    adapters stacked on the user's parametrization)."""
    for name, mod in model.named_modules():
        if not isinstance(mod, ADAPTABLE) or isinstance(mod._parameters.get("weight"), nn.Parameter):
            continue
        if parametrize.is_parametrized(mod, "weight") and all(
            isinstance(p, LowRankDelta) for p in mod.parametrizations.weight
        ):
            continue  # our own adapters (a selection being trained)
        raise AdvtuneError(
            f"layer {name!r} has a computed weight (e.g. spectral_norm or weight_norm): selective fine-tuning trains "
            "plain weights; remove it first (torch.nn.utils.parametrize.remove_parametrizations, or "
            "remove_spectral_norm / remove_weight_norm) or train every parameter (finetune --select all)"
        )


def refuse_tied(model: nn.Module) -> None:
    """Refuse, in one line, a parameter tensor two conv/linear layers share (tied weights): every selective rule
    chooses, masks or adapts a layer's entries under that layer's name, so one tensor would be two (the probe rule
    crashed, adapters merged twice into it, the second layer's units never trained). Full fine-tuning takes them."""
    owner: dict[int, str] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, ADAPTABLE):
            continue
        for p in mod.parameters(recurse=False):
            if id(p) in owner and owner[id(p)] != name:
                raise AdvtuneError(
                    f"layers {owner[id(p)]!r} and {name!r} share one parameter tensor (tied weights): the selective "
                    "rules train each layer's own entries; train every parameter (--select all) or give each layer "
                    "its own weights"
                )
            owner.setdefault(id(p), name)


def adaptable_layers(model: nn.Module) -> list[str]:
    """Names of the conv and linear layers of `model`, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, ADAPTABLE)]


def check_ranks(model: nn.Module, ranks: dict[str, int]) -> None:
    """Refuse, in one line, a layer the model lacks or a rank that does not fit it."""
    modules = dict(model.named_modules())
    for name, rank in ranks.items():
        mod = modules.get(name)
        if not isinstance(mod, ADAPTABLE):
            raise AdvtuneError(
                f"low-rank: {name!r} is not a conv or linear layer of the model; layers: "
                + ", ".join(adaptable_layers(model))
            )
        top = max_rank(mod.weight)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
            shape = tuple(mod.weight.shape)
            raise AdvtuneError(f"low-rank: rank {rank!r} does not fit {name} (weight {shape}): use 1..{top}")


def add_adapters(model: nn.Module, ranks: dict[str, int], seed: int = 0) -> int:
    """Adapt the named layers with the given ranks, freeze every other parameter of the model, and
    return the number of trainable entries (the adapters'). Ranks that do not fit are refused before
    any layer is changed."""
    check_ranks(model, ranks)
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    count = 0
    for name, rank in ranks.items():
        mod = modules[name]
        delta = LowRankDelta(mod.weight.detach(), rank, gen)
        order = list(mod._parameters)  # merge puts the weight back in its place (state_dict order)
        parametrize.register_parametrization(mod, "weight", delta)
        mod._advtune_order = order
        mod.parametrizations.weight.original.requires_grad_(False)
        count += delta.up.numel() + delta.down.numel()
    return count


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (what the optimizer trains)."""
    return [p for m in model.modules() if isinstance(m, LowRankDelta) for p in (m.up, m.down)]


@torch.no_grad()
def merge(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fold every adapter into its weight (`merged_weight`) and remove it: the model has its original
    architecture, parameters and state_dict keys again, with the adapted weights. Returns the factors
    merged, {weight name: (up, down)} on the CPU, for a patch that stores them instead of the weights."""
    factors = adapter_factors(model)
    for mod in list(model.modules()):
        if parametrize.is_parametrized(mod, "weight"):
            delta = mod.parametrizations.weight[0]
            new = merged_weight(mod.parametrizations.weight.original, delta.up, delta.down)
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
            mod.weight.copy_(new)
            for name in getattr(mod, "_advtune_order", ()):
                mod._parameters[name] = mod._parameters.pop(name)
            mod.__dict__.pop("_advtune_order", None)
    return factors


def check_adapter_lr_ratio(ratio: float, selection) -> None:
    """--adapter-lr-ratio other than 1 only where the selection trains adapters: refused in one line otherwise."""
    if ratio != 1 and not (isinstance(selection, LowRank) and selection.ranks):  # hybrid may pay only whole layers
        raise AdvtuneError(
            f"--adapter-lr-ratio {ratio:g} scales the low-rank adapters' rate, and this selection trains none: "
            "use --granularity lowrank, hybrid or shares (or --select lowrank), or leave it at 1"
        )


def up_factors(model: nn.Module) -> list[nn.Parameter]:
    """The up factors (zero at the start) of every adapter now on the model: what --adapter-lr-ratio speeds up."""
    return [m.up for m in model.modules() if isinstance(m, LowRankDelta)]


def adapter_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{weight name: (up, down)} of every adapter now on the model, copied to the CPU."""
    out = {}
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod, "weight"):
            delta = mod.parametrizations.weight[0]
            out[f"{name}.weight"] = (delta.up.detach().cpu().clone(), delta.down.detach().cpu().clone())
    return out


def adapter_size(weight: torch.Tensor, rank: int) -> int:
    """Entries of a rank-`rank` adapter of `weight`: rank * (out + fan_in)."""
    return rank * (weight.shape[0] + weight[0].numel())


def max_rank(weight: torch.Tensor) -> int:
    return min(weight.shape[0], weight[0].numel())


class LowRank:
    """A selection that trains low-rank adapters instead of a subset of the weights (for `fit`, via
    `Trainable`): `ranks` maps each adapted layer to its rank; `seed` draws the adapters' start."""

    kind = "lowrank"

    def __init__(
        self, ranks: dict[str, int], seed: int = 0, whole: tuple[str, ...] = (), norms: tuple[str, ...] = ()
    ) -> None:
        if not ranks and not whole:
            raise AdvtuneError("low-rank: no layer to adapt")
        self.ranks = dict(ranks)
        self.seed = int(seed)
        self.whole = tuple(whole)  # layers trained whole (every entry) next to the adapters: the hybrid rule
        # normalization layers whose scale and shift train too (the norms extra); a BatchNorm among them
        # also keeps updating its running statistics on the adversarial batches, as in full fine-tuning
        self.norms = tuple(norms)
        self.factors: dict | None = None  # {weight: (up, down)} merged at the end of fit (or the kept checkpoint's)
        both = set(self.whole) & set(self.ranks)
        if both:
            raise AdvtuneError(f"low-rank: {', '.join(sorted(both))} cannot be both adapted and trained whole")

    def __len__(self) -> int:
        return len(self.ranks) + len(self.whole)

    def __repr__(self) -> str:
        ranks = ", ".join(f"{n}:{r}" for n, r in list(self.ranks.items())[:4]) + (
            ", ..." if len(self.ranks) > 4 else ""
        )
        return f"LowRank({len(self.ranks)} adapted layers ({ranks}), {len(self.whole)} whole, {len(self.norms)} norms)"

    def is_everything(self, model: nn.Module) -> bool:
        return False

    def validate(self, model: nn.Module) -> None:
        check_ranks(model, self.ranks)
        modules = dict(model.named_modules())
        for name in self.whole:
            if not isinstance(modules.get(name), ADAPTABLE):
                raise AdvtuneError(f"low-rank: {name!r} is not a conv or linear layer of the model")
        for name in self.norms:
            if not isinstance(modules.get(name), NORMS):
                raise AdvtuneError(f"low-rank: {name!r} is not a normalization layer of the model")

    def adapt(self, model: nn.Module) -> int:
        """Add the adapters to `model` and free the whole layers (everything else frozen); the number
        of trainable entries."""
        self.validate(model)
        count = add_adapters(model, self.ranks, self.seed)
        for name in (*self.whole, *self.norms):
            for p in model.get_submodule(name).parameters(recurse=False):
                p.requires_grad_(True)
                count += p.numel()
        return count

    def params_by_layer(self, model: nn.Module, example_input=None) -> dict[str, int]:
        modules = dict(model.named_modules())
        out = {n: own_params(modules[n]) for n in (*self.whole, *self.norms)}
        out.update({n: adapter_size(_weight(modules[n]), r) for n, r in self.ranks.items()})
        return out

    def trainable_params(self, model: nn.Module, example_input=None) -> int:
        return sum(self.params_by_layer(model).values())

    def n_units(self, model: nn.Module) -> int:
        return sum(self.ranks.values())  # rank-one directions

    def by_layer(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """{layer: (rank, its largest rank)}; a whole layer: (largest, largest)."""
        modules = dict(model.named_modules())
        out = {n: (max_rank(_weight(modules[n])),) * 2 for n in self.whole}
        out.update({n: (r, max_rank(_weight(modules[n]))) for n, r in self.ranks.items()})
        return out

    def changed_entries(self, model: nn.Module) -> int:
        """Entries that change: all of each adapted weight, and the whole layers' and norms' parameters."""
        modules = dict(model.named_modules())
        whole = sum(own_params(modules[n]) for n in (*self.whole, *self.norms))
        return whole + sum(_weight(modules[n]).numel() for n in self.ranks)

    def to_json(self) -> dict:
        components = [*self.whole, *self.ranks]  # every layer it touches (the report marks them)
        return {
            "kind": self.kind,
            "ranks": self.ranks,
            "whole": list(self.whole),
            "norms": list(self.norms),
            "seed": self.seed,
            "components": components,
        }

    @classmethod
    def from_json(cls, data: dict) -> "LowRank":
        return cls(
            {k: int(v) for k, v in data["ranks"].items()},
            int(data.get("seed", 0)),
            tuple(data.get("whole", ())),
            tuple(data.get("norms", ())),
        )


def selection_from_json(data: dict, model: nn.Module):
    """A selection.json back: a LowRank (kind lowrank), a SparseEntries (kind sparse) or a Selection of components."""
    if isinstance(data, dict) and data.get("kind") == LowRank.kind:
        selection = LowRank.from_json(data)
        selection.validate(model)
        return selection
    if isinstance(data, dict) and data.get("kind") == "sparse":
        from .sparse import SparseEntries

        sparse = SparseEntries.from_json(data)
        sparse.validate(model)
        return sparse
    from ..components import Selection

    return Selection.from_json(data, model)


def _weight(module: nn.Module) -> torch.Tensor:
    """A layer's weight, the original one while an adapter is on it."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def uniform_ranks(model: nn.Module, rank: int, layers: list[str] | None = None) -> dict[str, int]:
    """Rank `rank` on every conv/linear layer (or the named ones), capped where a layer is smaller."""
    modules = dict(model.named_modules())
    names = layers if layers is not None else adaptable_layers(model)
    top = max((max_rank(modules[n].weight) for n in names), default=0)
    if names and rank > top:  # capped on every layer: not what the user asked for, refused rather than changed
        raise AdvtuneError(
            f"lowrank:rank={rank} is above every layer's full rank (the largest is {top}); give a rank up to {top}"
        )
    return {n: min(rank, max_rank(modules[n].weight)) for n in names}


def budget_ranks(
    model: nn.Module, params: int, scores: dict[str, float] | None = None, layers: list[str] | None = None
) -> dict[str, int]:
    """Ranks for every conv/linear layer (or `layers`) within `params` adapter entries: each gets rank 1,
    then the budget left goes out one rank at a time to the layer whose share of the scores (the
    vulnerability map's per-layer sums; equal shares without scores) is least met by its share of
    the adapter entries so far. Refused when not even rank 1 everywhere fits."""
    modules = dict(model.named_modules())
    names = adaptable_layers(model) if layers is None else list(layers)
    cost = {n: adapter_size(modules[n].weight, 1) for n in names}
    if params < sum(cost.values()):
        raise AdvtuneError(
            f"low-rank: a budget of {params} entries does not fit rank 1 on every layer ({sum(cost.values())} "
            "entries); raise --params"
        )
    raw = {n: max(float((scores or {}).get(n, 0.0)), 0.0) for n in names} if scores else {n: 1.0 for n in names}
    total = sum(raw.values()) or 1.0
    want = {n: raw[n] / total if sum(raw.values()) else 1 / len(names) for n in names}
    ranks = {n: 1 for n in names}
    left = params - sum(cost.values())
    while True:
        spent = sum(ranks[k] * cost[k] for k in names)
        open_ = [n for n in names if ranks[n] < max_rank(modules[n].weight) and cost[n] <= left]
        if not open_:
            return ranks
        n = max(open_, key=lambda k: (want[k] - ranks[k] * cost[k] / spent, -names.index(k)))
        ranks[n] += 1
        left -= cost[n]


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LowRankDelta) for m in model.modules())


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every adapter merged into its weight, under the plain keys, without
    touching the model (it may keep training). A deep copy cannot be merged instead: removing a
    parametrization edits the class the copy shares with the model."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.endswith(".parametrizations.weight.original"):
            prefix = key.removesuffix(".parametrizations.weight.original")
            delta = model.get_submodule(prefix).parametrizations.weight[0]
            out[prefix + ".weight"] = merged_weight(value, delta.up, delta.down)  # as `merge` will
        elif ".parametrizations.weight." not in key:
            out[key] = value
    return out


def hybrid_ranks(model: nn.Module, params: int, whole: list[str], scores: dict[str, float]) -> dict[str, int]:
    """The hybrid rule's adapters: the budget left after the whole layers, on the other conv/linear
    layers, shared out by score; the lowest-scored layers go without when rank 1 on each does not fit."""
    modules = dict(model.named_modules())
    left = params - sum(own_params(modules[n]) for n in whole)
    rest = sorted((n for n in adaptable_layers(model) if n not in whole), key=lambda n: -scores.get(n, 0.0))
    while rest and left < sum(adapter_size(modules[n].weight, 1) for n in rest):
        rest.pop()
    return budget_ranks(model, left, scores, rest) if rest else {}


def share_ranks(
    model: nn.Module, params: int, scores: dict[str, float], fixed: Sequence[str] = ()
) -> tuple[list[str], dict[str, int]]:
    """The shares rule (#21): every conv/linear layer is owed a share of `params` in proportion to its
    vulnerability score (negative sums count as 0). A layer whose share pays for all of its parameters
    trains whole, and what it does not need goes back to the others' shares (repeated until no further
    layer is paid for in full: water-filling); the other layers get adapters of the ranks their shares buy
    (`budget_ranks`, at least rank 1 each while that fits; the lowest-scored go without otherwise).

    Why: the hybrid rule takes whole layers best-first while they fit, so where the most vulnerable
    layers are too big to take whole (the last stage of a residual network) it skips them and spends the
    budget on smaller, less vulnerable ones. Here every layer gets what its score earns.
    `fixed`: layers trained whole whatever their score (--head: the unscored output layer), paid first."""
    modules = dict(model.named_modules())
    names = adaptable_layers(model)
    size = {n: own_params(modules[n]) for n in names}
    score = {n: max(float(scores.get(n, 0.0)), 0.0) for n in names}
    whole: list[str] = list(fixed)
    while True:
        rest = [n for n in names if n not in whole]
        left = params - sum(size[n] for n in whole)
        total = sum(score[n] for n in rest)
        if not rest or total <= 0:
            break
        paid = [n for n in rest if score[n] / total * left >= size[n]]
        if not paid:
            break
        whole += paid
    whole = [n for n in names if n in whole]  # model order
    ranks = hybrid_ranks(model, params, whole, scores)
    if not whole and not ranks:
        smallest = min(adapter_size(modules[n].weight, 1) for n in names)
        raise AdvtuneError(
            f"low-rank: a budget of {params} entries pays for no layer, not even a rank-1 adapter ({smallest} "
            "entries on the smallest layer); raise --params"
        )
    return whole, ranks
