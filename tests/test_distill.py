"""Distillation from a teacher on adversarial inputs (`distill:teacher=...`, #21 round 25): the loss is the stated
mix of cross-entropy and the tempered KL to the teacher, the teacher's pass is paid for, a bad teacher is refused in
one line before any work, training pulls the student toward its teacher, and inside the probe rule `teacher=probe`
is the probe's own model (the probe itself trains without one)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from advtune.errors import AdvtuneError
from advtune.models import load_model, read_meta, save_model
from advtune.threat import ThreatModel
from advtune.train import build_objective, cost_per_example, probe_stage_attack, with_probe_teacher


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from advtune.cli import main
    from cli_helpers import train_argv

    out = tmp_path_factory.mktemp("distill") / "base"
    assert main(train_argv(out, limit=200, limit_test=40)) == 0
    return out


def shaken_teacher(base, folder, scale: float = 0.5, seed: int = 3):
    """A teacher that disagrees with `base`: its weights moved by random noise, saved as a model folder."""
    model, meta = load_model(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    save_model(folder, model, meta)
    return folder


def test_the_loss_is_the_stated_mix_and_the_teachers_pass_is_paid_for(base, tmp_path):
    student = load_model(base)[0].train()
    teacher_dir = shaken_teacher(base, tmp_path / "teacher")
    threat = ThreatModel("linf", 0.1)
    x = torch.rand(16, *read_meta(base)["input_shape"])
    y = torch.randint(0, read_meta(base)["num_classes"], (16,))
    obj = build_objective(
        f"distill:teacher={teacher_dir},steps=2,alpha=0.25,temperature=3", threat, model=student, load_model=load_model
    )
    out = obj(student, x, y, generator=torch.Generator().manual_seed(0))
    x_adv = out["x_adv"]
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6 and 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
    logits = student(x_adv)
    with torch.no_grad():
        t = load_model(teacher_dir)[0](x_adv)
    p_t = torch.softmax(t / 3, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(logits / 3, 1))).sum(1).mean()
    want = 0.75 * nn.functional.cross_entropy(logits, y) + 0.25 * 9 * kl
    assert torch.allclose(out["loss"], want, atol=1e-5), (float(out["loss"]), float(want))
    # alpha=0 is adversarial training with the same attack, step for step
    plain = build_objective(
        f"distill:teacher={teacher_dir},steps=2,alpha=0", threat, model=student, load_model=load_model
    )
    adv = build_objective("pgd:steps=2", threat)
    a = plain(student, x, y, generator=torch.Generator().manual_seed(1))
    b = adv(student, x, y, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a["x_adv"], b["x_adv"]) and torch.allclose(a["loss"], b["loss"])
    # PGD-2 + the teacher's forward (counted whole) + the update
    assert obj.attack_grad_evals() == 3 and cost_per_example(obj) == 4.0 == cost_per_example(adv) + 1
    assert obj.describe()["teacher"] == str(teacher_dir) and obj.describe()["alpha"] == 0.25
    assert all(not p.requires_grad for p in obj.teacher.parameters())
    # the eps ramp: the attack's eps scaled down during the warm-up, the teacher and the mix kept
    ramped = build_objective(
        f"distill:teacher={teacher_dir}", threat, "eval", 0.5, model=student, load_model=load_model
    )
    assert abs(ramped.at(0.25).attack.threat.eps - 0.05) < 1e-9 and ramped.at(0.25).teacher is ramped.teacher
    assert ramped.at(0.5) is ramped


def test_a_bad_distill_spec_or_teacher_is_refused_in_one_line(base, tmp_path):
    student = load_model(base)[0]
    threat = ThreatModel("linf", 0.1)
    for spec, match in (
        ("distill", "needs a teacher"),
        ("distill:teacher=probe", "only exists inside --granularity probe"),
        (f"distill:teacher={base},alpha=1.5", "alpha"),
        (f"distill:teacher={base},temperature=0", "temperature"),
        (f"distill:teacher={base},steps=0", "steps"),
        (f"distill:teacher={base},beta=3", "unknown distill parameter"),
        (f"distill:teacher={base},load_model=x", "unknown distill parameter"),  # the loader is the caller's
        (f"distill:teacher={tmp_path / 'none'}", "no saved model"),
    ):
        with pytest.raises(AdvtuneError, match=match) as e:
            build_objective(spec, threat, model=student, load_model=load_model)
        assert "\n" not in str(e.value), str(e.value)
    with pytest.raises(AdvtuneError, match="load_model=advtune.models.load_model"):
        build_objective(f"distill:teacher={base}", threat, model=student)  # the training loop knows no model zoo


def test_a_teacher_for_other_inputs_or_classes_is_refused(base, tmp_path):
    student, meta = load_model(base)
    threat = ThreatModel("linf", 0.1)
    wide = dict(meta, num_classes=12)
    from advtune.models import build_model

    model = build_model(meta["architecture"], meta["input_shape"], 12)
    save_model(tmp_path / "twelve", model, wide)
    with pytest.raises(AdvtuneError, match=f"12 classes and the model {meta['num_classes']}"):
        build_objective(f"distill:teacher={tmp_path / 'twelve'}", threat, model=student, load_model=load_model)


def test_probe_teacher_specs():
    assert probe_stage_attack("pgd:steps=5") is None and probe_stage_attack("distill:teacher=runs/t") is None
    assert probe_stage_attack("distill:teacher=probe,alpha=0.7") == "pgd:steps=5"
    assert probe_stage_attack("distill:teacher=PROBE,steps=3,step=0.01") == "pgd:steps=3,step_size=0.01"
    assert with_probe_teacher("distill:teacher=probe,alpha=0.7", "runs/x.probe") == (
        "distill:teacher=runs/x.probe,alpha=0.7"
    )
    assert with_probe_teacher("pgd:steps=5", "runs/x.probe") == "pgd:steps=5"
    with pytest.raises(AdvtuneError, match="comma"):
        with_probe_teacher("distill:teacher=probe", "runs/a,b.probe")


def _kl_to(teacher, student, x) -> float:
    with torch.no_grad():
        p = torch.log_softmax(teacher(x), 1)
        return float((p.exp() * (p - torch.log_softmax(student(x), 1))).sum(1).mean())


def test_training_with_a_teacher_pulls_the_student_toward_it(base, tmp_path):
    from advtune.cli import main

    teacher_dir = shaken_teacher(base, tmp_path / "teacher", scale=1.0)
    teacher = load_model(teacher_dir)[0]
    x = torch.rand(200, *read_meta(base)["input_shape"], generator=torch.Generator().manual_seed(5))
    before = _kl_to(teacher, load_model(base)[0], x)
    argv = ["finetune", str(base), "--eps", "0.05", "--select", "all", "--budget", "3000", "--quiet"]
    argv += ["--limit", "200", "--limit-test", "20", "--monitor-test", "0"]
    for alpha in (1, 0):
        spec = f"distill:teacher={teacher_dir},steps=1,alpha={alpha}"
        assert main([*argv, "--attack", spec, "--out", str(tmp_path / f"a{alpha}")]) == 0
    pulled = _kl_to(teacher, load_model(tmp_path / "a1")[0], x)
    alone = _kl_to(teacher, load_model(tmp_path / "a0")[0], x)
    assert pulled < 0.5 * before and pulled < 0.5 * alone, (before, pulled, alone)
    run = json.loads((tmp_path / "a1" / "config.json").read_text())["run"]
    assert run["attack"] == f"distill:teacher={teacher_dir},steps=1,alpha=1"


def test_the_probe_rule_teaches_its_masked_stage_with_its_own_probe(base, tmp_path, capsys):
    from advtune.cli import main

    ft = tmp_path / "ft"
    argv = ["finetune", str(base), "--eps", "0.2", "--granularity", "probe", "--params", "0.1", "--quiet"]
    argv += ["--budget", "4000", "--limit", "200", "--limit-test", "20", "--monitor-test", "0"]
    argv += ["--attack", "distill:teacher=probe,steps=1,alpha=0.5", "--out", str(ft)]
    assert main(argv) == 0
    probe_run = json.loads((tmp_path / "ft.probe" / "config.json").read_text())["run"]
    assert probe_run["attack"] == "pgd:steps=1"  # no teacher before the probe has trained
    s = json.loads((ft / "summary.json").read_text())
    assert s["selection"]["kind"] == "sparse" and s["selection"]["probe"]["grad_evals"] > 0
    objective = json.loads((ft / "config.json").read_text())["objective"]
    assert objective["objective"] == "distill" and objective["teacher"] == str(tmp_path / "ft.probe")
    # the masked stage pays PGD-1 + the teacher + the update per example (the probe PGD-1 + the update)
    epochs = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()]
    paid = [(b["grad_evals"] - a["grad_evals"], b["examples"]) for a, b in zip(epochs, epochs[1:])]
    assert paid and all(g == 3 * n for g, n in paid), paid
    assert 4000 - 3 * 64 < s["cost"]["grad_evals"] <= 4000 + 3 * 64
    assert len(objective["teacher_sha256"]) == 64
    # a bad setting of the distillation is refused before the probe trains
    for bad, match in (("alpha=1.5", "alpha"), ("beta=3", "unknown distill parameter")):
        late = tmp_path / f"late-{bad[:4]}"
        assert main([*argv[:-4], "--attack", f"distill:teacher=probe,{bad}", "--out", str(late)]) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1, err
        assert not late.exists() and not late.with_name(late.name + ".probe").exists()
    # teacher=probe needs the probe rule: refused in one line before any work
    assert main([*argv[:4], "--select", "all", *argv[8:-1], str(tmp_path / "x")]) == 2  # no --params: all
    err = capsys.readouterr().err
    assert "only exists inside --granularity probe" in err and not (tmp_path / "x").exists()


def test_harden_refuses_teacher_probe_without_the_probe_rule_before_any_work(base, tmp_path, capsys):
    from advtune.cli import main

    out = tmp_path / "h"
    argv = ["harden", str(base), "--eps", "0.2", "--granularity", "shares", "--attack", "distill:teacher=probe"]
    assert main([*argv, "--limit", "200", "--limit-test", "20", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "needs the probe rule" in err and len(err.strip().splitlines()) == 1 and not out.exists(), err


def test_adversarial_training_from_scratch_can_learn_from_a_teacher(base, tmp_path):
    from advtune.cli import main
    from cli_helpers import train_argv

    out = tmp_path / "student"
    extra = ("--adversarial", f"distill:teacher={base},steps=1,alpha=0.5", "--eps", "0.1")
    assert main(train_argv(out, limit=200, limit_test=20, extra=extra)) == 0
    objective = json.loads((out / "config.json").read_text())["objective"]
    assert objective["objective"] == "distill" and objective["teacher"] == str(base)
