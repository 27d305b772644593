"""robust_accuracy, eps_curve, suites, the gradient-masking gate and the eps-curve plot."""

from __future__ import annotations

import importlib
import json
import logging

import pytest
import torch
from torch import nn

from advtune.attacks import FGSM, PGD, build_attack
from advtune.errors import AdvtuneError
from advtune.evaluation import EvalResult, eps_curve, robust_accuracy, suite
from advtune.report import plot_eps_curve
from advtune.threat import ThreatModel
from conftest import TinyCNN

THREAT = ThreatModel("linf", 0.15)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids spin-wait stalls when the 2 cores are shared."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def data(blobs):
    _, _, xt, yt = blobs
    return xt[:100], yt[:100]


def quick(threat=THREAT):
    return [FGSM(threat), PGD(threat, steps=10)]


class ZeroGradRound(torch.autograd.Function):
    """Input quantiser with a zero gradient: a real (planted) case of gradient masking."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


class Wrap(nn.Module):
    def __init__(self, net, pre=None, softmax=False):
        super().__init__()
        self.net, self.pre, self.softmax = net, pre, softmax

    def forward(self, x):
        out = self.net(self.pre(x) if self.pre else x)
        return out.softmax(1) if self.softmax else out


# ------------------------------------------------------------------ robust_accuracy


def test_robust_accuracy_reports_comparable_numbers_and_costs(tiny_model, data):
    x, y = data
    r = robust_accuracy(tiny_model, (x, y), quick(), generator=torch.Generator().manual_seed(0), cascade=False)
    assert r.n == 100 and r.clean_accuracy == 1.0
    acc = r.accuracy
    assert set(acc) == {"fgsm", "pgd"}
    assert r.worst_case_accuracy <= min(acc.values())  # worst case per sample
    assert acc["pgd"] <= acc["fgsm"] < 1.0
    assert r.grad_evals == {"fgsm": 100, "pgd": 1000}  # counted, not assumed
    assert r.forward_evals["pgd"] == 100  # the last PGD iterate is a forward only
    assert all(v <= THREAT.eps + 1e-6 for v in r.max_perturbation.values())
    assert r.suspect == []  # an honest model passes the gate
    j = r.to_json()
    json.dumps(j)
    for key in (
        "threat",
        "attacks",
        "seed",
        "accuracy",
        "worst_case_accuracy",
        "clean_accuracy",
        "n",
        "grad_evals",
        "wall_time_s",
        "max_perturbation",
        "suspect",
    ):
        assert key in j
    assert j["seed"] == 0 and j["threat"]["eps"] == 0.15


def test_a_log_says_where_a_long_batch_is_after_each_attack(tiny_model, data, caplog, monkeypatch):
    """Not a terminal: a batch of the standard suite takes minutes on a CPU, so the log reports after each
    attack inside a batch (at most once per LOG_EVERY_S), not only when a batch ends."""
    import advtune.progress as progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # every chance, for the test (30 s in real runs)
    monkeypatch.setattr(progress, "_progress_disabled", False)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    x, y = data
    with caplog.at_level(logging.INFO, logger="advtune.progress"):
        robust_accuracy(tiny_model, (x, y), quick(), batch_size=50, generator=torch.Generator().manual_seed(0))
    lines = [r.getMessage() for r in caplog.records if r.name == "advtune.progress"]
    assert lines[0].startswith("evaluate: 0/2 (0%)") and "of batch 1 after fgsm" in lines[0], lines
    assert any(line.startswith("evaluate: 0/2") and "of batch 1 after pgd" in line for line in lines), lines
    assert lines[-2].startswith("evaluate: 2/2 (100%)") and "clean=" in lines[-2], lines
    assert lines[-1].startswith("evaluate: 2/2 done in "), lines  # the loop said it ended
    assert all("clean=" not in line for line in lines if line.startswith("evaluate: 0/2")), lines  # counted done


def test_batches_iterable_equals_tensor_pair_and_limit(tiny_model, data):
    x, y = data
    attacks = [build_attack("bim:steps=3", THREAT)]
    a = robust_accuracy(tiny_model, (x, y), attacks, batch_size=32, gate=False)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 100, 32)]
    b = robust_accuracy(tiny_model, batches, attacks, gate=False)
    assert a.accuracy == b.accuracy and torch.equal(a.robust, b.robust)
    c = robust_accuracy(tiny_model, iter(batches), attacks, limit=40, gate=False)
    assert c.n == 40 and torch.equal(c.robust, a.robust[:40])


def test_the_batch_size_defaults_to_the_device_and_is_recorded(tiny_model, data):
    """No batch size: 256 examples per batch on the CPU (1000 on an accelerator, where small batches leave the
    device waiting on launches); the record says which was used and reads back."""
    from advtune.evaluation import EvalResult
    from advtune.evaluation.protocol import default_batch_size

    x, y = data
    attacks = [build_attack("bim:steps=2", THREAT)]
    r = robust_accuracy(tiny_model, (x, y), attacks, gate=False)
    assert r.batch_size == 256 and r.to_json()["batch_size"] == 256
    assert EvalResult.from_json({"schema": 1, **r.to_json()}).batch_size == 256
    assert robust_accuracy(tiny_model, (x, y), attacks, batch_size=32, gate=False).to_json()["batch_size"] == 32
    assert (default_batch_size(torch.device("cpu")), default_batch_size(torch.device("cuda", 0))) == (256, 1000)


def test_dynamo_is_loaded_only_where_square_may_compile():
    """Square's auto compile (its default) compiles on the CPU only: on a GPU the evaluation does not pay the
    1.5-3 s import of torch._dynamo, unless a compile is forced."""
    from advtune.evaluation.protocol import compiled_queries, may_compile

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    standard = suite("standard", THREAT)
    assert may_compile(standard, cpu) and not may_compile(standard, gpu)
    assert may_compile(compiled_queries(standard, True), gpu)
    assert not may_compile(compiled_queries(standard, False), cpu)
    assert not may_compile([FGSM(THREAT)], cpu)


def test_cascade_gives_the_same_worst_case_for_less_work(tiny_model, data):
    x, y = data
    attacks = [FGSM(THREAT), build_attack("bim:steps=5", THREAT)]
    full = robust_accuracy(tiny_model, (x, y), attacks, gate=False, cascade=False)
    casc = robust_accuracy(tiny_model, (x, y), attacks, gate=False, cascade=True)
    assert abs(full.worst_case_accuracy - casc.worst_case_accuracy) <= 0.01
    assert casc.grad_evals["bim:steps=5"] < full.grad_evals["bim:steps=5"]
    assert casc.to_json()["mode"] == "cascade"


def test_model_mode_is_restored(data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.0), TinyCNN()).train()
    x, y = data
    robust_accuracy(model, (x[:10], y[:10]), [FGSM(THREAT)], gate=False)
    assert all(m.training for m in model.modules())


def test_a_buggy_attack_is_caught(tiny_model, data):
    class TooFar:
        threat = THREAT
        spec = "too-far"

        def grad_evals(self):
            return 0

        def __call__(self, model, x, y, *, generator=None):
            return (x + 2 * THREAT.eps).clamp(0, 1)

    x, y = data
    with pytest.raises(AdvtuneError, match="too-far output is outside the linf ball"):
        robust_accuracy(tiny_model, (x, y), [TooFar()], gate=False)


# ------------------------------------------------------------------ gradient-masking gate


def test_gate_flags_a_planted_masking_model(tiny_model, data, caplog):
    x, y = data
    masked = Wrap(tiny_model, pre=ZeroGradRound.apply)
    threat = ThreatModel("linf", 0.2)
    attacks = quick(threat) + [build_attack("square:queries=200", threat)]
    with caplog.at_level(logging.WARNING, logger="advtune.evaluation"):
        r = robust_accuracy(masked, (x, y), attacks, generator=torch.Generator().manual_seed(0))
    assert r.clean_accuracy > 0.95
    assert r.accuracy["pgd"] == r.clean_accuracy  # gradient attacks are blind here ...
    assert r.accuracy["square:queries=200"] < 0.95  # ... the black-box one is not
    kinds = {s.split(":")[0] for s in r.suspect}
    assert {"zero-gradients", "black-box-stronger"} <= kinds
    assert "large-eps-not-broken" in kinds
    assert "gradient masking" in caplog.text


def test_gate_flags_probability_outputs(tiny_model, data):
    x, y = data
    r = robust_accuracy(
        Wrap(tiny_model, softmax=True), (x[:40], y[:40]), quick(), generator=torch.Generator().manual_seed(0)
    )
    assert any(s.startswith("probability-outputs") for s in r.suspect)


class _Scaled(nn.Module):
    """Logits times a huge factor: the softmax saturates, so the cross-entropy's input gradient is exactly zero."""

    def __init__(self, net, scale=1e4):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x):
        return self.net(x) * self.scale


