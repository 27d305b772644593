"""From a deployed model in to a deployed model out: a user's own module with a PyTorch checkpoint saved
from DataParallel goes through harden, ships as a robustness patch that rebuilds it bit for bit, and as
ONNX checked against PyTorch, or as a state_dict that loads without advtune; bad input is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import advtune
from advtune.cli import main
from advtune.errors import AdvtuneError
from advtune.weights import load_checkpoint

NET = textwrap.dedent(
    """
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 4))

        def forward(self, x):
            return self.head(self.features(x))

    def net():
        return Net()
    """
)
HARDEN = ["--eps", "0.2", "--limit", "300", "--limit-test", "40", "--budget", "6000", "--evaluation", "pgd:steps=5"]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A user's module trained outside advtune, saved from DataParallel in a nested checkpoint, brought
    in with train --epochs 0, hardened, and exported three ways."""
    root = tmp_path_factory.mktemp("deploy")
    (root / "mynet.py").write_text(NET)
    sys.path.insert(0, str(root))
    try:
        import mynet
    finally:
        sys.path.remove(str(root))
    torch.manual_seed(0)
    model = mynet.net()
    advtune.fit(model, advtune.load_dataset("synthetic", limit=300), config=advtune.TrainConfig(epochs=2, lr=3e-3))
    parallel = nn.DataParallel(model)  # keys start with module., as many production checkpoints do
    torch.save({"epoch": 2, "model_state_dict": parallel.state_dict(), "best_acc": 0.9}, root / "ckpt.pt")
    spec = f"{root / 'mynet.py'}:net"
    argv = ["train", "--dataset", "synthetic", "--model", spec, "--weights", str(root / "ckpt.pt"), "--epochs", "0"]
    assert main([*argv, "--limit", "300", "--limit-test", "40", "--out", str(root / "base"), "--quiet"]) == 0
    assert main(["harden", str(root / "base"), *HARDEN, "--out", str(root / "hard"), "--quiet"]) == 0
    for fmt, name in (("onnx", "model.onnx"), ("safetensors", "model.safetensors"), ("pt", "model.pt")):
        argv = ["export", str(root / "hard"), "--format", fmt, "--out", str(root / "ship" / name), "--quiet"]
        assert main([*argv, *(["--limit-test", "40"] if fmt == "onnx" else [])]) == 0  # the ONNX check's
    return root, model


def test_a_dataparallel_checkpoint_comes_in_as_the_model_it_was(shipped):
    root, model = shipped
    base = load_file(str(root / "base" / "model.safetensors"))
    assert base.keys() == model.state_dict().keys()  # module. prefixes gone, the user's own names
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items())


def test_the_patch_is_small_and_rebuilds_the_hardened_weights_bit_for_bit(shipped, capsys):
    root, _ = shipped
    patch, model_file = root / "hard" / "patch.safetensors", root / "hard" / "model.safetensors"
    assert patch.stat().st_size < 0.5 * model_file.stat().st_size  # a few layers of a tiny model
    assert main(["apply", str(root / "base"), str(patch), "--out", str(root / "applied"), "--quiet"]) == 0
    rebuilt, hardened = load_file(str(root / "applied" / "model.safetensors")), load_file(str(model_file))
    assert rebuilt.keys() == hardened.keys() and all(torch.equal(rebuilt[k], hardened[k]) for k in hardened)
    # docs/usage.md's command: the patch applied to the user's own nested DataParallel checkpoint
    assert main(["apply", str(root / "ckpt.pt"), str(patch), "--out", str(root / "from-ckpt"), "--quiet"]) == 0
    from_ckpt = load_file(str(root / "from-ckpt" / "model.safetensors"))
    assert from_ckpt.keys() == hardened.keys() and all(torch.equal(from_ckpt[k], hardened[k]) for k in hardened)
    # the fine-tuning stage's own patch rebuilds its model too (a finetune run writes one)
    ft = root / "hard" / "finetune"
    assert main(["apply", str(root / "base"), str(ft / "patch.safetensors"), "--out", str(root / "ft-applied")]) == 0
    rebuilt_ft = load_file(str(root / "ft-applied" / "model.safetensors"))
    assert all(torch.equal(rebuilt_ft[k], v) for k, v in load_file(str(ft / "model.safetensors")).items())
    assert any(
        not torch.equal(rebuilt_ft[k], v) for k, v in load_file(str(root / "base" / "model.safetensors")).items()
    )
    # the API does the same on a live model
    base = advtune.load_model(root / "base")
    advtune.apply_patch(base, patch)
    assert all(torch.equal(v, hardened[k]) for k, v in base.state_dict().items())
    # the applied folder is a model folder: evaluate works on it
    assert main(["evaluate", str(root / "applied"), "--eps", "0.2", "--attacks", "fgsm", "--limit-test", "20"]) == 0
    assert main(["info", str(root / "hard")]) == 0
    assert "% of the model: advtune apply" in capsys.readouterr().out


