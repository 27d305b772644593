"""The cost meter: wall time, gradient evaluations per example, FLOPs, trainable parameters, peak memory.

Unit of cost: one *gradient evaluation* = one forward + one backward pass of one example. A clean
training step costs 1; PGD-k adversarial training costs k (attack) + 1 (the update) per example.
Attack backward passes need only input gradients, but they still run through every layer, frozen or
not: selective fine-tuning saves only in the parameter-gradient share, which the FLOPs split shows.
"""

from __future__ import annotations

import contextlib
import copy
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .devices import model_dtype
from .records import Record


@dataclass
class CostMeter:
    wall_s: float = 0.0
    examples: int = 0  # examples that went through a training update
    attack_grad_evals: int = 0  # example-passes of forward+backward for input gradients (attacks)
    update_grad_evals: int = 0  # example-passes of forward+backward for parameter updates
    forward_evals: int = 0  # forward-only example-passes (evaluation, checks)
    partial_passes: int = 0  # example-passes (forward+backward) through an early block only
    partial_grad_evals: float = 0.0  # the same in full-network equivalents (passes x the block's FLOPs share)
    trainable_params: int = 0
    total_params: int = 0
    flops_forward: float = 0.0  # per example, measured once with torch.utils.flop_counter
    flops_attack_step: float = 0.0  # per example: forward + input-gradient backward
    flops_update_step: float = 0.0  # per example: forward + backward for the trainable parameters
    peak_memory_bytes: int = 0
    device: str = "cpu"
    phases: dict = field(default_factory=dict)
    _t0: float | None = field(default=None, repr=False)

    # ------------------------------------------------------------ counting
    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._t0 is not None:
            self.wall_s += time.perf_counter() - self._t0
            self._t0 = None
        self._update_memory()

    def add_update(self, n: int, attack_grad_evals_per_example: int = 0) -> None:
        self.examples += n
        self.update_grad_evals += n
        self.attack_grad_evals += n * attack_grad_evals_per_example

    def add_attack(self, n: int, grad_evals_per_example: int) -> None:
        self.attack_grad_evals += n * grad_evals_per_example

    def add_forward(self, n: int) -> None:
        self.forward_evals += n

    def add_counted(self, counter: "PassCounter") -> None:
        """Add what a PassCounter saw (examples through the model with and without gradients), and reset it."""
        grad, fwd = counter.take()
        self.attack_grad_evals += grad
        self.forward_evals += fwd

    def add_partial(self, n: int, passes_per_example: int, fraction: float) -> None:
        """A training step of a local objective: `passes_per_example` forward+backward passes through
        a block whose FLOPs are `fraction` of the whole network's."""
        self.examples += n
        self.partial_passes += n * passes_per_example
        self.partial_grad_evals += n * passes_per_example * fraction

    @property
    def grad_evals(self) -> int:
        """Full-network gradient evaluations; partial (block) passes count by their FLOPs share."""
        return self.attack_grad_evals + self.update_grad_evals + int(round(self.partial_grad_evals))

    @property
    def flops(self) -> float:
        return (
            self.attack_grad_evals * self.flops_attack_step
            + self.update_grad_evals * self.flops_update_step
            + self.forward_evals * self.flops_forward
            + self.partial_grad_evals * self.flops_attack_step
        )

    # ------------------------------------------------------------ measuring
    def measure_model(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        """Count FLOPs per example for a forward, an attack step and an update step, and the
        trainable parameters, with the model's *current* requires_grad flags (so a selection counts)."""
        params = list(model.parameters())
        self.trainable_params = sum(p.numel() for p in params if p.requires_grad)
        self.total_params = sum(p.numel() for p in params)
        dev = params[0].device if params else torch.device("cpu")
        self.device = str(dev)
        # a private copy in eval mode: the probe must not touch the real model's .grad or BN stats
        # (FlopCounterMode cannot wrap autograd.grad on a leaf, so the probe uses backward()).
        probe = copy.deepcopy(model).eval()
        x = torch.rand(1, *input_shape, device=dev, dtype=model_dtype(model))
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            probe(x)
        self.flops_forward = float(fc.get_total_flops())
        flags = [p.requires_grad for p in probe.parameters()]
        for p in probe.parameters():
            p.requires_grad_(False)
        with FlopCounterMode(display=False) as fc, torch.enable_grad():  # also when called under no_grad
            probe(x.clone().requires_grad_(True)).sum().backward()
        self.flops_attack_step = float(fc.get_total_flops())
        for p, f in zip(probe.parameters(), flags):
            p.requires_grad_(f)
        with FlopCounterMode(display=False) as fc, torch.enable_grad():
            out = probe(x).sum()
            if out.requires_grad:
                out.backward()
        self.flops_update_step = float(fc.get_total_flops())

    def _update_memory(self) -> None:
        if self.device.startswith("cuda") and torch.cuda.is_available():
            self.peak_memory_bytes = max(
                self.peak_memory_bytes, int(torch.cuda.max_memory_allocated(torch.device(self.device)))
            )
        else:
            # process peak RSS (KiB on Linux, bytes on macOS): an upper bound for this run on CPU
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_memory_bytes = max(self.peak_memory_bytes, rss if sys.platform == "darwin" else rss * 1024)

    # ------------------------------------------------------------ records
    def record(self) -> "CostRecord":
        """What the meter counted, as cost.json holds it."""
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        return CostRecord(
            **d,
            grad_evals=self.grad_evals,
            grad_evals_per_example=self.grad_evals / self.examples if self.examples else None,
            flops=self.flops,
            peak_memory_kind="cuda_max_allocated" if self.device.startswith("cuda") else "process_peak_rss",
        )

    def to_json(self) -> dict:
        """cost.json: the `CostRecord` of what the meter counted."""
        return self.record().to_json()

    def load_json(self, d: dict) -> "CostMeter":
        for k, v in d.items():
            if k in self.__dataclass_fields__ and not k.startswith("_"):
                setattr(self, k, v)
        return self


@dataclass(frozen=True, kw_only=True)
class CostRecord(Record):
    """cost.json: what a `CostMeter` counted (its fields, then the totals). Every field but the total
    gradient evaluations has a default, so older records (before a counter existed) still read."""

    SCHEMA = 1
    KIND = "cost"

    wall_s: float = 0.0
    examples: int = 0
    attack_grad_evals: int = 0
    update_grad_evals: int = 0
    forward_evals: int = 0
    partial_passes: int = 0
    partial_grad_evals: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    flops_forward: float = 0.0
    flops_attack_step: float = 0.0
    flops_update_step: float = 0.0
    peak_memory_bytes: int = 0
    device: str = "cpu"
    phases: dict = field(default_factory=dict)
    grad_evals: int  # full-network gradient evaluations (partial passes by their FLOPs share)
    grad_evals_per_example: float | None = None  # None: no training example
    flops: float = 0.0
    peak_memory_kind: str = "process_peak_rss"  # or cuda_max_allocated


class PassCounter:
    """Counts examples through the model: with a graph (gradient evaluations) or without (forwards)."""

    def __init__(self) -> None:
        self.grad = 0
        self.fwd = 0

    def _hook(self, module: nn.Module, args) -> None:
        x = args[0] if args else None
        n = len(x) if isinstance(x, Tensor) and x.dim() > 0 else 1
        if torch.is_grad_enabled() and isinstance(x, Tensor) and x.requires_grad:
            self.grad += n
        else:
            self.fwd += n

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator["PassCounter"]:
        # Outside torch.compile: traced, the counter (an int attribute) is a constant that changes every
        # call, so a compiled model recompiled on each call until dynamo gave up and ran it eagerly.
        # Wrapped only once dynamo is loaded (importing it costs ~1.3 s, and nothing compiles before it
        # is): whoever compiles inside `attached` imports torch._dynamo first (robust_accuracy does).
        hook = torch.compiler.disable(self._hook) if "torch._dynamo" in sys.modules else self._hook
        handle = model.register_forward_pre_hook(hook)
        _ATTACHED.setdefault(id(model), []).append(self)
        try:
            yield self
        finally:
            handle.remove()
            _ATTACHED[id(model)].remove(self)
            if not _ATTACHED[id(model)]:
                del _ATTACHED[id(model)]

    def take(self) -> tuple[int, int]:
        g, f = self.grad, self.fwd
        self.grad = self.fwd = 0
        return g, f


# the counters attached to each model (by id): forwards that run without calling the model, CUDA graph replays
# (Square's queries on a GPU), are credited to them here, since the pre-hook only fires when the graph is captured
_ATTACHED: dict[int, list[PassCounter]] = {}


def count_forwards(model: nn.Module, n: int) -> None:
    """Credit `n` forward-only examples to every counter attached to `model`, as its hook would have."""
    for counter in _ATTACHED.get(id(model), ()):
        counter.fwd += n


@contextlib.contextmanager
def uncounted(model: nn.Module) -> Iterator[None]:
    """Passes through `model` inside are not counted (a CUDA graph's warm-up and capture: set-up, not queries)."""
    saved = [(c, c.grad, c.fwd) for c in _ATTACHED.get(id(model), ())]
    try:
        yield
    finally:
        for c, grad, fwd in saved:
            c.grad, c.fwd = grad, fwd
