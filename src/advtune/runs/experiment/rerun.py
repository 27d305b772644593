"""What a re-run of an experiment must match: the setup every variant shares (`SHARED`) and each variant's resolved
settings as first run (variant-settings.json). A re-run measured another way is refused before anything is
rewritten, never mixed in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ... import filenames as files
from ...errors import AdvtuneError
from ...storage import read_json
from ..probe import probe_folder
from .config import EVAL_NAME

SETTINGS = "variant-settings.json"  # each variant's resolved settings, as first run

# keys whose values equal their absence (records from before the key existed): --norms off, or auto (a
# variant that ran with it off before auto existed recorded norms: false in its run's config.json). The price:
# a finished variant switched between auto and false is not re-run; its config.json still says what ran, and
# an unfinished one is refused by the fine-tuning's own resume check
UNSET = {"norms": (False, None), "head": (False, None), "probe_quotas": (False, None)}
# the same for a variant's train: keys: augment none is TrainConfig's default, which `recipe: harden` variants record
# since round 28 (harden's --augment) and older records left out
TRAIN_UNSET = {"augment": ("none",)}


def resolved_settings(v: dict) -> dict:
    """A variant's resolved settings as variant-settings.json records them."""
    return {k: val for k, val in v.items() if k != "sweep_of"}


def _same_head(recorded: bool | None, now: bool | None, decided: bool | None) -> bool:
    """head is auto (None) or given. Auto then and now: the same. Auto now, true then: the same where the run decided
    true (round 21's `recipe: harden` filled head: true before the fine-tuning decided it; the price: an explicit
    true switched to auto on a model where auto would say no is not re-run). A value now, auto then: what auto
    decided (`decided`, from the run's config.json; unknown: as UNSET, auto meaning off). Otherwise as given."""
    if now is None:
        return recorded is None or (recorded is True and decided is True)
    if recorded is None and decided is not None:
        return bool(now) == decided
    return bool(recorded) == bool(now)


def same_settings(recorded: dict, now: dict, decided_head: bool | None = None) -> bool:
    def plain(d: dict) -> dict:
        out = {k: val for k, val in d.items() if k != "head" and not (k in UNSET and val in UNSET[k])}
        if isinstance(out.get("train"), dict):
            out["train"] = {k: v for k, v in out["train"].items() if not (k in TRAIN_UNSET and v in TRAIN_UNSET[k])}
        return out

    return plain(recorded) == plain(now) and _same_head(recorded.get("head"), now.get("head"), decided_head)


def _decided_head(folder: Path) -> bool | None:
    """The --head a variant's run decided (config.json: a fine-tuning's run, or a harden run's recipe); None: none."""
    path = folder / files.CONFIG
    if not path.is_file():
        return None
    run = read_json(path, "config").get("run") or {}
    head = run.get("head", (run.get("recipe") or {}).get("head"))
    return head if isinstance(head, bool) else None


# what every variant of an experiment shares: its base model, threat norm, evaluation and analysis
SHARED = (("base", None), ("threat", "norm"), ("evaluation", None), ("analysis", None))


def refuse_other_setup(out: Path, seed: int, cfg: dict | None = None) -> None:
    """An experiment folder holds one seed and one setup (`SHARED`): its standard model, analysis and finished
    variants would be reused or reported next to runs measured another way. A list of several eps may grow (new
    points are new variants); one eps may not become several, nor several one: the variants' names (an `-eps`
    suffix only with several) and the analysis folder would change, and every finished variant would train again."""
    path = out / files.EXPERIMENT
    if not path.is_file():
        return
    old = read_json(path, "experiment record").get("config") or {}
    recorded = int(old.get("seed", 0))
    if recorded != seed:
        raise AdvtuneError(f"{out} holds an experiment run with seed {recorded}, not {seed}; use a new --out")
    then_eps, now_eps = _eps_list(old), _eps_list(cfg) if cfg is not None else None
    if now_eps is not None and then_eps is not None and (len(then_eps) == 1) != (len(now_eps) == 1):
        raise AdvtuneError(
            f"{out} holds an experiment run at eps {', '.join(map(str, then_eps))}; at {', '.join(map(str, now_eps))} "
            "its variants would be renamed (an -eps suffix comes only with several) and every finished one trained "
            "again: use a new --out for the new eps"
        )
    for key, sub_key in SHARED if cfg is not None else ():
        then, now = _setup(old, key), _setup(cfg, key)
        if sub_key is not None:
            then, now = (then or {}).get(sub_key), (now or {}).get(sub_key)
        if (then or None) != (now or None):
            name = f"{key}.{sub_key}" if sub_key else key
            raise AdvtuneError(
                f"{out} holds an experiment run with another {name} ({then!r}, now {now!r}); its variants were "
                "measured so: use a new --out"
            )


def _eps_list(cfg: dict) -> list | None:
    eps = (cfg.get("threat") or {}).get("eps") if isinstance(cfg.get("threat"), dict) else None
    return None if eps is None else list(eps) if isinstance(eps, (list, tuple)) else [eps]


def _setup(cfg: dict, key: str) -> Any:
    """A shared section as it measures: the norm's default written out, the evaluation's older `limit` read as
    `limit_test`, and the base's data folder (where the data is, not what) left out."""
    value = cfg.get(key)
    if not isinstance(value, dict):
        return value
    value = dict(value)
    if key == "threat":
        value.setdefault("norm", "linf")
    if key == "evaluation" and "limit" in value:
        value.setdefault("limit_test", value.pop("limit"))
    if key == "base":
        value.pop("data_dir", None)
    return value


def refuse_changed_variants(out: Path, variants: list[dict]) -> None:
    """A variant with something on disk (its run or its evaluation) that was run with other settings
    is refused before anything of the experiment is rewritten: never mixed in."""
    path = out / SETTINGS
    if not path.is_file():
        return
    recorded = read_json(path, "variant settings")
    for v in variants:
        folder = out / v["name"]
        probe = probe_folder(folder)  # the probe rule's first stage, next to the variant's folder
        exists = (folder / files.CONFIG).is_file() or (folder / files.evaluation(EVAL_NAME)).is_file()
        exists = exists or (probe / files.CONFIG).is_file()
        same = same_settings(recorded.get(v["name"], {}), resolved_settings(v), _decided_head(folder))
        if exists and v["name"] in recorded and not same:
            also = f" and {probe}" if probe.exists() else ""
            raise AdvtuneError(
                f"variant {v['name']} in {out} was run with other settings; use a new --out, "
                f"or delete {folder}{also} to run it again"
            )
