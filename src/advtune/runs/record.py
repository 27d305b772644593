"""Runs are records: `runs/<name>/` holds config.json (resolved config, seed, versions), metrics.jsonl,
cost.json, summary.json and artifacts (model.safetensors + model.json, checkpoint.pt), all written
atomically. The jobs that fill them are the other modules of this package."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

from .. import filenames as files
from ..cost import CostMeter
from ..distributed import barrier, is_main_process, on_main, rank_and_world
from ..errors import AdvtuneError
from ..provenance import versions
from ..storage import atomic_write_json, atomic_write_text, read_json, remove_orphan_tmp, to_jsonable

log = logging.getLogger(__name__)


_HELD: dict[Path, int] = {}  # run folders this process holds the writer lock of: path -> fd


def check_resume_overwrite(resume: bool, overwrite: bool) -> None:
    """Which one wins would be a guess (continue the run, or replace it?): refused, by each job before its data
    loads and by RunDir.create."""
    if resume and overwrite:
        raise AdvtuneError("give --resume (continue the run) or --overwrite (replace it), not both")


# runs this process moved aside for --overwrite and has not yet deleted (its new run has not finished): a failure
# says where the old run is (the CLI's error line), so it is never lost without a word
REPLACING: dict[Path, Path] = {}
DEFERRED: set[Path] = set()  # stages of a larger run (replaced_when_all_done): their done() leaves what they replaced


@contextlib.contextmanager
def replaced_when_all_done(*paths: Path):
    """Stages of one run (the probe rule's OUT.probe, then OUT): the runs an --overwrite of them moved aside are
    deleted only once every stage is done; a stage that fails leaves all of them kept (and said where)."""
    keys = {Path(p) for p in paths}
    DEFERRED.update(keys)
    try:
        yield
    finally:
        DEFERRED.difference_update(keys)
    for p in keys:  # reached only when every stage finished
        aside = REPLACING.pop(p, None)
        if aside is not None and is_main_process() and aside.is_dir():
            delete_replaced(aside)


def replaced_note() -> str:
    """For an error line: where the runs this process was replacing are kept (empty when none); said once (a later
    error of the same process is not about them)."""
    note = "".join(f" (the run {p} held before is kept at {a}: move it back to keep it)" for p, a in REPLACING.items())
    REPLACING.clear()
    return note


def is_advtune_run(p: Path) -> bool:
    """A folder advtune made: its config.json is advtune's record (every one records the versions it ran with). A
    config.json that cannot be read is neither: refused in its own words (--overwrite will not judge it)."""
    path = p / files.CONFIG
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdvtuneError(
            f"--overwrite: {path} cannot be read ({type(e).__name__}), so {p} is not known to be an advtune run; "
            "delete the folder yourself if it is one, or choose another --out"
        ) from None
    return isinstance(record, dict) and "versions" in record


def refuse_taken_out(path: str | os.PathLike, *, resume: bool, overwrite: bool, resumable: bool = True) -> None:
    """What RunDir.create would refuse about `--out` as it is now, changing nothing: each job asks before it reads
    its model and data (a rerun without --resume waited through both to be told the folder exists). Rank 0 looks,
    as in RunDir.create (another rank could see its folder half made), and a refusal stops every rank."""
    on_main(lambda: check_out(path, resume=resume, overwrite=overwrite, resumable=resumable))


def check_out(path: str | os.PathLike, *, resume: bool, overwrite: bool, resumable: bool = True) -> None:
    """`refuse_taken_out` on this process (RunDir.create's own check, on rank 0)."""
    if str(path).strip() in ("", ".", "./"):
        raise AdvtuneError("--out must name a run folder (e.g. runs/my-run), not the current folder")
    check_resume_overwrite(resume, overwrite)
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise AdvtuneError(f"output path {p} exists and is a file; pick another --out")
    if not (p.is_dir() and any(x.name != files.LOCK for x in p.iterdir())):
        return
    if resume:
        if not (p / files.CONFIG).is_file():
            raise AdvtuneError(f"--resume: {p} is not an advtune run (no {files.CONFIG}); pick the run folder")
    elif overwrite:
        if p.is_symlink():  # moved aside it would be the link, the run it points to never deleted
            raise AdvtuneError(
                f"--overwrite: {p} is a symbolic link (to {os.readlink(p)}); pass the folder it points to as --out"
            )
        if not is_advtune_run(p):  # another tool's folder may hold a config.json too
            raise AdvtuneError(
                f"--overwrite: {p} is not an advtune run (no {files.CONFIG} written by advtune); refusing to delete it"
            )
        others = nested_runs(p)
        if others:  # `finetune RUN --out RUN/hardened`: replacing RUN deleted the run saved inside it
            raise AdvtuneError(
                f"--overwrite: {p} holds other runs ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                "move them out of it first, or choose another --out"
            )
    else:
        how = "pass --resume to continue it or --overwrite" if resumable else "pass --overwrite"
        raise AdvtuneError(f"output folder {p} already exists; {how} to replace it, or choose another --out")


def delete_replaced(aside: Path) -> None:
    """Delete the run an --overwrite replaced, now that the new one is done; what could not go is said, not hidden."""
    shutil.rmtree(aside, ignore_errors=True)
    if aside.exists():
        log.warning("could not delete all of the replaced run kept at %s; delete it yourself", aside)


def aside_prefix(p: Path) -> str:
    """The start of the name an --overwrite moves run `p` aside to; a long name (near the file system's 255 bytes)
    by its hash, so that a run that could be made can be replaced."""
    name = p.name if len(p.name.encode()) <= 180 else hashlib.sha256(p.name.encode()).hexdigest()[:16]
    return f".{name}.replaced-"


def nested_runs(p: Path) -> list[str]:
    """The runs saved inside run folder `p` that are not part of it (its snapshots record what they belong to, a
    harden run's stages have their own names), as paths relative to `p`; an unreadable record counts as a run."""
    try:
        harden = read_json(p / files.CONFIG).get("command") == "harden"
    except AdvtuneError:
        harden = False
    found = []
    for cfg in sorted(p.rglob(files.CONFIG)):
        if cfg.parent == p or (harden and cfg.relative_to(p).parts[0] in files.HARDEN_STAGES):
            continue
        try:
            record = json.loads(cfg.read_text())
        except (OSError, ValueError):
            record = None
        if not (isinstance(record, dict) and ("snapshot" in record or "of" in record)):
            found.append(str(cfg.parent.relative_to(p)))
    return found


class RunDir:
    """A run's folder. Creating one refuses to clobber: an existing non-empty folder needs
    resume=True (continue it) or overwrite=True (replace it, only if it is an advtune run).

    Safety: one writer per folder (an exclusive lock, released when the process ends, so a killed
    run never blocks its --resume); an overwritten run is moved aside, not deleted, until the new
    run calls `done()`; temporary files an interrupted write left behind are removed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.aside: Path | None = None
        self.writer = is_main_process()  # under torch.distributed only rank 0 writes the record

    @classmethod
    def create(
        cls, path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False, resumable: bool = True
    ) -> "RunDir":
        """`resumable`: whether the command has --resume (its refusal of an existing folder offers it only then)."""
        if str(path).strip() in ("", ".", "./"):
            raise AdvtuneError("--out must name a run folder (e.g. runs/my-run), not the current folder")
        check_resume_overwrite(resume, overwrite)
        run = cls(path)
        # rank 0 alone checks, creates, replaces and locks the folder; a refusal stops every rank with it
        on_main(lambda: run._create(resume=resume, overwrite=overwrite, resumable=resumable))
        return run

    def _create(self, *, resume: bool, overwrite: bool, resumable: bool) -> None:
        run, p = self, self.path
        check_out(p, resume=resume, overwrite=overwrite, resumable=resumable)  # again: the folder may have changed
        if not resume and p.is_dir() and any(x.name != files.LOCK for x in p.iterdir()):  # --overwrite
            run._lock()  # nobody else may be writing the run we are about to replace
            aside = p.with_name(f"{aside_prefix(p)}{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9}")
            _release(p)
            try:
                p.rename(aside)
            except OSError as e:  # the run stays where it was, untouched
                raise AdvtuneError(
                    f"--overwrite: cannot move the run in {p} aside to {aside.name} ({e.strerror or e}); "
                    "make its parent folder writable or choose another --out"
                ) from None
            run.aside = aside
            REPLACING[p] = aside
            log.info("the run in %s is kept at %s until the new run finishes", p, aside)
        try:
            try:
                p.mkdir(parents=True, exist_ok=True)
                probe = p / ".write-test"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise AdvtuneError(f"cannot write to output folder {p} ({e.strerror}); pick a writable --out") from None
            run._lock()
        except AdvtuneError as e:
            if run.aside is not None and not run._put_back():
                REPLACING.pop(p, None)  # said here, once
                raise AdvtuneError(f"{e} (the run it was to replace is kept at {run.aside})") from None
            raise

        left = remove_orphan_tmp(p)
        if left:
            log.info("removed %d temporary file(s) an interrupted write left in %s", len(left), p)
        earlier = sorted(x for x in p.parent.glob(f"{glob_escape(aside_prefix(p))}*") if x != run.aside and x.is_dir())
        if earlier:  # an --overwrite killed before its run finished: the old run was kept there, and is still
            log.warning(
                "%d run(s) an interrupted --overwrite of %s moved aside are still kept (%s); delete them when no "
                "longer needed",
                len(earlier),
                p,
                ", ".join(str(x) for x in earlier),
            )

    def _put_back(self) -> bool:
        """The new run could not start: the run it was to replace goes back in its place."""
        assert self.aside is not None
        _release(self.path)
        try:
            (self.path / files.LOCK).unlink(missing_ok=True)
            if self.path.exists():
                self.path.rmdir()  # only an empty folder: nothing of the new run is deleted
            self.aside.rename(self.path)
        except OSError:
            return False
        REPLACING.pop(self.path, None)
        self.aside = None
        return True

    def _lock(self) -> None:
        """Take the folder's writer lock, or refuse with the holder's pid."""
        import fcntl

        key = self.path.resolve()
        if key in _HELD:
            return
        lock = self.path / files.LOCK
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _lock_error(self.path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            if holder == str(os.getpid()):  # this process holds it through another path (the folder moved)
                _HELD[key] = fd
                return
            os.close(fd)
            raise AdvtuneError(
                f"{self.path} is being written by another advtune process (pid {holder}); "
                "wait for it to finish or pick another --out"
            ) from None
        except OSError as e:  # a file system without locks (ENOLCK), ...
            os.close(fd)
            raise _lock_error(self.path, e) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as e:  # a full disk: the lock is released with its fd, nothing else was touched
            os.close(fd)
            raise _lock_error(self.path, e) from None
        _HELD[key] = fd

    def done(self) -> None:
        """The new run is complete: delete the run it replaced (kept aside until now). Under
        torch.distributed every rank waits here until rank 0 has written everything, so the next job
        (or a peer) reads a finished run."""
        if self.path in DEFERRED:  # a stage: what it replaced goes when its whole run is done
            barrier()
            return
        if self.writer and self.aside is not None and self.aside.is_dir():
            delete_replaced(self.aside)
        REPLACING.pop(self.path, None)
        self.aside = None
        barrier()

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: Any) -> None:
        if self.writer:
            atomic_write_json(self.path / name, obj)

    def read_json(self, name: str) -> Any:
        return read_json(self.path / name, name)

    def write_config(self, config: dict) -> None:
        record = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "working_dir": os.getcwd(),  # what the relative paths among the settings were relative to
            **config,
            "versions": versions(),
            "processes": rank_and_world()[1],  # torchrun: the work was split over this many
        }
        self.write_json(files.CONFIG, record)

    def write_metrics(self, rows: list[dict]) -> None:
        if self.writer:
            atomic_write_text(self.path / files.METRICS, "".join(json.dumps(to_jsonable(r)) + "\n" for r in rows))

    def read_metrics(self) -> list[dict]:
        p = self.path / files.METRICS
        if not p.is_file():
            return []
        rows = []
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise AdvtuneError(
                        f"{p} line {i} is not valid JSON (a corrupt record); re-create the run or delete the file"
                    ) from None
        return rows

    def write_cost(self, meter: CostMeter) -> None:
        self.write_json(files.COST, meter.to_json())


def _lock_error(folder: Path, e: OSError) -> AdvtuneError:
    """The one-line error of a run lock the OS refused: the folder, the OS's reason, the fix."""
    import errno

    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    fix = "free disk space or choose another --out" if full else "choose a writable --out"
    return AdvtuneError(f"cannot write the run lock in {folder}: {e.strerror or e}; {fix}")


def _release(path: Path) -> None:
    fd = _HELD.pop(path.resolve(), None)
    if fd is not None:
        os.close(fd)


def open_run(path: str | os.PathLike) -> RunDir:
    """An existing run folder, or a one-line error saying what is missing."""
    p = Path(path)
    if p.is_file():
        raise AdvtuneError(f"{p} is a file; pass the run folder that holds it (e.g. {p.parent})")
    if not p.is_dir():
        raise AdvtuneError(f"run folder {p} not found; pass the --out folder of an earlier `advtune train`")
    if not (p / files.CONFIG).is_file():
        if (p / files.EXPERIMENT).is_file():  # advtune's, but a folder of runs: name them
            runs = sorted(x.name for x in p.iterdir() if (x / files.WEIGHTS).is_file() and not x.name.startswith("."))
            raise AdvtuneError(
                f"{p} is an experiment folder, not a run; pass one of its runs ({', '.join(runs[:6]) or 'none yet'}: "
                f"e.g. {p / (runs[0] if runs else 'standard')})"
            )
        raise AdvtuneError(f"{p} is not an advtune run (no {files.CONFIG})")
    return RunDir(p)
