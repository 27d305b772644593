"""Weights on disk: safetensors files of a state_dict, read without executing code, and checked
against the model they are loaded into. Below the model zoo: the training loop uses it too."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

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


def load_weights(model: nn.Module, path: str | Path, what: str = "checkpoint") -> nn.Module:
    """Load safetensors weights into a (possibly user-defined) model, refusing any shape/name mismatch."""
    state = load_state(path)
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
        detail = (
            (f"missing {missing[:3]}" if missing else "")
            or (f"unexpected {extra[:3]}" if extra else "")
            or f"shape {wrong[0]}"
        )
        raise AdvtuneError(
            f"{what} is for another architecture or input shape ({detail}); load it into the model it was saved from"
        )
