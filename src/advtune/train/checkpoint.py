"""Exact resume: the checkpoint (weights, optimizer, RNG-free step position, cost, history) written
atomically after each epoch, validated and refused when the settings changed."""

from __future__ import annotations

import dataclasses
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import filenames as files
from ..cost import CostMeter
from ..errors import AdvtuneError
from ..storage import atomic_write_bytes
from ..weights import check_compatible
from .config import REGROW_HOW, TrainConfig

log = logging.getLogger(__name__)


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)
    stopped: str | None = None  # why training stopped early (a callback said so), if it did
    restored: bool = False  # the callback that stopped it put earlier weights back: the run ends with them as they are

    @property
    def last(self) -> dict:
        return self.epochs[-1] if self.epochs else {}


def _reason(e: Exception) -> str:
    """torch's reason for a file it could not read, to its first sentence (it was cut mid-word at 120 characters)."""
    first = ((str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]).strip()
    return first if len(first) <= 120 else first[:117].rsplit(" ", 1)[0] + "..."


def cuda_device_of(model) -> torch.device | None:
    """The CUDA device the model trains on (its generator is saved with the CPU's), or None off CUDA."""
    p = next(model.parameters(), None)
    return p.device if p is not None and p.device.type == "cuda" else None


def save_checkpoint(
    path: Path,
    model,
    opt,
    meter: CostMeter,
    history: History,
    cfg: TrainConfig,
    epoch: int,
    step: int,
    acc_state: torch.Tensor,
    average=None,
    regrowth=None,
    callbacks=(),
    scaler=None,
) -> None:
    state = {
        "format": "advtune-checkpoint-1",
        "epoch": epoch,
        "step": step,
        "config": cfg.to_json(),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "meter": meter.to_json(),
        "history": {"epochs": history.epochs, "stopped": history.stopped, "restored": history.restored},
        "acc_state": acc_state.cpu(),
        "rng": torch.get_rng_state(),
    }
    cuda = cuda_device_of(model)
    if cuda is not None:  # dropout, augmentation and attack noise on CUDA draw from the device's own generator
        state["cuda_rng"] = torch.cuda.get_rng_state(cuda)
    if average is not None:  # --ema: the weight average resumes with the run
        state["average"] = average.state_dict()
    if regrowth is not None:  # --regrow: the mask as it has moved, and the gradient sums since its last move
        state["regrow"] = regrowth.state_dict()
    if scaler is not None:  # fp16: the loss scale the run has adapted to (a fresh one skips steps by overflowing)
        state["scaler"] = scaler.state_dict()
    kept = {cb.name: cb.checkpoint_state() for cb in callbacks if hasattr(cb, "checkpoint_state")}
    if kept:  # an epoch callback's memory (the overfitting guard's best weights): a resume decides as the run would
        state["callbacks"] = kept
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


RESUMABLE_CHANGES = ("epochs", "checkpoint_every", "compile")  # the training settings a resume may change


