"""The house rules of docs/architecture.md, checked on the code: layers import downward only, no
private name crosses a module, run-file names have one home, every job returns a typed summary
that is exactly its summary.json."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "advtune"
APP = {"runs", "api", "cli", "__init__", "__main__"}  # the application layer and the entry points


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(top-level advtune module imported, names) for every relative import in `path`."""
    rel = path.relative_to(SRC).with_suffix("")
    pkg = list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[: len(pkg) - (node.level - 1)]
            parts = base + (node.module.split(".") if node.module else [])
            names = [a.name for a in node.names]
            out.append((parts[0] if parts else names[0], names))
    return out


def _library_files():
    return [p for p in SRC.rglob("*.py") if p.relative_to(SRC).parts[0].removesuffix(".py") not in APP]


def test_the_library_never_imports_the_application_layer():
    bad = [(str(p.relative_to(SRC)), top) for p in _library_files() for top, _ in _imports(p) if top in APP]
    assert bad == []


def test_the_training_loop_does_not_import_the_model_zoo():
    bad = [str(p.relative_to(SRC)) for p in (SRC / "train").glob("*.py") for top, _ in _imports(p) if top == "models"]
    assert bad == []


def test_no_private_name_crosses_a_module():
    bad = []
    for p in SRC.rglob("*.py"):
        for top, names in _imports(p):
            if top == "_common":  # attacks' own shared module, imported inside the attacks package
                continue
            bad += [f"{p.relative_to(SRC)}: {n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert bad == []


def test_run_file_names_have_one_home():
    names = re.compile(
        r'"(config\.json|summary\.json|cost\.json|metrics\.jsonl|model\.safetensors|model\.json|'
        r'checkpoint\.pt|selection\.json|report\.html|results\.json)"'
    )
    bad = [
        str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name != "filenames.py" and names.search(p.read_text())
    ]
    assert bad == []


def _as_record(summary) -> dict:
    return json.loads(json.dumps(summary.to_json()))  # tuples become lists, as in the file


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from advtune.runs import train as train_job
    from advtune.runs.train import TrainRun
    from advtune.train import TrainConfig

    out = tmp_path_factory.mktemp("arch") / "run"
    summary = train_job.run(
        TrainRun(
            dataset="synthetic", model="small-cnn", out=str(out), limit=300, limit_test=100, train=TrainConfig(epochs=1)
        )
    )
    return out, summary


def test_typed_summaries_are_their_records(trained, tmp_path):
    from advtune.runs import analyze as analyze_job
    from advtune.runs import finetune as finetune_job
    from advtune.runs.analyze import AnalyzeRun
    from advtune.runs.finetune import FinetuneRun
    from advtune.train import TrainConfig

    out, summary = trained
    assert summary.test_examples == 100 and 0 <= summary.test_acc <= 1
    assert _as_record(summary) == json.loads((out / "summary.json").read_text())
    a = analyze_job.run(
        AnalyzeRun(base=str(out), out=str(tmp_path / "an"), eps=0.2, criteria=("taylor",), limit=64, curve_limit=32)
    )
    assert a.examples_scored == 64 and "rank_agreement_with_restoration" not in a.to_json()
    assert _as_record(a) == json.loads((tmp_path / "an" / "summary.json").read_text())
    f = finetune_job.run(
        FinetuneRun(base=str(out), out=str(tmp_path / "ft"), eps=0.2, monitor=0, limit=128, train=TrainConfig(epochs=1))
    )
    assert f.pgd10_acc_quick is None and "pgd10_acc_quick" not in f.to_json()
    assert _as_record(f) == json.loads((tmp_path / "ft" / "summary.json").read_text())
