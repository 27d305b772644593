"""What a record says about where it came from: package versions, platform, git commit."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

from .version import VERSION


def versions() -> dict[str, str]:
    out = {
        "advtune": VERSION,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }
    sha = git_sha()
    if sha:
        out["git_sha"] = sha
        dirty = _git_dirty()
        if dirty is not None:  # the code that ran was the commit plus uncommitted changes to tracked files
            out["git_dirty"] = dirty
    return out


def _git_dirty() -> bool | None:
    root = Path(__file__).resolve().parents[2]
    try:
        command = ["git", "status", "--porcelain", "--untracked-files=no"]
        r = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(r.stdout.strip()) if r.returncode == 0 else None


def git_sha() -> str | None:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None
