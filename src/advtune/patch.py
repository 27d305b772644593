"""The robustness patch: only what hardening changed, to ship to a fleet that already has the base model.

A patch is a safetensors file. For every tensor of the state_dict that changed, it holds the changed
entries' values (`<name>::value`, in flat order) and where they are, as whichever is smaller: their flat
positions (`<name>::index`, int32, or int64 for a tensor of 2^31 entries or more) or a bit per entry of the
tensor (`<name>::mask`, uint8, eight entries a byte, lowest bit first: smaller once more than 1 entry in 32
changed, as in harden's sparse masks); or, when that is no smaller, the whole tensor (`<name>::full`); or,
for a weight a low-rank adapter changed, the adapter's factors (`<name>::up`, `<name>::down`, applied by
`merged_weight`, which gives the same bits on every machine; used only when it reproduces the hardened
weight exactly). Its metadata names the base it applies to and the result it must give, by the sha256 of
their state_dicts (`state_sha256`: names, dtypes, shapes and bytes), so `apply_patch` refuses another base
in one line and proves the result bit-identical. The metadata also carries what produced the patch (recipe,
eps, measured accuracies) as JSON.

Reading never executes code (safetensors holds tensors only).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from .distributed import is_main_process
from .errors import AdvtuneError
from .storage import atomic_write_bytes


def merged_weight(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """W + up @ down, computed the same way on every machine: the rank-one terms summed in a fixed order
    in float64 (each product of two float32 numbers is exact there), then rounded once. A matmul's
    summation order depends on the BLAS and its threads; this does not, so a patch that stores the
    factors gives the hardened weights bit for bit wherever it is applied (train/lowrank.py merges
    its adapters with it)."""
    with torch.no_grad():
        delta = torch.zeros(up.shape[0], down.shape[1], dtype=torch.float64, device=weight.device)
        for k in range(up.shape[1]):
            delta += up[:, k : k + 1].double() * down[k : k + 1].double()
        return (weight.double() + delta.view_as(weight)).to(weight.dtype)


FORMAT = "advtune-patch"
# 1: changed entries by position or whole tensors; 2: + low-rank factors (up/down); 3: + bit masks. A patch
# says the lowest version that reads it, so older readers take every patch they can.
READS = ("1", "2", "3")
LOCATORS = ("index", "mask")  # the parts that say where changed entries are (not stored entries)
BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def packed_size(n: int) -> int:
    """The bytes `pack_bits` makes of `n` entries."""
    return -(-n // 8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor as uint8 bytes, eight entries a byte, the first entry in the lowest bit."""
    padded = torch.zeros(packed_size(mask.numel()) * 8, dtype=torch.uint8)
    padded[: mask.numel()] = mask.flatten().ne(0).cpu().to(torch.uint8)
    return (padded.view(-1, 8) * BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` entries of `pack_bits`'s bytes as a flat bool tensor."""
    return (packed.to(torch.uint8)[:, None] & BIT_WEIGHTS.to(packed.device)).ne(0).flatten()[:n]


def locate_changes(diff: torch.Tensor, changed: int) -> tuple[str, torch.Tensor]:
    """Where a tensor's `changed` entries are (`diff`: flat bool), in the smaller of two encodings: ("index", flat
    positions as int32, or int64 past int32's range) or ("mask", `pack_bits(diff)`); only the one chosen is built."""
    position = torch.int32 if diff.numel() < 2**31 else torch.int64
    if packed_size(diff.numel()) < changed * position.itemsize:
        return "mask", pack_bits(diff)
    return "index", diff.nonzero().flatten().to(position)


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A fingerprint of a state_dict: every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return h.hexdigest()


def cpu_state(model_or_state: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of the state_dict on the CPU (a copy: training the model in place must not change it)."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def make_patch(
    base, hardened, info: dict[str, Any] | None = None, factors: dict | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The patch from `base` to `hardened` (models or state_dicts of the same architecture): its
    tensors and its metadata. `factors`: {weight name: (up, down)} of merged low-rank adapters, stored
    instead of the weight where they reproduce it exactly."""
    old, new = cpu_state(base), cpu_state(hardened)
    if old.keys() != new.keys() or any(old[k].shape != new[k].shape or old[k].dtype != new[k].dtype for k in old):
        raise AdvtuneError("a patch needs two states of the same architecture (the same names, shapes and dtypes)")
    tensors: dict[str, torch.Tensor] = {}
    changed_entries = 0
    for name in sorted(new):
        diff = (old[name] != new[name]).flatten()
        if old[name].is_floating_point():  # NaN != NaN: a NaN that stayed NaN did not change
            diff &= ~(old[name].isnan() & new[name].isnan()).flatten()
        n = int(diff.sum())
        if n == 0:
            continue
        changed_entries += n
        up, down = (factors or {}).get(name, (None, None))
        if up is not None and torch.equal(merged_weight(old[name], up, down), new[name]):
            tensors[f"{name}::up"], tensors[f"{name}::down"] = up.contiguous(), down.contiguous()
        else:
            kind, where = locate_changes(diff, n)
            value = new[name].flatten()[diff].clone()
            if where.numel() * where.element_size() + value.numel() * value.element_size() < new[name].nbytes:
                tensors[f"{name}::{kind}"], tensors[f"{name}::value"] = where, value
            else:
                tensors[f"{name}::full"] = new[name]
    parts = {k.rpartition("::")[2] for k in tensors}
    meta = {
        "format": FORMAT,
        "version": "3" if "mask" in parts else "2" if "up" in parts else "1",
        "base_sha256": state_sha256(old),
        "result_sha256": state_sha256(new),
        "changed_entries": str(changed_entries),
        "stored_entries": str(sum(t.numel() for k, t in tensors.items() if k.rpartition("::")[2] not in LOCATORS)),
        "total_entries": str(sum(v.numel() for v in new.values())),
        "info": json.dumps(info or {}, sort_keys=True),
    }
    return tensors, meta


def write_patch(
    path: str | Path, base, hardened, info: dict[str, Any] | None = None, factors: dict | None = None
) -> dict[str, str]:
    """Write the patch from `base` to `hardened` to `path` (atomically); returns its metadata. Under
    torchrun rank 0 alone builds and writes it (the others return {})."""
    if not isinstance(path, (str, os.PathLike)):
        raise AdvtuneError(f"write_patch(path, base, hardened): path first, got a {type(path).__name__}")
    for what, m in (("base", base), ("hardened", hardened)):
        if not isinstance(m, (torch.nn.Module, dict)):
            raise AdvtuneError(f"write_patch: {what} must be a model or its state_dict, got {type(m).__name__}")
    if not is_main_process():
        return {}
    tensors, meta = make_patch(base, hardened, info, factors)
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return meta


def read_patch(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A patch's tensors and metadata; a truncated, foreign or damaged file is a one-line error."""
    path = Path(path)
    if path.is_dir():
        raise AdvtuneError(f"{path} is a folder; pass the patch file in it, {path / 'patch.safetensors'}")
    if not path.is_file():
        raise AdvtuneError(f"patch not found: {path}")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdvtuneError(f"{path} is truncated or not a safetensors file ({str(e).splitlines()[0]})") from None
    if meta.get("format") != FORMAT:
        raise AdvtuneError(f"{path} is not an advtune patch (no '{FORMAT}' format in its metadata)")
    if meta.get("version") not in READS:
        raise AdvtuneError(
            f"{path} is a version {meta.get('version')!r} patch; this advtune reads versions {', '.join(READS)}"
        )
    for key in ("base_sha256", "result_sha256"):
        if len(meta.get(key, "")) != 64:
            raise AdvtuneError(f"{path}: the patch's metadata lacks {key}; the file is damaged")
    for key in ("changed_entries", "total_entries"):
        if not str(meta.get(key, "")).isdigit():
            raise AdvtuneError(f"{path}: the patch's metadata lacks {key}; the file is damaged")
    try:
        info = json.loads(meta.get("info") or "{}")
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise AdvtuneError(f"{path}: the patch's info is not a JSON object; the file is damaged")
    return tensors, meta


def patch_factors(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The low-rank factors a patch stores, {weight name: (up, down)} ({} without a patch)."""
    if not Path(path).is_file():
        return {}
    tensors, _ = read_patch(path)
    return {
        k[: -len("::up")]: (v, tensors[k[: -len("::up")] + "::down"]) for k, v in tensors.items() if k.endswith("::up")
    }


def patch_info(path: str | Path) -> dict[str, Any]:
    """What a patch says about itself: its hashes, entry counts and the producer's info."""
    _, meta = read_patch(path)
    return {**{k: v for k, v in meta.items() if k != "info"}, "info": json.loads(meta.get("info") or "{}")}


def apply_to_state(state: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """`state` with the patch applied, checked: the base must be the patch's base, and the result
    must be the patch's result, bit for bit."""
    tensors, meta = read_patch(path)
    state = cpu_state(state)
    have = state_sha256(state)
    if have == meta["result_sha256"] != meta["base_sha256"]:  # (a patch that changes nothing applies to its base)
        raise AdvtuneError(f"this model already is {path}'s result: the patch was applied to it before")
    if have != meta["base_sha256"]:
        raise AdvtuneError(
            f"{path} is a patch for another base model (its base has sha256 {meta['base_sha256'][:12]}..., "
            f"this one {have[:12]}...); apply it to the model it was made from"
        )
    out = {k: v.clone() for k, v in state.items()}
    for key, value in tensors.items():
        name, _, part = key.rpartition("::")
        if name not in out or part not in ("full", "index", "mask", "value", "up", "down"):
            raise AdvtuneError(f"{path}: entry {key!r} does not fit this model; the file is damaged")
        if part == "up":
            down = tensors.get(f"{name}::down")
            w = out[name]
            if down is None or value.dim() != 2 or down.dim() != 2 or value.shape[0] != w.shape[0]:
                raise AdvtuneError(
                    f"{path}: the low-rank factors of {name!r} do not fit this model; the file is damaged"
                )
            if value.shape[1] != down.shape[0] or down.shape[1] != w[0].numel():
                raise AdvtuneError(
                    f"{path}: the low-rank factors of {name!r} do not fit this model; the file is damaged"
                )
            out[name] = merged_weight(w, value.to(w.dtype), down.to(w.dtype))
        elif part == "full":
            if value.numel() != out[name].numel():
                raise AdvtuneError(f"{path}: the values of {name!r} do not fit this model; the file is damaged")
            out[name] = value.to(out[name].dtype).reshape(out[name].shape).clone()
        elif part in LOCATORS:
            values, n = tensors.get(f"{name}::value"), out[name].numel()
            if part == "index":
                outside = value.numel() and (value.max() >= n or value.min() < 0)
                if values is None or values.numel() != value.numel() or outside:
                    raise AdvtuneError(
                        f"{path}: the changed entries of {name!r} do not fit this model; the file is damaged"
                    )
                where = value.long().flatten()
            else:
                if values is None or value.dim() != 1 or value.numel() != packed_size(n):
                    raise AdvtuneError(
                        f"{path}: the change mask of {name!r} does not fit this model; the file is damaged"
                    )
                where = unpack_bits(value, n)
                if int(where.sum()) != values.numel():
                    raise AdvtuneError(
                        f"{path}: the change mask of {name!r} does not fit its values; the file is damaged"
                    )
            flat = out[name].flatten()
            flat[where] = values.flatten().to(flat.dtype)  # values of any shape of the right size: the hash judges
            out[name] = flat.reshape(out[name].shape)
    if state_sha256(out) != meta["result_sha256"]:
        raise AdvtuneError(f"{path}: applying it did not give the recorded result; the file is damaged")
    return out


def apply_patch(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the patch at `path` to `model` in place (its weights become the hardened ones, bit for
    bit) and return it; a model that is not the patch's base is refused before anything changes."""
    patched = apply_to_state(model.state_dict(), path)
    model.load_state_dict(patched)
    return model
