"""Robust accuracy: every attack on every clean-correct example (or cascaded), the worst case per
example, counted costs, the threat model checked after each attack, then the gate."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from numbers import Integral

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from ..attacks import APGD, APGDT, FGSM, PGD, Attack, Square, logits_of
from ..cost import PassCounter
from ..data import TensorData
from ..devices import eval_mode, model_device, model_dtype, out_of_memory
from ..distributed import all_gather, all_max, all_sum, broadcast, on_main, rank_and_world
from ..errors import AdvtuneError
from ..inputs import batches, check_devices, data_device
from ..progress import progress
from ..seeding import batch_generator
from ..threat import ThreatModel
from .gate import (
    GATE_SAMPLES,
    is_black_box,
    masking_gate,
    spec_of,
)
from .results import EvalResult

log = logging.getLogger(__name__)


def suite(name: str, threat: ThreatModel) -> list[Attack]:
    """Named attack lists. standard: APGD-CE, APGD-T, Square (AutoAttack without FAB; Square is linf
    only, so the l2 suite has no black-box attack). quick: FGSM and PGD-20."""
    if name == "standard":
        attacks: list[Attack] = [APGD(threat, loss="ce"), APGDT(threat)]
        if threat.norm == "linf":
            attacks.append(Square(threat))
        else:
            log.info("standard suite for %s: Square is linf-only, running APGD-CE and APGD-T", threat.norm)
        return attacks
    if name == "quick":
        return [FGSM(threat), PGD(threat, steps=20)]
    raise AdvtuneError(f"unknown suite {name!r}; valid suites: {', '.join(SUITES)}")


SUITES = ("standard", "quick")


def compiled_queries(attacks: Sequence[Attack], compile: bool | None = True) -> list[Attack]:
    """The same attacks with the black-box ones (Square) querying a compiled forward (`compile=True`),
    the eager one (False), or deciding by their query load (None: auto, their default)."""
    return [
        dataclasses.replace(a, compile=compile)
        if dataclasses.is_dataclass(a) and any(f.name == "compile" for f in dataclasses.fields(a))
        else a  # (an attack of your own need not be a dataclass)
        for a in attacks
    ]


def with_compile(attacks: Sequence[Attack], compile: bool | None, said: str) -> list[Attack]:
    """The attacks with the compile choice applied (None: auto, as they are); a choice with no attack to take it is
    refused, named as the caller says it (`said`: the command's flag, the API's keyword): it would change nothing."""
    if compile is None:
        return list(attacks)
    if not any(hasattr(a, "compile") for a in attacks):
        norms = {getattr(getattr(a, "threat", None), "norm", "linf") for a in attacks}
        l2 = " (Square is linf-only: the standard suite drops it for l2)" if norms - {"linf"} else ""
        raise AdvtuneError(f"{said} decides how Square queries the model; these attacks have no Square{l2}: drop it")
    return compiled_queries(attacks, compile)


def may_compile(attacks: Sequence[Attack], device: torch.device) -> bool:
    """Whether an attack may torch.compile on `device`: forced (compile=True), or auto (None, Square's
    default), which compiles on the CPU only. Elsewhere importing dynamo (1.5-3 s) would be time lost."""
    modes = {a.compile for a in attacks if hasattr(a, "compile")}
    return True in modes or (None in modes and device.type == "cpu")


def default_batch_size(device: torch.device) -> int:
    """Examples per batch of an evaluation when none is given: 256 on the CPU; 1000 on an accelerator, where a
    batch of a few hundred images leaves the device waiting on kernel launches and every batch runs its own
    attack loops (measured on an H200: docs/benchmarks.md). Where 1000 does not fit, the out-of-memory retry
    halves it, and says so."""
    return 256 if device.type == "cpu" else 1000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # honest wall times on asynchronous devices
        torch.cuda.synchronize(device)


def _length(data) -> int | None:
    """How many examples `data` holds, when that is known without reading it (for progress)."""
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor):
        return len(data[0])
    return len(data) if isinstance(data, TensorData) else None  # a DataLoader's len counts batches


def _num_classes(model: nn.Module, x: Tensor) -> int:
    """First forward on a tiny batch: shape errors become a message a person can act on."""
    with torch.inference_mode():
        return logits_of(model, x[:2]).shape[1]


def check_attacks(attacks) -> list[Attack]:
    if not isinstance(attacks, (list, tuple)):
        attacks = [attacks]
    if not attacks:
        raise AdvtuneError("no attacks given; pass e.g. suite('standard', threat) or [build_attack('pgd', threat)]")
    for a in attacks:
        if not callable(a) or not isinstance(getattr(a, "threat", None), ThreatModel) or not hasattr(a, "grad_evals"):
            raise AdvtuneError(f"{a!r} is not an attack; build one with build_attack('pgd', threat)")
    threats = {a.threat for a in attacks}
    if len(threats) > 1:
        raise AdvtuneError(
            f"all attacks must share one threat model, got {', '.join(map(str, threats))}; "
            "evaluate each threat model separately (or use eps_curve)"
        )
    specs = [spec_of(a) for a in attacks]
    dup = {s for s in specs if specs.count(s) > 1}
    if dup:
        raise AdvtuneError(f"attack {sorted(dup)[0]!r} appears twice in the list; remove the duplicate")
    return list(attacks)


@dataclass
class _Tally:
    """One attack's running totals over the batches."""

    grads: int = 0
    fwds: int = 0
    seconds: float = 0.0
    max_pert: float = 0.0
    status: list[Tensor] = field(default_factory=list)  # per batch, int8 per example


