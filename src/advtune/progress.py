"""Progress of long work: tqdm bars on a terminal, periodic log lines elsewhere (--quiet: none)."""

from __future__ import annotations

import logging
import sys
import threading
import time
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
    done/total, the rate and an estimate of the time left, and a last line when it ends; quiet for loops shorter than
    that. A loop whose items each take minutes (an evaluation's batch of attacks) also reports from inside an item: a
    heartbeat thread logs the state when LOG_EVERY_S passed since the last line, and set_postfix says what runs."""

    def __init__(self, iterable: Iterable[T], desc: str, total: int | None) -> None:
        self.iterable, self.desc = iterable, desc
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.postfix = ""
        self.done, self.said = 0, False
        self.t0 = self.last = time.perf_counter()
        self.lock = threading.Lock()

    def set_postfix(self, refresh: bool = True, **kw) -> None:
        """As tqdm's: refresh=False leaves the state for the next line (the item ends next, and its line
        then counts it done)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())
        if refresh:
            self._maybe_log()

    def __iter__(self):
        self.t0 = self.last = time.perf_counter()
        self.done, self.said = 0, False
        # a heartbeat: an item that runs for minutes (an epoch, Square's queries on a batch) still gets its line
        # every LOG_EVERY_S, so a log read later never shows a silence it cannot tell from a stalled job
        stop, beat = threading.Event(), None
        if LOG_EVERY_S > 0:  # (0: a line at every chance, from the loop itself: what the tests set)
            beat = threading.Thread(target=self._beat, args=(stop,), daemon=True, name=f"progress:{self.desc}")
            beat.start()
        try:
            for item in self.iterable:
                yield item
                self.done += 1
                self._maybe_log()
        finally:  # (also when the caller broke out: a budget's last, partial epoch; or an error unwound it)
            stop.set()
            if beat is not None:
                beat.join()  # no heartbeat line after the last one
            if self.said:  # a loop that said where it was says where it ended (a short one stays silent)
                elapsed, of = time.perf_counter() - self.t0, f"/{self.total}" if self.total else ""
                log.info("%s: %d%s done in %.0f s", self.desc, self.done, of, elapsed)

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(LOG_EVERY_S / 3):
            self._maybe_log()

    def _maybe_log(self) -> None:
        with self.lock:  # the loop and its heartbeat: one line per interval
            now = time.perf_counter()
            if now - self.last < LOG_EVERY_S:
                return
            self.last, self.said = now, True
        self._log(now)

    def _log(self, now: float) -> None:
        done, elapsed = self.done, now - self.t0
        tail = f" [{self.postfix}]" if self.postfix else ""
        if self.total:
            rate = done / elapsed if elapsed > 0 else 0.0
            left = f"about {(self.total - done) / rate:.0f} s left" if rate > 0 else "time left not known yet"
            log.info(
                "%s: %d/%d (%.0f%%), %.0f s elapsed, %s%s", self.desc, done, self.total, 100 * done / self.total,
                elapsed, left, tail,
            )  # fmt: skip
        else:
            log.info("%s: %d done, %.0f s elapsed%s", self.desc, done, elapsed, tail)


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
