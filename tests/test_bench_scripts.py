"""The benchmark scripts as a user reproducing a published number meets them: every one answers --help, an output
path that cannot be written is refused before any work, and every JSON line they append says what made it."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from advtune.errors import AdvtuneError

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import val_select

    return val_select


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(script, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    out = capsys.readouterr().out
    assert e.value.code in (0, None) and "usage" in out.lower()


def test_the_gpu_script_answers_help_and_refuses_missing_folders():
    ok = subprocess.run(["bash", str(BENCH / "gpu_eval_speed.sh"), "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "gpu_eval_speed.sh <work folder> <output folder>" in ok.stdout
    bad = subprocess.run(["bash", str(BENCH / "gpu_eval_speed.sh")], capture_output=True, text=True)
    assert bad.returncode == 2 and "<work folder>" in bad.stderr


def test_appended_lines_record_what_made_them(bench, tmp_path, monkeypatch, capsys):
    """Two sessions' lines in one published file could not be told apart (no date, versions or arguments)."""
    monkeypatch.setattr(sys, "argv", ["val_select.py", "runs/x", "--eps", "8/255"])
    out = tmp_path / "deep" / "val.jsonl"
    bench.emit({"run": "runs/x", "robust": 0.3}, bench.writable_out(out))
    assert json.loads(capsys.readouterr().out) == {"run": "runs/x", "robust": 0.3}  # stdout: the result alone
    line = json.loads(out.read_text())
    assert line["robust"] == 0.3 and line["recorded"]["argv"] == ["runs/x", "--eps", "8/255"]
    assert line["recorded"]["script"] == "val_select.py" and "torch" in line["recorded"]["versions"]


def test_an_unwritable_out_is_refused_before_any_work(bench, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AdvtuneError, match=r"cannot write --out .*file/x.jsonl .*pick a writable path"):
        bench.writable_out(blocker / "x.jsonl")


def test_recipe_search_refuses_an_unwritable_log_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    out = subprocess.run(
        [sys.executable, str(BENCH / "recipe_search.py"), "--name", "x", "--log", str(tmp_path / "file" / "x.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # its default base model path is relative: nothing may be trained or written here
    )
    assert out.returncode == 2 and "cannot write --log" in out.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]


def test_the_gpu_suites_rehearsal_needs_the_suite():
    out = subprocess.run(
        [sys.executable, str(BENCH / "scale.py"), "--rehearse"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "--rehearse rehearses the GPU suite: give --gpu-suite too" in out.stderr