class _Noisy(nn.Module):
    """Gaussian input noise in the forward, even in eval mode: every call is another random draw."""

    def __init__(self, net, sigma=0.5):
        super().__init__()
        self.net, self.sigma = net, sigma

    def forward(self, x):
        return self.net(x + self.sigma * torch.randn_like(x))


def test_gate_flags_a_saturated_softmax_and_a_randomized_forward(tiny_model, data):
    """An audit: FGSM and PGD (cross-entropy) were blind on a model with logits x 1e4 and reported its clean accuracy
    as robust with the gate passed (it looked at the margin's gradient only); a model with noise in its forward
    passed too (AutoAttack checks for randomness)."""
    x, y = data
    g = torch.Generator().manual_seed(0)
    saturated = robust_accuracy(_Scaled(tiny_model), (x, y), quick(), generator=g)
    assert saturated.accuracy["pgd"] == saturated.clean_accuracy  # blind ...
    assert any(s.startswith("zero-ce-gradients") for s in saturated.suspect)  # ... and now said so
    noisy = robust_accuracy(_Noisy(tiny_model), (x, y), quick(), generator=torch.Generator().manual_seed(0))
    assert any(s.startswith("randomized-outputs") for s in noisy.suspect)
    honest = robust_accuracy(tiny_model, (x, y), quick(), generator=torch.Generator().manual_seed(0))
    assert honest.suspect == []  # neither check fires on the plain model
    assert honest.gated and honest.to_json()["gated"] is True