def config_changes(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """(key, recorded, now) for every training setting a resume would change, other than
    RESUMABLE_CHANGES; a key an older record lacks counts as its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    inert = set(RESUMABLE_CHANGES)
    if not saved.get("regrow", defaults["regrow"]) and not now.get("regrow", defaults["regrow"]):
        # a fixed mask: how it would move had no effect
        inert |= set(REGROW_HOW)
    return [
        (k, saved.get(k, defaults.get(k)), v)
        for k, v in now.items()
        if k not in inert and saved.get(k, defaults.get(k)) != v
    ]


def _refuse_changed_config(saved: dict, cfg: TrainConfig) -> None:
    changed = config_changes(saved, cfg.to_json())
    if changed:
        raise AdvtuneError(
            f"--resume with a different config ({', '.join(f'{k}: {a} -> {b}' for k, a, b in changed)}); "
            "use the original settings or start a new run"
        )


def check_resume(checkpoint_dir: str | Path, cfg: TrainConfig, ramp: float = 0.0) -> None:
    """Refuse a resume whose training config differs from its checkpoint's, before anything is
    written (fit checks again when it loads the checkpoint). `ramp`: the share of the run over which its eps
    ramps up (0: none)."""
    path = Path(checkpoint_dir) / files.CHECKPOINT
    if not path.is_file():
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/foreign files
        raise AdvtuneError(
            f"checkpoint {path} is truncated or corrupt ({_reason(e)}); "
            "delete it and rerun with --resume (the run starts again in this folder), or start over with --overwrite"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("config"), dict):
        _refuse_changed_config(state["config"], cfg)
        _refuse_new_length(state["config"], cfg, ramp, int(state.get("epoch", 0)))


def _refuse_new_length(saved: dict, cfg: TrainConfig, ramp: float, done: int) -> None:
    """A new --epochs may extend a run only where nothing laid over its length would jump mid-run: a decaying
    learning-rate schedule (a cosine's rate from its end back to most of its peak) and an eps ramp the run is still
    inside, before or after the change (`done`: the epochs finished)."""
    before = saved.get("epochs", cfg.epochs)
    if cfg.steps or before == cfg.epochs:  # a budget's steps decide the length, not --epochs
        return
    what = [f"the {cfg.schedule} learning-rate schedule"] if cfg.schedule != "constant" else []
    if cfg.regrow:  # the mask moves on a schedule over the run's steps (train/regrow.py)
        what.append("the --regrow schedule of the moving mask")
    if ramp and done / max(before, cfg.epochs) < ramp:  # past the ramp on both lengths: eps stays at its full value
        what.append(f"the eps ramp (over the first {100 * ramp:g}% of the run)")
    if what:
        raise AdvtuneError(
            f"--resume with --epochs {cfg.epochs}, started with {before}: {' and '.join(what)} "
            f"{'span' if len(what) > 1 else 'spans'} the run's length and would jump mid-run; resume with --epochs "
            f"{before} or start a new run"
        )


def load_checkpoint(
    path: Path,
    model,
    opt,
    meter: CostMeter,
    history: History,
    cfg: TrainConfig,
    device,
    average=None,
    regrowth=None,
    callbacks=(),
    scaler=None,
):
    try:
        # weights_only: tensors and plain containers only, never code from the file
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for truncated/foreign files
        raise AdvtuneError(
            f"checkpoint {path} is truncated or corrupt ({_reason(e)}); "
            "delete it and rerun with --resume (the run starts again in this folder), or start over with --overwrite"
        ) from None
    if not isinstance(state, dict) or state.get("format") != "advtune-checkpoint-1":
        raise AdvtuneError(f"{path} is not an advtune training checkpoint; delete it or pick another --out")
    _refuse_changed_config(dict(state["config"]), cfg)
    check_compatible(model, state["model"], f"checkpoint {path}")
    model.load_state_dict(state["model"])
    try:
        opt.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise AdvtuneError(
            f"checkpoint {path} has optimizer state for other parameters ({e}); start a new run"
        ) from None
    if average is not None:
        average.load_state_dict(state.get("average"), f"checkpoint {path}")
    if regrowth is not None:
        regrowth.load_state_dict(state.get("regrow"), f"checkpoint {path}")
    if scaler is not None and isinstance(state.get("scaler"), dict):
        scaler.load_state_dict(state["scaler"])
    kept = state.get("callbacks") if isinstance(state.get("callbacks"), dict) else {}
    for cb in callbacks:
        if hasattr(cb, "restore_checkpoint_state") and kept.get(cb.name) is not None:
            cb.restore_checkpoint_state(kept[cb.name])
    meter.load_json(state["meter"])
    history.epochs = list(state["history"]["epochs"])
    history.stopped = state["history"]["stopped"]
    history.restored = bool(state["history"].get("restored", False))
    torch.set_rng_state(state["rng"].cpu())
    cuda = cuda_device_of(model)
    if isinstance(state.get("cuda_rng"), torch.Tensor) and cuda is not None:  # (a run begun on the CPU has none)
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), cuda)
    return int(state["epoch"]), int(state["step"]), state["acc_state"].to(device)
