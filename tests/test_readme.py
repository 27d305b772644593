"""Every command of the README's "Using it" block runs and does what it says, at a tiny size.

The README's commands are read from the file, so the test follows the README. The substitutions that
make them tiny are listed here (and nothing else changes): the synthetic dataset instead of MNIST,
a few hundred examples, one epoch, a small budget, the `quick` suite instead of `standard` (Square's
5000 queries per example), and the seconds-long synthetic experiment instead of the MNIST claim."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from advtune.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = {
    "train": ["--limit", "300", "--limit-test", "60"],
    "harden": [
        "--limit",
        "300",
        "--limit-test",
        "60",
        "--budget",
        "6000",
        "--evaluation",
        "apgd-ce:steps=20,square:queries=100",
    ],
    "analyze": ["--limit", "100", "--curve-limit", "60"],
    "finetune": ["--limit", "200", "--monitor-test", "0"],
    "export": ["--limit-test", "60"],
}


def _commands() -> list[list[str]]:
    block = README.read_text().split("## Using it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("advtune ")]


def _tiny(argv: list[str], root: Path) -> list[str]:
    out = []
    for a in argv[1:]:
        a = a.replace("runs/", f"{root}/")
        a = {"mnist": "synthetic", "configs/mnist-claim.yaml": "configs/synthetic-smoke.yaml"}.get(a, a)
        out.append(a)
    cmd = out[0]
    out = [re.sub(r"^standard$", "quick", a) if i and out[i - 1] == "--suite" else a for i, a in enumerate(out)]
    if "--epochs" in out:
        out[out.index("--epochs") + 1] = "1"
    if "--limit-test" in out and cmd == "evaluate":
        out[out.index("--limit-test") + 1] = "60"
    if cmd == "experiment":
        out.append("--no-report")  # the README's next command writes the report
    return out + TINY.get(cmd, []) + ["--quiet"]


def test_the_readme_block_is_found():
    cmds = _commands()
    assert [c[1] for c in cmds][:3] == ["train", "harden", "info"] and len(cmds) >= 9


@pytest.mark.timeout(600)
def test_every_readme_command_runs_at_a_tiny_size(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(README.parent)  # configs/ paths are relative to the checkout
    for argv in _commands():
        tiny = _tiny(argv, tmp_path)
        assert main(tiny) == 0, f"README command failed: {' '.join(argv)}\n(as run: {' '.join(tiny)})"
    shown = capsys.readouterr().out
    assert "hardened" in shown and "worst case over attacks" in shown and "fine-tuned" in shown
    assert (tmp_path / "mnist-hard" / "report.html").is_file()
    assert (tmp_path / "mnist-claim" / "report.html").is_file()  # written by the README's `advtune report`
    assert next((tmp_path / "mnist-std").glob("eval-*.png"))  # the accuracy-vs-eps plot
    assert json.loads((tmp_path / "mnist-hard.onnx.check.json").read_text())["ok"]
    patched, hardened = (load_file(str(tmp_path / f / "model.safetensors")) for f in ("mnist-patched", "mnist-hard"))
    assert patched.keys() == hardened.keys() and all(torch.equal(patched[k], hardened[k]) for k in hardened)
