"""Where a selection's analysis comes from: an analysis folder's score table (or a score file), checked to exist
before the base loads, and to have scored this very model (not another of the same architecture)."""

from __future__ import annotations

from pathlib import Path

from .. import filenames as files
from ..errors import AdvtuneError
from ..patch import state_sha256
from ..storage import read_json
from ..vulnerability import ScoreTable


def read_table(source: str | Path, criterion: str) -> ScoreTable:
    """The score table of `criterion` in an analysis folder (or a score file itself)."""
    folder = Path(source)
    table_file = folder / files.scores(criterion) if folder.is_dir() else folder
    if folder.is_dir() and not table_file.is_file():
        have = sorted(p.stem.removeprefix("scores-") for p in folder.glob("scores-*.json"))
        raise AdvtuneError(
            f"{folder} has no scores for criterion {criterion!r}"
            + (
                f"; it has: {', '.join(have)}"
                if have
                else " (not an analysis folder): run `advtune analyze BASE --eps EPS --out DIR` on the model you "
                "fine-tune and pass --select DIR"
            )
        )
    if not table_file.is_file():
        raise AdvtuneError(
            f"--select {str(source)!r}: not all, random, layers:<names>, or an analyze folder/score file"
        )
    return ScoreTable.from_json(read_json(table_file, "score table"))


def check_select_exists(select: str) -> None:
    """--select names a rule or an existing analysis folder or score file: a mistyped folder refused before the base
    and the data load (it was found out reading the scores, after both)."""
    if select not in ("all", "random", "top", "lowrank") and ":" not in select and not Path(select).exists():
        raise AdvtuneError(
            f"--select {select!r}: not all, random, layers:<names>, lowrank:rank=R, nor an analysis folder (advtune "
            "analyze --out)"
        )


def scored_other_model(select, model) -> str | None:
    """The analysis folder `select` names (or holds the score file it names) when it recorded scoring a model whose
    weights differ from `model`'s: another seed of the same architecture passes every shape check, but its unit
    indices name other units. None where it is this model, or the record predates the field (nothing to compare)."""
    folder = Path(select)
    folder = folder if folder.is_dir() else folder.parent
    config = folder / files.CONFIG
    scored = read_json(config, "analysis config").get("model_state_sha256") if config.is_file() else None
    return str(folder) if scored and scored != state_sha256(model.state_dict()) else None


OTHER_MODEL = (
    "--select %s scored another model than this base (its weights differ): a unit's rank does not carry over between "
    "separately trained networks; `advtune analyze` this base for its own map"
)
