"""Square Attack: score-based black-box random search (linf).

Paper: Andriushchenko, Croce, Flammarion & Hein 2020, "Square Attack: a query-efficient black-box
adversarial attack via random search" (Algorithm 1 with the linf sampling of section 3.1).
Start from vertical stripes of +-eps; each iteration sets a random square window (side shrinking on
the paper's p-schedule) of each still-robust sample to x +- eps (one random sign per channel) and keeps
the change if the margin loss z_y - max_{i!=y} z_i decreased. It only queries the model: no gradients,
so it is the masking gate's witness (a black-box attack must not beat the white-box ones).
Parameters: `queries` (forward passes per sample and restart, the start included), `p_init` (initial
fraction of pixels per square), `restarts` (on samples not yet fooled), `compile` (run the queries
through `torch.compile(model, dynamic=True)`: ~1.3-2x faster forwards on CPU for a VGG on CIFAR-10 and
1.4-2.3x for small-cnn on MNIST after a one-off compile of ~5-20 s, logits equal to ~1e-6, so an accept
decision on a tie can differ from eager; falls back to the eager forward, with a warning, where
compiling fails. Default None = auto: compiled on the CPU when a call's query load, examples x queries,
is above `AUTO_QUERIES` (where the compile pays for itself) or the process already compiled; eager on
other devices, where no gain was measured. true/false force it).
Norms: linf only; images must be (N, C, H, W).
Cost: 0 gradient evaluations; up to queries * restarts forward passes per example.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..seeding import sample_on
from ..threat import ThreatModel
from ._common import (
    AttackConfig,
    Best,
    attack_entry,
    check_float,
    check_int,
    check_threat,
    checked_logits,
    margin,
    success,
    with_restarts,
)
from .registry import register

log = logging.getLogger(__name__)

# the paper's p-schedule, on a 10,000-query scale: (upper end of the iteration range, divisor of p_init)
_P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))


def p_selection(i: int, queries: int, p_init: float) -> float:
    """Fraction of pixels the square covers at iteration i (rescaled to the query budget)."""
    it = int(i / queries * 10000)
    for end, div in _P_SCHEDULE:
        if it <= end:
            return p_init / div
    return p_init / 512


def _rand_sign(shape, generator, dev, like: Tensor) -> Tensor:
    s = torch.randint(0, 2, shape, generator=generator, device=dev).to(device=like.device, dtype=like.dtype)
    return 2 * s - 1


# examples x queries of one call above which auto compiles on the CPU: ~0.1-0.3 ms an eager query there,
# so this is a minute or more of queries, against a compile of 5-20 s that saves 30-55% of it
AUTO_QUERIES = 500_000


class _QueryForward:
    """The forward Square queries with: the model, or its compiled form (`compile=True`).

    A new `torch.compile` wrapper per call costs nothing after the first: dynamo caches the compiled
    code on the model class's forward, guarded on shapes and dtypes, not on the instance. Batches of
    one run eager (a size-1 dimension is specialised: compiling it again would cost seconds for one
    example), and the first failure to compile (no C compiler, an unsupported Python or layer)
    switches to eager for the rest of the process, with one warning.
    """

    broken = False  # set once compiling failed in this process
    warm = False  # a compiled query ran in this process: later calls reuse dynamo's cache

    def __init__(self, model: nn.Module, compile: bool):
        self.model = model
        use = compile and not _QueryForward.broken
        self.compiled: Callable[[Tensor], Tensor] | None = torch.compile(model, dynamic=True) if use else None

    def __call__(self, x: Tensor) -> Tensor:
        if self.compiled is not None and len(x) > 1:
            try:
                out = self.compiled(x)
                _QueryForward.warm = True
                return out
            except Exception as e:  # noqa: BLE001 -- any compiler failure: the eager forward is the same model
                log.warning("square: compiling the model failed (%s: %s); querying it eagerly", type(e).__name__, e)
                self.compiled, _QueryForward.broken = None, True
        return self.model(x)


def _square_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor | None,
    threat: ThreatModel,
    queries: int,
    p_init: float,
    generator: torch.Generator | None,
    compile: bool | None = None,
) -> Best:
    n, c, h, w = x.shape
    forward = _QueryForward(model, auto_compile(x, n * queries) if compile is None else compile)
    dev = sample_on(generator, x.device)
    eps = threat.eps
    x_best = threat.project(x + eps * _rand_sign((n, c, 1, w), generator, dev, x), x)
    with torch.no_grad():
        logits = checked_logits(model, x_best, y, target)
    m, fooled = margin(logits, y, target), success(logits, y, target)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    for i in range(queries - 1):
        idx = (~fooled).nonzero().flatten()
        if idx.numel() == 0:
            break
        k = idx.numel()
        s = min(max(int(round(math.sqrt(p_selection(i, queries, p_init) * h * w))), 1), h, w)
        vh = torch.randint(0, h - s + 1, (k,), generator=generator, device=dev).to(x.device)
        vw = torch.randint(0, w - s + 1, (k,), generator=generator, device=dev).to(x.device)
        in_rows = (rows[None] >= vh[:, None]) & (rows[None] < vh[:, None] + s)
        in_cols = (cols[None] >= vw[:, None]) & (cols[None] < vw[:, None] + s)
        window = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (k, 1, h, w)
        xs, xb = x[idx], x_best[idx]
        x_new = threat.project(torch.where(window, xs + eps * _rand_sign((k, c, 1, 1), generator, dev, x), xb), xs)
        with torch.inference_mode():  # a query: no autograd bookkeeping at all (~15% faster forwards here)
            logits = forward(x_new)
        ts = None if target is None else target[idx]
        m_new, f_new = margin(logits, y[idx], ts), success(logits, y[idx], ts)
        accept = (m_new < m[idx]) | f_new
        x_best[idx] = torch.where(accept.view(-1, 1, 1, 1), x_new, xb)
        m[idx] = torch.where(accept, m_new, m[idx])
        fooled[idx] = fooled[idx] | f_new
    return Best(x_best, -m, fooled)


def auto_compile(x: Tensor, load: int) -> bool:
    """compile=None: compile the queries on the CPU when `load` (examples x queries) is large, or when
    this process compiled already (dynamo's cache makes it free); never where compiling failed."""
    if x.device.type != "cpu" or _QueryForward.broken:
        return False
    if load > AUTO_QUERIES and not _QueryForward.warm:
        log.info(
            "square: %d examples x queries on the CPU: querying a compiled forward (square:compile=false: eagerly)",
            load,
        )
    return load > AUTO_QUERIES or _QueryForward.warm


@attack_entry("square", images=True)
def square(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    queries: int = 5000,
    p_init: float = 0.8,
    restarts: int = 1,
    compile: bool | None = None,
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Square Attack (linf); returns each sample's lowest-margin point found."""

    def run_once(xs: Tensor, ys: Tensor, ts: Tensor | None) -> Best:
        return _square_run(model, xs, ys, ts, threat, queries, p_init, generator, compile)

    return with_restarts(run_once, x, y, target, restarts).x.detach()


@register("square")
@dataclass(frozen=True)
class Square(AttackConfig):
    """Square Attack (`square`); see the module docstring."""

    threat: ThreatModel
    queries: int = 5000
    p_init: float = 0.8
    restarts: int = 1
    compile: bool | None = None  # None: auto (see the module docstring)

    name = "square"
    black_box = True  # the masking gate compares it against the white-box attacks
    norms = ("linf",)
    function = staticmethod(square)

    def __post_init__(self) -> None:
        check_threat(self.threat, self.name, self.norms)
        check_int(f"{self.name} queries", self.queries)
        check_float(f"{self.name} p_init", self.p_init, high=1.0)
        check_int(f"{self.name} restarts", self.restarts)

    def grad_evals(self) -> int:
        return 0

    def forward_evals(self) -> int:
        return self.queries * self.restarts
