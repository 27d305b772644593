"""Typed records (advtune.records): each record goes through its file and comes back equal; a missing
field, a malformed one and a schema newer than the code are one line naming the file and the field;
a record written before schema versions existed still reads."""

from __future__ import annotations

import json

import pytest

from advtune.cost import CostMeter, CostRecord
from advtune.errors import AdvtuneError
from advtune.evaluation import EvalResult
from advtune.frontier import Frontier, FrontierPoint, reference_plateau, robust_at, verdicts
from advtune.records import AnalyzeSummary, HardenSummary
from advtune.runs.finetune import FinetuneSummary
from advtune.runs.train import TrainSummary
from advtune.storage import atomic_write_json
from advtune.threat import ThreatModel

COST = CostMeter(wall_s=1.5, examples=64, attack_grad_evals=320, update_grad_evals=64, total_params=1000).record()


def harden_summary(**change) -> HardenSummary:
    fields = dict(
        eps=0.2,
        norm="linf",
        base="runs/base",
        architecture="small-cnn",
        before={"clean_acc": 0.99, "robust_acc": 0.02, "suspect": []},
        after={"clean_acc": 0.97, "robust_acc": 0.61, "accuracy": {"apgd-ce": 0.61}, "suspect": []},
        test_examples=100,
        evaluation="apgd-ce",
        selection={"components": 1, "trainable_params": 320, "by_layer": {"net.conv1": [32, 32]}},
        trainable_params=320,
        param_share=0.002,
        recipe={"criterion": "taylor", "eps_warmup": 0.3},
        budget=20000,
        cost={
            "base_training_grad_evals": None,
            "analysis_grad_evals": 6600,
            "finetune_grad_evals": 20304,
            "harden_grad_evals": 26904,
            "analysis_wall_s": 1.0,
        },
        concentration=[{"share": 0.1, "repaired": 0.5}],
        analysis_examples=600,
    )
    return HardenSummary(**{**fields, **change})


def points() -> list[FrontierPoint]:
    ref = [
        FrontierPoint(
            variant="at", kind="train", reference=True, step=s, total_grad_evals=c, clean_acc=0.9, robust_acc=r
        )
        for s, c, r in ((1, 100, 0.2), (2, 200, 0.8), (None, 300, 0.9))
    ]
    sel = [
        FrontierPoint(
            variant="s",
            kind="finetune",
            select="top",
            param_share=0.05,
            total_grad_evals=c,
            clean_acc=0.95,
            robust_acc=r,
        )
        for c, r in ((30, 0.5), (70, 0.885))
    ]
    return ref + sel


def eval_result() -> EvalResult:
    return EvalResult(
        threat=ThreatModel.linf(0.3),
        attacks=["fgsm", "pgd:steps=10"],
        n=100,
        n_clean_correct=98,
        n_robust={"fgsm": 70, "pgd:steps=10": 60},
        n_robust_worst=60,
        grad_evals={"fgsm": 98, "pgd:steps=10": 700},
        forward_evals={"fgsm": 98, "pgd:steps=10": 70},
        wall_time_s={"fgsm": 0.1, "pgd:steps=10": 0.9},
        max_perturbation={"fgsm": 0.3, "pgd:steps=10": 0.3},
        seed=0,
        cascade=True,
        suspect=["the gate's finding"],
        gate_grad_evals=12,
        total_wall_s=1.25,
    )


RECORDS = {
    "train": TrainSummary(0.95, 100, 2, None, {"epoch": 2, "loss": 0.1}, COST.to_json()),
    "analyze": AnalyzeSummary(64, 0.98, 0.1, "pgd:steps=10", {"norm": "linf", "eps": 0.2}, {}, COST.to_json()),
    "analyze+agreement": AnalyzeSummary(64, 0.98, 0.1, "pgd", {}, {}, {}, {"taylor": 0.8}),
    "finetune": FinetuneSummary(0.9, 100, 1, "plateau", {}, {"components": 3}, COST.to_json(), 0.4, 50),
    "finetune-no-monitor": FinetuneSummary(0.9, 100, 1, None, {}, None, COST.to_json()),
    "harden": harden_summary(),
    "harden+report": harden_summary(report="runs/x/report.html", before=None, after=None, selection=None),
    "cost": COST,
    "frontier": Frontier(tuple(points())),
}


