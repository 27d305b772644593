"""One home for measuring a model during and around training: clean accuracy, per-example
correctness, adversarial examples of a whole split, and the quick single-attack monitor.

The honest robustness protocol (several attacks, worst case per example, the masking gate) is
`advtune.evaluation.robust_accuracy`; what is here is for monitoring and analysis only.
"""

from __future__ import annotations

import torch
from torch import nn

from .attacks import PGD
from .cost import CostMeter
from .data import TensorData
from .devices import eval_mode, model_device
from .progress import progress
from .seeding import derive_seed, make_generator


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorData, batch_size: int = 512, meter: CostMeter | None = None) -> float:
    """Clean accuracy of `model` on a split (eval mode, restored afterwards)."""
    device = model_device(model)
    correct = torch.zeros((), dtype=torch.long, device=device)
    with eval_mode(model):
        for x, y in data.batches(batch_size, device=device):
            correct += (model(x).argmax(1) == y).sum()
    if meter is not None:
        meter.add_forward(len(data))
    return correct.item() / max(len(data), 1)


def robust_accuracy_quick(
    model: nn.Module, data: TensorData, attack, batch_size: int, seed: int | None, meter: CostMeter | None = None
) -> float:
    """Accuracy under one attack (validation monitor during training; evaluation.py is the full protocol)."""
    device = model_device(model)
    correct = 0
    with eval_mode(model):
        for i, (x, y) in enumerate(data.batches(batch_size, device=device)):
            x_adv = attack(model, x, y, generator=make_generator(derive_seed(seed, "val-attack", i), device))
            with torch.no_grad():
                correct += int((model(x_adv).argmax(1) == y).sum())
    if meter is not None:
        meter.add_attack(len(data), int(attack.grad_evals()))
        meter.add_forward(len(data))
    return correct / max(len(data), 1)


def quick_robust_acc(model, data, threat, seed, steps: int = 10) -> float:
    """PGD-10 accuracy, a quick monitor only; `advtune evaluate` is the honest protocol."""
    return robust_accuracy_quick(model, data, PGD(threat, steps=steps), 256, seed)


def adversarial_examples(model, attack, x, y, batch_size: int, seed: int) -> torch.Tensor:
    """x_adv for all of x, batch by batch, each batch with its own derived generator (reproducible)."""
    out = []
    dev = model_device(model)
    with eval_mode(model):
        for i in progress(range(0, len(x), batch_size), desc=f"attack {attack.spec}", total=-(-len(x) // batch_size)):
            g = make_generator(derive_seed(seed, "analyze", i), dev)
            out.append(attack(model, x[i : i + batch_size], y[i : i + batch_size], generator=g))
    return torch.cat(out)


@torch.no_grad()
def correct(model, x, y, batch_size: int) -> torch.Tensor:
    """Per-example correctness of the model's predictions (eval mode)."""
    with eval_mode(model):
        return torch.cat(
            [model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size] for i in range(0, len(x), batch_size)]
        )
