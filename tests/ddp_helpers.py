"""Running advtune in one process and under torchrun (2 local CPU processes, gloo) for the
distributed tests (tests/test_distributed*.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

BIN = Path(sys.executable).parent
TORCHRUN = BIN / "torchrun"
TRAIN = ["--dataset", "synthetic", "--model", "small-cnn", "--limit", "256", "--limit-test", "100"]
TRAIN += ["--batch-size", "64", "--device", "cpu", "--quiet"]
# float32 sums of 2 x 32 per-example gradients vs 64: Adam's first steps magnify the last bits a little
ATOL = 1e-4


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", ADVTUNE_DIST_TIMEOUT="120")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def one(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "advtune"), *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=300
    )


def two(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "advtune", *args]
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
