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

class _ZeroGradRound(torch.autograd.Function):  # an input quantiser with no gradient: planted gradient masking
    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)

class _Masked(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(_ZeroGradRound.apply(x))

def masked(input_shape, num_classes):
    return _Masked(make(input_shape, num_classes))

def tied(input_shape, num_classes):
    shared = nn.Linear(16, 16)  # one module used twice: its weights appear under two names of the state_dict
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 16), nn.ReLU(), shared, nn.ReLU(), shared,
                         nn.Linear(16, num_classes))
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
    capsys.readouterr()
    assert main(["info", str(tmp_path / "ft")]) == 0  # a new-user walk: "model ? on ..." for a run of an own model
    assert f"model      {nets}:make on synthetic" in capsys.readouterr().out
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
        ("nets.py:nothere", "has no function 'nothere'; it has: make, masked, no_args"),
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


def test_a_module_spec_is_located_and_hashed_without_running_code(tmp_path, monkeypatch):
    """`pkg.sub:make` was located with importlib.util.find_spec, which imports `pkg` (runs its __init__.py) before
    the file's hash is compared: a received run folder's model.json ran code even when it was then refused."""
    from advtune.factories import factory_record

    pkg = "advtune_locate_test_pkg"  # a name no other test imports (sys.modules is shared within a worker)
    marker = tmp_path / "ran"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (tmp_path / pkg / "nets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # after the files exist: it refreshes the import system's caches
    record = factory_record(f"{pkg}.nets:make")
    assert record["module_file"] == str(tmp_path / pkg / "nets.py") and len(record["sha256"]) == 64
    with pytest.raises(AdvtuneError, match=f"no module '{pkg}.absent'"):
        factory_record(f"{pkg}.absent:make")
    meta = {"factory": {**record, "sha256": "0" * 64}, "input_shape": [1, 16, 16], "num_classes": 4}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(AdvtuneError, match="changed since this run was written"):
        advtune.load_model(tmp_path / "run")
    assert not marker.exists()  # located, hashed and refused: nothing of the package ran


def test_a_model_with_tied_weights_exports_as_it_saves(nets, tmp_path):
    """save_model stored tied weights (one tensor under two names) each on its own; export handed them to
    safetensors as they were, which refuses tensors sharing memory: a traceback after a finished run."""
    from safetensors.torch import load_file

    run = tmp_path / "tied-run"
    assert main(_train(run, "nets.py:tied")) == 0
    out = tmp_path / "tied.safetensors"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out), "--quiet"]) == 0
    exported, saved = load_file(out), load_file(run / "model.safetensors")
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    assert torch.equal(exported["3.weight"], exported["5.weight"])


def test_the_masking_gate_runs_and_fires_in_the_evaluate_command(nets, tmp_path, capsys):
    """Nothing above `robust_accuracy` showed that a job runs the gate: a command that skipped it printed
    "masking gate: passed" for a model whose gradients are zero. A planted masking model, through the command."""
    run = tmp_path / "masked-run"
    assert main(_train(run, "nets.py:masked", "--epochs", "2")) == 0
    capsys.readouterr()
    argv = ["evaluate", str(run), "--eps", "0.3", "--attacks", "pgd:steps=5,square:queries=300", "--limit-test", "60"]
    assert main([*argv, "--name", "gate"]) == 0
    shown = capsys.readouterr().out
    record = json.loads((run / "eval-gate.json").read_text())
    assert record["clean_accuracy"] > 0.5 and record["gate_grad_evals"] > 0
    assert any(s.startswith("zero-gradients") for s in record["suspect"]), record["suspect"]
    assert "masking gate: passed" not in shown and "zero-gradients" in shown


def test_a_factory_file_imports_the_helper_modules_beside_it(tmp_path, monkeypatch):
    """An audit: `python file.py` imports the modules beside the file; advtune's console script ran the file without
    its folder on the path ("No module named 'blocks'") unless the command ran from that folder."""
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))  # what the import adds is undone after the test
    code = tmp_path / "code"
    code.mkdir()
    (code / "advtune_test_blocks.py").write_text("from torch import nn\nWIDTH = 8\n")
    (code / "mine.py").write_text(
        "from torch import nn\nfrom advtune_test_blocks import WIDTH\n\n"
        "def make(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, WIDTH), nn.ReLU(), nn.Linear(WIDTH, num_classes))\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delitem(sys.modules, "advtune_test_blocks", raising=False)
    from advtune.factories import build_from_factory

    model = build_from_factory(f"{code / 'mine.py'}:make", (1, 16, 16), 4)
    assert model[1].out_features == 8


def test_a_model_that_raises_while_training_is_one_line_naming_its_line(tmp_path, monkeypatch, capsys):
    """A bad-input audit: a factory model whose forward fails only in train mode printed a 32-line traceback through
    advtune's loop; with --overwrite nothing said where the replaced run was kept."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flaky.py").write_text(
        "from torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 14 * 14, 4)\n\n"
        "    def forward(self, x):\n"
        "        if self.training:\n"
        "            raise ValueError('train-mode forward fails')\n"
        "        return self.fc(self.conv(x).flatten(1))\n\n"
        "def make():\n"
        "    return Net()\n"
    )
    assert main(_train(tmp_path / "ok", "small-cnn")) == 0
    capsys.readouterr()
    assert main(_train(tmp_path / "ok", "flaky.py:make", "--overwrite")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "your model raised ValueError: train-mode forward fails (flaky.py:10)" in err
    assert "held before is kept at" in err  # where the run it was replacing is
    # out of memory inside your forward: the batch-size fix, not "your model raised" (a review)
    (tmp_path / "flaky.py").write_text(
        (tmp_path / "flaky.py")
        .read_text()
        .replace(
            "raise ValueError('train-mode forward fails')",
            "raise RuntimeError('CUDA out of memory. Tried to allocate 2 GiB')",
        )
    )
    assert main(_train(tmp_path / "oom", "flaky.py:make")) == 2
    err = capsys.readouterr().err
    assert "advtune: error: out of memory (CUDA out of memory" in err and "your model raised" not in err