def test_a_result_says_when_the_gate_did_not_run(tiny_model, data):
    """An audit: gate=False (and an eps curve's larger eps, where the gate runs at the first only) recorded
    `suspect: []`, which reads as passed."""
    from advtune.runs.info import _eval_line

    x, y = data
    off = robust_accuracy(tiny_model, (x[:20], y[:20]), [FGSM(THREAT)], gate=False)
    record = off.to_json()
    assert record["gated"] is False and record["suspect"] == [] and EvalResult.from_json(record).gated is False
    assert "masking gate not run" in _eval_line(record)


def test_gate_flags_iterative_weaker_than_fgsm(tiny_model, data):
    x, y = data
    useless = PGD(THREAT, steps=5, step_size=1e-6)  # an iterative attack that barely moves
    r = robust_accuracy(tiny_model, (x, y), [useless], generator=torch.Generator().manual_seed(0))
    assert any(s.startswith("iterative-weaker-than-fgsm") and useless.spec in s for s in r.suspect)


def test_one_image_on_a_small_test_set_does_not_call_a_model_suspect(tiny_model):
    """The gate's tolerances are shares (1% for a black-box-only break): on 20 clean-correct images one image was
    5% and flagged the model; now a flag needs more than two images' worth, as eps_curve's floor."""
    from types import SimpleNamespace

    from advtune.evaluation.gate import above_noise, masking_gate

    assert above_noise(0.01, 20) == 0.1 and above_noise(0.01, 1000) == 0.01
    threat = ThreatModel("linf", 0.1)
    white, square = PGD(threat, steps=2), build_attack("square:queries=10", threat)

    def gate(only_square: int) -> list[str]:
        broken = {white.spec: torch.zeros(20, dtype=torch.int8), square.spec: torch.zeros(20, dtype=torch.int8)}
        broken[square.spec][:only_square] = 1  # images the black-box attack alone broke
        result = SimpleNamespace(n_clean_correct=20, broken=broken)
        return masking_gate(tiny_model, None, None, threat, result, attacks=[white, square])

    assert gate(1) == [] and gate(2) == []  # 5% and 10%: within two images' worth of 20
    assert any(s.startswith("black-box-stronger") for s in gate(3))  # 15%


# ------------------------------------------------------------------ eps curve


