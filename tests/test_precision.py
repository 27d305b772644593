"""Mixed precision (--amp) and the GPU path: bf16 autocast runs on CPU and keeps adversarial examples
in the threat model; fp16 needs CUDA (a one-line error otherwise); the CUDA tests run where a GPU is."""

from __future__ import annotations

import json

import pytest
import torch

from advtune import PGD, ThreatModel, TrainConfig, adversarial, fit
from advtune.attacks import build_attack
from advtune.cli import main
from advtune.data import load_dataset
from advtune.errors import AdvtuneError
from advtune.models import build_model

EPS = 0.1


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", limit=256, limit_test=64)


def model_for(ds, device="cpu"):
    torch.manual_seed(0)
    return build_model("small-cnn", ds.input_shape, ds.num_classes).to(device)


@pytest.mark.parametrize("spec", ["fgsm", "pgd:steps=5", "apgd-ce:steps=10", "apgd-t:steps=5,n_target_classes=2"])
def test_attacks_under_bf16_autocast_stay_in_the_threat_model(data, spec):
    model = model_for(data).eval()
    x, y = data.test.tensors()
    threat = ThreatModel.linf(EPS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = build_attack(spec, threat)(model, x, y, generator=torch.Generator().manual_seed(0))
    assert x_adv.dtype == torch.float32  # the step and the projection ran in float32
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_bf16_adversarial_training_runs_on_cpu_and_learns(data):
    model = model_for(data)
    before = [p.detach().clone() for p in model.parameters()]
    hist = fit(
        model,
        data.train,
        adversarial(PGD(ThreatModel.linf(EPS), steps=2)),
        TrainConfig(epochs=2, batch_size=32, amp="bf16"),
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert next(model.parameters()).dtype == torch.float32  # the master weights stay float32
    assert hist.epochs[-1]["train_loss"] < hist.epochs[0]["train_loss"]


def test_fp16_without_cuda_is_refused_before_training(data, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(AdvtuneError, match="amp fp16 needs a CUDA device"):
        fit(model_for(data), data.train, config=TrainConfig(epochs=1, amp="fp16"))
    out = tmp_path / "fp16"
    args = ["train", "--dataset", "synthetic", "--model", "small-cnn", "--limit", "64", "--epochs", "1"]
    assert main([*args, "--amp", "fp16", "--device", "cpu", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--amp fp16 needs a CUDA device" in err and len(err.strip().splitlines()) == 1


def test_an_unknown_precision_is_a_one_line_error():
    with pytest.raises(AdvtuneError, match="unknown amp 'fp8'"):
        TrainConfig(amp="fp8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_mixed_precision_training_and_attacks(data, amp):
    model = model_for(data, "cuda")
    fit(model, data.train, adversarial(PGD(ThreatModel.linf(EPS), steps=2)), TrainConfig(epochs=1, amp=amp))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    x, y = data.test.tensors("cuda")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    with torch.autocast("cuda", dtype=dtype):
        x_adv = build_attack("pgd:steps=5", ThreatModel.linf(EPS))(model.eval(), x, y)
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_training_matches_eager_closely(data):
    """Compiled kernels sum in another order than eager cuDNN ones, and Adam's first steps divide by
    tiny second moments, so parameters drift by more than on CPU: the training itself must agree."""
    eager, compiled = model_for(data, "cuda"), model_for(data, "cuda")
    h_eager = fit(eager, data.train, config=TrainConfig(epochs=1))
    h_compiled = fit(compiled, data.train, config=TrainConfig(epochs=1, compile=True))
    drift = max((a - b).abs().max().item() for a, b in zip(eager.parameters(), compiled.parameters()))
    loss_e, loss_c = h_eager.epochs[-1]["train_loss"], h_compiled.epochs[-1]["train_loss"]
    assert drift < 1e-2 and abs(loss_e - loss_c) <= 1e-3 * max(1.0, abs(loss_e)), (drift, loss_e, loss_c)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_evaluation_with_the_gate_agrees_with_cpu(data):
    """The whole protocol on CUDA (cascade, Square, the gate indexing the CPU-side records): the same
    verdicts as on the CPU, up to an example whose margin is a float apart."""
    from advtune.evaluation import robust_accuracy, suite

    model = model_for(data)
    fit(model, data.train, config=TrainConfig(epochs=2))
    results = {}
    for device in ("cpu", "cuda"):
        m = model.to(device).eval()
        attacks = suite("standard", ThreatModel.linf(EPS))
        results[device] = robust_accuracy(
            m, data.test.tensors(device), attacks, generator=torch.Generator().manual_seed(0)
        )
    cpu, cuda = results["cpu"], results["cuda"]
    assert cuda.clean_accuracy == cpu.clean_accuracy and cuda.gate_grad_evals > 0
    assert abs(cuda.worst_case_accuracy - cpu.worst_case_accuracy) <= 1 / len(data.test) + 1e-9
    assert cuda.suspect == cpu.suspect


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_every_job_runs_on_the_gpu(tmp_path):
    every_job_runs_on(tmp_path, "cuda")


def every_job_runs_on(tmp_path, device: str) -> None:
    """train (AMP), evaluate (suite, --compile), analyze, finetune, harden with --device <device>."""
    from cli_helpers import train_argv

    base, cuda = tmp_path / "base", ["--device", device]
    assert main(train_argv(base, limit=512, limit_test=64, epochs=2, extra=(*cuda, "--amp", "bf16"))) == 0
    ev = ["evaluate", str(base), "--eps", "0.1", "--suite", "standard", "--limit-test", "64", "--quiet", *cuda]
    assert main([*ev, "--compile", "--name", "gpu"]) == 0
    assert json.loads((base / "eval-gpu.json").read_text())["examples"] == 64
    analysis = tmp_path / "analysis"
    assert main(["analyze", str(base), "--eps", "0.1", "--limit", "128", "--out", str(analysis), "--quiet", *cuda]) == 0
    tuned = tmp_path / "tuned"
    ft = ["finetune", str(base), "--select", str(analysis), "--eps", "0.1", "--limit", "256", "--epochs", "1"]
    assert main([*ft, "--out", str(tuned), "--quiet", *cuda]) == 0
    hardened = tmp_path / "hardened"
    hd = ["harden", str(base), "--eps", "0.1", "--limit", "256", "--limit-test", "64", "--budget", "5000"]
    assert main([*hd, "--out", str(hardened), "--quiet", *cuda]) == 0
    assert json.loads((hardened / "summary.json").read_text())["after"]["robust_acc"] >= 0
