"""The probe rule's mask (#21, RESULTS round 18): the weight entries a short whole-network fine-tuning moved most.

Full-network adversarial fine-tuning's own change does not compress (cut to its largest 10% it keeps 8.5% robust
accuracy), but its 10% of largest |W_tuned - W_base| trained again from the base reaches 27.9% on validation where
the Fisher mask reaches 22-24%: which entries train matters more than how the change is cut. The probe rule finds
such a mask without full fine-tuning: the whole network trains for a first share of the budget, the mask is the
entries that probe moved most, every other entry goes back to the base, and the rest of the budget trains within
the mask (runs/probe.py). Movement as the criterion is movement pruning's (Sanh et al. 2020); training a mask
again after finding it, the lottery-ticket procedure's (Frankle & Carbin 2019), both from memory.

Here: the change of each conv/linear weight, the mask of the `budget` largest |change| over all of them (biases and,
with `norms`, the normalization layers' scale and shift train whole, as the measured recipe did; they are paid
first), and the start weights of the masked run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import AdvtuneError
from .sparse import SparseEntries

MASKED = (nn.Conv2d, nn.Linear)  # the layers whose weight entries the mask chooses among


def masked_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(qualified name, parameter) of every conv/linear weight and bias: the entries the probe rule's masks rank."""
    return [
        (f"{name}.{p_name}" if name else p_name, p)
        for name, m in model.named_modules()
        if isinstance(m, MASKED)
        for p_name, p in m.named_parameters(recurse=False)
    ]


def weight_changes(base: nn.Module, moved: nn.Module) -> dict[str, Tensor]:
    """{qualified name of every conv/linear weight: moved - base} (on the CPU); the two models must match."""
    moved_params = dict(moved.named_parameters())
    out = {}
    for key, p in masked_params(base):
        if key.rpartition(".")[2] != "weight":
            continue
        other = moved_params.get(key)
        if other is None or other.shape != p.shape:
            raise AdvtuneError(f"the probe's model has no weight {key} of shape {tuple(p.shape)}")
        out[key] = (other.detach() - p.detach()).cpu()
    if not out:
        raise AdvtuneError("the probe rule chooses conv/linear weight entries; the model has no Conv2d or Linear layer")
    return out


def whole_params(model: nn.Module, norms: Sequence[str]) -> list[str]:
    """The parameters that train whole next to the mask: every conv/linear bias and the `norms` layers' own."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, MASKED) and m.bias is not None:
            names.append(f"{name}.bias" if name else "bias")
        if name in norms:
            names += [f"{name}.{p}" if name else p for p, _ in m.named_parameters(recurse=False)]
    return names


def movement_mask(
    base: nn.Module, moved: nn.Module, budget: int, norms: Sequence[str] = ()
) -> tuple[SparseEntries, int]:
    """The probe rule's mask within `budget` entries: the biases and the `norms` layers whole (paid first), then the
    conv/linear weight entries of largest |moved - base| over all layers. Returns the mask and the weight entries in
    it. Refused in one line where the whole parameters take the budget."""
    params = dict(base.named_parameters())
    whole = whole_params(base, norms)
    paid = sum(params[n].numel() for n in whole)
    left = int(budget) - paid
    if left <= 0:
        raise AdvtuneError(
            f"--granularity probe: the biases and normalization layers have {paid:,} parameters, the whole budget of "
            f"{int(budget):,} or more; raise --params"
        )
    changes = weight_changes(base, moved)
    flat = torch.cat([d.abs().flatten() for d in changes.values()])
    k = min(left, len(flat))
    keep = torch.zeros(len(flat), dtype=torch.bool)
    keep[flat.topk(k).indices] = True  # ties (entries that did not move) broken by topk's order: deterministic
    entries: dict[str, Tensor] = {n: torch.ones(params[n].shape, dtype=torch.bool) for n in whole}
    at = 0
    for name, d in changes.items():
        entries[name] = keep[at : at + d.numel()].reshape(d.shape)
        at += d.numel()
    return SparseEntries(entries, norms=tuple(norms)), k


def movement_scores(base: nn.Module, moved: nn.Module) -> dict[str, Tensor]:
    """|moved - base| of every conv/linear weight and bias (on the CPU): what the sparse rule's per-layer quotas rank
    entries by when the probe's movement takes the place of the Fisher (`--probe-quotas`)."""
    moved_params = dict(moved.named_parameters())
    return {key: (moved_params[key].detach() - p.detach()).abs().cpu() for key, p in masked_params(base)}


def start_weights(model: nn.Module, base_state: Mapping[str, Tensor], mask: SparseEntries) -> nn.Module:
    """`model` (the probe's, in place): every parameter entry outside `mask` put back to the base's value. A
    normalization layer the mask trains keeps the probe's statistics (they belong to the weights that trained and
    keep moving); one it does not train (the norms off) gets the base's statistics back with its scale and shift,
    since it stays frozen in eval mode for the rest of the run."""
    masks = mask.masks(model)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and name not in mask.norms:
                for b, t in m.named_buffers(recurse=False):
                    key = f"{name}.{b}" if name else b
                    if key in base_state and t is not None:
                        t.copy_(base_state[key].to(t.device, t.dtype))
        for name, p in model.named_parameters():
            m = masks.get(name)
            old = base_state[name].to(p.device, p.dtype)
            if m is None:
                p.copy_(old)
            else:
                m = m.to(p.device)
                p.copy_(torch.where(m, p, old))
    return model