def as_file(record: dict) -> dict:
    return json.loads(json.dumps(record))  # tuples become lists, as in the file


@pytest.mark.parametrize("name", RECORDS)
def test_each_record_goes_through_its_file_and_comes_back(name, tmp_path):
    record = RECORDS[name]
    path = tmp_path / "record.json"
    atomic_write_json(path, record.to_json())
    on_disk = json.loads(path.read_text())
    assert on_disk["schema"] == 1 and on_disk["kind"] == type(record).KIND
    back = type(record).read(path)
    assert as_file(back.to_json()) == on_disk == as_file(record.to_json())
    assert type(back).from_json(on_disk, path) == back


def test_the_cost_record_is_what_the_meter_writes():
    meter = CostMeter(examples=10, update_grad_evals=10, attack_grad_evals=50, partial_grad_evals=2.4)
    d = meter.to_json()
    assert d["grad_evals"] == 62 and d["grad_evals_per_example"] == 6.2 and d["kind"] == "cost"
    assert CostRecord.from_json(d) == meter.record()
    assert CostMeter().load_json(d).grad_evals == 62  # a checkpoint's meter loads back from it


def test_an_eval_result_goes_through_its_record(tmp_path):
    result = eval_result()
    path = tmp_path / "eval-protocol.json"
    atomic_write_json(path, {"schema": 1, "kind": "single", **result.to_json(), "examples": 100})
    assert EvalResult.read(path) == result
    legacy = tmp_path / "eval-old.json"
    atomic_write_json(legacy, {k: v for k, v in result.to_json().items() if k not in ("gate_grad_evals", "mode")})
    old = EvalResult.read(legacy)
    assert old.worst_case_accuracy == 0.6 and old.gate_grad_evals == 0 and not old.cascade
    record = json.loads(path.read_text())
    record["n_robust"]["fgsm"] = "70"
    with pytest.raises(AdvtuneError, match=r"field 'n_robust\.fgsm' is \"70\", not an integer"):
        EvalResult.from_json(record, path)
    with pytest.raises(AdvtuneError, match="not 'single': an eps curve"):
        EvalResult.from_json({**result.to_json(), "kind": "curve"}, path)


def test_an_evaluation_record_carries_its_schema(tiny_model, blobs):
    from advtune.runs.configs import EvaluateRun
    from advtune.runs.evaluate import evaluate_model

    _, _, xt, yt = blobs
    record = evaluate_model(tiny_model, (xt[:64], yt[:64]), EvaluateRun(run="-", eps=(0.1,), attacks="fgsm"))
    assert record["schema"] == EvalResult.SCHEMA and record["kind"] == "single"
    back = EvalResult.from_json(as_file({k: v for k, v in record.items() if k != "_result"}))
    assert back.n_robust == record["_result"].n_robust and back.threat == record["_result"].threat


def error(read, path) -> str:
    with pytest.raises(AdvtuneError) as e:
        read(path)
    message = str(e.value)
    assert "\n" not in message, message
    return message


def write(path, record: dict, edit=None):
    record = as_file(record)
    if edit:
        edit(record)
    path.write_text(json.dumps(record))
    return path