@dataclass
class _Batch:
    """What one batch of the evaluation found, per example (CPU), kept to reassemble the batches in order."""

    index: int
    correct: Tensor
    labels: Tensor
    checksum: Tensor
    status: dict[str, Tensor] = field(default_factory=dict)  # per attack: -1 not attacked, 0 held, 1 broken
    probe: tuple[Tensor, Tensor, Tensor] | None = None  # gate candidates: x, y, example index


def _attack_once(
    model: nn.Module,
    attack: Attack,
    spec: str,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    generator,
    counter: PassCounter,
    tally: _Tally,
) -> Tensor:
    """Run one attack on (x, y), check its output against the threat model, return which it broke."""
    device = x.device
    _sync(device)
    t0 = time.perf_counter()
    x_adv = attack(model, x, y, generator=generator)
    _sync(device)
    tally.seconds += time.perf_counter() - t0
    g, f = counter.take()
    tally.grads, tally.fwds = tally.grads + g, tally.fwds + f
    if not isinstance(x_adv, Tensor):
        raise AdvtuneError(f"attack {spec} returned {type(x_adv).__name__}, not a tensor")
    threat.check(x_adv, x, what=f"{spec} output")  # a violation is a bug in the attack: raise
    tally.max_pert = max(tally.max_pert, threat.distance(x_adv, x).max().item())
    with torch.inference_mode():
        hit = model(x_adv).argmax(1) != y
    counter.take()  # the verification forward is not the attack's cost
    return hit