def test_eps_curve_is_monotone_and_reaches_zero(tiny_model, data, tmp_path):
    x, y = data
    x, y = x[:60], y[:60]
    curve = eps_curve(
        tiny_model,
        (x, y),
        lambda e: [PGD(ThreatModel("linf", e), steps=10)],
        [0.3, 0.0, 0.1, 0.2],
        generator=torch.Generator().manual_seed(0),
    )
    assert curve.eps == [0.0, 0.1, 0.2, 0.3]
    assert curve.accuracy[0] == curve.clean_accuracy == 1.0
    assert all(b <= a for a, b in zip(curve.accuracy, curve.accuracy[1:]))
    assert curve.accuracy[-1] <= 0.02
    json.dumps(curve.to_json())
    png = plot_eps_curve({"tiny": curve}, tmp_path / "curve.png", title="tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eps_curve_repairs_and_flags_a_non_monotone_attack(tiny_model, data):
    x, y = data

    def factory(e):  # a strong attack at 0.2, a useless one at 0.25
        t = ThreatModel("linf", e)
        return [PGD(t, steps=10)] if e < 0.25 else [FGSM(t, step_size=1e-6)]

    curve = eps_curve(tiny_model, (x, y), factory, [0.2, 0.25], gate=False)
    assert curve.raw_accuracy[1] > curve.raw_accuracy[0]  # the raw numbers rise ...
    assert curve.accuracy[1] <= curve.accuracy[0]  # ... the reported curve does not
    assert any(s.startswith("accuracy-rises-with-eps") for s in curve.suspect)


def test_eps_curve_rejects_one_shot_iterators_and_reordered_data(tiny_model, data):
    x, y = data
    make = lambda e: [FGSM(ThreatModel("linf", e))]  # noqa: E731
    with pytest.raises(AdvtuneError, match="not a one-shot iterator"):
        eps_curve(tiny_model, iter([(x, y)]), make, [0.1, 0.2], gate=False)

    class Shuffled:
        def __init__(self):
            self.g = torch.Generator().manual_seed(0)

        def __iter__(self):
            p = torch.randperm(len(x), generator=self.g)
            yield x[p], y[p]

    with pytest.raises(AdvtuneError, match="different order"):
        eps_curve(tiny_model, Shuffled(), make, [0.1, 0.2], gate=False)
    with pytest.raises(AdvtuneError, match="returned fgsm for eps=0.1"):
        eps_curve(tiny_model, (x, y), lambda e: [FGSM(ThreatModel("linf", 0.1))], [0.2], gate=False)


# ------------------------------------------------------------------ suites


def test_suites():
    std = suite("standard", THREAT)
    assert [a.spec for a in std] == ["apgd-ce", "apgd-t", "square"]
    assert [a.spec for a in suite("standard", ThreatModel("l2", 0.5))] == ["apgd-ce", "apgd-t"]
    assert [a.spec for a in suite("quick", THREAT)] == ["fgsm", "pgd:steps=20"]
    with pytest.raises(AdvtuneError, match="unknown suite 'strong'.*standard, quick"):
        suite("strong", THREAT)


# ------------------------------------------------------------------ error paths


def test_inputs_outside_unit_range_are_rejected(tiny_model, data):
    x, y = data
    with pytest.raises(AdvtuneError, match=r"images must lie in \[0, 1\].*divide by 255"):
        robust_accuracy(tiny_model, ((x - 0.5) / 0.25, y), quick(), gate=False)
    with pytest.raises(AdvtuneError, match="uint8.*/ 255"):
        robust_accuracy(tiny_model, ((x * 255).to(torch.uint8), y), quick(), gate=False)


@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 8, 8)], ids=["channels", "size"])
def test_wrong_shape_is_rejected(tiny_model, shape, gen):
    x = torch.rand(4, *shape, generator=gen)
    with pytest.raises(AdvtuneError, match="cannot take inputs of shape"):
        robust_accuracy(tiny_model, (x, torch.zeros(4, dtype=torch.long)), quick(), gate=False)


def test_labels_out_of_range_are_rejected(tiny_model, data):
    x, y = data
    with pytest.raises(AdvtuneError, match=r"labels must be in \[0, 3\] for a model with 4 outputs"):
        robust_accuracy(tiny_model, (x, y + 4), quick(), gate=False)
    with pytest.raises(AdvtuneError, match="labels must be integer class indices"):
        robust_accuracy(tiny_model, (x, y.float()), quick(), gate=False)


@pytest.mark.parametrize("empty", ["pair", "list"])
def test_empty_data_is_rejected(tiny_model, data, empty):
    x, y = data
    source = (x[:0], y[:0]) if empty == "pair" else []
    with pytest.raises(AdvtuneError, match="no examples to evaluate"):
        robust_accuracy(tiny_model, source, quick(), gate=False)


