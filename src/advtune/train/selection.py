"""Selective training inside the loop: only the selected slices of the selected parameters move;
every other entry is restored bit-exactly after each step."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase  # BatchNorm and InstanceNorm: the norms with running statistics

from ..errors import AdvtuneError
from .lowrank import check_adapter_lr_ratio, merge, refuse_parametrized, refuse_tied, up_factors

log = logging.getLogger(__name__)


class Trainable:
    """Applies a Selection for the duration of fit:
    (a) tensors with no selected entry get requires_grad=False and stay out of the optimizer;
    (b) partially selected tensors get masked gradients AND their unselected slices are restored
        after every optimizer step (momentum and weight decay move entries with zero gradient);
    (c) BatchNorms whose parameters are all frozen run in eval mode (running stats don't move);
        partially selected BNs have their unselected running-stat entries restored after each step;
    (d) a selection covering everything changes nothing: exactly the full-training path;
    (e) a low-rank selection (lowrank.LowRank) adds adapters and trains only them; `close` merges
        them into the weights, so the model leaves `fit` with its own architecture.
    """

    def __init__(self, model: nn.Module, selection, example_input: torch.Tensor | None = None) -> None:
        self.model = model
        self.flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self.partial: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.frozen_bns: list[_NormBase] = []
        self.partial_bns: list[tuple[_NormBase, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.adapted = False
        self.selection = selection
        if selection is not None and not callable(getattr(selection, "is_everything", None)):
            hint = "; call its .select(share=...) first" if hasattr(selection, "select") else ""
            raise AdvtuneError(
                f"selection must be a Selection (VulnerabilityMap.select(...), a selection.json read back), got "
                f"{type(selection).__name__}{hint}"
            )
        if selection is None:  # a norm the caller froze and put in eval mode (a frozen backbone) keeps its statistics
            self.frozen_bns = [
                m
                for m in model.modules()
                if isinstance(m, _NormBase)
                and m.track_running_stats
                and not m.training
                and any(True for _ in m.parameters(recurse=False))
                and not any(p.requires_grad for p in m.parameters(recurse=False))
            ]
            return
        if selection.is_everything(model):  # everything selected trains, also what the caller froze (close gives it)
            for p in model.parameters():
                p.requires_grad_(True)
            return  # (d): selecting everything is exactly the full-training path
        refuse_parametrized(model)  # before anything is frozen or adapted
        refuse_tied(model)
        if hasattr(selection, "adapt"):  # (e): adapters, everything else frozen
            selection.adapt(model)
            self.adapted = True
            self.frozen_bns = [  # a BatchNorm the selection trains (the norms extra) keeps moving its statistics
                m
                for m in model.modules()
                if isinstance(m, _NormBase)
                and m.track_running_stats
                and not any(p.requires_grad for p in m.parameters(recurse=False))
            ]
            return
        # a traced forward finds the BatchNorm that follows each selected conv (see components.py)
        masks = selection.masks(model, example_input=example_input)
        for name, p in model.named_parameters():
            m = masks.get(name)
            if m is None or not bool(m.any()):
                p.requires_grad_(False)
                continue
            p.requires_grad_(True)  # the selection decides, also for a parameter the caller froze (close gives it back)
            if not bool(m.all()):
                m = m.to(p.device)
                self.partial.append((p, m, p.detach().clone()))
        for mod in model.modules():
            if not isinstance(mod, _NormBase) or not mod.track_running_stats:
                continue
            own = [p for p in mod.parameters(recurse=False)]
            if not own or not any(p.requires_grad for p in own):
                self.frozen_bns.append(mod)
            elif mod.weight is not None:
                wmask = next((m for p, m, _ in self.partial if p is mod.weight), None)
                if wmask is not None:
                    self.partial_bns.append((mod, ~wmask, mod.running_mean.clone(), mod.running_var.clone()))

    def snapshot(self) -> None:
        self.partial = [(p, m, p.detach().clone()) for p, m, _ in self.partial]
        self.partial_bns = [
            (bn, keep, bn.running_mean.clone(), bn.running_var.clone()) for bn, keep, _, _ in self.partial_bns
        ]

    def count(self) -> int:
        """Parameters that can change: full trainable tensors plus the selected entries of partial ones."""
        partial = {id(p): int(m.sum()) for p, m, _ in self.partial}
        return sum(partial.get(id(p), p.numel()) for p in self.model.parameters() if p.requires_grad)

    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def train_mode(self) -> None:
        self.model.train()
        for bn in self.frozen_bns:
            bn.eval()

    def param_groups(self, lr_ratio: float = 1.0) -> list[nn.Parameter] | list[dict]:
        """The optimizer's parameters: one group, or (lr_ratio != 1, LoRA+) the adapters' up factors with their
        rate scaled by `lr_ratio` (the loop reads `lr_scale`) and everything else at the base rate."""
        params = self.params()
        if lr_ratio == 1:
            return params
        check_adapter_lr_ratio(lr_ratio, self.selection if self.adapted else None)  # adapters on the model now
        ups = {id(p) for p in up_factors(self.model)}
        groups = [
            {"params": [p for p in params if id(p) in ups], "lr_scale": float(lr_ratio)},
            {"params": [p for p in params if id(p) not in ups], "lr_scale": 1.0},
        ]
        return [g for g in groups if g["params"]]

    def mask_grads(self) -> None:
        for p, m, _ in self.partial:
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def restore_frozen(self) -> None:
        for p, m, frozen in self.partial:
            torch.where(m, p, frozen, out=p)
        for bn, keep, mean, var in self.partial_bns:
            bn.running_mean[keep] = mean[keep]
            bn.running_var[keep] = var[keep]

    def close(self) -> None:
        if self.adapted:  # the factors go with the selection, for a patch that stores them
            self.selection.factors = merge(self.model)
            self.adapted = False
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.flags[name])
