"""The Python API reaches what the commands do, in its own words: harden's held-out split, checkpoint choice and
training limit as keywords (and a Dataset's own validation split), a keyword the function does not take names the one
meant, a vulnerability map read back from its JSON selects again, and AdvtuneError is the ValueError Python callers
expect, without internal handlers swallowing its precise messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import advtune
from advtune import AdvtuneError
from advtune.data import Dataset, TensorData
from conftest import TinyCNN

QUICK = {"eps": 0.2, "budget": 6000}
ROOT = Path(__file__).resolve().parents[1]


def test_harden_takes_the_commands_holdout_keep_best_and_limit(tiny_model, blobs):
    x, y, _, _ = blobs
    data = (x[:400], y[:400])
    default = advtune.harden(tiny_model, data, **QUICK).summary()
    assert default["analysis_examples"] == 360 and default["checkpoints"]["examples"] == 40  # a tenth held out
    held = advtune.harden(tiny_model, data, holdout=50, keep_best=2, **QUICK).summary()
    assert held["analysis_examples"] == 350 and held["checkpoints"]["examples"] == 50
    assert len(held["checkpoints"]["curve"]) == 2
    last = advtune.harden(tiny_model, data, holdout=0, keep_best=0, **QUICK).summary()
    assert last["analysis_examples"] == 400 and last.get("checkpoints") is None  # every image trains, the last kept
    few = advtune.harden(tiny_model, data, limit=200, **QUICK).summary()
    assert few["analysis_examples"] == 180  # the first 200, a tenth of them held out


def test_harden_uses_a_datasets_own_validation_split(tiny_model, blobs):
    x, y, xt, yt = blobs
    val = TensorData(x[400:430], y[400:430])
    ds = Dataset("blobs", TensorData(x[:400], y[:400]), TensorData(xt, yt), list("abcd"), (0.5,), (0.5,), val=val)
    s = advtune.harden(tiny_model, ds, limit_test=20, evaluation="apgd-ce", **QUICK).summary()
    assert s["analysis_examples"] == 400 and s["checkpoints"]["examples"] == 30  # train intact, its val chooses
    s = advtune.harden(tiny_model, ds, keep_best=0, limit_test=20, evaluation="apgd-ce", **QUICK).summary()
    assert s.get("checkpoints") is None
    with pytest.raises(AdvtuneError, match=r"holds out its own val split \(30 examples\).*drop holdout="):
        advtune.harden(tiny_model, ds, holdout=10, **QUICK)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"holdout": -1}, r"^holdout must be an integer >= 0"),
        ({"keep_best": 1.5}, r"^keep_best must be an integer >= 0"),
        ({"limit": 0}, r"^limit must be a positive integer"),
        ({"holdout": 20, "keep_best": 0}, r"^holdout 20 chooses between checkpoints, but keep_best 0 keeps the last"),
        ({"holdout": 400}, r"^holdout 400 leaves no training data"),
    ],
)
def test_harden_refuses_bad_holdout_settings_in_keywords_before_work(tiny_model, blobs, kw, match):
    x, y, _, _ = blobs
    with pytest.raises(AdvtuneError, match=match):
        advtune.harden(tiny_model, (x[:400], y[:400]), **QUICK, **kw)


def test_an_unknown_keyword_names_the_one_meant(tiny_model, blobs):
    x, y, xt, yt = blobs
    with pytest.raises(TypeError, match=r"evaluate\(\) got an unexpected keyword argument 'limit_test'; did you mean "):
        advtune.evaluate(tiny_model, (xt, yt), eps=0.1, limit_test=5)
    with pytest.raises(TypeError, match=r"it is a Recipe setting: recipe=Recipe\(params=\.\.\.\)"):
        advtune.harden(tiny_model, (x, y), eps=0.1, params=0.2)
    with pytest.raises(TypeError, match=r"analyze\(\) got an unexpected keyword argument 'criteria'; did you mean "):
        advtune.analyze(tiny_model, (x, y), eps=0.1, criteria="taylor")
    with pytest.raises(TypeError, match=r"did you mean seed=\.\.\.\?"):
        advtune.evaluate(tiny_model, (xt, yt), eps=0.1, sed=1)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'colour'$"):  # nothing near: Python's words
        advtune.evaluate(tiny_model, (xt, yt), eps=0.1, colour=1)


def test_a_vulnerability_map_read_back_from_json_selects_as_the_original(tiny_model, blobs):
    x, y, _, _ = blobs
    vmap = advtune.analyze(tiny_model, (x[:200], y[:200]), eps=0.2, limit=200, curve=False)
    data = json.loads(json.dumps(vmap.to_json()))
    back = advtune.VulnerabilityMap.from_json(data, tiny_model)
    assert back.ranked() == vmap.ranked() and back.threat == vmap.threat and back.grad_evals == vmap.grad_evals
    a, b = vmap.select(params=0.2), back.select(params=0.2)
    assert a.trainable_params(tiny_model) == b.trainable_params(tiny_model) and a.to_json() == b.to_json()
    alone = advtune.VulnerabilityMap.from_json(data)  # without the model: read, not select
    assert alone.ranked() == vmap.ranked()
    with pytest.raises(AdvtuneError, match="needs the model this map was made for"):
        alone.select(share=0.1)
    other = advtune.build_model("small-cnn", input_shape=(1, 16, 16), num_classes=4)
    with pytest.raises(AdvtuneError, match="made for a different model"):
        advtune.VulnerabilityMap.from_json(data, other)
    with pytest.raises(AdvtuneError, match=r"made for a model of 2,\d{3} parameters; this one has 5:"):
        advtune.VulnerabilityMap.from_json(
            {**data, "scores": {**data["scores"], "metadata": {}}}, torch.nn.Linear(4, 1)
        )
    with pytest.raises(AdvtuneError, match=r"^eps must be"):  # the threat's own words, not "malformed"
        advtune.VulnerabilityMap.from_json({**data, "threat": {**data["threat"], "eps": -1}})
    with pytest.raises(AdvtuneError, match="malformed vulnerability map JSON"):
        advtune.VulnerabilityMap.from_json({**data, "params": "many"}, tiny_model)
    with pytest.raises(AdvtuneError, match="not an advtune vulnerability map"):
        advtune.VulnerabilityMap.from_json({"format": "x"})
    with pytest.raises(AdvtuneError, match="malformed vulnerability map JSON"):
        advtune.VulnerabilityMap.from_json({k: v for k, v in data.items() if k != "grad_evals"})


def test_advtune_error_is_a_value_error_and_keeps_its_precise_messages(tmp_path):
    assert issubclass(AdvtuneError, ValueError)
    with pytest.raises(ValueError, match="eps"):  # a caller's `except ValueError` catches a bad argument
        advtune.ThreatModel.linf(-1)
    # the handlers that wrap a parser's ValueError no longer swallow advtune's own message into a generic one
    np.savez(tmp_path / "d.npz", x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(2, np.int64))
    with pytest.raises(AdvtuneError, match=r"lacks arrays x_test, y_test; an \.npz dataset needs") as e:
        advtune.data.formats.load_npz(tmp_path / "d.npz")
    assert "corrupt" not in str(e.value)
    table = {"format": "advtune.scores/1", "criterion": "taylor", "components": ["a[1"], "scores": [1.0]}
    with pytest.raises(AdvtuneError, match=r"^cannot parse component 'a\[1'"):
        advtune.ScoreTable.from_json(table)
    table["components"] = ["a[0]", "a[1]"]
    with pytest.raises(AdvtuneError, match=r"^score table has 2 components but 1 scores"):
        advtune.ScoreTable.from_json(table)


@pytest.mark.parametrize("script", ["reselect.py", "delta_truncate.py"])
def test_a_bench_scripts_bad_number_is_said_in_its_own_words(script):
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "runs/none", "--eps", "abc"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "argument --eps: not a number: 'abc'" in out.stderr, out.stderr


def test_the_map_left_the_api_module_and_is_still_its_name():
    from advtune import api, vulnerability

    assert advtune.VulnerabilityMap is vulnerability.VulnerabilityMap is api.VulnerabilityMap
    assert advtune.VulnerabilityMap.__module__ == "advtune.vulnerability.vulnerability_map"  # one home


def test_evaluate_takes_the_commands_compile_choice(tiny_model, blobs):
    _, _, xt, yt = blobs
    square = advtune.Square(advtune.ThreatModel.linf(0.1), queries=20)
    import advtune.api as api

    seen = []
    real = api.robust_accuracy

    def spy(model, data, attacks, **kw):
        seen.append([getattr(a, "compile", "-") for a in attacks])
        return real(model, data, attacks, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "robust_accuracy", spy)
        eager = advtune.evaluate(tiny_model, (xt, yt), eps=0.1, attacks=[square], limit=8, compile=False)
        auto = advtune.evaluate(tiny_model, (xt, yt), eps=0.1, attacks=[square], limit=8)
    assert seen == [[False], [None]] and eager.worst_case_accuracy == auto.worst_case_accuracy
    with pytest.raises(AdvtuneError, match="^compile= decides how Square queries the model; these attacks have no"):
        advtune.evaluate(tiny_model, (xt, yt), eps=0.1, attacks="apgd-ce", compile=True)
    with pytest.raises(AdvtuneError, match="^compile must be True, False or None"):
        advtune.evaluate(tiny_model, (xt, yt), eps=0.1, compile="yes")


def test_fit_guards_fgsm_training_as_the_commands_do(blobs):
    x, y, _, _ = blobs
    threat = advtune.ThreatModel.linf(0.1)
    cfg = advtune.TrainConfig(epochs=1, batch_size=100)

    def watched(objective, **kw) -> bool:
        history = advtune.fit(TinyCNN(), (x[:300], y[:300]), objective, cfg, **kw)
        return "guard_pgd_acc" in history.last

    assert watched(advtune.adversarial(advtune.FGSM(threat)))  # on by default for FGSM, as --guard's default
    assert not watched(advtune.adversarial(advtune.FGSM(threat)), guard=False)
    assert not watched(advtune.adversarial(advtune.PGD(threat, steps=1)))
    assert watched(advtune.adversarial(advtune.PGD(threat, steps=1)), guard=True)
    with pytest.raises(AdvtuneError, match="^guard=True/False/None watches adversarial training"):
        advtune.fit(TinyCNN(), (x[:300], y[:300]), advtune.clean(), cfg, guard=True)
    assert watched(advtune.trades(threat, steps=1), guard=True)  # as `train --adversarial trades --guard`
    # its PGD-10 on 512 images is counted, as the command counts it
    off = advtune.fit(TinyCNN(), (x[:300], y[:300]), advtune.adversarial(advtune.FGSM(threat)), cfg, guard=False)
    on = advtune.fit(TinyCNN(), (x[:300], y[:300]), advtune.adversarial(advtune.FGSM(threat)), cfg)
    assert on.last["grad_evals"] >= off.last["grad_evals"] + 300 * 10  # (its subset: the 300 training images)
    moving = advtune.TrainConfig(epochs=1, batch_size=100, regrow=0.3)
    with pytest.raises(AdvtuneError, match="^regrow with the overfitting guard"):
        advtune.fit(TinyCNN(), (x[:300], y[:300]), advtune.adversarial(advtune.FGSM(threat)), moving)


def test_fit_names_the_setting_a_stray_keyword_belongs_to(blobs):
    x, y, _, _ = blobs
    with pytest.raises(TypeError, match=r"it is a TrainConfig setting: config=TrainConfig\(epochs=\.\.\.\)"):
        advtune.fit(TinyCNN(), (x[:64], y[:64]), epochs=1)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'callback'; did you mean callbacks="):
        advtune.fit(TinyCNN(), (x[:64], y[:64]), callback=[])


def test_compile_leaves_an_attack_of_your_own_alone(tiny_model, blobs):
    _, _, xt, yt = blobs
    threat = advtune.ThreatModel.linf(0.1)

    class Noise:  # an attack that is not a dataclass
        spec, threat_ = "noise", threat

        def __init__(self):
            self.threat = threat

        def perturb(self, model, x, y, generator=None):
            return x

    chosen = advtune.evaluation.compiled_queries([Noise(), advtune.Square(threat, queries=5)], False)
    assert isinstance(chosen[0], Noise) and chosen[1].compile is False