def test_bad_attack_lists_are_rejected(tiny_model, data):
    x, y = data
    with pytest.raises(AdvtuneError, match="no attacks given"):
        robust_accuracy(tiny_model, (x, y), [], gate=False)
    with pytest.raises(AdvtuneError, match="share one threat model"):
        robust_accuracy(tiny_model, (x, y), [FGSM(THREAT), FGSM(ThreatModel("linf", 0.1))], gate=False)
    with pytest.raises(AdvtuneError, match="appears twice"):
        robust_accuracy(tiny_model, (x, y), [FGSM(THREAT), FGSM(THREAT)], gate=False)
    with pytest.raises(AdvtuneError, match="is not an attack"):
        robust_accuracy(tiny_model, (x, y), ["pgd"], gate=False)


def test_a_model_or_data_on_the_meta_device_is_a_one_line_error(tiny_model, data):
    """A meta tensor has a shape and no values: a meta model, or meta data, is a one-line error naming
    both devices and the fix, not a failed Tensor.item() (nor the generator made on the model's device)."""
    import copy

    import advtune

    x, y = data
    meta_model, mx, my = copy.deepcopy(tiny_model).to("meta"), x.to("meta"), y.to("meta")
    model_on_meta = (
        "the model is on meta and the data on cpu: meta tensors hold no values, nothing can be computed; "
        "move the model or the data: model.to_empty(device='cpu') and load its weights (a meta model has none to copy)"
    )
    data_on_meta = (
        "the model is on cpu and the data on meta: meta tensors hold no values, nothing can be computed; "
        "move the model or the data: create the data on cpu, the model's device (a meta tensor has no values to copy)"
    )
    for call, message in (
        (lambda: robust_accuracy(meta_model, (x, y), quick()), model_on_meta),
        (lambda: robust_accuracy(tiny_model, (mx, my), quick()), data_on_meta),
        (lambda: robust_accuracy(tiny_model, [(mx, my)], quick()), data_on_meta),  # batches: the first one says it
        (lambda: advtune.evaluate(meta_model, (x, y), eps=0.1, attacks="fgsm"), model_on_meta),
        (lambda: advtune.evaluate(tiny_model, (mx, my), eps=0.1, attacks="fgsm"), data_on_meta),
    ):
        with pytest.raises(AdvtuneError) as e:
            call()
        assert str(e.value) == message
    with pytest.raises(AdvtuneError, match=r"^the model is on meta: .*model.to_empty\(device='cpu'\)"):
        robust_accuracy(meta_model, iter([(x, y)]), quick())  # a loader's device is not known before reading it
    # data on the CPU for a model elsewhere is moved to the model's device, as before
    assert robust_accuracy(tiny_model, (x[:20], y[:20]), quick(), gate=False).n == 20


def test_evaluate_compile_flag_compiles_only_the_black_box_queries():
    """`evaluate --compile`: Square (suite or attack list) queries a compiled forward; the white-box
    attacks and the default are unchanged."""
    from advtune.runs.configs import EvaluateRun
    from advtune.runs.evaluate import attacks_for

    for source in ({"suite": "standard"}, {"attacks": "apgd-ce,square:queries=100"}):
        plain = attacks_for(EvaluateRun(run="r", **source), 0.3)
        compiled = attacks_for(EvaluateRun(run="r", compile=True, **source), 0.3)
        eager = attacks_for(EvaluateRun(run="r", compile=False, **source), 0.3)
        assert [a.name for a in plain] == [a.name for a in compiled] == [a.name for a in eager]
        for a, b, c in zip(plain, compiled, eager, strict=True):
            if a.name == "square":  # the default decides by the query load (auto)
                assert a.compile is None and b.compile is True and c.compile is False and b.queries == a.queries
                assert "compile" not in a.spec and "compile=true" in b.spec and "compile=false" in c.spec
            else:
                assert a == b == c