def _attack_fitting(
    model: nn.Module,
    attack: Attack,
    spec: str,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    generator,
    counter: PassCounter,
    tally: _Tally,
    fit: dict,
) -> Tensor:
    """`_attack_once` in chunks that fit the device: out of memory, the chunk halves (said once per size)
    and stays halved for the rest of the evaluation (`fit`), so one big batch does not fail a long run.
    A failed try's passes and time count; the generator is rewound, so the retry draws what the try drew
    (a split batch still draws differently from a whole one, as with any other batch size)."""
    n, chunk = len(x), min(len(x), fit.get(spec) or len(x))
    hits, i = [], 0
    while i < n:
        j = min(n, i + chunk)
        state = generator.get_state() if generator is not None else None
        t0 = time.perf_counter()
        try:
            hits.append(_attack_once(model, attack, spec, x[i:j], y[i:j], threat, generator, counter, tally))
            i = j
            continue
        except Exception as e:
            if not out_of_memory(e):
                raise
        # out of memory (outside the except block, so the failed try's tensors are released first)
        g, f = counter.take()
        tally.grads, tally.fwds = tally.grads + g, tally.fwds + f
        tally.seconds += time.perf_counter() - t0
        if state is not None:
            generator.set_state(state)
        if x.is_cuda:
            torch.cuda.empty_cache()
        if j - i == 1:
            raise AdvtuneError(
                f"{spec}: out of memory on {x.device} even for one example; free the device or use a "
                "smaller model or another device"
            )
        chunk = fit[spec] = max(1, (j - i) // 2)
        log.warning(
            "%s: out of memory on %d examples (%s); retrying %d at a time (a smaller --batch-size avoids the retries)",
            spec,
            j - i,
            x.device,
            chunk,
        )
    return torch.cat(hits)


def first_examples(pairs: Iterable[tuple[Tensor, Tensor]], limit: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    """The batches up to `limit` examples, stopping before the next is read: examples past it are never read or
    validated (a DataLoader's next batch may hold anything)."""
    n = 0
    for x, y in pairs:
        if limit is not None:
            x, y = x[: limit - n], y[: limit - n]
        n += len(x)
        yield x, y
        if limit is not None and n >= limit:
            return


def robust_accuracy(
    model: nn.Module,
    data,
    attacks: Sequence[Attack] | Attack,
    *,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    limit: int | None = None,
    cascade: bool = True,
    gate: bool = True,
) -> EvalResult:
    """Clean, per-attack and worst-case robust accuracy of `model` on `data`, with costs and the masking gate.

    data: an (x, y) tensor pair (float in [0, 1]) or any iterable of (x, y) batches.
    attacks: attacks sharing one threat model (e.g. `suite("standard", threat)`).
    limit: evaluate at most this many examples. The model runs in eval mode (restored afterwards).
    cascade: run each attack only on the examples still robust, cheapest first and black-box attacks last
        (AutoAttack's protocol, the default; per-attack numbers cumulative). False: every attack on every
        clean-correct example (per-attack numbers comparable).
    gate: run `masking_gate` afterwards and record its findings in `EvalResult.suspect`.
    batch_size: examples per batch; None: `default_batch_size` of the model's device.
    """
    attacks = check_attacks(attacks)
    if cascade:  # the cheapest attack breaks the easy examples, so the expensive ones see fewer
        attacks = sorted(attacks, key=lambda a: (is_black_box(a), int(a.grad_evals())))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise AdvtuneError(f"generator must be a torch.Generator (or None), got {type(generator).__name__}")
    threat = attacks[0].threat
    specs = [spec_of(a) for a in attacks]
    # numbers.Integral: numpy integers too (harden's limit_test took them, evaluate's limit did not)
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1
    ):
        raise AdvtuneError(f"batch_size must be a positive integer, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, Integral) or limit < 1):
        raise AdvtuneError(f"limit must be a positive integer or None, got {limit!r}")
    batch_size, limit = (None if v is None else int(v) for v in (batch_size, limit))
    device, dtype = model_device(model), model_dtype(model)
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    check_devices(device, data_device(data))  # a meta model (or meta data): one line, not a failed .item()
    lazy = [n for n, m in model.named_modules() if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:  # built under inference mode its weights could never train; the message blamed the input shape
        raise AdvtuneError(
            f"layer {lazy[0]!r} is a lazy module not built yet: run one forward pass first (model(x[:1]))"
        )
    started = time.perf_counter()
    counter = PassCounter()
    tallies = {s: _Tally() for s in specs}
    rank, world = rank_and_world()
    n, classes = 0, None
    done: list[_Batch] = []  # this rank's batches; under torch.distributed batch b belongs to rank b % world
    n_probe = 0
    fit: dict[str, int] = {}  # per attack: the largest chunk known to fit the device after an OOM

    n_known = _length(data)
    total = None if n_known is None else -(-min(n_known, limit or n_known) // batch_size)
    n_clean = n_alive = n_mine = 0
    # Square may compile: load dynamo before the counter's hook, which then stays out of compiled code
    # (PassCounter.attached); traced, its changing count recompiled every call
    if may_compile(attacks, device):
        importlib.import_module("torch._dynamo")
    with eval_mode(model), counter.attached(model):
        bar = progress(
            first_examples(batches(data, batch_size, lower=threat.lower, upper=threat.upper, device=device), limit),
            desc="evaluate",
            total=total,
        )
        for b, (xb, yb) in enumerate(bar):
            if limit is not None:
                if n >= limit:
                    break
                xb, yb = xb[: limit - n], yb[: limit - n]
            if len(xb) == 0:
                continue
            offset, n = n, n + len(xb)
            if b % world != rank:
                continue
            xb, yb = xb.to(device=device, dtype=dtype), yb.to(device=device, dtype=torch.long)
            if classes is None:
                classes = _num_classes(model, xb)
            if yb.min().item() < 0 or yb.max().item() >= classes:
                raise AdvtuneError(
                    f"labels must be in [0, {classes - 1}] for a model with {classes} outputs, got "
                    f"values in [{yb.min().item()}, {yb.max().item()}]"
                )
            with torch.inference_mode():
                correct = logits_of(model, xb).argmax(1) == yb  # every batch checked: the last may be odd-sized
            counter.take()
            idx_c = correct.nonzero().flatten()
            xc, yc = xb[idx_c], yb[idx_c]
            batch = _Batch(b, correct.cpu(), yb.cpu(), xb.flatten(1).double().sum(1).cpu())
            # the gate's probe: the first clean-correct examples overall; a rank's share of them is a
            # prefix of its own, so no rank keeps more than GATE_SAMPLES
            need = GATE_SAMPLES - n_probe
            if need > 0 and len(idx_c):
                batch.probe = (xc[:need].cpu(), yc[:need].cpu(), (idx_c[:need] + offset).cpu())
                n_probe += len(batch.probe[1])
            # random attacks draw from a stream of their batch's own, so the numbers do not depend on how
            # the batches were split over processes
            gen = batch_generator(generator, b)
            alive = torch.ones(len(xc), dtype=torch.bool, device=device)
            for a, s in zip(attacks, specs):
                status = torch.full((len(xb),), -1, dtype=torch.int8)  # -1: not attacked
                run = alive.nonzero().flatten() if cascade else torch.arange(len(xc), device=device)
                if len(run) and hasattr(bar, "set_postfix"):  # what the heartbeat's line says while it runs
                    bar.set_postfix(refresh=False, running=f"{s} on {len(run)} of batch {b + 1}")
                if len(run):
                    hit = _attack_fitting(model, a, s, xc[run], yc[run], threat, gen, counter, tallies[s], fit)
                    alive[run[hit]] = False
                    status[idx_c[run].cpu()] = hit.to(torch.int8).cpu()
                batch.status[s] = status
                if hasattr(bar, "set_postfix"):  # a batch of strong attacks takes minutes: say where it is
                    bar.set_postfix(robust=f"{int(alive.sum())}/{len(xb)} of batch {b + 1} after {s}")
            done.append(batch)
            n_mine += len(xb)
            n_clean, n_alive = n_clean + len(idx_c), n_alive + int(alive.sum())
            if hasattr(bar, "set_postfix"):  # what the log line (or the bar) says so far
                bar.set_postfix(refresh=False, clean=f"{n_clean / n_mine:.1%}", robust=f"{n_alive / n_mine:.1%}", n=n)

        if n == 0:
            raise AdvtuneError("no examples to evaluate (empty data); check the dataset split or the limit")
        if world > 1:  # every rank's batches, back in order; costs summed, times and perturbations the max
            done = sorted((bt for part in all_gather(done) for bt in part), key=lambda bt: bt.index)
            for s in specs:
                t = tallies[s]
                t.grads, t.fwds = (int(v) for v in all_sum([t.grads, t.fwds]))
                t.seconds, t.max_pert = all_max([t.seconds, t.max_pert])
            fits = all_gather(fit)  # a rank's chunk after its out-of-memory halving: the smallest is recorded
            fit = {s: min(f[s] for f in fits if s in f) for s in specs if any(s in f for f in fits)}
        for bt in done:
            for s in specs:
                tallies[s].status.append(bt.status[s])
        result = _summarise(
            threat,
            specs,
            tallies,
            torch.cat([bt.correct for bt in done]),
            torch.cat([bt.labels for bt in done]),
            torch.cat([bt.checksum for bt in done]),
            generator,
            cascade,
        )
        result.batch_size = batch_size
        result.attack_chunks = dict(fit)
        log.info(
            "clean %.4f, worst case %.4f over %s (n=%d, %s)",
            result.clean_accuracy,
            result.worst_case_accuracy,
            ", ".join(specs),
            n,
            threat,
        )
        result.gated = bool(gate)
        if gate:
            probes = [bt.probe for bt in done if bt.probe is not None]

            def cat(i: int, on: torch.device | str = device):
                return torch.cat([p[i] for p in probes])[:GATE_SAMPLES].to(on) if probes else None

            def run_gate():
                suspect = masking_gate(
                    model,
                    cat(0),
                    cat(1),
                    threat,
                    result,
                    attacks=attacks,
                    probe_idx=cat(2, "cpu"),  # positions in the per-example records, which stay on the CPU
                    generator=generator,
                )
                return suspect, counter.take()[0]

            # rank 0 runs the gate on the same probe one process would use; every rank gets its verdict
            result.suspect, result.gate_grad_evals = broadcast(on_main(run_gate))
    _sync(device)
    result.total_wall_s = time.perf_counter() - started
    return result


def _summarise(
    threat: ThreatModel,
    specs: list[str],
    tallies: dict[str, _Tally],
    clean: Tensor,
    labels: Tensor,
    checksum: Tensor,
    generator,
    cascade: bool,
) -> EvalResult:
    broken = {s: torch.cat(tallies[s].status) for s in specs}
    n_correct = int(clean.sum())
    robust, n_robust = clean.clone(), {}
    for s in specs:
        robust &= broken[s] != 1
        # cascade: cumulative (robust to this attack and every earlier one); full: this attack alone
        n_robust[s] = int(robust.sum()) if cascade else n_correct - int((broken[s] == 1).sum())
    return EvalResult(
        threat=threat,
        attacks=specs,
        n=len(clean),
        n_clean_correct=n_correct,
        n_robust=n_robust,
        n_robust_worst=int(robust.sum()),
        grad_evals={s: t.grads for s, t in tallies.items()},
        forward_evals={s: t.fwds for s, t in tallies.items()},
        wall_time_s={s: t.seconds for s, t in tallies.items()},
        max_perturbation={s: t.max_pert for s, t in tallies.items()},
        seed=None if generator is None else generator.initial_seed(),
        cascade=cascade,
        robust=robust,
        broken=broken,
        labels=labels,
        checksum=checksum,
    )