def test_a_patch_for_another_base_or_damaged_is_refused_in_one_line(shipped, tmp_path, capsys):
    root, _ = shipped
    patch = root / "hard" / "patch.safetensors"
    other = {k: v + 1e-3 for k, v in load_file(str(root / "base" / "model.safetensors")).items()}
    save_file(other, str(tmp_path / "other.safetensors"))
    assert main(["apply", str(tmp_path / "other.safetensors"), str(patch), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a patch for another base model" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing written
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(patch.read_bytes()[:200])
    assert main(["apply", str(root / "base"), str(cut), "--out", str(tmp_path / "o")]) == 2
    assert "truncated or not a safetensors file" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["apply", str(root / "base"), str(patch), "--out", str(root / "hard")]) == 2  # over its own run
    assert "holds the patch" in capsys.readouterr().err


def test_apply_never_replaces_its_inputs_and_names_what_is_wrong(shipped, tmp_path, capsys):
    """A review found `apply --overwrite` moving aside an --out that held its patch one level down (a harden run and
    its fine-tuning stage's patch: a traceback, the run left hidden) or that was the base file's folder (the base run
    deleted), --weights-key ignored with a run folder, and damaged patches ending in tracebacks."""
    import hashlib

    from safetensors import safe_open

    root, _ = shipped
    hard_before = sorted(p.name for p in (root / "hard").iterdir())
    stage_patch = root / "hard" / "finetune" / "patch.safetensors"
    for base, patch, out in (
        (root / "base", stage_patch, root / "hard"),
        (root / "base" / "model.safetensors", root / "hard" / "patch.safetensors", root / "base"),
    ):
        assert main(["apply", str(base), str(patch), "--out", str(out), "--overwrite", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert "and would replace it; write to a new folder" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in (root / "hard").iterdir()) == hard_before and (root / "base" / "model.json").is_file()
    patch = root / "hard" / "patch.safetensors"
    out = tmp_path / "o"
    cases = [
        (["--weights-key", "model"], root / "base", patch, "--weights-key picks the state_dict inside a .pt base"),
        ([], root / "base", root / "hard", "is a folder; pass the patch file in it"),
        ([], root / "hard", patch, "already is"),
    ]
    tensors = load_file(str(patch))
    with safe_open(str(patch), framework="pt") as f:
        meta = f.metadata()
    full = next(k for k in tensors if k.endswith("::full") or k.endswith("::index"))
    damaged = {
        "values": ({**tensors, full: tensors[full].flatten()[:-1]}, meta),
        "info": (tensors, {**meta, "info": "{not json"}),
        "changed_entries": (tensors, {k: v for k, v in meta.items() if k != "changed_entries"}),
    }
    if full.endswith("::index"):
        damaged["values"] = ({**tensors, full: -1 - tensors[full]}, meta)  # indices below the first entry
    for name, (t, m) in damaged.items():
        save_file(t, str(tmp_path / f"{name}.safetensors"), metadata=m)
        cases.append(([], root / "base", tmp_path / f"{name}.safetensors", "the file is damaged"))
    for extra, base, p, message in cases:
        assert main(["apply", str(base), str(p), "--out", str(out), *extra, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not out.exists()
    # the folder apply writes exports like any run: ONNX's check takes the hardening's eps from the patch
    assert main(["apply", str(root / "base"), str(patch), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0 and "None" not in capsys.readouterr().out  # apply records no seed/device
    assert main(["info", str(out / "model.safetensors")]) == 2
    assert f"is a file; pass the run folder that holds it (e.g. {out})" in capsys.readouterr().err
    onnx = tmp_path / "applied.onnx"
    assert main(["export", str(out), "--out", str(onnx), "--limit-test", "10", "--quiet"]) == 0
    check = json.loads((tmp_path / "applied.onnx.check.json").read_text())
    assert check["ok"] and check["threat"]["eps"] == 0.2
    assert check["sha256"] == hashlib.sha256(onnx.read_bytes()).hexdigest() and check["seed"] == 0


def test_export_files_are_readable_records_stay_and_bad_batches_are_one_line(shipped, tmp_path, capsys):
    """A review found the ONNX file written 0600 (mkstemp's mode; the other formats 0644), --batch-size 0 a
    traceback after the whole export, --out over the run's own model.safetensors accepted, and an older ONNX check
    left next to a file that replaced it."""
    root, _ = shipped
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.onnx", "model.pt", "model.safetensors"):
        assert (root / "ship" / name).stat().st_mode & 0o777 == 0o666 & ~umask
    out = tmp_path / "m.onnx"
    for argv, message in (
        (["--batch-size", "0"], "--batch-size must be a positive number"),
        (["--out", str(root / "hard" / "model.safetensors"), "--format", "pt", "--overwrite"], "the run's own records"),
        (["--out", str(root / "base" / "model.safetensors"), "--overwrite"], "the run's own records"),  # another run's
        (["--out", str(tmp_path)], "is a folder; name the file"),
        (["--format", "pt"], "--format pt and --out m.onnx disagree (its suffix says onnx): name the file m.pt"),
        (["--format", "onnx", "--out", str(tmp_path / "m.safetensors")], "or drop --format to write safetensors"),
    ):
        assert main(["export", str(root / "hard"), "--out", str(out), "--limit-test", "10", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not out.exists()
    out = tmp_path / "m.bin"  # a suffix that names no format: onnx unless --format says otherwise
    assert main(["export", str(root / "hard"), "--out", str(out), "--limit-test", "10", "--quiet"]) == 0
    assert (tmp_path / "m.bin.check.json").is_file()
    assert main(["export", str(root / "hard"), "--format", "pt", "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert not (tmp_path / "m.bin.check.json").exists()  # it checked the file this one replaced
    assert main(["export", str(root / "hard"), "--out", str(tmp_path / "w.safetensors"), "--quiet"]) == 0
    (tmp_path / "hf").mkdir()  # another tool's folder with a config.json of its own: not a run, written to (a review)
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "cnn"}')
    assert main(["export", str(root / "hard"), "--out", str(tmp_path / "hf" / "model.safetensors"), "--quiet"]) == 0
    shipped_keys = load_file(str(root / "ship" / "model.safetensors")).keys()
    assert load_file(str(tmp_path / "w.safetensors")).keys() == shipped_keys  # the suffix chose safetensors


def test_onnx_export_equals_pytorch_clean_and_adversarial(shipped):
    root, _ = shipped
    check = json.loads((root / "ship" / "model.onnx.check.json").read_text())
    assert check["ok"] and check["examples"] == 40 and check["attack"].startswith("pgd")
    for kind in ("clean", "adversarial"):
        assert check[kind]["disagreements"] == 0 and check[kind]["max_abs_diff"] < 1e-4
    import onnxruntime as ort

    x = torch.rand(5, 1, 16, 16)  # pixels in [0, 1]: the normalisation (if any) is inside the model
    got = ort.InferenceSession(str(root / "ship" / "model.onnx")).run(None, {"pixels": x.numpy()})[0]
    want = advtune.load_model(root / "hard")(x).detach()
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-4)


def test_the_state_dict_loads_into_the_users_module_without_advtune(shipped, tmp_path):
    """A fresh virtual environment that has torch and safetensors (this one's packages) but not advtune."""
    root, _ = shipped
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = Path(sysconfig.get_paths()["purelib"])  # torch, safetensors; advtune's editable hook is not read
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "deps.pth").write_text(str(purelib) + "\n")
    x = torch.rand(6, 1, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    want = advtune.load_model(root / "hard")(x).detach()
    torch.save(want, tmp_path / "want.pt")
    script = textwrap.dedent(
        f"""
        import importlib.util, sys, torch
        from safetensors.torch import load_file
        assert importlib.util.find_spec("advtune") is None, "advtune is installed here"
        sys.path.insert(0, {str(root)!r})
        from mynet import Net
        x, want = torch.load({str(tmp_path / "x.pt")!r}), torch.load({str(tmp_path / "want.pt")!r})
        for state in (load_file({str(root / "ship" / "model.safetensors")!r}),
                      torch.load({str(root / "ship" / "model.pt")!r}, weights_only=True)):
            net = Net()
            net.load_state_dict(state, strict=True)
            assert torch.allclose(net.eval()(x), want, atol=1e-6)
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


class Payload:
    """A pickle that would run a command when loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_that_need_code_or_do_not_fit_are_one_line_errors(shipped, tmp_path, capsys):
    root, model = shipped
    marker = tmp_path / "pwned"
    torch.save({"state_dict": model.state_dict(), "hook": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(AdvtuneError, match="cannot be read without executing code"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save(model, tmp_path / "whole.pt")  # a pickled module, not a state_dict
    with pytest.raises(AdvtuneError, match="cannot be read without executing code"):
        load_checkpoint(tmp_path / "whole.pt")
    torch.save({"weights": model.state_dict()}, tmp_path / "odd.pt")
    with pytest.raises(AdvtuneError, match="top-level keys: weights; name the one"):
        load_checkpoint(tmp_path / "odd.pt")
    assert load_checkpoint(tmp_path / "odd.pt", key="weights").keys() == model.state_dict().keys()
    (tmp_path / "cut.pt").write_bytes((root / "ckpt.pt").read_bytes()[:100])
    with pytest.raises(AdvtuneError, match="truncated or not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    # files that are no checkpoint at all are named for what they are (they were all "cannot be read without
    # executing code", and an empty one an IndexError)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "renamed.pt").write_bytes((root / "base" / "model.safetensors").read_bytes())
    (tmp_path / "meta.pt").write_bytes((root / "base" / "model.json").read_bytes())
    for name, message in (
        ("empty.pt", "is empty"),
        ("renamed.pt", "is a safetensors file; give it the .safetensors suffix"),
        ("meta.pt", "is not a PyTorch checkpoint (neither a zip nor a pickle)"),
    ):
        with pytest.raises(AdvtuneError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_checkpoint(tmp_path / name)
    wrong = {k: v for k, v in model.state_dict().items() if not k.startswith("head.3")}
    wrong["features.0.weight"] = torch.zeros(4, 1, 3, 3)
    torch.save(wrong, tmp_path / "wrong.pt")
    spec = f"{root / 'mynet.py'}:net"
    argv = ["train", "--dataset", "synthetic", "--model", spec, "--weights", str(tmp_path / "wrong.pt")]
    assert main([*argv, "--epochs", "0", "--out", str(tmp_path / "b"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "2 missing (head.3.weight, head.3.bias)" in err and "1 of another shape (features.0.weight" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "b").exists()


def test_export_refusals_write_nothing(shipped, tmp_path, capsys, monkeypatch):
    root, _ = shipped
    target = root / "ship" / "model.onnx"
    before = target.read_bytes()
    assert main(["export", str(root / "hard"), "--out", str(target), "--limit-test", "10"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and target.read_bytes() == before
    trades = tmp_path / "trades.onnx"  # a training objective as the check's attack was replaced by PGD unsaid
    assert main(["export", str(root / "hard"), "--out", str(trades), "--attack", "trades:beta=6"]) == 2
    assert "--attack trades:beta=6: a training objective, not an attack" in capsys.readouterr().err
    assert not trades.exists()
    import onnxruntime

    class Off:  # an exported graph that disagrees with PyTorch
        def __init__(self, *a, **k):
            self.real = real(*a, **k)

        def run(self, *a, **k):
            return [y + 1.0 for y in self.real.run(*a, **k)]

    real = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", Off)
    out = tmp_path / "bad.onnx"
    assert main(["export", str(root / "hard"), "--out", str(out), "--limit-test", "10"]) == 2
    assert "disagrees with PyTorch" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".bad.onnx*"))
    failed = json.loads((tmp_path / "bad.onnx.check-failed.json").read_text())  # the numbers, for the report
    assert not failed["ok"] and failed["clean"]["max_abs_diff"] > 0.99 and failed["file"] is None
    monkeypatch.setattr(onnxruntime, "InferenceSession", real)  # the export passes: the refusal's numbers go
    assert main(["export", str(root / "hard"), "--out", str(out), "--limit-test", "10", "--quiet"]) == 0
    assert out.is_file() and not (tmp_path / "bad.onnx.check-failed.json").exists()
    out.unlink()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the extra is not installed
    assert main(["export", str(root / "hard"), "--out", str(out)]) == 2
    assert "pip install 'advtune[onnx]'" in capsys.readouterr().err and not out.exists()


def test_a_patch_of_a_model_with_batchnorm_scalars_round_trips(tmp_path):
    """BatchNorm's num_batches_tracked is a 0-dim integer tensor: hashed and patched like the rest."""
    from advtune.patch import state_sha256

    base = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    tuned = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    tuned.load_state_dict(base.state_dict())
    tuned.train()(torch.rand(8, 1, 8, 8))  # moves the running stats and the 0-dim counter
    with torch.no_grad():
        tuned[3].bias.add_(1.0)
    advtune.write_patch(tmp_path / "same.safetensors", base, base)  # a patch that changes nothing applies to its base
    advtune.apply_patch(base, tmp_path / "same.safetensors")
    advtune.write_patch(tmp_path / "p.safetensors", base, tuned)
    advtune.apply_patch(base, tmp_path / "p.safetensors")
    assert state_sha256(base.state_dict()) == state_sha256(tuned.state_dict())
    assert int(base[1].num_batches_tracked) == 1


def test_a_model_onnx_cannot_export_is_one_line_and_writes_nothing(shipped, tmp_path, capsys, monkeypatch):
    root, _ = shipped

    def refuse(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::fancy' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    out = tmp_path / "ship" / "m.onnx"
    assert main(["export", str(root / "hard"), "--out", str(out), "--limit-test", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ONNX cannot export this model (RuntimeError: Exporting the operator" in err and len(err.splitlines()) == 1
    assert "--format safetensors" in err and not (tmp_path / "ship").exists()  # not even the folder


def test_the_onnx_checks_settings_with_another_format_are_refused(shipped, tmp_path, capsys):
    """--eps/--attack/--limit-test shape the ONNX check alone: with safetensors or pt they were dropped silently."""
    root, _ = shipped
    out = tmp_path / "m.safetensors"
    argv = ["export", str(root / "hard"), "--format", "safetensors", "--out", str(out), "--quiet"]
    assert main([*argv, "--eps", "0.1", "--limit-test", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--eps --limit-test: settings of the ONNX check" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert main(argv) == 0 and out.is_file()
