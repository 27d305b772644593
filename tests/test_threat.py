"""ThreatModel: validation, projection, random starts, steps and the bound check."""

from __future__ import annotations

import math

import pytest
import torch

from advtune.errors import AdvtuneError
from advtune.threat import ThreatModel

NORMS = ["linf", "l2"]


def _eps(norm: str) -> float:
    return 0.1 if norm == "linf" else 1.0


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("eps", [0.0, -0.1])
def test_eps_not_positive_is_rejected(eps):
    with pytest.raises(AdvtuneError, match="eps must be > 0"):
        ThreatModel("linf", eps)


def test_linf_eps_larger_than_pixel_range_is_rejected():
    with pytest.raises(AdvtuneError, match="exceeds the pixel range.*8/255"):
        ThreatModel("linf", 8)


def test_l2_eps_may_exceed_the_pixel_range():
    assert ThreatModel("l2", 3.0).eps == 3.0


def test_unknown_norm_is_rejected():
    with pytest.raises(AdvtuneError, match="unknown threat norm 'l1'"):
        ThreatModel("l1", 0.1)


@pytest.mark.parametrize("eps", [float("nan"), float("inf"), "0.1", True])
def test_non_numeric_eps_is_rejected(eps):
    with pytest.raises(AdvtuneError, match="finite number"):
        ThreatModel("linf", eps)


def test_empty_box_is_rejected():
    with pytest.raises(AdvtuneError, match="lower < upper"):
        ThreatModel("linf", 0.1, lower=1.0, upper=0.0)


def test_int_eps_is_stored_as_float_and_the_model_is_frozen():
    t = ThreatModel("l2", 1)
    assert isinstance(t.eps, float)
    with pytest.raises(AttributeError):
        t.eps = 2.0
    assert t.with_eps(0.5) == ThreatModel("l2", 0.5)
    assert t.to_json() == {"norm": "l2", "eps": 1.0, "lower": 0.0, "upper": 1.0}


# ------------------------------------------------------------------ geometry


@pytest.mark.parametrize("norm", NORMS)
def test_project_lands_in_ball_and_box_and_is_idempotent(norm, gen):
    t = ThreatModel(norm, _eps(norm))
    x = torch.rand(6, 1, 5, 5, generator=gen)
    far = x + 3 * torch.randn(x.shape, generator=gen)
    p = t.project(far, x)
    assert (t.distance(p, x) <= t.eps + 1e-6).all()
    assert p.min() >= 0 and p.max() <= 1
    assert torch.allclose(t.project(p, x), p, atol=1e-7)
    inside = t.project(x + 1e-3 * torch.randn(x.shape, generator=gen), x)
    assert torch.allclose(t.project(inside, x), inside)  # points already inside do not move


@pytest.mark.parametrize("norm", NORMS)
def test_random_start_is_inside_and_seeded(norm):
    t = ThreatModel(norm, _eps(norm))
    x = torch.full((50, 1, 4, 4), 0.5)
    a = t.random_start(x, torch.Generator().manual_seed(3))
    b = t.random_start(x, torch.Generator().manual_seed(3))
    c = t.random_start(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    t.check(a, x)
    d = t.distance(a, x)
    assert d.min() > 0
    if norm == "l2":  # uniform in the ball: radii spread out, not all on the sphere
        assert d.min() < 0.95 * t.eps


def test_l2_random_start_radius_is_uniform_in_volume():
    x = torch.full((4000, 2), 0.5)  # 2-D points; radius 0.4 around 0.5 never touches the box
    t = ThreatModel("l2", 0.4)
    r = t.distance(t.random_start(x, torch.Generator().manual_seed(0)), x) / t.eps
    # in d=2, P(r <= s) = s^2
    assert abs((r <= 0.5).float().mean().item() - 0.25) < 0.03


def test_steepest_step_linf_is_sign_and_l2_has_the_step_length(gen):
    g = torch.randn(4, 3, 2, 2, generator=gen)
    g[0] = 0
    g[1, 0, 0, 0] = float("nan")
    s = ThreatModel("linf", 0.1).steepest_step(g, 0.2)
    assert torch.equal(s[2:], 0.2 * g[2:].sign())
    assert (s[0] == 0).all() and s[1, 0, 0, 0] == 0  # zero and NaN gradients give no move
    s2 = ThreatModel("l2", 1.0).steepest_step(g, 0.2)
    assert torch.allclose(s2[2:].flatten(1).norm(dim=1), torch.full((2,), 0.2))
    assert (s2[0] == 0).all() and torch.isfinite(s2).all()


def test_distance_per_sample():
    x = torch.zeros(2, 4)
    xa = torch.tensor([[0.3, -0.4, 0.0, 0.0], [0.0, 0.0, 0.1, 0.0]])
    assert torch.allclose(ThreatModel("linf", 0.5).distance(xa, x), torch.tensor([0.4, 0.1]))
    assert torch.allclose(ThreatModel("l2", 0.5).distance(xa, x), torch.tensor([0.5, 0.1]))


def test_check_accepts_the_boundary_and_rejects_violations():
    t = ThreatModel("linf", 0.25)
    x = torch.full((2, 4), 0.5)
    t.check(x + 0.25, x)
    with pytest.raises(AdvtuneError, match="outside the linf ball"):
        t.check(x + 0.25 + 1e-4, x)
    with pytest.raises(AdvtuneError, match="pixel box"):
        t.check(torch.full((2, 4), -0.1), torch.full((2, 4), 0.1))
    with pytest.raises(AdvtuneError, match="NaN"):
        t.check(torch.full((2, 4), float("nan")), x)
    with pytest.raises(AdvtuneError, match="shape"):
        t.check(x[:1], x)
    with pytest.raises(AdvtuneError, match="keep the input's dtype and device"):
        t.check(x.double(), x)


def test_l2_check_uses_the_euclidean_norm():
    t = ThreatModel("l2", 0.5)
    x = torch.full((1, 4), 0.5)
    t.check(x + 0.25, x)  # ||(0.25,)*4||_2 = 0.5
    with pytest.raises(AdvtuneError, match="outside the l2 ball"):
        t.check(x + 0.26, x)
    assert math.isclose(t.distance(x + 0.25, x).item(), 0.5, rel_tol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "shape", "eps"),
    [(torch.float32, (3, 160, 160), 3.0), (torch.bfloat16, (3, 32, 32), 1.0), (torch.bfloat16, (3, 32, 32), 0.5)],
)
def test_the_l2_ball_check_allows_rounding_and_still_catches_an_attack_outside(dtype, shape, eps):
    """A fixed 1e-6 called correct l2 attacks broken: on large images (a 160x160 float32 image at eps 3 rounds to
    ~1e-6 over) and in bfloat16 (each pixel rounds on its own: the check is rounding-limited there); a perturbation
    10% outside is still refused."""
    from torch import nn

    from advtune.attacks import build_attack

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(torch.Size(shape).numel(), 10)).to(dtype)
    x = (torch.rand(4, *shape) * 0.8 + 0.1).to(dtype)
    threat = ThreatModel("l2", eps)
    for spec in ("fgsm", "pgd:steps=3"):
        threat.check(build_attack(spec, threat)(model, x, model(x).argmax(1)), x)
    direction = torch.randn(4, *shape)
    outside = x.float() + 1.10 * eps * direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    with pytest.raises(AdvtuneError, match="outside the l2 ball"):
        threat.check(outside.to(dtype), x)
