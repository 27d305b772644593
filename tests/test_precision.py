"""Mixed precision (--amp) and the GPU path: bf16 autocast runs on CPU and keeps adversarial examples
in the threat model; fp16 needs CUDA (a one-line error otherwise); the CUDA tests run where a GPU is."""

from __future__ import annotations

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
    with pytest.raises(AdvtuneError, match="--amp fp16 needs a CUDA device"):
        fit(model_for(data), data.train, config=TrainConfig(epochs=1, amp="fp16"))
    out = tmp_path / "fp16"
    args = ["train", "--dataset", "synthetic", "--model", "small-cnn", "--limit", "64", "--epochs", "1"]
    assert main([*args, "--amp", "fp16", "--device", "cpu", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--amp fp16 needs a CUDA device" in err and len(err.strip().splitlines()) == 1


def test_an_unknown_precision_is_a_one_line_error():
    with pytest.raises(AdvtuneError, match="unknown --amp 'fp8'"):
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
    eager, compiled = model_for(data, "cuda"), model_for(data, "cuda")
    fit(eager, data.train, config=TrainConfig(epochs=1))
    fit(compiled, data.train, config=TrainConfig(epochs=1, compile=True))
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert torch.allclose(a, b, atol=1e-4)
