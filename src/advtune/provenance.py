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