def test_a_missing_field_is_one_line_naming_file_and_field(tmp_path):
    path = write(tmp_path / "summary.json", harden_summary().to_json(), lambda r: r.pop("budget"))
    assert error(HardenSummary.read, path).startswith(f"{path}: missing field 'budget' (the record is incomplete")
    path = write(path, harden_summary().to_json(), lambda r: r["after"].pop("robust_acc"))
    assert error(HardenSummary.read, path).startswith(f"{path}: missing field 'after.robust_acc'")
    path = write(tmp_path / "cost.json", COST.to_json(), lambda r: r.pop("grad_evals"))
    assert error(CostRecord.read, path).startswith(f"{path}: missing field 'grad_evals'")
    path = write(tmp_path / "frontier.json", RECORDS["frontier"].to_json(), lambda r: r["points"][3].pop("robust_acc"))
    assert error(Frontier.read, path).startswith(f"{path}: missing field 'points[3].robust_acc'")
    message = error(lambda p: HardenSummary.read(p, rerun="advtune harden BASE --resume --out runs/x"), path)
    assert "re-run `advtune harden BASE --resume --out runs/x` to complete it" in message
    assert (
        error(TrainSummary.read, tmp_path / "nowhere.json") == f"train summary not found: {tmp_path / 'nowhere.json'}"
    )


def test_a_malformed_field_is_one_line_naming_file_and_field(tmp_path):
    path = write(tmp_path / "summary.json", harden_summary().to_json(), lambda r: r.update(budget="abc"))
    assert error(HardenSummary.read, path).startswith(f"{path}: field 'budget' is \"abc\", not an integer")
    path = write(path, harden_summary().to_json(), lambda r: r["before"].update(clean_acc="high"))
    assert error(HardenSummary.read, path).startswith(f"{path}: field 'before.clean_acc' is \"high\", not a number")
    path = write(path, harden_summary().to_json(), lambda r: r.update(cost=[1, 2]))
    assert error(HardenSummary.read, path).startswith(f"{path}: field 'cost' is [1, 2], not an object")
    path = write(path, harden_summary().to_json(), lambda r: r.update(selection=[1]))
    assert error(HardenSummary.read, path).startswith(f"{path}: field 'selection' is [1], not an object or null")
    path = write(path, harden_summary().to_json(), lambda r: r["selection"]["by_layer"].update({"net.conv1": [3]}))
    assert error(HardenSummary.read, path).startswith(f"{path}: field 'selection.by_layer.net.conv1' is [3], not")
    path = write(tmp_path / "cost.json", COST.to_json(), lambda r: r.update(wall_s=True))
    assert error(CostRecord.read, path).startswith(f"{path}: field 'wall_s' is true, not a number")
    path = write(tmp_path / "frontier.json", RECORDS["frontier"].to_json(), lambda r: r["points"][1].update(step="2"))
    assert error(Frontier.read, path).startswith(f"{path}: field 'points[1].step' is \"2\", not an integer or null")
    path = write(tmp_path / "ft.json", RECORDS["finetune"].to_json(), lambda r: r.update(stopped=3))
    assert error(FinetuneSummary.read, path).startswith(f"{path}: field 'stopped' is 3, not a string or null")
    (tmp_path / "list.json").write_text("[1, 2]")
    assert f"{tmp_path / 'list.json'} holds a JSON list, not an advtune record" in error(
        TrainSummary.read, tmp_path / "list.json"
    )


def test_a_json_record_that_is_not_an_object_is_one_line(tmp_path):
    """A config.json holding a list (an edited or foreign file) failed later on `.get` with a traceback."""
    from advtune.storage import read_json

    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(AdvtuneError, match=r"run config .*config\.json holds a JSON list, not an advtune record"):
        read_json(tmp_path / "config.json", "run config")


def test_a_json_record_that_cannot_be_read_is_one_line(tmp_path, monkeypatch):
    """An audit: a record the process may not read (permission denied) gave a traceback."""
    from pathlib import Path

    from advtune.storage import read_json

    (tmp_path / "config.json").write_text("{}")

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)  # (chmod does not stop root, who runs CI here)
    with pytest.raises(AdvtuneError, match=r"run config .*config\.json cannot be read \(Permission denied\)"):
        read_json(tmp_path / "config.json", "run config")


def test_another_kind_of_record_is_refused(tmp_path):
    path = write(tmp_path / "summary.json", RECORDS["analyze"].to_json())
    assert error(HardenSummary.read, path).startswith(
        f'{path}: field \'kind\' is "analyze-summary", not "harden-summary"'
    )


