"""Shared fixtures: a synthetic task a tiny CNN learns in seconds, trained once per session."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from advtune.data import synthetic_blobs

# No test may touch the network: dataset lookups fail instead of downloading (download tests
# pass download=True explicitly and point at a local HTTP server).
os.environ["ADVTUNE_NO_DOWNLOAD"] = "1"

# `make test` runs several pytest workers (pytest-xdist): each takes its share of the cores, at least one thread
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh seeded generator for each test."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(autouse=True)
def _deterministic():
    """Deterministic kernels and one fixed seed per test; restored afterwards."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    yield
    torch.use_deterministic_algorithms(prev)


class TinyCNN(nn.Module):
    """Two convs + a linear head over 1x16x16 inputs, 4 classes (synthetic_blobs)."""

    def __init__(self, classes: int = 4, channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc(x.flatten(1))


def train_tiny(x: torch.Tensor, y: torch.Tensor, epochs: int = 8, seed: int = 0) -> nn.Module:
    """Plain hand-written loop (independent of advtune.train) so attack tests don't depend on fit()."""
    torch.manual_seed(seed)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.zero_grad(set_to_none=True)  # hand the fixture over with no .grad: attack tests check purity
    model.eval()
    return model


@pytest.fixture(scope="session")
def blobs():
    """(x_train, y_train, x_test, y_test) float32 in [0,1], 1x16x16, 4 classes."""
    g = torch.Generator().manual_seed(7)
    x, y = synthetic_blobs(1200, classes=4, size=16, generator=g)
    return x[:1000], y[:1000], x[1000:], y[1000:]


@pytest.fixture(scope="session")
def tiny_model(blobs):
    """A TinyCNN trained once per session to >95% test accuracy on the blobs (eval mode)."""
    x, y, xt, yt = blobs
    model = train_tiny(x, y)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.95, f"fixture model only reached {acc:.3f}"
    for p in model.parameters():
        p.requires_grad_(True)
    return model
