"""Downloads with verification: each file from the first mirror that answers, md5-checked, written
atomically; a mismatch is refused and leaves no file."""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import AdvtuneError
from .registry import Spec

log = logging.getLogger(__name__)


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_files(spec: Spec, target: Path, mirrors: tuple[str, ...] | None = None, timeout: float = 60.0) -> None:
    """Fetch each missing file from the first mirror that answers; verify its md5 before it is kept.

    A file is written to a temporary name and renamed only after its checksum matches, so a failed
    or corrupted download never leaves a file that looks complete. `$ADVTUNE_MIRROR` overrides mirrors.
    """
    from ..progress import progress

    if os.environ.get("ADVTUNE_MIRROR"):
        mirrors = (os.environ["ADVTUNE_MIRROR"],)
    mirrors = mirrors or spec.mirrors
    target.mkdir(parents=True, exist_ok=True)
    for rf in spec.files:
        dest = target / rf.name
        if dest.is_file() and md5sum(dest) == rf.md5:
            continue
        errors = []
        for base in mirrors:
            url = base.rstrip("/") + "/" + rf.name
            tmp = dest.with_name(dest.name + ".part")
            try:
                log.info("downloading %s", url)
                with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                    total = int(resp.headers.get("Content-Length") or 0) or None
                    bar = progress(
                        iter(lambda: resp.read(1 << 16), b""),
                        desc=rf.name,
                        total=(total // (1 << 16) + 1) if total else None,
                    )
                    for chunk in bar:
                        out.write(chunk)
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                tmp.unlink(missing_ok=True)
                errors.append(f"{url}: {e}")
                continue
            except BaseException:  # Ctrl-C mid-file: no half file left behind (the next run fetches it whole)
                tmp.unlink(missing_ok=True)
                raise
            got = md5sum(tmp)
            if got != rf.md5:
                tmp.unlink(missing_ok=True)
                raise AdvtuneError(
                    f"checksum mismatch for {url}: md5 {got}, expected {rf.md5}; the file was "
                    "refused and deleted: try another mirror (ADVTUNE_MIRROR) or download it by hand"
                )
            os.replace(tmp, dest)
            break
        else:
            raise AdvtuneError(
                f"could not download {rf.name} ({'; '.join(errors)}); without network, put the "
                f"files in <dir>/{spec.folder}/ and pass --data-dir <dir> or set ADVTUNE_DATA=<dir>"
            )
