"""The command line the tests train their small runs with (the synthetic task, small-cnn)."""

from __future__ import annotations


def train_argv(out, *, limit: int, limit_test: int | None = None, epochs: int = 1, extra: tuple = ()) -> list[str]:
    """`advtune train` on the synthetic task: `limit` training and `limit_test` test examples."""
    argv = ["train", "--dataset", "synthetic", "--model", "small-cnn", "--epochs", str(epochs)]
    argv += ["--limit", str(limit)] + (["--limit-test", str(limit_test)] if limit_test is not None else [])
    return [*argv, "--out", str(out), "--quiet", *extra]
