"""`advtune apply BASE PATCH --out DIR`: the hardened model rebuilt from its base and its patch.

The patch names the base it was made from and the result it gives by their hashes: another base is
refused in one line before anything is written, and the result is checked bit for bit. With a run
folder as BASE, DIR is a model folder like the base's (model.json copied, so `evaluate`, `info` and
`export` work on it); with a weights file, DIR holds the patched weights."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save

from .. import filenames as files
from ..errors import AdvtuneError
from ..patch import apply_to_state, patch_info, state_sha256
from ..storage import atomic_write_bytes, read_json
from ..weights import load_checkpoint, load_state
from .configs import ApplyRun
from .record import RunDir


def run(run: ApplyRun) -> dict:
    """Apply `run.patch` to `run.base` into `run.out`; returns the record (config.json, with the
    versions and time of the application)."""
    base, out = Path(run.base), Path(run.out).resolve()
    # --overwrite moves --out aside: a folder holding the base or the patch (or being it) would lose them
    for what, path in (("the base", base), ("the patch", Path(run.patch))):
        if path.resolve() == out or path.resolve().is_relative_to(out):
            raise AdvtuneError(f"--out {run.out} holds {what} ({path}) and would replace it; write to a new folder")
    if base.is_dir():
        if run.weights_key is not None:
            raise AdvtuneError("--weights-key picks the state_dict inside a .pt base; a run folder's weights have none")
        if not (base / files.WEIGHTS).is_file():
            raise AdvtuneError(f"{base} holds no model ({files.WEIGHTS}); pass a run folder or a weights file")
        state = load_state(base / files.WEIGHTS)
    else:
        state = load_checkpoint(base, run.weights_key)
    info = patch_info(run.patch)
    patched = apply_to_state(state, run.patch)  # refuses another base; checks the result
    # everything the new folder copies, read before it is made (and before an old one is moved aside)
    patch_bytes = Path(run.patch).read_bytes()
    meta = read_json(base / files.MODEL_META, "model metadata") if (base / files.MODEL_META).is_file() else None
    base_run = _base_run(base) if base.is_dir() else {}
    rd = RunDir.create(run.out, overwrite=run.overwrite, resumable=False)  # all checked: only now is --out made
    record = {
        "command": "apply",
        "run": {"base": str(base), "patch": str(run.patch)},
        "base_sha256": state_sha256(state),
        "result_sha256": info["result_sha256"],
        "changed_entries": int(info["changed_entries"]),
        "total_entries": int(info["total_entries"]),
        "patch_bytes": len(patch_bytes),
        "patch_info": info["info"],
    }
    rd.write_config({**record, **base_run})
    atomic_write_bytes(rd.file(files.WEIGHTS), save(patched, metadata={"format": "pt", "advtune": "1"}))
    if base.is_dir() and meta is not None:
        rd.write_json(files.MODEL_META, {**meta, "patched": {"base": str(base), "patch": str(run.patch)}})
    atomic_write_bytes(rd.file(files.PATCH), patch_bytes)
    rd.done()
    return record


def _base_run(base: Path) -> dict:
    """What the base run recorded of its data, so that `evaluate` finds the same test split."""
    if not (base / files.CONFIG).is_file():
        return {}
    cfg = read_json(base / files.CONFIG, "base config")
    return {"dataset": cfg.get("dataset"), "base": str(base)}
