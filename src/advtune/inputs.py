"""The one input adapter: every public entry point (evaluate, analyze, harden, fit) reads data here.

Accepted as `data`:
- an ``(x, y)`` pair of tensors: x float images ``(N, C, H, W)`` in [0, 1], y integer labels ``(N,)``;
- any iterable of ``(x, y)`` batches, such as a ``torch.utils.data.DataLoader``;
- an advtune split (``TensorData``: ``Dataset.train`` / ``Dataset.test``); a whole advtune
  ``Dataset`` is resolved to the split the caller names (evaluation: test; training, analysis: train).

Each batch is validated once, with one-line `AdvtuneError`s that name the problem and the fix
(shape, dtype, range, NaN, labels). Tensors on another device than the model are moved to it, and
float64 images are cast to the model's dtype, since neither is a mistake worth an error.
Pixel space is the convention (DESIGN.md): normalisation is the model's first layer, so inputs
outside [0, 1] are refused rather than clipped.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .data import Dataset, TensorData
from .errors import AdvtuneError

_FIX_RANGE = "undo the normalisation (make it the model's first layer) or divide by 255"


def check_devices(model_device: Any, data_device: Any = None, *, what: str = "data") -> None:
    """Raise a one-line AdvtuneError unless a model on `model_device` can compute on data on `data_device`
    (None: not known yet). Data on another real device is fine (it is moved to the model's), but a meta
    tensor has a shape and no values: neither a meta model nor meta data can be computed with or moved."""
    model = torch.device(model_device)
    data = None if data_device is None else torch.device(data_device)
    if model.type != "meta" and (data is None or data.type != "meta"):
        return
    real = next((str(d) for d in (data, model) if d is not None and d.type != "meta"), "cpu")
    on = f"the model is on {model}" + (f" and the {what} on {data}" if data is not None else "")
    if model.type == "meta":
        fix = f"model.to_empty(device={real!r}) and load its weights (a meta model has none to copy)"
        if data is not None and data.type == "meta":
            fix += f", and create the {what} on {real}"
    else:
        fix = f"create the {what} on {model}, the model's device (a meta tensor has no values to copy)"
    raise AdvtuneError(f"{on}: meta tensors hold no values, nothing can be computed; move the model or the data: {fix}")


def data_device(data: Any) -> torch.device | None:
    """The device of `data` when known without reading it (a tensor pair, an advtune split), else None."""
    if is_tensor_tuple(data, (2, 3)):
        return data[0].device
    if isinstance(data, TensorData):
        return data.x.device
    return None


def check_batch(
    x: Any,
    y: Any,
    *,
    x_adv: Any = None,
    lower: float = 0.0,
    upper: float = 1.0,
    what: str = "data",
    device: Any = None,
) -> None:
    """Raise a one-line AdvtuneError unless (x, y[, x_adv]) is a valid batch of pixel-space images
    (for a model on `device`, when given)."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise AdvtuneError(
            f"{what}: a batch must be a pair of tensors (x, y), got ({type(x).__name__}, {type(y).__name__})"
        )
    meta = next((t.device for t in (x, y, x_adv) if isinstance(t, Tensor) and t.device.type == "meta"), None)
    if device is not None:  # before any value is read: a meta tensor has none
        check_devices(device, meta or x.device, what=what)
    elif meta is not None:
        raise AdvtuneError(
            f"{what} is on {meta}: meta tensors hold no values, nothing can be computed; "
            f"create the {what} on a real device (cpu, cuda)"
        )
    if x.dtype == torch.uint8:
        raise AdvtuneError(f"{what}: images are uint8; advtune works in pixel space [0, 1]: pass x.float() / 255")
    if not x.is_floating_point():
        raise AdvtuneError(f"{what}: images must be floating point in [0, 1], got {x.dtype}")
    if x.dim() < 2:
        raise AdvtuneError(f"{what}: images must be a batch (N, C, H, W), got shape {tuple(x.shape)}")
    if y.dim() != 1 or len(y) != len(x) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        fix = "pass y.long()"  # the fix the shape asks for: a column, one-hot rows, or the dtype
        if y.dim() == 2 and len(y) == len(x):
            fix = "pass y.view(-1)" if y.shape[1] == 1 else "one-hot rows? pass y.argmax(1)"
            fix += ".long()" if y.shape[1] == 1 and (y.is_floating_point() or y.dtype == torch.bool) else ""
        raise AdvtuneError(
            f"{what}: labels must be integer class indices of shape ({len(x)},), got {y.dtype} {tuple(y.shape)}; {fix}"
        )
    if len(y) and int(y.min()) < 0:
        raise AdvtuneError(f"{what}: labels must be class indices >= 0, got {int(y.min())}")
    if len(x) and not bool(torch.isfinite(x).all()):
        raise AdvtuneError(f"{what}: images contain NaN or inf; clean the data first")
    if len(x):
        lo, hi = float(x.min()), float(x.max())
        if lo < lower - 1e-6 or hi > upper + 1e-6:
            raise AdvtuneError(
                f"{what}: images must lie in [{lower:g}, {upper:g}] (pixel space), got values in "
                f"[{lo:.4g}, {hi:.4g}]; {_FIX_RANGE}"
            )
    if x_adv is not None and (not isinstance(x_adv, Tensor) or x_adv.shape != x.shape):
        got = tuple(x_adv.shape) if isinstance(x_adv, Tensor) else type(x_adv).__name__
        raise AdvtuneError(f"{what}: x_adv must have the shape of x {tuple(x.shape)}, got {got}")


