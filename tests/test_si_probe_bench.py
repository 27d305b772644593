"""bench/si_probe.py (#21, round 36): the path-integral score is what it says, and the bench's mask is taken by it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from advtune.cli import main
from cli_helpers import train_argv


@pytest.fixture
def si(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import si_probe

    return si_probe


def test_the_path_integral_adds_up_to_the_loss_decrease_and_stops_listening(si):
    """Small SGD steps on a quadratic: the scores sum to the loss decrease (first order), each entry's share is its
    own (the entry the loss does not depend on scores 0), and after stop() other optimizers are not heard."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    weights = torch.tensor([3.0, 1.0, 0.0])  # the third entry does not matter to the loss
    loss = lambda: (weights * w**2).sum()  # noqa: E731
    opt = torch.optim.SGD([w], lr=1e-3)
    integral = si.PathIntegral()
    start = float(loss().detach())
    for _ in range(200):
        opt.zero_grad()
        loss().backward()
        opt.step()
    integral.stop()
    omega = integral.omega[id(w)]
    assert integral.steps == 200 and omega[2] == 0 and bool((omega[:2] > 0).all())
    assert abs(float(omega.sum()) - (start - float(loss().detach()))) < 1e-2 * start
    opt.zero_grad()
    loss().backward()
    opt.step()
    assert integral.steps == 200  # removed: the masked stage's steps are not counted


def test_the_bench_runs_finetunes_probe_rule_with_the_score(si, tmp_path, monkeypatch):
    assert main(train_argv(tmp_path / "base", limit=200, limit_test=20)) == 0
    assert (
        main(["analyze", str(tmp_path / "base"), "--eps", "0.2", "--limit", "64", "--out", str(tmp_path / "an")]) == 0
    )
    argv = [str(tmp_path / "base"), "--select", str(tmp_path / "an"), "--eps", "0.2", "--attack", "pgd:steps=1"]
    argv += ["--params", "0.1", "--granularity", "probe", "--probe-quotas", "--head", "--limit", "200"]
    argv += ["--budget", "3000", "--monitor-test", "0", "--quiet"]
    seen = {}
    real = si.PathIntegral.scores
    monkeypatch.setattr(si.PathIntegral, "scores", lambda self, m: seen.setdefault("s", real(self, m)))
    assert si.run([*argv, "--out", str(tmp_path / "si")]) == 0
    record = json.loads((tmp_path / "si" / "si-probe.json").read_text())
    assert record["probe_steps"] > 0 and seen["s"]
    # within each scored layer the entries that changed are the top of the score (the quotas' share of it)
    base, tuned = (
        load_file(str(tmp_path / "base" / "model.safetensors")),
        load_file(str(tmp_path / "si" / "model.safetensors")),
    )
    name = "net.conv2.weight"
    changed = tuned[name] != base[name]
    score = seen["s"][name]
    assert 0 < int(changed.sum()) < changed.numel()
    assert float(score[changed].min()) >= float(score[~changed].max())
    import advtune.runs.probe as probe_stage

    assert probe_stage.movement_scores is si.movement_scores  # the library's rule is back after the bench
    with pytest.raises(SystemExit, match="--granularity probe"):
        si.run([a for a in argv if a not in ("--granularity", "probe")] + ["--out", str(tmp_path / "x")])
