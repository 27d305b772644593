"""The one home for the facts of a torch.distributed run (torchrun): this process's rank, the world
size, whether it is the main process (rank 0, the only one that creates folders and writes files),
its device (from LOCAL_RANK), the collectives the jobs need (sum, max, gather, barrier, "rank 0
decides"), and the process group's life (`session`). Without a process group there is one process,
rank 0 of 1, and every helper here is a no-op.

Collectives time out (ADVTUNE_DIST_TIMEOUT seconds, default 600): a rank that dies never leaves the
others waiting forever (torchrun also stops the other workers when one fails).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import AdvtuneError

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKENDS = ("auto", "gloo", "nccl")
DEFAULT_TIMEOUT_S = 600


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the one process that writes records."""
    return rank_and_world()[0] == 0


def is_distributed() -> bool:
    return rank_and_world()[1] > 1


def launched_by_torchrun() -> bool:
    """torchrun (or any launcher with the env:// convention) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(spec: str = "auto") -> str:
    """Under torchrun each rank takes the GPU its LOCAL_RANK names (`auto` or `cuda`); one process keeps `spec`."""
    if launched_by_torchrun() and spec in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if launched_by_torchrun() and spec.startswith("cuda:") and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise AdvtuneError(  # every rank of this machine would share one GPU (NCCL refuses, gloo crowds it)
            f"--device {spec} under torchrun puts every process of this machine on one GPU; give --device cuda "
            "(each process takes the GPU of its LOCAL_RANK), or choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    return spec


def timeout_s() -> float:
    raw = os.environ.get("ADVTUNE_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        raise AdvtuneError(f"ADVTUNE_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise AdvtuneError(f"ADVTUNE_DIST_TIMEOUT must be positive, got {raw!r}")
    return value


def choose_backend(backend: str, device: str) -> str:
    """gloo on CPU, NCCL on CUDA (`auto`); NCCL asked for without a GPU is a one-line error."""
    if backend not in BACKENDS:
        raise AdvtuneError(f"unknown --dist-backend {backend!r}; valid: {', '.join(BACKENDS)}")
    cuda = torch.cuda.is_available() and device != "cpu"
    if backend == "nccl" and not cuda:
        raise AdvtuneError(
            "--dist-backend nccl needs CUDA GPUs, and this process has none (or --device cpu); use gloo or auto"
        )
    if backend == "auto":
        return "nccl" if cuda else "gloo"
    return backend


@contextlib.contextmanager
def session(backend: str = "auto", device: str = "auto") -> Iterator[None]:
    """The process group of a torchrun launch, for the length of one command: joined on entry, and on
    exit a barrier (every rank has finished its writes) before `destroy_process_group`. Outside
    torchrun, or when a group already exists (the caller owns it), nothing happens."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    if not dist.is_available():
        raise AdvtuneError("this PyTorch build has no torch.distributed; run a single process instead")
    chosen = choose_backend(backend, device)
    wait = timeout_s()
    if chosen == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=wait))
    except (RuntimeError, ValueError) as e:
        raise AdvtuneError(f"could not join the torchrun process group ({chosen}): {str(e).splitlines()[0]}") from None
    rank, world = rank_and_world()
    log.info("distributed: rank %d of %d, backend %s, collectives time out after %g s", rank, world, chosen, wait)
    ok = False
    try:
        yield
        ok = True
    finally:
        if ok:
            with contextlib.suppress(RuntimeError):
                dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _device_for_collectives() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU ones
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: list[float] | tuple[float, ...]) -> list[float]:
    """Element-wise sum over ranks (float64), the same list on every rank."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device_for_collectives())
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def all_max(values: list[float] | tuple[float, ...]) -> list[float]:
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device_for_collectives())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float(v) for v in t.tolist()]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable; tensors on CPU), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * rank_and_world()[1]
    dist.all_gather_object(out, obj)
    return out


def on_each_machine(fn: Callable[[], Any]) -> None:
    """The first rank of each machine (LOCAL_RANK 0) runs `fn` (unpack a local file, ...) while the rest wait; a
    one-line error on any of them is raised on every rank. Every rank must call it (a collective)."""
    if not is_distributed():
        fn()
        return
    error = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        try:
            fn()
        except AdvtuneError as e:
            error = str(e)
    first = next((e for e in all_gather(error) if e is not None), None)
    if first is not None:
        raise AdvtuneError(first)


def on_main(fn: Callable[[], T]) -> T | None:
    """Rank 0 runs `fn` (create a folder, download a dataset, ...) while the others wait; a one-line
    error on rank 0 is raised on every rank, so all of them stop with the same message instead of
    waiting for a collective that never comes. Returns fn's result on rank 0, None elsewhere."""
    if not is_distributed():
        return fn()
    result, error = None, None
    if is_main_process():
        try:
            result = fn()
        except AdvtuneError as e:
            error = str(e)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise AdvtuneError(box[0])
    return result


def broadcast_state(module: torch.nn.Module, *, buffers_only: bool = False) -> None:
    """Make every rank's parameters (and buffers, e.g. BatchNorm statistics) rank 0's, as DDP does at
    its start: the ranks then train one model, whatever their own initialisation was."""
    if not is_distributed():
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank (picklable)."""
    if not is_distributed():
        return obj
    box = [obj if is_main_process() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_global_batch(batch_size: int) -> int:
    """`batch_size` is the global batch: it must split evenly over the processes. Returns the per-rank batch."""
    world = rank_and_world()[1]
    if batch_size % world:
        raise AdvtuneError(
            f"--batch-size {batch_size} is the global batch and must split evenly over the {world} processes; "
            f"use a multiple of {world}, e.g. {world * max(1, batch_size // world)}"
        )
    return batch_size // world
