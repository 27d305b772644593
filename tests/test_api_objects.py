"""What the API's returned objects are like in a REPL and an IDE: short reprs with the numbers a user looks for,
equality that works, the public class names, the type-hint marker, one version, lenient integer types."""

from __future__ import annotations

import dataclasses
import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import advtune
from advtune.errors import AdvtuneError


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 16, 16), torch.randint(0, 4, (64,))
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 256, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    return model, x, y


def test_two_equal_evaluations_compare_equal_and_read_back_equal(toy):
    """`==` compared wall times (always False), and raised on the per-example tensors when they matched."""
    model, x, y = toy
    a = advtune.evaluate(model, (x, y), eps=0.1, attacks="fgsm", limit=np.int64(16))  # numpy ints taken too
    b = advtune.evaluate(model, (x, y), eps=0.1, attacks="fgsm", limit=16)
    assert a == b and a.n == 16
    assert advtune.EvalResult.from_json(a.to_json()) == a
    assert a != advtune.evaluate(model, (x, y), eps=0.1, attacks="fgsm", limit=8)
    text = repr(a)
    assert text.startswith("EvalResult(linf eps=0.1, n=16, clean ") and "worst case" in text and "gate " in text


def test_reprs_are_one_short_line(toy):
    model, x, y = toy
    vmap = advtune.analyze(model, (x, y), eps=0.1, limit=32, curve=False)
    assert len(vmap.table) == 96 and len(repr(vmap.table)) < 200 and repr(vmap.table).startswith("ScoreTable(taylor")
    assert len(repr(vmap)) < 600
    sel = vmap.select(share=0.25)
    assert repr(sel).startswith(f"Selection({len(sel)} components in ") and len(repr(sel)) < 200
    hardened = advtune.harden(model, (x, y), eps=0.1, budget=2000, test=(x[:8], y[:8]), evaluation="fgsm")
    assert type(hardened) is advtune.HardenResult and advtune.HardenResult.__name__ == "HardenResult"
    text = repr(hardened)
    assert text.startswith("HardenResult(linf eps=0.1: before clean ") and "% of the parameters" in text
    assert len(text) < 300 and "\n" not in text
    assert repr(hardened.selection).startswith("SparseEntries(") and "object at 0x" not in repr(hardened.selection)


def test_the_package_ships_its_type_hints_and_one_version():
    assert (Path(advtune.__file__).parent / "py.typed").is_file()
    assert importlib.metadata.version("advtune") == advtune.__version__


def test_write_patch_with_its_arguments_swapped_is_one_line(toy, tmp_path):
    model = toy[0]
    with pytest.raises(AdvtuneError, match="write_patch\\(path, base, hardened\\): path first, got a Sequential"):
        advtune.write_patch(model, model, tmp_path / "p.safetensors")
    with pytest.raises(AdvtuneError, match="hardened must be a model or its state_dict, got str"):
        advtune.write_patch(tmp_path / "p.safetensors", model, "hardened.safetensors")


def test_fit_takes_the_loops_name_for_its_config_and_refuses_a_non_attack_val_attack(toy):
    """`fit(m, d, cfg=...)` was "multiple values for argument 'cfg'"; `val_attack=3` trained and measured nothing."""
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 2, (32,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    assert len(advtune.fit(model, (x, y), cfg=advtune.TrainConfig(epochs=2)).epochs) == 2
    with pytest.raises(AdvtuneError, match="val_attack must be an attack .*got int"):
        advtune.fit(model, (x, y), val_attack=3)


def test_results_on_other_images_differ_and_a_record_read_twice_is_equal(toy):
    model, x, y = toy
    a = advtune.evaluate(model, (x[:16], y[:16]), eps=0.1, attacks="fgsm")
    b = advtune.evaluate(model, (x[16:32], y[16:32]), eps=0.1, attacks="fgsm")
    assert b.checksum is not None and not torch.equal(a.checksum, b.checksum)
    same_counts_other_images = dataclasses.replace(a, labels=b.labels, checksum=b.checksum)
    assert a != same_counts_other_images and a == dataclasses.replace(a)  # another measurement; the same one
    record = a.to_json()
    record["max_perturbation"] = {k: None for k in record["max_perturbation"]}  # NaN, as an all_max may give
    assert advtune.EvalResult.from_json(record) == advtune.EvalResult.from_json(record)
    empty = advtune.EvalResult.from_json({**a.to_json(), "n": 0, "n_clean_correct": 0, "n_robust_worst": 0})
    assert "clean n/a" in repr(empty)