def test_square_compiles_by_itself_when_the_query_load_pays_for_it(monkeypatch):
    """compile=None (the default): on the CPU, a call with more than AUTO_QUERIES examples x queries
    compiles; a small one stays eager unless this process compiled already; other devices, never."""
    sq = importlib.import_module("advtune.attacks.square")  # the module (the package exports the function)

    monkeypatch.setattr(sq._QueryForward, "warm", False)
    monkeypatch.setattr(sq._QueryForward, "broken", False)
    cpu = torch.zeros(1)
    assert sq.auto_compile(cpu, sq.AUTO_QUERIES + 1) and not sq.auto_compile(cpu, sq.AUTO_QUERIES)
    assert not sq.auto_compile(torch.zeros(1, device="meta"), 10 * sq.AUTO_QUERIES)
    monkeypatch.setattr(sq._QueryForward, "warm", True)  # compiled once: every later call reuses it
    assert sq.auto_compile(cpu, 100)
    monkeypatch.setattr(sq._QueryForward, "broken", True)  # compiling failed once: eager from then on
    assert not sq.auto_compile(cpu, 10 * sq.AUTO_QUERIES)


COMPILE_COUNT_SCRIPT = """
import importlib, sys, torch
from advtune.evaluation import robust_accuracy
from advtune.attacks import build_attack
from advtune.models import build_model
from advtune.threat import ThreatModel

frames = []
def counting_backend(gm, example_inputs):  # compiles nothing: counts the graphs dynamo hands over
    frames.append(1)
    return gm.forward

square = importlib.import_module("advtune.attacks.square")
real_compile = torch.compile
square.torch.compile = lambda m, **kw: real_compile(m, backend=counting_backend, **kw)
torch.manual_seed(0)
model = build_model("small-cnn", (1, 28, 28), 10).eval()
x = torch.rand(75, 1, 28, 28)
with torch.no_grad():
    y = model(x).argmax(1)  # at eps 1e-4 nothing flips: every example takes every query
assert "torch._dynamo" not in sys.modules  # as in a fresh `advtune evaluate`
attack = build_attack("square:queries=30,compile=true", ThreatModel.linf(1e-4))
r = robust_accuracy(model, (x, y), [attack], batch_size=30, gate=False)  # batches of 30, 30, 15
assert sum(r.forward_evals.values()) == 30 * 75, r.forward_evals
assert 1 <= len(frames) <= 3, len(frames)
print("ok", len(frames))
"""


def test_compiled_queries_count_every_forward_and_compile_once():
    """The evaluation counts forwards with a hook on the model (PassCounter). Traced by torch.compile,
    that hook's counter was a constant changing every call, so each query recompiled until dynamo gave
    up (8 graphs) and ran eagerly. In a fresh process (dynamo not loaded, as in `advtune evaluate`), the
    hook stays outside compiled code: one or two graphs for every batch size, every query counted."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", COMPILE_COUNT_SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_out_of_memory_retries_in_smaller_chunks(tiny_model, data, caplog):
    """A batch that does not fit the device is split (and stays split), not a failed run; the numbers are
    those of the same attack run on batches that fit."""
    x, y = data
    pgd = PGD(THREAT, steps=5, random_start=False)  # per example the same, however the batch is split
    sizes = []

    class Tight:  # PGD on a device that holds at most 16 examples at a time
        threat = THREAT
        spec = pgd.spec

        def grad_evals(self):
            return pgd.grad_evals()

        def __call__(self, model, x, y, *, generator=None):
            sizes.append(len(x))
            if len(x) > 16:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return pgd(model, x, y, generator=generator)

    with caplog.at_level(logging.WARNING, logger="advtune.evaluation"):
        r = robust_accuracy(tiny_model, (x, y), [Tight()], batch_size=50, gate=False)
    ref = robust_accuracy(tiny_model, (x, y), [pgd], batch_size=12, gate=False)
    assert r.worst_case_accuracy == ref.worst_case_accuracy < r.clean_accuracy
    assert "out of memory on 50 examples" in caplog.text and "12 at a time" in caplog.text
    assert caplog.text.count("out of memory") == 2  # 50 -> 25 -> 12, then the second batch starts at 12
    assert sizes[:3] == [50, 25, 12] and max(sizes[3:]) <= 12  # what fit is kept for the rest of the run
    # the record says so (the batch asked for and the chunk the attack ran in), and reads back
    assert r.batch_size == 50 and r.attack_chunks == {pgd.spec: 12} and ref.attack_chunks == {}
    assert EvalResult.from_json(r.to_json()).attack_chunks == {pgd.spec: 12}


def test_out_of_memory_on_one_example_is_one_line(tiny_model, data):
    class Hopeless:
        threat = THREAT
        spec = "hopeless"

        def grad_evals(self):
            return 1

        def __call__(self, model, x, y, *, generator=None):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")

    x, y = data
    with pytest.raises(AdvtuneError, match="hopeless: out of memory on cpu even for one example"):
        robust_accuracy(tiny_model, (x[:4], y[:4]), [Hopeless()], gate=False)


def test_other_errors_are_not_retried(tiny_model, data):
    calls = []

    class Broken:
        threat = THREAT
        spec = "broken"

        def grad_evals(self):
            return 1

        def __call__(self, model, x, y, *, generator=None):
            calls.append(len(x))
            raise RuntimeError("shape mismatch")

    x, y = data
    with pytest.raises(RuntimeError, match="shape mismatch"):
        robust_accuracy(tiny_model, (x[:8], y[:8]), [Broken()], gate=False)
    assert len(calls) == 1


def test_the_eval_speed_profile_splits_time_into_phases(tiny_model, data, monkeypatch):
    """bench/eval_phases.py: forward + backward + rest add up to each attack's time; FGSM's and PGD's
    backward passes are timed, and the model's own outputs are unchanged by the timer."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    eval_phases = importlib.import_module("eval_phases")
    x, y = data
    timed = eval_phases.PhaseTimer(tiny_model).eval()
    with torch.no_grad():
        assert torch.equal(timed(x), tiny_model(x)) and timed.forward_s > 0 and timed.backward_s == 0
    out = eval_phases.profile(tiny_model, x, y, 0.15, 50, name="quick")
    assert set(out["attacks"]) == {"fgsm", "pgd:steps=20"} and "eval_phases" in sys.modules
    for p in out["attacks"].values():
        assert p["forward_s"] > 0 and p["backward_s"] > 0 and p["grad_evals"] > 0
        assert p["forward_s"] + p["backward_s"] <= p["total_s"] + 1e-6
        assert p["other_s"] == pytest.approx(p["total_s"] - p["forward_s"] - p["backward_s"])
    ref = robust_accuracy(tiny_model, (x, y), suite("quick", THREAT), batch_size=50, gate=False)
    assert out["attacks"]["pgd:steps=20"]["grad_evals"] == ref.grad_evals["pgd:steps=20"]


