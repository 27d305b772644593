"""Small shared helpers: seeding, generators, devices, atomic writes, progress bars, versions."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np
import torch
from torch import nn

from .distributed import is_main_process, local_device
from .errors import AdvtuneError

log = logging.getLogger(__name__)
T = TypeVar("T")

# ---------------------------------------------------------------- randomness


def seed_everything(seed: int | None) -> None:
    """Seed Python, NumPy and torch. Only entry points (CLI, experiment runner) call this."""
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator on `device`, or None when seed is None (recorded as nondeterministic)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def batch_generator(generator: torch.Generator | None, index: int, device=None) -> torch.Generator | None:
    """Batch `index`'s own random stream, derived from `generator` (None: the global RNG): work split
    over batches, or over processes, draws the same numbers however it is split."""
    if generator is None:
        return None
    return make_generator(derive_seed(generator.initial_seed(), "batch", index), device or generator.device)


def derive_seed(seed: int | None, *keys: int | str) -> int | None:
    """A stable sub-seed, e.g. derive_seed(seed, "epoch", 3): independent streams per purpose."""
    if seed is None:
        return None
    h = int(seed) & 0xFFFFFFFFFFFF
    for k in keys:
        for ch in str(k).encode():
            h = (h * 1000003 ^ ch) & 0xFFFFFFFFFFFF
        h = (h * 1000003 ^ 0x5F) & 0xFFFFFFFFFFFF
    return h


def sample_on(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where to draw random numbers: on the generator's device (the rule: sample there, then move)."""
    return generator.device if generator is not None else device


# ---------------------------------------------------------------- numbers


def parse_number(text: str | float | int) -> float:
    """A float that may be written as a fraction: `0.3`, `8/255` (eps in pixel units)."""
    from fractions import Fraction

    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    try:
        s = str(text).strip()
        return float(Fraction(s)) if "/" in s else float(s)
    except (ValueError, ZeroDivisionError):
        raise AdvtuneError(f"not a number: {text!r} (examples: 0.3, 8/255)") from None


# ---------------------------------------------------------------- devices


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
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


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


# ---------------------------------------------------------------- files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


TMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: never a half-written file.
    The file gets the permissions a plain open() would (0666 minus the umask), not mkstemp's 0600.
    A full disk or a read-only folder is a one-line AdvtuneError; the temporary file is removed."""
    if not is_main_process():  # under torch.distributed rank 0 alone writes files (its peers wait at barriers)
        return
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise AdvtuneError(
            f"cannot write {path} ({e.strerror or e}); free disk space or pick a writable folder"
        ) from None
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def remove_orphan_tmp(folder: str | os.PathLike) -> list[str]:
    """Delete temporary files an interrupted atomic write left behind (`.<name>.<random>.tmp`)."""
    removed = []
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p.name)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, float) and obj != obj:  # NaN -> null keeps the JSON strict
        return None
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise AdvtuneError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdvtuneError(f"{what} {path} is not valid JSON ({e}); re-create it or delete the run") from None


# ---------------------------------------------------------------- progress + environment

_progress_disabled = False


def set_progress(enabled: bool) -> None:
    """The CLI's --quiet switches progress bars off globally."""
    global _progress_disabled
    _progress_disabled = not enabled


LOG_EVERY_S = 30.0


class _LogProgress:
    """Progress for logs (stderr is not a terminal): one log line every LOG_EVERY_S seconds with
    done/total, the rate and an estimate of the time left; quiet for loops shorter than that."""

    def __init__(self, iterable: Iterable[T], desc: str, total: int | None) -> None:
        self.iterable, self.desc = iterable, desc
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.postfix = ""

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def __iter__(self):
        import logging
        import time

        log = logging.getLogger("advtune.progress")
        t0 = last = time.perf_counter()
        done = 0
        for item in self.iterable:
            yield item
            done += 1
            now = time.perf_counter()
            if now - last >= LOG_EVERY_S:
                last = now
                rate = done / (now - t0)
                if self.total:
                    left = (self.total - done) / rate if rate > 0 else float("nan")
                    log.info(
                        "%s: %d/%d (%.0f%%), %.0f s elapsed, about %.0f s left%s",
                        self.desc,
                        done,
                        self.total,
                        100 * done / self.total,
                        now - t0,
                        left,
                        f" [{self.postfix}]" if self.postfix else "",
                    )
                else:
                    log.info(
                        "%s: %d done, %.0f s elapsed%s",
                        self.desc,
                        done,
                        now - t0,
                        f" [{self.postfix}]" if self.postfix else "",
                    )


def progress(
    iterable: Iterable[T], desc: str = "", total: int | None = None, disable: bool | None = None, leave: bool = False
) -> Iterable[T]:
    """One wrapper around tqdm: bars go to stderr on a terminal; in a log (not a terminal) a line every
    30 s instead; nothing with --quiet (or disable=True)."""
    from tqdm.auto import tqdm

    if disable or _progress_disabled:
        return tqdm(iterable, desc=desc, total=total, disable=True)
    if disable is None and not sys.stderr.isatty():
        return _LogProgress(iterable, desc, total)  # type: ignore[return-value]
    return tqdm(iterable, desc=desc, total=total, disable=False, leave=leave, dynamic_ncols=True)


def versions() -> dict[str, str]:
    from . import __version__

    out = {
        "advtune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }
    sha = git_sha()
    if sha:
        out["git_sha"] = sha
    return out


def git_sha() -> str | None:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None
