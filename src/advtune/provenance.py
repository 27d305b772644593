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


def checkout_root() -> Path | None:
    """The source checkout this code runs from (`src/advtune` under a folder whose pyproject.toml is advtune's), or
    None for an installed copy: a wheel installed inside another git repository must not record that repository's
    commit as advtune's, nor search its neighbours for data."""
    here = Path(__file__).resolve()
    root = here.parents[2]
    if here.parents[1].name != "src":
        return None
    try:
        return root if 'name = "advtune"' in (root / "pyproject.toml").read_text() else None
    except OSError:
        return None


def _git_dirty() -> bool | None:
    root = checkout_root()
    if root is None:
        return None
    try:
        command = ["git", "status", "--porcelain", "--untracked-files=no"]
        r = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(r.stdout.strip()) if r.returncode == 0 else None


def git_sha() -> str | None:
    root = checkout_root()
    if root is None or not (root / ".git").exists():
        return None
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None