def test_a_model_that_runs_out_of_memory_in_an_attack_is_retried(tiny_model, data, caplog):
    """The out-of-memory error raised inside a real attack's forward (through logits_of, which turns
    other forward errors into one-line input errors) reaches the retry."""
    x, y = data

    class Hungry(nn.Module):  # a device that holds the gradients of at most 16 examples
        def __init__(self):
            super().__init__()
            self.net = tiny_model

        def forward(self, x):
            if torch.is_grad_enabled() and len(x) > 16:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.net(x)

    pgd = PGD(THREAT, steps=5, random_start=False)
    with caplog.at_level(logging.WARNING, logger="advtune.evaluation"):
        r = robust_accuracy(Hungry(), (x, y), [pgd], batch_size=50, gate=False)
    ref = robust_accuracy(tiny_model, (x, y), [pgd], batch_size=12, gate=False)
    assert r.worst_case_accuracy == ref.worst_case_accuracy and "retrying 12 at a time" in caplog.text


def test_the_reports_gate_cell_says_what_the_gate_checked():
    """The report's tables wrote "passed" wherever nothing was flagged, where the printout of the same run said the
    black-box check never ran (an evaluation without Square, any l2 run) or that the gate was not run at all."""
    from advtune.evaluation.gate import gate_word
    from advtune.report.narrative import harden_protocol
    from advtune.report.tables import harden_table

    assert gate_word([], "apgd-ce,apgd-t:n_target_classes=3,square:queries=5000") == "passed"
    assert gate_word([], "apgd-ce,apgd-t:n_target_classes=3") == "passed (no black-box check)"
    assert gate_word([], "standard") == "passed" and gate_word([], "standard", norm="l2") != "passed"
    assert gate_word(["zero-gradients"], "standard") == "SUSPECT"
    assert gate_word([], "apgd-ce,square", probed=False) == "not run"
    assert gate_word([], "square:queries=1000") == "passed (black-box attacks only)"
    assert harden_protocol({"evaluation": "square", "norm": "linf", "test_examples": 10}).endswith(
        "(without its black-box check: no gradient attack ran to compare the black-box one with)."
    )
    side = {"clean_acc": 0.9, "robust_acc": 0.5, "suspect": []}
    summary = {"before": {**side, "clean_acc": 0.0}, "after": side, "evaluation": "apgd-ce,apgd-t", "norm": "linf"}
    assert [row[-1] for row in harden_table(summary)[1]] == ["not run", "passed (no black-box check)"]
    assert harden_protocol({**summary, "test_examples": 10}).endswith(
        "gate on (without its black-box check: no black-box attack in the evaluation)."
    )