def test_a_newer_schema_asks_for_a_newer_advtune(tmp_path):
    path = write(tmp_path / "summary.json", harden_summary().to_json(), lambda r: r.update(schema=2))
    message = error(HardenSummary.read, path)
    assert message.startswith(f"{path}: field 'schema' is 2, newer than this advtune") and "upgrade advtune" in message
    path = write(tmp_path / "frontier.json", RECORDS["frontier"].to_json(), lambda r: r.update(schema=7))
    assert "upgrade advtune" in error(Frontier.read, path)
    with pytest.raises(AdvtuneError, match="field 'schema' is 3, newer"):
        EvalResult.from_json({"schema": 3, **eval_result().to_json()}, "eval-x.json")
    path = write(tmp_path / "cost.json", COST.to_json(), lambda r: r.update(schema="one"))
    assert error(CostRecord.read, path).startswith(f"{path}: field 'schema' is \"one\", not a schema version")


@pytest.mark.parametrize("name", ["train", "analyze", "finetune", "harden", "cost", "frontier"])
def test_a_record_from_before_schema_versions_still_reads(name, tmp_path):
    record = RECORDS[name]
    old = {k: v for k, v in as_file(record.to_json()).items() if k not in ("schema", "kind")}
    path = write(tmp_path / "old.json", old)
    assert type(record).read(path) == type(record).from_json(as_file(record.to_json()))


def test_fields_with_defaults_may_be_missing_in_older_records(tmp_path):
    path = write(tmp_path / "cost.json", {"grad_evals": 12, "wall_s": 3})  # a cost.json before the other counters
    cost = CostRecord.read(path)
    assert cost.grad_evals == 12 and cost.partial_passes == 0 and cost.grad_evals_per_example is None
    summary = {k: v for k, v in harden_summary().to_json().items() if k not in ("schema", "kind", "analysis_examples")}
    summary["cost"] = {k: v for k, v in summary["cost"].items() if "wall_s" not in k}
    assert HardenSummary.read(write(tmp_path / "summary.json", summary)).analysis_examples is None
    assert HardenSummary.read(write(tmp_path / "budget.json", {**summary, "budget": 2e4})).budget == 20000


def test_the_frontier_reads_points_as_records_or_as_their_dicts():
    pts = points()
    dicts = [p.to_json() for p in pts]
    plat = reference_plateau(pts)
    assert plat == reference_plateau(dicts) and plat.robust_acc == 0.9 and plat.cost == 300
    assert verdicts(pts, plat) == verdicts(dicts, plat) and robust_at(dicts, "s", 50) == 0.5
    dicts[4].pop("clean_acc")
    with pytest.raises(AdvtuneError, match=r"^frontier points: missing field 'points\[4\]\.clean_acc'"):
        reference_plateau(dicts)


