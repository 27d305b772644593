"""Accuracy against eps, monotone by construction, with the raw per-eps numbers kept."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from ..attacks import Attack
from ..errors import AdvtuneError
from ..threat import ThreatModel
from .gate import (
    spec_of,
)
from .protocol import (
    robust_accuracy,
)
from .results import EpsCurve, EvalResult

log = logging.getLogger(__name__)


def eps_curve(
    model: nn.Module,
    data,
    attack_factory: Callable[[float], Sequence[Attack] | Attack],
    eps_list: Sequence[float],
    *,
    batch_size: int | None = None,  # None: robust_accuracy's default for the model's device
    generator: torch.Generator | None = None,
    limit: int | None = None,
    gate: bool = True,
) -> EpsCurve:
    """Robust accuracy at each eps (ascending), monotone by construction.

    An example broken at eps_i is broken at every eps_j > eps_i (its adversarial is feasible there),
    so the curve reports robust_j = AND_{i<=j} robust_i. The raw per-eps accuracies are kept; if
    they rise with eps beyond noise the attacks are unreliable and it is flagged in `suspect`.
    eps = 0 gives the clean accuracy. The gate runs once, with the smallest positive eps.
    """
    eps_sorted = sorted({float(e) for e in eps_list})
    if not eps_sorted or any(not math.isfinite(e) or e < 0 for e in eps_sorted):
        raise AdvtuneError(f"eps_list must be non-empty finite numbers >= 0, got {list(eps_list)}")
    positive = [e for e in eps_sorted if e > 0]
    if len(positive) > 1 and isinstance(data, Iterator):
        raise AdvtuneError(
            "eps_curve evaluates the data once per eps: pass an (x, y) pair or a list/DataLoader, "
            "not a one-shot iterator"
        )
    if not positive:
        raise AdvtuneError("eps_list needs at least one eps > 0")
    results: list[EvalResult] = []
    for i, e in enumerate(positive):
        attacks = attack_factory(e)
        attacks = list(attacks) if isinstance(attacks, (list, tuple)) else [attacks]
        for a in attacks:
            if not isinstance(getattr(a, "threat", None), ThreatModel) or not math.isclose(a.threat.eps, e):
                raise AdvtuneError(
                    f"attack_factory({e}) returned {spec_of(a)} for "
                    f"eps={getattr(getattr(a, 'threat', None), 'eps', None)}; build the attacks with "
                    "ThreatModel(norm, eps) from the eps it is given"
                )
        r = robust_accuracy(  # every attack on every example: the raw per-eps numbers stay comparable
            model,
            data,
            attacks,
            batch_size=batch_size,
            generator=generator,
            limit=limit,
            cascade=False,
            gate=gate and i == 0,
        )
        if results and (
            r.n != results[0].n
            or not torch.equal(r.labels, results[0].labels)
            or not torch.equal(r.checksum, results[0].checksum)
        ):
            raise AdvtuneError(
                "the data came in a different order or size on a second pass; eps_curve needs the "
                "same examples in the same order for every eps (no shuffling)"
            )
        results.append(r)
    first = results[0]
    n = first.n
    cum = first.robust.clone()
    by_eps = {0.0: (first.n_clean_correct / n, first.n_clean_correct / n)}
    prev = first.clean_accuracy
    suspect = list(first.suspect)
    for e, r in zip(positive, results):
        cum &= r.robust
        raw = r.worst_case_accuracy
        if raw > prev + max(0.02, 2 / n):
            msg = f"accuracy-rises-with-eps: {prev:.3f} -> {raw:.3f} at eps={e:g} (raw, before monotone repair)"
            log.warning("evaluation may be unreliable: %s", msg)
            suspect.append(msg)
        prev = raw
        by_eps[e] = (cum.sum().item() / n, raw)
    eps_out = eps_sorted
    return EpsCurve(
        eps=eps_out,
        accuracy=[by_eps[e][0] for e in eps_out],
        raw_accuracy=[by_eps[e][1] for e in eps_out],
        clean_accuracy=first.clean_accuracy,
        n=n,
        attacks=[r.attacks for r in results],
        results=results,
        suspect=suspect,
    )
