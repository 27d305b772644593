"""Your own model on the command line: --model file.py:factory / package.module:factory (+ --weights),
rebuilt from the run by every command, the file's hash checked; bad specs are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import advtune
from advtune.cli import main
from advtune.errors import AdvtuneError

NETS = """
import torch
from torch import nn

def make(input_shape, num_classes):
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * (h // 2) * (w // 2), num_classes))

def no_args():
    return make((1, 16, 16), 4)

def raises():
    raise ValueError("bad width")

def three_outputs():
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 3))

def not_a_module():
    return "model"
"""


def _train(out, model, *extra):
    return [
        "train",
        "--dataset",
        "synthetic",
        "--model",
        model,
        "--epochs",
        "1",
        "--limit",
        "300",
        "--limit-test",
        "100",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


@pytest.fixture
def nets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets.py").write_text(NETS)
    return tmp_path / "nets.py"


def test_a_factory_model_trains_and_every_command_rebuilds_it(nets, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train(run, "nets.py:make")) == 0
    meta = json.loads((run / "model.json").read_text())
    assert meta["factory"]["file"] == str(nets) and len(meta["factory"]["sha256"]) == 64
    assert main(["evaluate", str(run), "--eps", "0.1", "--attacks", "fgsm", "--limit-test", "50", "--quiet"]) == 0
    assert (
        main(
            [
                "analyze",
                str(run),
                "--eps",
                "0.1",
                "--out",
                str(tmp_path / "an"),
                "--limit",
                "100",
                "--curve-limit",
                "50",
                "--criteria",
                "taylor",
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "finetune",
                str(run),
                "--eps",
                "0.1",
                "--select",
                str(tmp_path / "an"),
                "--share",
                "0.2",
                "--out",
                str(tmp_path / "ft"),
                "--limit",
                "200",
                "--monitor-test",
                "0",
                "--eps-warmup",
                "0.3",
                "--quiet",
            ]
        )
        == 0
    )
    loaded = advtune.load_model(tmp_path / "ft")
    assert type(loaded).__name__ == "Sequential" and isinstance(loaded[1], torch.nn.BatchNorm2d)
    # the file changes: every command refuses the run, in one line
    nets.write_text(NETS + "\n# edited\n")
    capsys.readouterr()
    assert main(["evaluate", str(run), "--eps", "0.1", "--attacks", "fgsm", "--limit-test", "50", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "changed since this run was written" in err and err.count("\n") == 1


def test_weights_with_zero_epochs_record_the_model_as_it_is(nets, tmp_path):
    model = advtune.models.build_from_factory("nets.py:make", (1, 16, 16), 4)
    torch.nn.init.constant_(model[0].bias, 0.25)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert (
        main(
            _train(tmp_path / "imported", "nets.py:make", "--weights", str(tmp_path / "w.safetensors"), "--epochs", "0")
        )
        == 0
    )
    saved = load_file(str(tmp_path / "imported" / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_a_package_module_factory(nets, tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "arch.py").write_text(NETS)
    assert main(_train(tmp_path / "run", "mypkg.arch:no_args")) == 0
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["factory"]["module"] == "mypkg.arch" and len(meta["factory"]["sha256"]) == 64
    # a model.json that names a callable without the hash advtune records (edited, or not advtune's): nothing of it
    # is imported or called (sys.exit would end the process)
    unhashed = {k: v for k, v in meta["factory"].items() if k != "sha256"}
    for factory in (unhashed, {"spec": "sys:exit", "module": "sys", "name": "exit"}):
        (tmp_path / "run" / "model.json").write_text(json.dumps({**meta, "factory": factory}))
        with pytest.raises(AdvtuneError, match="without its file's sha256.*nothing of it is run"):
            advtune.load_model(tmp_path / "run")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("missing.py:make", "no such file"),
        ("nets.py:nothere", "has no function 'nothere'; it has: make, no_args"),
        ("nets.py:raises", "the factory raised ValueError: bad width"),
        ("nets.py:three_outputs", "returns 3 outputs per example but the data has 4 classes"),
        ("nets.py:not_a_module", "returned str, not a torch.nn.Module"),
        ("nets.py:", "write path/to/file.py:factory"),
        ("nomodule.sub:make", "no module 'nomodule.sub' on the Python path"),
        ("sys:exit", "module 'sys' has no .py file to record"),  # a built-in: nothing to hash, nothing called
    ],
)
def test_bad_model_specs_are_one_line_errors(nets, tmp_path, capsys, spec, message):
    assert main(_train(tmp_path / "bad", spec)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()  # nothing written


def test_a_plain_user_model_saved_without_a_factory_says_how_to_load_it(tmp_path):
    from conftest import TinyCNN

    advtune.save_model(TinyCNN(), tmp_path / "m")
    with pytest.raises(advtune.AdvtuneError, match="load the weights into your own model"):
        advtune.load_model(tmp_path / "m")
