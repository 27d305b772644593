"""Progress of long work: tqdm bars on a terminal, periodic log lines elsewhere (--quiet: none)."""

from __future__ import annotations

import logging
import sys
from typing import Iterable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


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