def is_tensor_tuple(data: Any, sizes: tuple[int, ...] = (2,)) -> bool:
    """An (x, y) (or, with sizes=(2, 3), (x, y, x_adv)) tuple of tensors, not a list of batches."""
    return isinstance(data, (tuple, list)) and len(data) in sizes and all(isinstance(t, Tensor) for t in data)


def resolve_split(data: Any, split: str) -> Any:
    """A whole advtune Dataset becomes its `split` ("train" or "test"); anything else is returned as is."""
    return getattr(data, split) if isinstance(data, Dataset) else data


def batches(
    data: Any,
    batch_size: int,
    *,
    allow_adv: bool = False,
    lower: float = 0.0,
    upper: float = 1.0,
    what: str = "data",
    device: Any = None,
) -> Iterator[tuple[Tensor, ...]]:
    """Validated float batches ``(x, y)`` (or ``(x, y, x_adv or None)`` with allow_adv) from any
    accepted `data`. Tensor pairs and advtune splits are sliced; iterables are streamed as they come.
    device: the model's, when known: each batch must be one it can compute on (see check_devices)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AdvtuneError(f"batch_size must be a positive integer, got {batch_size!r}")
    sizes = (2, 3) if allow_adv else (2,)
    if isinstance(data, Dataset):
        raise AdvtuneError(f"{what}: pass one split of the dataset (ds.train or ds.test), not the whole dataset")
    if isinstance(data, TensorData):
        source: Iterable = data.batches(batch_size)
    elif is_tensor_tuple(data, sizes):
        n = len(data[0])
        if any(len(t) != n for t in data[1:]):
            raise AdvtuneError(f"{what}: x has {n} examples but y has {len(data[1])}; pass matching (x, y)")
        source = (tuple(t[i : i + batch_size] for t in data) for i in range(0, n, batch_size))
    elif isinstance(data, Tensor) or isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise AdvtuneError(
            f"{what} must be an (x, y) pair of tensors, an iterable of (x, y) batches such as a "
            f"DataLoader, or an advtune dataset split; got {type(data).__name__}"
        )
    elif isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (tuple, list, dict)):
        kinds = " and ".join(type(t).__name__ for t in data)  # (x.numpy(), y) read as two batches of one
        raise AdvtuneError(
            f"{what}: an (x, y) pair of tensors, got {kinds}: pass (torch.as_tensor(x), torch.as_tensor(y))"
        )
    else:
        source = data
    for item in source:
        if not is_tensor_tuple(item, sizes):
            want = "(x, y) or (x, y, x_adv)" if allow_adv else "(x, y)"
            raise AdvtuneError(
                f"{what}: each batch must be an {want} pair of tensors, got {type(item).__name__}"
                f"{' of ' + str(len(item)) if isinstance(item, (tuple, list)) else ''}; "
                "a DataLoader must yield (image, label) pairs"
            )
        x, y = item[0], item[1]
        xa = item[2] if len(item) == 3 else None
        check_batch(x, y, x_adv=xa, lower=lower, upper=upper, what=what, device=device)
        yield (x, y, xa) if allow_adv else (x, y)


def as_tensor_data(data: Any, *, what: str = "data", limit: int | None = None):
    """Any accepted `data` as an in-memory advtune split (TensorData), validated once; with `limit`,
    only its first `limit` examples (an iterable is not read past them).

    Training shuffles with its own seeded permutation (exact resume), so an iterable such as a
    DataLoader is read once into memory; a random transform in it is therefore sampled once."""
    if limit is not None:
        try:
            n = -1 if isinstance(limit, bool) else operator.index(limit)  # numpy integers too
        except TypeError:
            n = -1
        if n < 1:
            raise AdvtuneError(f"{what}: the limit must be a positive number of examples, got {limit!r}")
        limit = n
    if isinstance(data, TensorData):
        part = data.take(limit)
        if part.x.is_floating_point():  # uint8 is what advtune's loaders store: [0, 255] by construction
            check_batch(part.x, part.y, what=what)  # range, NaN, labels >= 0, as for an (x, y) pair
        elif len(part.y) and int(part.y.min()) < 0:
            raise AdvtuneError(f"{what}: labels must be class indices >= 0, got {int(part.y.min())}")
        return part
    if isinstance(data, Dataset):
        raise AdvtuneError(f"{what}: pass one split of the dataset (ds.train or ds.test), not the whole dataset")
    xs, ys, n = [], [], 0
    for x, y in batches(data, 4096, what=what):
        if limit is not None:
            x, y = x[: limit - n], y[: limit - n]
        xs.append(x.detach().cpu())
        ys.append(y.detach().cpu())
        n += len(y)
        if limit is not None and n >= limit:
            break
    if not xs or sum(len(y) for y in ys) == 0:
        raise AdvtuneError(f"{what} is empty; check the split or the DataLoader")
    check_joinable(xs, what, flat_ok=False)
    return TensorData(torch.cat(xs).float(), torch.cat(ys).long())


def check_joinable(xs: Sequence[Tensor], what: str, flat_ok: bool = True) -> None:
    """Batches of images that join into one tensor of (N, C, H, W) images, or a one-line error before torch.cat's.
    flat_ok: (N, F) inputs pass (a model of the user's may take them); (N, H, W) never does (a channel missing)."""
    shapes = sorted({tuple(x.shape[1:]) for x in xs})
    if len(shapes) > 1:
        raise AdvtuneError(f"{what}: batches have different image shapes {shapes}; resize them to one shape")
    if xs[0].dim() == 3 or (xs[0].dim() != 4 and not flat_ok):
        raise AdvtuneError(
            f"{what}: images must be (N, C, H, W), got shape {tuple(xs[0].shape)}; add the channel dimension, "
            "e.g. x.unsqueeze(1)"
        )


def validation_split(val: Any) -> Any:
    """fit's monitoring split: a whole Dataset's validation split (`load_dataset(..., val=N)`), never its test split
    without a word; a Dataset without one is refused (pass `ds.test` to monitor on test on purpose)."""
    if not isinstance(val, Dataset):
        return val
    if val.val is None or not len(val.val):
        raise AdvtuneError(
            "val= got a Dataset without a validation split; load it with load_dataset(..., val=N), or pass ds.test "
            "to monitor on the test split"
        )
    return val.val