def test_info_shows_a_finetunes_budget_and_selection_and_a_dirty_checkout():
    """info showed a budgeted fine-tuning as epochs=1 (its steps decide) with no word of what it trained, and a
    run from a modified checkout under the commit's sha alone."""
    from advtune.provenance import versions
    from advtune.runs.info import format_info

    train = {"epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "schedule": "constant"}
    run = {"select": "runs/a", "granularity": "probe", "budget": 540000, "train": {**train, "weight_decay": 0.0}}
    config = {
        "command": "finetune",
        "run": run,
        "steps": 1406,
        "selection": {"kind": "sparse", "trainable_params": 108420, "param_share": 0.1},
        "versions": {"advtune": "0.1.0", "git_sha": "abc", "git_dirty": True},
    }
    summary = {"test_acc": 0.6, "test_examples": 1000, "pgd10_acc_quick": 0.3, "pgd10_examples": 500}
    text = format_info({"run": "r", "config": config, "metrics": [], "summary": summary})
    assert "quick PGD  30.00% under PGD-10 on 500 test examples (a monitor, not the claim" in text  # a new-user walk
    assert "training   steps=1406 (--budget 540,000 gradient evaluations), batch_size=64" in text
    assert "epochs=" not in text
    assert "selection  --select runs/a (sparse): 108,420 trainable parameters (10.00% of the model)" in text
    assert "git_sha abc (+ uncommitted changes)" in text
    v = versions()
    assert "git_sha" not in v or isinstance(v["git_dirty"], bool)  # recorded with the sha, whenever git answers


def test_info_says_an_unfinished_run_a_resumed_length_the_images_and_a_small_rate():
    """An audit of what info shows: an interrupted run read as a finished one, a resume with --epochs 2 still said
    epochs=1 (config.json keeps how it started), an evaluation of 100 images looked like one of 1000, lr 2e-5 printed
    as 0.0000, and a hardened model the gate flagged had no word of it on the harden line."""
    from advtune.runs.info import format_info

    train = {"epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 2e-5, "schedule": "constant"}
    config = {"command": "train", "run": {"model": "small-cnn", "dataset": "mnist", "train": train}}
    unfinished = format_info({"run": "r", "config": config, "metrics": [{"epoch": 1, "lr": 2e-5}], "summary": {}})
    assert "status     unfinished" in unfinished and "--resume" in unfinished
    assert "lr=2e-05" in unfinished and "0.0000" not in unfinished
    ev = {"threat": {"norm": "linf", "eps": 0.3}, "clean_accuracy": 0.99, "worst_case_accuracy": 0.9, "examples": 100}
    ev["attacks"] = ["apgd-ce"]
    resumed = format_info(
        {"run": "r", "config": config, "metrics": [], "summary": {"epochs": 2}, "evaluations": {"e": {**ev}}}
    )
    assert "unfinished" not in resumed and "epochs=2 (config.json: 1; resumed with another length)" in resumed
    assert "worst case 90.00% over apgd-ce on 100 test images" in resumed
    flagged = harden_summary(after={"clean_acc": 0.97, "robust_acc": 0.61, "suspect": ["zero-gradients: 3%"]})
    text = format_info(
        {"run": "r", "config": {"command": "harden", "run": {}}, "metrics": [], "summary": flagged.to_json()}
    )
    assert "!! masking gate SUSPECT: zero-gradients: 3%" in text


def test_info_on_an_unfinished_harden_says_which_stage_it_reached(tmp_path):
    """`advtune info` on a harden run that was interrupted (or is running) said only "unfinished" and its folders:
    which stage it reached, and how far into it, was a matter of reading the stages' files."""
    import json

    from advtune.runs.info import format_info, run_info

    run = tmp_path / "hard"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"command": "harden", "run": {"eps": 0.3}}))
    assert "stages     analysis running or not started, probe not started, finetune not started" in format_info(
        run_info(run)
    )  # the analysis writes its folder when it ends
    (run / "analysis").mkdir()
    (run / "analysis" / "summary.json").write_text("{}")
    (run / "probe").mkdir()
    (run / "probe" / "summary.json").write_text("{}")
    (run / "finetune").mkdir()
    (run / "finetune" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    text = format_info(run_info(run))
    assert "stages     analysis finished, probe finished, finetune unfinished (1 epoch recorded)" in text
    (run / "finetune" / "summary.json").write_text("{}")
    assert "finetune finished; then the evaluation before and after" in format_info(run_info(run))
    unit = tmp_path / "unit"  # a rule without the probe stage: none named
    (unit / "analysis").mkdir(parents=True)
    (unit / "config.json").write_text(json.dumps({"command": "harden", "run": {"recipe": {"granularity": "unit"}}}))
    (unit / "analysis" / "summary.json").write_text("{}")
    assert "stages     analysis finished, finetune running or not started\n" in format_info(run_info(unit)) + "\n"
    (run / "summary.json").write_text("{}")  # finished: no stage line
    assert "stages" not in format_info(run_info(run))
