"""docs/api.md is executable: its Python blocks run top to bottom in one namespace, and what they
print is checked against what they promise (robust after harden, the gate passes, ...)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_api_doc_has_examples():
    assert len(_blocks()) >= 6


@pytest.mark.timeout(600)
def test_api_doc_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "api_doc"}
    for i, code in enumerate(_blocks()):
        try:
            exec(compile(code, f"{DOC.name} block {i + 1}", "exec"), ns)
        except Exception as e:  # pragma: no cover - the message names the failing block
            pytest.fail(f"docs/api.md block {i + 1} failed: {type(e).__name__}: {e}\n{code}")
    # what the page claims, on the objects it built
    assert ns["history"].last["train_acc"] > 0.8
    assert ns["result"].clean_accuracy > 0.8 and ns["result"].suspect == []
    assert len(ns["vmap"].ranked(top=5)) == 5
    sel, ctrl, model = ns["selection"], ns["control"], ns["model"]
    assert 0 < sel.trainable_params(model) <= 0.1 * sum(p.numel() for p in model.parameters())
    assert abs(ctrl.trainable_params(model) - sel.trainable_params(model)) <= 0.05 * sel.trainable_params(model) + 64
    h = ns["hardened"]
    assert h.after.worst_case_accuracy > h.before.worst_case_accuracy + 0.1
    assert h.model is not ns["base"]
    assert (Path(ns["folder"]) / "model.safetensors").is_file()
