"""The command line the tests train their small runs with (the synthetic task, small-cnn)."""

from __future__ import annotations


def train_argv(out, *, limit: int, limit_test: int | None = None, epochs: int = 1, extra: tuple = ()) -> list[str]:
    """`advtune train` on the synthetic task: `limit` training and `limit_test` test examples."""
    argv = ["train", "--dataset", "synthetic", "--model", "small-cnn", "--epochs", str(epochs)]
    argv += ["--limit", str(limit)] + (["--limit-test", str(limit_test)] if limit_test is not None else [])
    return [*argv, "--out", str(out), "--quiet", *extra]


def check_sparse_harden(base, out, trainable: int):
    """A harden folder `out` from the run `base` whose fine-tuning trained a sparse mask: only the mask's entries moved
    (every other one bit-exact; BatchNorm statistics may follow), at most `trainable` of them, and the patch rebuilds
    the hardened weights bit for bit. Returns the hardened model."""
    import json

    import torch

    from advtune.models import load_model
    from advtune.patch import apply_patch
    from advtune.train.lowrank import selection_from_json

    base_model, hardened = load_model(base)[0], load_model(out)[0]
    chosen = selection_from_json(json.loads((out / "finetune" / "selection.json").read_text()), base_model)
    masks = chosen.masks(base_model)
    moved = 0
    for (name, a), b in zip(base_model.state_dict().items(), hardened.state_dict().values()):
        m = masks.get(name)
        if m is None:
            assert torch.equal(a, b) or "running" in name or "num_batches" in name, name
        else:
            assert torch.equal(a[~m], b[~m]), name
            moved += int((a != b).sum())
    assert 0 < moved <= trainable
    rebuilt = apply_patch(load_model(base)[0], out / "patch.safetensors")
    for (k, a), b in zip(hardened.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), k
    return hardened
