"""Records on disk: atomic writes (never a half-written file), JSON that stays strict, and reading
JSON with a one-line error."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import filenames as files
from .distributed import is_main_process
from .errors import AdvtuneError


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
        tmp = None
        _sync_folder(path.parent)  # the rename itself survives a power loss
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise AdvtuneError(f"cannot write {path} ({e.strerror or e}); {_write_fix(e)}") from None
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def _write_fix(e: OSError) -> str:
    """The fix a failed write's cause asks for (every cause was told to free disk space)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free disk space"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the folder is not writable: pick a writable one (or make it writable)"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):  # EEXIST: the mkdir of a folder a file already names
        return "a part of the path is a file, not a folder: pick another path"
    if e.errno == errno.EISDIR:
        return "a folder has that file's name: pick another path"
    if e.errno == errno.ENAMETOOLONG:
        return "shorten the path"
    return "free disk space or pick a writable folder"


def _sync_folder(folder: Path) -> None:
    """fsync a folder after a rename into it (POSIX; where a folder cannot be opened, as on Windows, skipped)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
    """A JSON record: every advtune record is one object, so anything else (a list, a number: an edited or foreign
    file) is refused here, by name, instead of failing later on a missing key."""
    path = Path(path)
    if not path.is_file():
        raise AdvtuneError(f"{what} not found: {path}")
    try:
        record = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdvtuneError(f"{what} {path} is not valid JSON ({e}); {_record_fix(path)}") from None
    except OSError as e:  # e.g. permission denied: a traceback before
        raise AdvtuneError(f"{what} {path} cannot be read ({e.strerror or e}); check the file and its access") from None
    if not isinstance(record, dict):
        raise AdvtuneError(
            f"{what} {path} holds a JSON {type(record).__name__}, not an advtune record (an object); "
            + _record_fix(path)
        )
    return record


def _record_fix(path: Path) -> str:
    """How to get a damaged record back, by which one it is (deleting the run was the advice for every one)."""
    if path.name.startswith("eval-"):
        return "delete this file or rerun advtune evaluate with --overwrite (the model is not affected)"
    if path.name in (files.SUMMARY, files.COST, files.METRICS):
        return "rerun the command that made the run with --resume (train, finetune) or --overwrite"
    if path.name == files.RESULTS:
        return "rerun the experiment's command (its finished variants are kept, the table is rebuilt)"
    return "re-create it or delete the run"


def file_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 of a file's bytes, read in chunks; None when there is no such file."""
    import hashlib

    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        return None
    return h.hexdigest()
