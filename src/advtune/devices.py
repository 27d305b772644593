"""Where a model lives: the --device spec resolved, a model's device and dtype, eval mode for a while."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .distributed import local_device
from .errors import AdvtuneError


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto|cpu|cuda|cuda:i` -> torch.device, with a clear error when CUDA is asked for but absent."""
    spec = local_device((spec or "auto").strip().lower())  # under torchrun: this rank's GPU
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AdvtuneError(f"--device {spec}: CUDA is not available on this machine; use --device cpu or auto")
        return torch.device(spec)
    if spec == "cpu":
        return torch.device("cpu")
    raise AdvtuneError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:<index>")


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (device follows the model, never cached)."""
    require_module(model)
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def require_module(model) -> None:
    """The API's functions take an nn.Module: a state_dict or a function failed deep inside with an AttributeError."""
    if not isinstance(model, nn.Module):
        hint = " (a state_dict? load it into your model first)" if isinstance(model, dict) else ""
        raise AdvtuneError(f"model must be an nn.Module, got {type(model).__name__}{hint}")


def model_dtype(model: nn.Module) -> torch.dtype:
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model in eval mode for the block, then restore each submodule's own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def out_of_memory(e: BaseException) -> bool:
    """A device (or host) allocation failure, as opposed to a bug: the one error a smaller batch fixes."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError: 2.4+
    if isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and any(
        m in str(e) for m in ("out of memory", "can't allocate memory", "Cannot allocate memory")
    )
