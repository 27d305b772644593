"""The threat model: the only place in advtune that knows perturbation geometry.

A `ThreatModel` is a norm ball of radius `eps` around each clean input, intersected with the pixel
box [lower, upper]. Attacks never compute norms, projections or step directions themselves; they ask
the threat model (`project`, `random_start`, `steepest_step`, `distance`, `check`), so adding a norm
means editing this file only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .errors import AdvtuneError
from .seeding import sample_on

NORMS = ("linf", "l2")
_TINY = 1e-12  # guards divisions by a zero norm


@dataclass(frozen=True)
class ThreatModel:
    """Perturbations allowed to the attacker: ``||x_adv - x||_norm <= eps`` and ``lower <= x_adv <= upper``.

    Inputs live in pixel space (see DESIGN.md): eps is in the same units as the pixels, e.g. 8/255.
    For ``linf`` eps must not exceed ``upper - lower`` (a larger ball already covers the whole box).
    """

    norm: Literal["linf", "l2"] = "linf"
    eps: float = 8 / 255
    lower: float = 0.0
    upper: float = 1.0

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise AdvtuneError(f"unknown threat norm {self.norm!r}; use one of {', '.join(NORMS)}")
        for name in ("eps", "lower", "upper"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise AdvtuneError(f"threat model {name} must be a finite number, got {v!r}; e.g. eps=8/255")
            object.__setattr__(self, name, float(v))  # ints are accepted, stored as floats
        if not self.lower < self.upper:
            raise AdvtuneError(
                f"threat model needs lower < upper, got [{self.lower}, {self.upper}]; pixel space is [0, 1]"
            )
        if self.eps <= 0:
            raise AdvtuneError(f"eps must be > 0, got {self.eps}; e.g. eps=8/255 (linf) or eps=0.5 (l2)")
        if self.norm == "linf" and self.eps > self.upper - self.lower:
            raise AdvtuneError(
                f"linf eps={self.eps} exceeds the pixel range {self.upper - self.lower}; "
                "eps is in pixel units: write 8/255, not 8"
            )

    # ------------------------------------------------------------ helpers

    @classmethod
    def linf(cls, eps: float, lower: float = 0.0, upper: float = 1.0) -> "ThreatModel":
        """``ThreatModel.linf(8/255)``: every pixel may move by at most eps."""
        return cls("linf", eps, lower, upper)

    @classmethod
    def l2(cls, eps: float, lower: float = 0.0, upper: float = 1.0) -> "ThreatModel":
        """``ThreatModel.l2(0.5)``: the perturbation's Euclidean norm is at most eps."""
        return cls("l2", eps, lower, upper)

    def with_eps(self, eps: float) -> "ThreatModel":
        """The same threat model with another radius (validated)."""
        return dataclasses.replace(self, eps=eps)

    def to_json(self) -> dict:
        return {"norm": self.norm, "eps": self.eps, "lower": self.lower, "upper": self.upper}

    def __str__(self) -> str:
        return f"{self.norm} eps={self.eps:.6g}"

    # ------------------------------------------------------------ geometry

    def distance(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Per-sample norm of the perturbation, shape (N,)."""
        return self._norm(x_adv - x)

    def normalize(self, v: Tensor) -> Tensor:
        """Scale each sample of `v` to unit norm (zero stays zero)."""
        n = self._norm(v)
        return v / (n.view(-1, *[1] * (v.dim() - 1)) + _TINY)

    def steepest_step(self, grad: Tensor, step: float | Tensor) -> Tensor:
        """The step of length `step` that increases a linear loss most: sign(g) for linf, g/||g||_2 for l2.

        Non-finite gradient entries are treated as zero so a broken gradient never produces NaN
        pixels; the masking gate in `evaluate` reports such gradients separately.
        """
        g = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        if self.norm == "linf":
            return step * g.sign()
        return step * self.normalize(g)

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Map `x_adv` into the eps-ball around `x` intersected with the box [lower, upper].

        For l2 this shrinks the perturbation onto the ball, then clips to the box; clipping only
        moves coordinates towards x (which lies in the box), so the result stays in the ball.
        """
        if self.norm == "linf":
            x_adv = torch.minimum(torch.maximum(x_adv, x - self.eps), x + self.eps)
        else:
            delta = x_adv - x
            n = self._norm(delta)
            factor = torch.clamp(self.eps / (n + _TINY), max=1.0)
            x_adv = x + delta * factor.view(-1, *[1] * (x.dim() - 1))
        return x_adv.clamp(self.lower, self.upper)

    def random_start(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A random point of the threat model around `x`.

        linf: uniform in the cube. l2: uniform in the ball (a Gaussian direction, radius eps*u^(1/d)).
        Random numbers are drawn on the generator's device, then moved, so a seed gives the same
        points on any device.
        """
        dev = sample_on(generator, x.device)
        if self.norm == "linf":
            u = torch.rand(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
            delta = (2 * u - 1) * self.eps
        else:
            d = max(x[0].numel(), 1) if len(x) else 1
            direction = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
            r = torch.rand(len(x), generator=generator, device=dev, dtype=x.dtype).to(x.device)
            radius = self.eps * r.pow(1.0 / d)
            delta = self.normalize(direction) * radius.view(-1, *[1] * (x.dim() - 1))
        return self.project(x + delta, x)

    def check(self, x_adv: Tensor, x: Tensor, atol: float = 1e-6, what: str = "x_adv") -> None:
        """Raise AdvtuneError if `x_adv` leaves the threat model (outside the ball or the box, NaN, shape)."""
        half = x.dtype in (torch.float16, torch.bfloat16)
        u = torch.finfo(x.dtype).eps if x.is_floating_point() else 0.0
        if half:  # a half-precision model's inputs: rounding, not a bug
            atol = max(atol, u / 2)  # half a unit in the last place at 1.0
        ball = atol
        if self.norm == "l2" and x.numel() and self.eps > 0:
            d = x[0].numel()
            if half:  # the rescale rounds (~eps*u), and every pixel rounds on its own: ||r||^2 / (2 eps)
                ball = atol + 2 * self.eps * u + d * (u / 4) ** 2 / (2 * self.eps)
            else:  # float32: the norm's accumulation errs relative to eps (a 224x224 image at eps 3: ~1e-4)
                ball = atol + self.eps * u * math.sqrt(d) + math.sqrt(d) * u / 4
        if x_adv.shape != x.shape:
            raise AdvtuneError(
                f"{what} has shape {tuple(x_adv.shape)} but the clean input has {tuple(x.shape)}; "
                "an attack must return one adversarial per input"
            )
        if x_adv.device != x.device or x_adv.dtype != x.dtype:
            raise AdvtuneError(
                f"{what} is {x_adv.dtype} on {x_adv.device} but the input is {x.dtype} on {x.device}; "
                "an attack must keep the input's dtype and device"
            )
        if x_adv.numel() == 0:
            return
        if not torch.isfinite(x_adv).all():
            raise AdvtuneError(f"{what} contains NaN or inf: the attack is broken (a bug, please report it)")
        dist = self._norm((x_adv.float() - x.float()).double()).max().item()  # not rounded again in a half dtype
        if dist > self.eps + ball:
            raise AdvtuneError(
                f"{what} is outside the {self.norm} ball: max distance {dist:.8g} > eps {self.eps:.8g} "
                f"(+{ball:g}); the attack is broken (a bug, please report it)"
            )
        lo, hi = x_adv.min().item(), x_adv.max().item()
        if lo < self.lower - atol or hi > self.upper + atol:
            raise AdvtuneError(
                f"{what} leaves the pixel box [{self.lower}, {self.upper}]: values in [{lo:.8g}, {hi:.8g}]; "
                "the attack is broken (a bug, please report it)"
            )

    def _norm(self, v: Tensor) -> Tensor:
        f = v.flatten(1)
        if self.norm == "linf":
            return f.abs().amax(dim=1) if f.shape[1] else f.new_zeros(len(f))
        return f.norm(p=2, dim=1)