def test_the_gate_says_when_its_black_box_check_had_nothing_to_run_on():
    """Under l2 the standard suite has no black-box attack (Square is linf-only): the gate's black-box check never
    ran, and every output said "masking gate: passed"."""
    from advtune.evaluation import passed_line

    assert passed_line(["apgd-ce", "square:queries=500"]) == "masking gate: passed"
    assert passed_line(["apgd-ce", "transfer:source=runs/at"]) == "masking gate: passed"
    assert "without its black-box check" in passed_line(["apgd-ce", "apgd-t"])
    from advtune.runs.evaluate import format_evaluation  # an eps curve records a list of attacks per eps

    curve = {"kind": "curve", "examples": 10, "eps": [0.1], "accuracy": [0.5], "raw_accuracy": [0.5], "suspect": []}
    assert format_evaluation({**curve, "attacks": [["apgd-ce", "square"]]}).endswith("masking gate: passed")
    # black-box attacks alone: nothing to compare them with; no clean-correct example: no probe, nothing checked
    assert "no gradient attack ran to compare" in passed_line(["square"])
    assert passed_line(["apgd-ce", "square"], probed=False).startswith("masking gate: not run")
    single = {"kind": "single", "examples": 4, "threat": {"norm": "linf", "eps": 0.1}, "mode": "cascade"}
    single |= {"clean_accuracy": 0.0, "accuracy": {"apgd-ce": 0.0}, "worst_case_accuracy": 0.0, "suspect": []}
    single |= {"grad_evals_per_example": {"apgd-ce": 0.0}, "wall_time_s": {"apgd-ce": 0.0}}
    single |= {"max_perturbation": {"apgd-ce": 0.0}}
    assert format_evaluation(single).endswith(
        "masking gate: not run (no test example is classified correctly, so there was nothing to check)"
    )


def test_an_evaluation_without_apgd_says_it_is_an_upper_bound():
    """A new-user walk: `--suite quick` put a hardened model at 100% (PGD-20) that APGD-T put at 59%, and its output
    read like a claim. It now says what it is; a suite with APGD does not."""
    from advtune.runs.evaluate import format_evaluation

    def single(spec):
        record = {"kind": "single", "examples": 4, "threat": {"norm": "linf", "eps": 0.1}, "mode": "cascade"}
        record |= {"clean_accuracy": 1.0, "accuracy": {spec: 1.0}, "worst_case_accuracy": 1.0, "suspect": []}
        return record | {
            "grad_evals_per_example": {spec: 20.0},
            "wall_time_s": {spec: 0.1},
            "max_perturbation": {spec: 0.1},
        }

    assert "an upper bound" in format_evaluation(single("pgd:steps=20"))
    assert "an upper bound" not in format_evaluation(single("apgd-ce"))
    # an audit: the per-attack lines of a cascade are cumulative, and nothing said so
    assert "mode cascade: each attack runs on what the ones above left" in format_evaluation(single("apgd-ce"))
    assert "cumulative" not in format_evaluation({**single("apgd-ce"), "mode": "full"})


def test_an_eps_curve_through_zero_is_taken_and_a_lone_zero_refused(tmp_path, capsys):
    """An audit: `--eps 0,0.1` was refused ("eps must be > 0") though an eps curve takes 0 as its clean point."""
    from advtune.cli import main
    from cli_helpers import train_argv

    base = tmp_path / "base"
    assert main(train_argv(base, limit=100, limit_test=20)) == 0
    argv = ["evaluate", str(base), "--attacks", "fgsm", "--limit-test", "10", "--quiet"]
    assert main([*argv, "--eps", "0,0.1"]) == 0
    record = json.loads(next(base.glob("eval-fgsm-linf-eps0_0.1.json")).read_text())
    assert record["eps"][0] == 0 and record["accuracy"][0] == record["clean_accuracy"]
    capsys.readouterr()
    assert main([*argv, "--eps", "0"]) == 2 and "eps must be > 0" in capsys.readouterr().err
