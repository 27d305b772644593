"""The house rules of docs/architecture.md, checked on the code: layers import downward only, no
private name crosses a module, run-file names have one home, every job returns a typed summary
that is exactly its summary.json (and its reader reads it back)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from advtune.threat import ThreatModel  # module level: the registry resolves field annotations here

SRC = Path(__file__).resolve().parents[1] / "src" / "advtune"
# the application layer and the entry points
APP = {"runs", "api", "cli", "cli_folders", "cli_text", "__init__", "__main__"}


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


# The layers of docs/architecture.md, lowest first: a module imports only from its own layer or below.
LAYERS = [
    (
        "ground",
        {
            "errors",
            "version",
            "filenames",
            "lazy",
            "registry",
            "keywords",
            "settings",
            "recipe",
            "distributed",
            "seeding",
        }
        | {"devices", "storage", "progress", "provenance", "threat", "weights", "patch", "cost", "data", "records"},
    ),
    ("foundations", {"attacks", "components", "models", "factories", "inputs"}),
    ("library", {"train", "evaluation", "vulnerability", "metrics", "frontier", "report"}),
    ("application", {"runs"}),
    ("entry points", {"api", "cli", "cli_folders", "cli_text", "__init__", "__main__"}),
]
LAYER_OF = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}


def _unit(path: Path) -> str:
    """The top-level module or package of src/advtune a file belongs to."""
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def _arrows() -> list[tuple[str, str, str]]:
    """(file, its unit, the unit it imports) for every relative import between top-level units."""
    out = []
    for p in SRC.rglob("*.py"):
        me = _unit(p)
        for top, _ in _imports(p):
            if top != me and top != "__version__":
                out.append((str(p.relative_to(SRC)), me, top))
    return out


def test_every_module_has_a_layer():
    units = {_unit(p) for p in SRC.rglob("*.py")} | {top for _, _, top in _arrows()}
    assert units - set(LAYER_OF) == set(), "add the new module to LAYERS here and to docs/architecture.md"


def test_imports_run_downward_only():
    up = [(f, top) for f, me, top in _arrows() if LAYER_OF.get(top, -1) > LAYER_OF.get(me, -1)]
    assert up == []


def test_no_import_circle_between_modules():
    graph: dict[str, set[str]] = {}
    for _, me, top in _arrows():
        graph.setdefault(me, set()).add(top)
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done

    def circle_from(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := circle_from(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for unit in sorted(graph):
        if unit not in state:
            assert circle_from(unit, [unit]) is None


def test_no_module_over_500_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


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
        r'["\'](config\.json|summary\.json|cost\.json|metrics\.jsonl|model\.safetensors|model\.json|'
        r'checkpoint\.pt|selection\.json|report\.html|results\.json)["\']'
    )  # either quote (an f-string's inner literal is single-quoted)
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
    assert _as_record(type(summary).read(out / "summary.json")) == _as_record(summary)  # its reader gives it back
    a = analyze_job.run(
        AnalyzeRun(base=str(out), out=str(tmp_path / "an"), eps=0.2, criteria=("taylor",), limit=64, curve_limit=32)
    )
    assert a.examples_scored == 64 and "rank_agreement_with_restoration" not in a.to_json()
    assert _as_record(a) == json.loads((tmp_path / "an" / "summary.json").read_text())
    assert _as_record(type(a).read(tmp_path / "an" / "summary.json")) == _as_record(a)
    f = finetune_job.run(
        FinetuneRun(
            base=str(out), out=str(tmp_path / "ft"), eps=0.2, monitor_test=0, limit=128, train=TrainConfig(epochs=1)
        )
    )
    assert f.pgd10_acc_quick is None and "pgd10_acc_quick" not in f.to_json()
    assert _as_record(f) == json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert _as_record(type(f).read(tmp_path / "ft" / "summary.json")) == _as_record(f)


def test_adding_an_attack_is_one_class_as_documented(tiny_model, blobs):
    """The recipe of docs/architecture.md, verbatim: a pure function + a registered AttackConfig."""
    from dataclasses import dataclass

    import torch

    from advtune.attacks import REGISTRY, build_attack, register
    from advtune.attacks._common import AttackConfig, check_int, check_threat

    def myattack(model, x, y, threat, *, steps, target=None, generator=None):
        x_adv = x.clone()
        for _ in range(steps):  # a signed-gradient ascent, projected by the threat model
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                loss = torch.nn.functional.cross_entropy(model(x_adv), y)
                (g,) = torch.autograd.grad(loss, [x_adv])
            x_adv = threat.project(threat.steepest_step(g, threat.eps / 4) + x_adv.detach(), x)
        return x_adv.detach()

    try:

        @register("myattack")
        @dataclass(frozen=True)
        class MyAttack(AttackConfig):
            threat: ThreatModel
            steps: int = 10
            name = "myattack"
            function = staticmethod(myattack)

            def __post_init__(self) -> None:
                check_threat(self.threat, self.name, self.norms)
                check_int(f"{self.name} steps", self.steps)

            def grad_evals(self) -> int:
                return self.steps

        threat = ThreatModel.linf(0.2)
        attack = build_attack("myattack:steps=5", threat)
        assert attack == MyAttack(threat, steps=5) and attack.spec == "myattack:steps=5"
        x, y, _, _ = blobs
        x_adv = attack(tiny_model, x[:64], y[:64])
        threat.check(x_adv, x[:64])
        with torch.no_grad():
            assert (tiny_model(x_adv).argmax(1) == y[:64]).float().mean() < 0.9
    finally:
        REGISTRY.pop("myattack", None)


def test_adding_a_criterion_is_one_class_as_documented(tiny_model, blobs):
    import torch

    from advtune.vulnerability import CRITERIA, Criterion, build_criterion, register_criterion, score

    try:

        @register_criterion
        class AbsShift(Criterion):
            name = "abs-shift"

            def _init_state(self, model):
                self.sums = {n: self._zeros(n, torch.device("cpu")) for n in self.layer_names}

            def _update(self, model, x, x_adv, y):
                clean, _ = self._clean_pass(model, x)
                adv, _ = self._clean_pass(model, x_adv)
                for n in self.layer_names:
                    d = (adv[n] - clean[n]).abs()
                    self.sums[n] += d.transpose(0, 1).flatten(1).sum(1).cpu()

            def _unit_scores(self):
                return {n: s / self.n_samples for n, s in self.sums.items()}

        assert isinstance(build_criterion("abs-shift"), AbsShift)
        x, y, _, _ = blobs
        table = score(tiny_model, (x[:64], y[:64], (x[:64] + 0.1).clamp(0, 1)), None, "abs-shift")
        assert len(table) == 8 + 16 and table.ranked()[0][1] > 0
    finally:
        CRITERIA.pop("abs-shift", None)
