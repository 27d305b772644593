"""Attacks: properties parametrized over the registry, strength with tolerances, references, error paths."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advtune.attacks import (
    APGD,
    FGSM,
    PGD,
    Square,
    attack_class,
    attack_params,
    build_attack,
    list_attacks,
    register_attack,
)
from advtune.attacks.apgd import checkpoints, oscillating
from advtune.errors import AdvtuneError
from advtune.threat import ThreatModel
from conftest import TinyCNN

EPS = {"linf": 0.15, "l2": 1.5}
# the registry as every entry point sees it (advtune.evaluation registers `transfer`): the cases are then the
# same whichever other test files were collected first (they once depended on it). `transfer` crafts on
# another saved run (source=<folder>): tests/test_transfer.py covers it
importlib.import_module("advtune.evaluation")
ATTACKS = [name for name in list_attacks() if name != "transfer"]
CASES = [(name, norm) for name in ATTACKS for norm in attack_class(name).norms]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids spin-wait stalls when the 2 cores are shared."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def cheap(name: str, threat: ThreatModel, **extra):
    """The registered attack with a small budget (restarts=2 where possible, to exercise restarts)."""
    params = attack_params(name)
    budget = {"steps": 3, "queries": 15, "restarts": 2}
    parts = [f"{k}={v}" for k, v in {**budget, **extra}.items() if k in params]
    return build_attack(name + (":" + ",".join(parts) if parts else ""), threat)


@pytest.fixture(scope="module")
def batch(blobs):
    _, _, xt, yt = blobs
    return xt[:7].clone(), yt[:7].clone()  # odd N


def fresh_model(training: bool) -> nn.Module:
    torch.manual_seed(1)
    m = TinyCNN()
    return m.train(training)


# ------------------------------------------------------------------ properties over the registry


@pytest.mark.parametrize("name,norm", CASES)
def test_output_is_inside_threat_model_with_same_shape_dtype_device(name, norm, tiny_model, batch, gen):
    x, y = batch
    threat = ThreatModel(norm, EPS[norm])
    x_adv = cheap(name, threat)(tiny_model, x, y, generator=gen)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert (threat.distance(x_adv, x) <= threat.eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name,norm", CASES)
def test_attack_is_pure(name, norm, training, batch, gen):
    model = fresh_model(training)
    x, y = batch
    x_before = x.clone()
    cheap(name, ThreatModel(norm, EPS[norm]))(model, x, y, generator=gen)
    assert torch.equal(x, x_before)  # input not mutated
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training == training for m in model.modules())


@pytest.mark.parametrize("name,norm", CASES)
def test_same_seed_gives_bitwise_equal_output_also_under_no_grad(name, norm, tiny_model, batch):
    x, y = batch
    attack = cheap(name, ThreatModel(norm, EPS[norm]))
    a = attack(tiny_model, x, y, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # evaluation code calls attacks from no_grad blocks
        b = attack(tiny_model, x, y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name,norm", CASES)
def test_tiny_eps_returns_about_x(name, norm, tiny_model, batch, gen):
    x, y = batch
    x_adv = cheap(name, ThreatModel(norm, 1e-8))(tiny_model, x, y, generator=gen)
    assert torch.allclose(x_adv, x, atol=1e-7)


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("name,norm", CASES)
def test_small_batches(name, norm, n, tiny_model, batch, gen):
    x, y = batch[0][:n], batch[1][:n]
    threat = ThreatModel(norm, EPS[norm])
    x_adv = cheap(name, threat)(tiny_model, x, y, generator=gen)
    assert x_adv.shape == x.shape
    threat.check(x_adv, x)


@pytest.mark.parametrize("name,norm", CASES)
def test_float64_model_and_inputs(name, norm, batch, gen):
    model = fresh_model(False).double()
    x, y = batch[0].double(), batch[1]
    threat = ThreatModel(norm, EPS[norm])
    x_adv = cheap(name, threat)(model, x, y, generator=gen)
    assert x_adv.dtype == torch.float64
    threat.check(x_adv, x)


@pytest.mark.parametrize("name,norm", CASES)
def test_counted_gradient_evaluations_within_declared_cost(name, norm, tiny_model, batch, gen):
    x, y = batch
    attack = cheap(name, ThreatModel(norm, EPS[norm]))
    counted = []

    def hook(module, args):
        if torch.is_grad_enabled() and args[0].requires_grad:
            counted.append(len(args[0]))

    handle = tiny_model.register_forward_pre_hook(hook)
    attack(tiny_model, x, y, generator=gen)
    handle.remove()
    assert sum(counted) <= attack.grad_evals() * len(x)
    if name in ("fgsm", "fgsm-rs", "bim", "mifgsm"):  # no survivor logic: exactly the declared cost
        assert sum(counted) == attack.grad_evals() * len(x)


@pytest.mark.parametrize("name,norm", CASES)
def test_spec_round_trips(name, norm):
    threat = ThreatModel(norm, EPS[norm])
    for attack in (build_attack(name, threat), cheap(name, threat)):
        assert build_attack(attack.spec, threat) == attack
        assert attack.spec.split(":")[0] == name


@pytest.mark.parametrize("name", [n for n in ATTACKS if attack_class(n).supports_target])
def test_targeted_mode_stays_inside(name, tiny_model, batch, gen):
    x, y = batch
    threat = ThreatModel("linf", 0.15)
    x_adv = cheap(name, threat)(tiny_model, x, y, generator=gen, target=(y + 1) % 4)
    threat.check(x_adv, x)


# ------------------------------------------------------------------ strength (tolerances, not golden numbers)


@pytest.fixture(scope="module")
def test_set(blobs):
    _, _, xt, yt = blobs
    return xt[:120], yt[:120]


def error(model, x_adv, y) -> float:
    with torch.no_grad():
        return (model(x_adv).argmax(1) != y).float().mean().item()


def test_pgd_at_least_as_strong_as_fgsm_and_apgd_as_pgd(tiny_model, test_set):
    x, y = test_set
    t = ThreatModel("linf", 0.15)
    e_fgsm = error(tiny_model, FGSM(t)(tiny_model, x, y), y)
    e_pgd = error(tiny_model, PGD(t, steps=20)(tiny_model, x, y, generator=torch.Generator().manual_seed(0)), y)
    e_apgd = error(tiny_model, APGD(t, steps=20)(tiny_model, x, y, generator=torch.Generator().manual_seed(0)), y)
    assert e_fgsm > 0.02  # the eps is in the interesting range
    assert e_pgd >= e_fgsm
    assert e_apgd >= e_pgd - 0.03


@pytest.mark.parametrize("spec", ["bim:steps=10", "mifgsm:steps=10", "apgd-dlr:steps=10", "apgd-t:steps=10"])
def test_every_iterative_gradient_attack_is_at_least_as_strong_as_fgsm(tiny_model, test_set, spec):
    """The registry's property tests checked the ball, purity, determinism and cost: an iterative attack that lost its
    strength (a step of the wrong sign or size) passed them. At the eps where FGSM breaks some, each breaks as many."""
    from advtune.attacks import build_attack

    x, y = test_set
    t = ThreatModel("linf", 0.15)
    e_fgsm = error(tiny_model, FGSM(t)(tiny_model, x, y), y)
    e = error(tiny_model, build_attack(spec, t)(tiny_model, x, y, generator=torch.Generator().manual_seed(0)), y)
    assert e_fgsm > 0.02 and e >= e_fgsm - 0.01, (spec, e, e_fgsm)


def test_large_eps_breaks_everything(tiny_model, test_set):
    x, y = test_set
    x_adv = PGD(ThreatModel("linf", 0.35), steps=10)(tiny_model, x, y, generator=torch.Generator().manual_seed(0))
    assert error(tiny_model, x_adv, y) >= 0.98


def test_l2_pgd_breaks_everything_at_a_large_radius(tiny_model, test_set):
    x, y = test_set
    x_adv = PGD(ThreatModel("l2", 4.0), steps=10)(tiny_model, x, y, generator=torch.Generator().manual_seed(0))
    assert error(tiny_model, x_adv, y) >= 0.95


def test_targeted_pgd_reaches_the_target(tiny_model, test_set):
    x, y = test_set
    target = (y + 1) % 4
    x_adv = PGD(ThreatModel("linf", 0.35), steps=20)(
        tiny_model, x, y, target=target, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        assert (tiny_model(x_adv).argmax(1) == target).float().mean() >= 0.9


def test_fgsm_equals_the_closed_form(tiny_model, test_set):
    x, y = test_set
    eps = 0.1
    xv = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(tiny_model(xv), y), [xv])  # independent autograd call
    expected = (x + eps * g.sign()).clamp(0, 1)
    assert torch.allclose(FGSM(ThreatModel("linf", eps))(tiny_model, x, y), expected, atol=1e-7)


def test_fgsm_flips_a_linear_model_exactly_when_eps_exceeds_margin_over_l1_norm():
    g = torch.Generator().manual_seed(0)
    d = 20
    for trial in range(8):
        model = nn.Linear(d, 2)
        with torch.no_grad():
            model.weight.copy_(torch.randn(2, d, generator=g) * 0.2)
            model.bias.copy_(torch.randn(2, generator=g) * 0.5)
        x = torch.full((1, d), 0.5)
        with torch.no_grad():
            z = model(x)[0]
        y = z.argmax().view(1)
        w = model.weight[y.item()] - model.weight[1 - y.item()]
        threshold = ((z[y] - z[1 - y]).abs() / w.abs().sum()).item()
        for factor, flips in ((0.98, False), (1.02, True)):
            eps = factor * threshold
            if not 0 < eps < 0.5:  # no clipping at the box
                continue
            x_adv = FGSM(ThreatModel("linf", eps))(model, x, y)
            with torch.no_grad():
                assert (model(x_adv).argmax(1) != y).item() == flips, (trial, factor)


def test_square_needs_no_gradients(tiny_model, test_set):
    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise AssertionError("square must not call backward")

    class Guarded(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(NoBackward.apply(x))

    x, y = test_set
    model = Guarded(tiny_model)
    x_adv = Square(ThreatModel("linf", 0.25), queries=100)(model, x, y, generator=torch.Generator().manual_seed(0))
    assert error(tiny_model, x_adv, y) > 0.3


def test_square_compiled_queries_match_eager(tiny_model, test_set, monkeypatch):
    """compile=True queries torch.compile(model): same eps-ball and box, the same examples fooled
    (logits differ by ~1e-6, so only a tie could change an accept decision)."""
    square_module = importlib.import_module("advtune.attacks.square")
    real_compile, compiled_calls = torch.compile, []

    def counting_compile(model, **kwargs):
        compiled = real_compile(model, **kwargs)

        def call(x):
            compiled_calls.append(len(x))
            return compiled(x)

        return call

    monkeypatch.setattr(square_module.torch, "compile", counting_compile)
    monkeypatch.setattr(square_module._QueryForward, "broken", False)
    x, y = test_set
    threat = ThreatModel("linf", 0.25)
    runs = {}
    for compiled in (False, True):
        attack = Square(threat, queries=100, compile=compiled)
        assert ("compile=true" in attack.spec) == compiled
        runs[compiled] = attack(tiny_model, x, y, generator=torch.Generator().manual_seed(0))
    for x_adv in runs.values():
        assert (x_adv - x).abs().max() <= 0.25 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        fooled = {k: (tiny_model(v).argmax(1) != y) for k, v in runs.items()}
    assert fooled[True].float().mean() > 0.3
    assert (fooled[True] != fooled[False]).sum() <= 1
    assert len(compiled_calls) > 10 and not square_module._QueryForward.broken  # the queries did go compiled


def _falls_back_once(model, data, caplog, option: str, warning: str) -> None:
    """Square with `option` forced on (where it cannot work) gives one warning and the numbers of it forced off."""
    x, y = data
    threat = ThreatModel("linf", 0.25)
    eager = Square(threat, queries=40, **{option: False})(model, x, y, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="advtune.attacks.square"):
        fell_back = Square(threat, queries=40, **{option: True})(
            model, x, y, generator=torch.Generator().manual_seed(0)
        )
    assert torch.equal(fell_back, eager)
    assert sum(warning in r.message for r in caplog.records) == 1


def test_square_falls_back_to_eager_when_compiling_fails(tiny_model, test_set, monkeypatch, caplog):
    square_module = importlib.import_module("advtune.attacks.square")

    def broken_compile(model, **kwargs):
        def fail(x):
            raise RuntimeError("no C compiler")

        return fail

    monkeypatch.setattr(square_module.torch, "compile", broken_compile)
    monkeypatch.setattr(square_module._QueryForward, "broken", False)
    _falls_back_once(tiny_model, test_set, caplog, "compile", "compiling the model failed")
    assert square_module._QueryForward.broken


def test_square_syncing_once_per_chunk_keeps_its_contract(tiny_model, test_set):
    """sync_every > 1 (the accelerator default): survivors re-found once per chunk of queries, the random numbers
    drawn ahead. Same eps-ball and box, a point reported fooled does fool (one fooled early in a chunk is never
    changed after), and as strong as one sync per query within a few examples; a value < 1 is refused."""
    x, y = test_set
    threat = ThreatModel("linf", 0.25)
    fooled = {}
    for every in (1, 8, 32):
        x_adv = Square(threat, queries=100, sync_every=every)(
            tiny_model, x, y, generator=torch.Generator().manual_seed(0)
        )
        assert (x_adv - x).abs().max() <= 0.25 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        with torch.no_grad():
            fooled[every] = (tiny_model(x_adv).argmax(1) != y).sum().item()
    assert fooled[1] > 0.3 * len(x)
    assert abs(fooled[8] - fooled[1]) <= 0.1 * len(x) and abs(fooled[32] - fooled[1]) <= 0.1 * len(x)
    with pytest.raises(AdvtuneError, match="sync_every must be an integer >= 1"):
        Square(threat, sync_every=0)


def test_square_falls_back_to_eager_queries_when_a_graph_cannot_be_captured(tiny_model, test_set, monkeypatch, caplog):
    """graphs=True where no CUDA graph can be captured (here: the CPU)."""
    square_module = importlib.import_module("advtune.attacks.square")
    monkeypatch.setattr(square_module._Queries, "broken", False)
    _falls_back_once(tiny_model, test_set, caplog, "graphs", "CUDA graph failed")
    assert square_module._Queries.broken


def test_square_graph_replays_are_counted_as_queries(tiny_model, test_set, monkeypatch):
    """A CUDA graph replay never calls the model, so the evaluation's pass counter (a forward pre-hook) is credited
    per replay, and the warm-up and capture are not counted: the same forward evaluations as eager queries. A
    stand-in graph (replay = the step with hooks off) makes this checkable without a GPU."""
    from advtune.cost import uncounted
    from advtune.evaluation import robust_accuracy

    square_module = importlib.import_module("advtune.attacks.square")

    class StandInGraph:
        def __init__(self, queries):
            queries._step()  # the capture's own pass, as a real capture records one (not counted)
            self.queries = queries

        def replay(self):
            with uncounted(self.queries.forward.model):
                self.queries._step()

    x, y = test_set
    threat = ThreatModel("linf", 0.25)
    counts = {}
    for graphs in (False, True):
        if graphs:
            monkeypatch.setattr(square_module._Queries, "_try_capture", lambda q: StandInGraph(q))
        r = robust_accuracy(
            tiny_model,
            (x, y),
            [Square(threat, queries=30, sync_every=4, graphs=graphs)],  # the same working sets either way
            generator=torch.Generator().manual_seed(0),
        )
        counts[graphs] = (list(r.forward_evals.values()), r.n_robust_worst)
    assert counts[True] == counts[False] and counts[False][0][0] > 30 * r.n_robust_worst


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_square_graph_replays_compute_what_eager_queries_do(tiny_model, test_set):
    """On a GPU the queries are CUDA graph replays by default: the same points as eager queries, with the same
    random draws (same seed, same working sets), so the same examples fooled."""
    x, y = (t.cuda() for t in test_set)
    model = copy.deepcopy(tiny_model).cuda()  # the fixture is shared: moved in place it would leave the CPU
    threat = ThreatModel("linf", 0.25)
    runs = {
        graphs: Square(threat, queries=200, graphs=graphs)(model, x, y, generator=torch.Generator().manual_seed(0))
        for graphs in (False, None)
    }
    for x_adv in runs.values():
        assert (x_adv - x).abs().max() <= 0.25 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.allclose(runs[None], runs[False], atol=1e-6)
    assert not importlib.import_module("advtune.attacks.square")._Queries.broken


@pytest.mark.parametrize("every", [1, 7, 32])
def test_square_chunks_keep_first_successes_and_every_survivors_queries(every):
    """A linear model (margin = 3 - sum of the perturbation): examples are fooled along the way, so the working set
    shrinks. Every example still robust at the end got all its queries, and a fooled one ends at exactly the first
    fooling point it was queried at (the model sees every query and matches it to its clean image), though points
    fooled inside a chunk are queried on."""

    class Linear(nn.Module):
        def __init__(self, clean):
            super().__init__()
            self.clean, self.seen = clean, torch.zeros(len(clean), dtype=torch.long)
            self.first = torch.full_like(clean, float("nan"))  # each example's first fooling point queried

        def forward(self, x):
            who = ((x[:, None] - self.clean[None]).abs().flatten(2).amax(2) <= 0.1 + 1e-6).float().argmax(1)
            self.seen += torch.bincount(who, minlength=len(self.clean))
            s = (x - self.clean[who]).flatten(1).sum(1)
            new = (s > 3.0) & self.first[who].isnan().flatten(1).all(1)
            self.first[who[new]] = x[new]
            return torch.stack([torch.full_like(s, 3.0), s], 1)

    clean = 0.2 + 0.6 * torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model, y = Linear(clean), torch.zeros(24, dtype=torch.long)
    x_adv = Square(ThreatModel("linf", 0.1), queries=60, p_init=0.15, sync_every=every)(
        model, clean, y, generator=torch.Generator().manual_seed(1)
    )
    fooled = (x_adv - clean).flatten(1).sum(1) > 3.0
    assert 0 < fooled.sum() < 24  # the shrinking path runs
    assert (model.seen[~fooled] == 60).all() and (model.seen[fooled] <= 60).all()
    assert torch.equal(x_adv[fooled], model.first[fooled])


@pytest.mark.parametrize("every", [1, 7, 32])
def test_square_gives_every_survivor_every_query_whatever_the_chunk(every):
    """A model no square can fool (its logits ignore the input): the start and queries - 1 queries, each on all
    examples, whether the chunks divide the queries or not (7 into 19, 32 over them)."""

    class Stubborn(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls: list[int] = []

        def forward(self, x):
            self.calls.append(len(x))
            logits = torch.zeros(len(x), 3)
            logits[:, 0] = 10.0
            return logits

    model = Stubborn()
    x, y = torch.rand(5, 1, 8, 8), torch.zeros(5, dtype=torch.long)
    x_adv = Square(ThreatModel("linf", 0.1), queries=20, sync_every=every)(
        model, x, y, generator=torch.Generator().manual_seed(0)
    )
    assert model.calls == [5] * 20
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6


@pytest.mark.parametrize("channels", [1, 3])
def test_square_never_spends_a_query_on_the_point_it_already_holds(channels):
    """A model no square can fool keeps its starting point (the stripes) all along: every query must propose a
    different point. Drawing the window's signs blindly proposed the start itself for ~22% of MNIST-shaped
    queries (a one-pixel window whose sign matched its stripe: the paper's code redraws those)."""

    class Stubborn(nn.Module):
        def __init__(self):
            super().__init__()
            self.seen: list[torch.Tensor] = []

        def forward(self, x):
            self.seen.append(x.clone())
            logits = torch.zeros(len(x), 3)
            logits[:, 0] = 10.0
            return logits

    model = Stubborn()
    x, y = torch.rand(6, channels, 12, 12, generator=torch.Generator().manual_seed(0)), torch.zeros(6, dtype=torch.long)
    # p_init small: the windows are one or two pixels, where a repeat is likeliest
    x_adv = Square(ThreatModel("linf", 0.1), queries=200, p_init=0.01, compile=False, graphs=False)(
        model, x, y, generator=torch.Generator().manual_seed(0)
    )
    start = model.seen[0]
    assert torch.equal(x_adv, start)  # nothing accepted: the start is the current point throughout
    repeats = sum(int((q == start).flatten(1).all(1).sum()) for q in model.seen[1:])
    assert len(model.seen) == 200 and repeats == 0
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_restarts_only_rerun_survivors(tiny_model, test_set):
    x, y = test_set
    seen = []
    handle = tiny_model.register_forward_pre_hook(lambda m, a: seen.append(len(a[0])) if a[0].requires_grad else None)
    PGD(ThreatModel("linf", 0.2), steps=2, restarts=3)(tiny_model, x, y, generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert seen[0] == len(x) and max(seen[2:]) < len(x)


def test_apgd_checkpoints_follow_the_paper():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    # AutoAttack's oscillation test halves the step when the loss rose in at most 0.75 of the window's steps: 12 of
    # 16 (the window 41 -> 57) halves it too
    assert oscillating(torch.tensor([11, 12, 13]), 16, 0.75).tolist() == [True, True, False]
    assert checkpoints(5)[-1] <= 5 and checkpoints(5) == sorted(set(checkpoints(5)))


# ------------------------------------------------------------------ differential references (optional packages)


@pytest.mark.reference
def test_pgd_matches_torchattacks(tiny_model, test_set):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = test_set
    eps = 0.15
    ref = torchattacks.PGD(tiny_model, eps=eps, alpha=2.5 * eps / 20, steps=20, random_start=True)(x, y)
    ours = PGD(ThreatModel("linf", eps), steps=20)(tiny_model, x, y, generator=torch.Generator().manual_seed(0))
    assert abs(error(tiny_model, ours, y) - error(tiny_model, ref, y)) <= 0.03


@pytest.mark.reference
def test_apgd_ce_matches_pyautoattack(tiny_model, test_set):
    pyautoattack = pytest.importorskip("pyautoattack")
    from pyautoattack.autopgd_base import APGDAttack

    x, y = test_set
    eps = 0.15
    ref = APGDAttack(tiny_model, n_iter=30, eps=eps, loss="ce", device=x.device).perturb(x, y)
    ours = APGD(ThreatModel("linf", eps), steps=30)(tiny_model, x, y, generator=torch.Generator().manual_seed(0))
    assert pyautoattack is not None
    assert abs(error(tiny_model, ours, y) - error(tiny_model, ref, y)) <= 0.03


# ------------------------------------------------------------------ error paths


def test_unknown_attack_lists_the_valid_names():
    with pytest.raises(AdvtuneError, match="unknown attack 'pgdd'.*valid attacks: fgsm, fgsm-rs, bim, pgd"):
        build_attack("pgdd:steps=3", ThreatModel())


def test_unknown_parameter_lists_the_valid_parameters():
    with pytest.raises(AdvtuneError, match="unknown parameter 'stepz'.*valid parameters: steps, step_size, restarts"):
        build_attack("pgd:stepz=3", ThreatModel())


def test_bim_has_no_restarts_parameter():
    with pytest.raises(AdvtuneError, match="unknown parameter 'restarts'"):
        build_attack("bim:restarts=2", ThreatModel())


@pytest.mark.parametrize("spec", ["pgd:steps=0", "pgd:steps=-3", "apgd-ce:steps=0", "mifgsm:steps=0"])
def test_steps_must_be_positive(spec):
    with pytest.raises(AdvtuneError, match="steps must be an integer >= 1"):
        build_attack(spec, ThreatModel())


@pytest.mark.parametrize(
    "spec,match",
    [
        ("pgd:steps=ten", "steps='ten' is not a valid int"),
        ("pgd:step=fast", "step_size='fast' is not a valid float"),
        ("pgd:steps", "needs a value"),
        ("pgd:steps=3,steps=4", "given twice"),
        ("pgd:loss=hinge", "loss must be one of ce, dlr, margin"),
        ("square:p_init=2", "p_init must be a number"),
        ("pgd:step=-0.1", "step_size must be a number > 0"),
    ],
)
def test_bad_values_are_rejected(spec, match):
    with pytest.raises(AdvtuneError, match=match):
        build_attack(spec, ThreatModel())


def test_step_alias_and_fractions():
    attack = build_attack("PGD: steps=40, step=2/255, restarts=5", ThreatModel())
    assert attack == PGD(ThreatModel(), steps=40, step_size=2 / 255, restarts=5)


def test_linf_only_attack_rejects_l2():
    l2_only_missing = [n for n in list_attacks() if "l2" not in attack_class(n).norms]
    assert "square" in l2_only_missing
    with pytest.raises(AdvtuneError, match="square supports only the linf threat model, not l2"):
        build_attack("square", ThreatModel("l2", 0.5))


def test_dlr_needs_enough_classes(gen):
    model = nn.Linear(4, 2)
    x, y = torch.rand(3, 4, generator=gen), torch.tensor([0, 1, 0])
    with pytest.raises(AdvtuneError, match="DLR loss needs a model with at least 3 classes"):
        APGD(ThreatModel(), steps=2, loss="dlr")(model, x, y)


@pytest.mark.parametrize("classes", [2, 3])
def test_apgd_t_on_fewer_than_four_classes_steers_with_cross_entropy(gen, classes):
    """The standard suite holds APGD-T: a 2- or 3-class model (a user's own data) failed after the clean pass
    and APGD-CE had run; targeted cross-entropy takes DLR's place, and still finds the adversarials."""
    torch.manual_seed(0)
    model = nn.Linear(4, classes)
    x = torch.rand(16, 4, generator=gen)
    y = model(x).argmax(1)
    threat = ThreatModel("linf", 0.5)
    x_adv = build_attack("apgd-t:steps=20", threat)(model, x, y)
    threat.check(x_adv, x)
    assert (model(x_adv).argmax(1) != y).float().mean() > 0.5  # a linear model at eps 0.5: most flip


def test_apgd_t_rejects_a_target(tiny_model, batch):
    x, y = batch
    with pytest.raises(AdvtuneError, match="chooses its own targets"):
        build_attack("apgd-t:steps=2", ThreatModel())(tiny_model, x, y, target=y)


def test_bad_inputs_to_an_attack(tiny_model, batch):
    x, y = batch
    with pytest.raises(AdvtuneError, match="floating-point"):
        FGSM(ThreatModel())(tiny_model, (x * 255).to(torch.uint8), y)
    with pytest.raises(AdvtuneError, match="y must be an integer tensor"):
        FGSM(ThreatModel())(tiny_model, x, y[:3])


def test_register_attack_rejects_duplicates():
    with pytest.raises(AdvtuneError, match="already registered"):
        register_attack("pgd", PGD)


def test_apgd_early_stop_fools_the_same_samples_for_less_work(tiny_model, test_set):
    """A sample leaves the batch once fooled; the others' trajectories are unchanged, so the set of
    fooled samples is exactly the one of the full run, at a fraction of the gradient evaluations."""
    from advtune.attacks import apgd, apgd_targeted
    from advtune.cost import PassCounter

    x, y = test_set
    threat = ThreatModel("linf", 0.15)
    for fn in (apgd, apgd_targeted):
        out, cost = {}, {}
        for early in (True, False):
            counter = PassCounter()
            with counter.attached(tiny_model):
                x_adv = fn(
                    tiny_model, x, y, threat, steps=30, early_stop=early, generator=torch.Generator().manual_seed(3)
                )
            cost[early] = counter.take()[0]
            threat.check(x_adv, x)
            with torch.no_grad():
                out[early] = tiny_model(x_adv).argmax(1) != y
        assert 0 < int(out[True].sum()) < len(y)
        assert torch.equal(out[True], out[False]), fn.__name__
        assert cost[True] < cost[False], (fn.__name__, cost)  # no pass on a sample once fooled


class _Wavy(nn.Module):
    """A loss that rises and falls along every straight path: logits (sin(40 * sum x), 0). Steps of 2 * eps jump
    over its crests, so APGD's checkpoints see an oscillating loss and must halve the step."""

    def forward(self, x):
        s = torch.sin(40 * x.flatten(1).sum(1, keepdim=True))
        return torch.cat([s, torch.zeros_like(s)], 1)


def test_apgd_starts_at_twice_eps_and_halves_its_step_when_the_loss_oscillates(monkeypatch):
    """Only APGD's pure helpers had tests: a run that never halved its step, or started from another one, passed
    every strength test (it breaks the fixture models anyway). The step lengths it takes, recorded."""
    from advtune.attacks import APGD
    from advtune.threat import ThreatModel as Threat

    taken = []
    real = Threat.steepest_step

    def spy(self, grad, step):
        taken.append(step.flatten().clone() if torch.is_tensor(step) else torch.tensor([step]))
        return real(self, grad, step)

    monkeypatch.setattr(Threat, "steepest_step", spy)
    threat, steps = Threat("linf", 0.1), 20
    x, y = torch.full((8, 1, 2, 2), 0.5), torch.zeros(8, dtype=torch.long)
    APGD(threat, steps=steps, early_stop=False)(_Wavy(), x, y, generator=torch.Generator().manual_seed(0))
    first = checkpoints(steps)[0]
    assert len(taken) == steps and all(torch.allclose(t, torch.full_like(t, 0.2)) for t in taken[:first])
    later = torch.stack(taken[first:])
    assert torch.isclose(later, torch.tensor(0.1)).any()  # halved at a checkpoint
    assert (later <= 0.2 + 1e-9).all() and (later[-1] < 0.2).any()  # never grows back
