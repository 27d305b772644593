"""bench/reselect.py (#21, item 3 and the restart follow-up): how an arm's budget is split into runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


@pytest.fixture
def reselect(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import reselect

    return reselect


@pytest.mark.parametrize("arm", ["restart", "reselect"])
@pytest.mark.parametrize("restarts", [1, 4])
def test_restarted_arms_split_the_budget_and_ramp_only_in_the_first_run(reselect, arm, restarts):
    stages = reselect.stages_of(arm, switch=0.2, ramp=0.15, restarts=restarts)
    assert len(stages) == 1 + restarts
    assert sum(share for share, _ in stages) == pytest.approx(1.0)
    assert stages[0][0] * stages[0][1] == pytest.approx(0.15)  # the ramp ends where the single run's does
    assert all(warmup == 0.0 for _, warmup in stages[1:])
    assert len({round(share, 9) for share, _ in stages[1:]}) == 1


def test_the_single_arm_is_one_run_with_the_ramp(reselect):
    assert reselect.stages_of("single", switch=0.2, ramp=0.15, restarts=4) == [(1.0, 0.15)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--restarts", "0"], "--restarts must be 1..20"),
        (["--ramp", "0.3"], "need 0 < --ramp < --switch < 1"),
        (["--arms", "single,twice"], "unknown arm(s) twice"),
        (["--val-start", "100"], "validation would overlap training"),
        (["--restarts", "4"], "needs --fresh-seed"),  # short runs would replay the same images
    ],
)
def test_bad_arguments_are_refused_before_the_model_is_loaded(reselect, argv, message, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["reselect.py", str(tmp_path / "missing"), "--eps", "0.3", "--out", "x", *argv])
    with pytest.raises(SystemExit) as e:
        reselect.main()
    assert message in str(e.value)


@pytest.mark.parametrize("switch, restarts", [(0.2, 4), (0.3, 2), (0.2, 8), (0.5, 3), (0.4, 3)])
def test_every_point_is_evaluated_once_at_the_end_of_its_run_or_inside_it(reselect, switch, restarts):
    """Shares summed in floats miss the run boundaries by ~1e-16: no point may be dropped (1.0 above all), moved to
    the next run's first step, or evaluated twice."""
    points = [0.2, 0.4, 0.6, 0.8, 1.0]
    stages = reselect.stages_of("restart", switch=switch, ramp=0.1, restarts=restarts)
    steps, done, seen = 469, 0.0, []
    for i, (share, _) in enumerate(stages):
        marks = reselect.marks_of(points, done, share, steps, last=i == len(stages) - 1)
        assert all(1 <= step <= steps for step in marks)
        for step, p in marks.items():
            end = done + share
            assert p <= end + 1e-9  # never in a run that starts after it
            if abs(p - end) < 1e-9:
                assert step == steps  # a point on a boundary is the end of the run before it
        seen += marks.values()
        done += share
    assert sorted(seen) == points


def test_points_that_fall_on_one_step_are_refused(reselect):
    with pytest.raises(SystemExit, match="same step"):
        reselect.marks_of([0.5, 0.5000001], 0.0, 1.0, 10, last=True)
