"""Weights on disk, read without executing code and checked against the model they are loaded into:
safetensors files of a state_dict, and PyTorch checkpoints (`.pt`/`.pth`/`.bin`/`.ckpt`, read with
`torch.load(weights_only=True)`) holding a state_dict directly or under a key (`state_dict`, `model`,
`model_state_dict`, or one the user names), with DataParallel's `module.` prefixes removed. Below the
model zoo: the training loop uses it too."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from . import filenames as files
from .errors import AdvtuneError


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file; a truncated or foreign file gives a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise AdvtuneError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdvtuneError(
            f"{path} is truncated or not a safetensors file ({str(e).splitlines()[0]}); re-save the model or retrain"
        ) from None


COMMON_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")  # where checkpoints nest it
PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DistributedDataParallel, torch.compile


def load_checkpoint(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """The state_dict in a weights file: safetensors, or a PyTorch checkpoint read with
    weights_only=True (never executing code), found at `key` or a common key, prefixes removed."""
    path = Path(path)
    if path.is_dir():  # a run folder: its weights are a file in it
        raise AdvtuneError(f"{path} is a folder, not a weights file; give the file (e.g. {path / files.WEIGHTS})")
    if path.suffix.lower() == ".safetensors":
        if key is not None:
            raise AdvtuneError(f"{path} is a safetensors file: it holds one state_dict, drop the key {key!r}")
        return load_state(path)
    if not path.is_file():
        raise AdvtuneError(f"weights file not found: {path}")
    _check_checkpoint_header(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).strip().splitlines()
        reason = next((ln for ln in lines if "Unsupported global" in ln), lines[-1] if lines else "it holds objects")
        reason = reason.strip()[:200]
        raise AdvtuneError(
            f"{path} cannot be read without executing code (weights_only refused it: {reason}); save its "
            "state_dict instead: torch.save(model.state_dict(), 'weights.pt')"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise AdvtuneError(f"{path} is truncated or not a PyTorch checkpoint ({reason}); re-save it") from None
    return strip_prefixes(find_state(obj, key, path))


def _check_checkpoint_header(path: Path) -> None:
    """A PyTorch checkpoint is a zip (torch.save) or a pickle (its legacy format): anything else is named for what it
    is, rather than read as a pickle that "cannot be read without executing code"."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise AdvtuneError(f"{path} is empty (an interrupted download or save?); re-save it")
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        raise AdvtuneError(f"{path} is a safetensors file; give it the .safetensors suffix")
    if head.startswith(b"PK") or (head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5):  # zip; pickle 2+
        return
    raise AdvtuneError(
        f"{path} is not a PyTorch checkpoint (neither a zip nor a pickle); pass the model's weights file"
    )


def find_state(obj: Any, key: str | None, path: Path) -> dict[str, torch.Tensor]:
    """The state_dict inside a loaded checkpoint: `obj` itself, `obj[key]`, or under a common key."""
    if not isinstance(obj, dict):
        raise AdvtuneError(f"{path} holds a {type(obj).__name__}, not a state_dict; save model.state_dict()")
    if key is not None:
        if key not in obj:
            raise AdvtuneError(f"{path} has no key {key!r}; its top-level keys: {', '.join(map(str, list(obj)[:12]))}")
        obj = obj[key]
    elif not _is_state(obj):
        found = next((k for k in COMMON_KEYS if isinstance(obj.get(k), dict) and _is_state(obj[k])), None)
        if found is None:
            raise AdvtuneError(
                f"{path} holds no state_dict at its top level or under {', '.join(COMMON_KEYS)}; its top-level "
                f"keys: {', '.join(map(str, list(obj)[:12]))}; name the one with the weights (--weights-key)"
            )
        obj = obj[found]
    if not _is_state(obj):
        raise AdvtuneError(f"{path}: {key!r} is not a state_dict (names to tensors)")
    return dict(obj)


def _is_state(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DataParallel's `module.` (and torch.compile's `_orig_mod.`) off every name that has it."""
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path, what: str = "checkpoint", key: str | None = None) -> nn.Module:
    """Load weights (safetensors or a PyTorch checkpoint) into a (possibly user-defined) model,
    refusing any name or shape mismatch in one line that says which."""
    state = load_checkpoint(path, key)
    check_compatible(model, state, what)
    model.load_state_dict(state)
    return model


def check_compatible(model: nn.Module, state: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or extra or wrong:
        parts = [
            f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
            if missing
            else "",
            f"{len(extra)} unexpected ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})" if extra else "",
            f"{len(wrong)} of another shape ({', '.join(wrong[:2])}{', ...' if len(wrong) > 2 else ''})"
            if wrong
            else "",
        ]
        raise AdvtuneError(
            f"{what} does not fit the model: {'; '.join(p for p in parts if p)}; it is for another architecture or "
            "input shape: load it into the model it was saved from"
        )


def storable_state(state: dict) -> dict:
    """`state` as safetensors can store it: every tensor detached, on the CPU, contiguous and with a storage of its
    own (tied weights or views of one storage cloned: safetensors refuses tensors that share memory)."""
    out = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    seen: set[int] = set()
    for k, v in out.items():
        key = v.untyped_storage().data_ptr() if v.numel() else id(v)
        if key in seen:
            out[k] = v.clone()
        seen.add(key)
    return out
