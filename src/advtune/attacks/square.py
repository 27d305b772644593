"""Square Attack: score-based black-box random search (linf).

Paper: Andriushchenko, Croce, Flammarion & Hein 2020, "Square Attack: a query-efficient black-box
adversarial attack via random search" (Algorithm 1 with the linf sampling of section 3.1).
Start from vertical stripes of +-eps; each iteration sets a random square window (side shrinking on
the paper's p-schedule) of each still-robust sample to x +- eps (one random sign per channel; a proposal
that would not change the point flips a random non-empty set of its channels, as the paper's code
redraws it) and keeps
the change if the margin loss z_y - max_{i!=y} z_i decreased. It only queries the model: no gradients,
so it is the masking gate's witness (a black-box attack must not beat the white-box ones).
Parameters: `queries` (forward passes per sample and restart, the start included), `p_init` (initial
fraction of pixels per square), `restarts` (on samples not yet fooled), `compile` (run the queries
through `torch.compile(model, dynamic=True)`: ~1.3-2x faster forwards on CPU for a VGG on CIFAR-10 and
1.4-2.3x for small-cnn on MNIST after a one-off compile of ~5-20 s, logits equal to ~1e-6, so an accept
decision on a tie can differ from eager; falls back to the eager forward, with a warning, where
compiling fails. Default None = auto: compiled on the CPU when a call's query load, examples x queries,
is above `AUTO_QUERIES` (where the compile pays for itself) or the process already compiled; eager on
other devices, where no gain was measured. true/false force it), `sync_every` (queries between two
host syncs: the survivors are re-found and the random numbers drawn that often; None = auto: 1 on the CPU,
where a sync costs nothing and every query goes to a survivor, `DEVICE_SYNC_EVERY` on a GPU, where a sync
per query idled the device; a different value draws a different, equally strong random stream: every
survivor still gets every query), `graphs` (replay each query as a CUDA graph, captured once per working
set of survivors: the same kernels without a Python launch each; None = auto: on CUDA devices, unless the
queries are compiled; a failed capture falls back to eager queries with a warning).
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

from ..cost import count_forwards, uncounted
from ..devices import out_of_memory
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

# queries between two host syncs on an accelerator (sync_every=None there). Each sync (finding the survivors,
# copying CPU-drawn random numbers over) drains the device's queue, and a query of a few hundred images is a few
# dozen small kernels: one sync per query left a GPU idle most of the time. A point fooled inside a chunk is still
# queried (never changed) until the chunk ends: wasted work, which is cheap where the launches are the cost.
DEVICE_SYNC_EVERY = 32
SHRINK_BELOW = 0.75  # on an accelerator, the working set shrinks to the survivors when at most this share is left


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
                if out_of_memory(e):  # memory, not the compiler: the evaluation's retry in smaller chunks handles it
                    raise
                log.warning("square: compiling the model failed (%s: %s); querying it eagerly", type(e).__name__, e)
                self.compiled, _QueryForward.broken = None, True
        return self.model(x)


class _Queries:
    """The survivors' working set for a stretch of queries: fixed shapes, updated in place, so that on a GPU
    one query can be a CUDA graph replay (`graphed`): a query of a few hundred images is a few dozen small
    kernels, whose launches from Python cost more than the GPU's work (~1.6 ms a query on an H200 for a VGG on
    CIFAR-10, eager). The graph is captured once per working set; a capture that fails (a model that syncs
    with the host inside its forward, say) switches to eager queries for the rest of the process, with one
    warning."""

    broken = False  # set once capturing failed in this process

    def __init__(self, forward, x, x_best, m, fooled, y, target, idx, threat: ThreatModel, graphed: bool):
        self.forward, self.threat, self.idx, self.k = forward, threat, idx, len(idx)
        self.xs, self.xb, self.m, self.fooled = x[idx], x_best[idx], m[idx], fooled[idx]
        self.y, self.target = y[idx], None if target is None else target[idx]
        h, w = x.shape[-2:]
        self.rows, self.cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        # one query's random draws and square side: written before each query, read by the (captured) step
        self.vh = torch.zeros(self.k, dtype=torch.long, device=x.device)
        self.vw = torch.zeros_like(self.vh)
        self.sign = torch.zeros((self.k, x.shape[1], 1, 1), dtype=x.dtype, device=x.device)
        self.flip = torch.ones_like(self.sign)  # -1 in the channels whose sign a no-op proposal flips
        self.side = torch.zeros((), dtype=torch.long, device=x.device)
        self.ran = torch.zeros((), dtype=torch.int32, device=x.device)
        self.graph = self._capture() if graphed and not _Queries.broken else None

    def _step(self) -> None:
        in_rows = (self.rows[None] >= self.vh[:, None]) & (self.rows[None] < (self.vh + self.side)[:, None])
        in_cols = (self.cols[None] >= self.vw[:, None]) & (self.cols[None] < (self.vw + self.side)[:, None])
        window = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (k, 1, h, w)
        x_new = self.threat.project(torch.where(window, self.xs + self.threat.eps * self.sign, self.xb), self.xs)
        # a proposal equal to the current point (its window holds these signs already) would spend a query on
        # nothing: a fifth of them on MNIST. The paper's code redraws the signs until the window changes; here
        # a random non-empty set of channels flips (drawn ahead, uniform over the other sign patterns), which
        # changes every pixel of those channels (clip(x + eps) != clip(x - eps) for eps > 0)
        same = (x_new == self.xb).flatten(1).all(1).view(-1, 1, 1, 1)
        flipped = self.threat.project(
            torch.where(window, self.xs + self.threat.eps * self.sign * self.flip, self.xb), self.xs
        )
        x_new = torch.where(same, flipped, x_new)
        with torch.inference_mode():  # a query: no autograd bookkeeping at all (~15% faster forwards on the CPU)
            logits = self.forward(x_new)
        m_new, f_new = margin(logits, self.y, self.target), success(logits, self.y, self.target)
        accept = ~self.fooled & ((m_new < self.m) | f_new)  # a point once fooled keeps its first success
        self.xb.copy_(torch.where(accept.view(-1, 1, 1, 1), x_new, self.xb))
        self.m.copy_(torch.where(accept, m_new, self.m))
        self.fooled.copy_(self.fooled | f_new)
        self.ran.fill_(1)  # a sentinel the capture check reads: a replay that ran the step sets it

    def _capture(self):
        saved = (self.xb.clone(), self.m.clone(), self.fooled.clone())
        # the warm-up, the capture and the check are set-up: each replay is counted as a query
        with uncounted(self.forward.model):
            try:
                graph = self._try_capture()
            except Exception as e:  # noqa: BLE001 -- any capture failure: the eager queries compute the same
                # not the model's fault: the evaluation's retry in smaller chunks handles it (an out-of-memory error
                # inside a capture can surface as the capture's own failure, with it as the context)
                if any(c is not None and out_of_memory(c) for c in (e, e.__context__, e.__cause__)):
                    raise
                log.warning(
                    "square: capturing a query as a CUDA graph failed (%s: %s); querying eagerly", type(e).__name__, e
                )
                _Queries.broken, graph = True, None
        for kept, value in zip((self.xb, self.m, self.fooled), saved, strict=True):
            kept.copy_(value)  # the warm-up's and the check's queries are undone (they ran on the zeroed draws)
        return graph

    def _try_capture(self):
        device = self.xs.device
        with torch.cuda.device(device):  # the capture stream on the tensors' device, whichever device is current
            before = torch.cuda.current_stream()
            stream = torch.cuda.Stream()
            try:
                stream.wait_stream(before)
                with torch.cuda.stream(stream):  # warm-up on a side stream (lazy inits), as capture needs
                    self._step()
                before.wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                    self._step()
            finally:  # a capture that failed at its end can leave its stream current
                torch.cuda.set_stream(before)
            # a capture on the wrong device or stream records nothing, with only a warning: replay once and check
            self.ran.zero_()
            graph.replay()
            if not bool(self.ran):
                raise RuntimeError("the captured query computed nothing (an empty graph)")
        return graph

    def query(self, vh: Tensor, vw: Tensor, sign: Tensor, flip: Tensor, side: int) -> None:
        self.vh.copy_(vh)
        self.vw.copy_(vw)
        self.sign.copy_(sign)
        self.flip.copy_(flip)
        self.side.fill_(side)
        if self.graph is not None:
            self.graph.replay()
            count_forwards(self.forward.model, self.k)  # the model's hooks ran at the capture, not at a replay
        else:
            self._step()

    def write_back(self, x_best: Tensor, m: Tensor, fooled: Tensor) -> None:
        x_best[self.idx], m[self.idx], fooled[self.idx] = self.xb, self.m, self.fooled


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
    sync_every: int | None = None,
    graphs: bool | None = None,
) -> Best:
    if sync_every is not None:
        check_int("square sync_every", sync_every)
    n, c, h, w = x.shape
    forward = _QueryForward(model, auto_compile(x, n * queries) if compile is None else compile)
    graphed = (x.device.type == "cuda" and forward.compiled is None) if graphs is None else graphs
    chunk = sync_every or (1 if x.device.type == "cpu" else DEVICE_SYNC_EVERY)
    dev = sample_on(generator, x.device)
    x_best = threat.project(x + threat.eps * _rand_sign((n, c, 1, w), generator, dev, x), x)
    with torch.no_grad():
        logits = checked_logits(model, x_best, y, target)
    m, fooled = margin(logits, y, target), success(logits, y, target)
    work: _Queries | None = None
    i = 0
    while i < queries - 1:
        # the survivors are counted (a host sync) once per chunk of queries; inside it the shapes are fixed and
        # the random numbers drawn ahead, so an accelerator runs the chunk without waiting for the host. The
        # working set shrinks to the survivors when any was fooled (one sync per query: the CPU), or on an
        # accelerator when a quarter was (a fooled point is queried on, never changed; each shrink recaptures)
        alive = int((~fooled).sum())
        if alive == 0:
            break
        # (a working set replayed as a graph always follows the accelerator's rule: each shrink is a new capture)
        if work is None or (alive < work.k and ((chunk == 1 and work.graph is None) or alive <= SHRINK_BELOW * work.k)):
            idx = (~fooled).nonzero().flatten()
            work = None  # the old working set's graph and its memory pool go before the new one is captured
            work = _Queries(forward, x, x_best, m, fooled, y, target, idx, threat, graphed)
        sides = [_side(t, queries, p_init, h, w) for t in range(i, min(i + chunk, queries - 1))]
        draws = [
            (
                torch.randint(0, h - s + 1, (work.k,), generator=generator, device=dev),
                torch.randint(0, w - s + 1, (work.k,), generator=generator, device=dev),
                torch.randint(0, 2, (work.k, c, 1, 1), generator=generator, device=dev),
                _flip_draw(work.k, c, generator, dev),
            )
            for s in sides
        ]
        vh, vw, signs, flips = (torch.stack(d).to(x.device) for d in zip(*draws, strict=True))
        signs, flips = 2 * signs.to(x.dtype) - 1, flips.to(x.dtype)
        for j, s in enumerate(sides):
            work.query(vh[j], vw[j], signs[j], flips[j], s)
        work.write_back(x_best, m, fooled)
        i += len(sides)
    return Best(x_best, -m, fooled)


def _flip_draw(k: int, c: int, generator: torch.Generator | None, device) -> Tensor:
    """Per image, -1 in a random non-empty set of the c channels (+1 elsewhere): uniform over the 2^c - 1
    non-empty sets (past 30 channels, random bits with an empty draw flipping every channel)."""
    if c <= 30:
        r = torch.randint(1, 2**c, (k,), generator=generator, device=device)
        bits = (r[:, None] >> torch.arange(c, device=device)) & 1
    else:
        bits = torch.randint(0, 2, (k, c), generator=generator, device=device)
        bits = torch.where(bits.sum(1, keepdim=True) == 0, 1, bits)  # no boolean indexing: no host sync
    return (1 - 2 * bits).view(k, c, 1, 1)


def _side(i: int, queries: int, p_init: float, h: int, w: int) -> int:
    """Side of iteration i's square, in pixels: at least 1, at most the image."""
    return min(max(int(round(math.sqrt(p_selection(i, queries, p_init) * h * w))), 1), h, w)


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
    sync_every: int | None = None,
    graphs: bool | None = None,
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Square Attack (linf); returns each sample's lowest-margin point found."""

    def run_once(xs: Tensor, ys: Tensor, ts: Tensor | None) -> Best:
        return _square_run(model, xs, ys, ts, threat, queries, p_init, generator, compile, sync_every, graphs)

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
    sync_every: int | None = None  # None: 1 on the CPU, DEVICE_SYNC_EVERY elsewhere (see the module docstring)
    graphs: bool | None = None  # None: CUDA graphs on a CUDA device unless the queries are compiled

    name = "square"
    black_box = True  # the masking gate compares it against the white-box attacks
    norms = ("linf",)
    function = staticmethod(square)

    def __post_init__(self) -> None:
        check_threat(self.threat, self.name, self.norms)
        check_int(f"{self.name} queries", self.queries)
        check_float(f"{self.name} p_init", self.p_init, high=1.0)
        check_int(f"{self.name} restarts", self.restarts)
        if self.sync_every is not None:
            check_int(f"{self.name} sync_every", self.sync_every)

    def grad_evals(self) -> int:
        return 0

    def forward_evals(self) -> int:
        return self.queries * self.restarts
