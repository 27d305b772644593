"""Training-batch augmentation: shape and pixel box kept, reproducible from its generator, really crops
and flips, and changes what training sees (the augmented run differs from the plain one)."""

from __future__ import annotations

import pytest
import torch

from advtune.data import load_dataset
from advtune.errors import AdvtuneError
from advtune.train import TrainConfig, clean, fit
from advtune.train.augment import PAD, augment


def test_crop_flip_keeps_shape_and_the_pixel_box_and_is_reproducible():
    x = torch.rand(64, 3, 12, 12)
    a = augment(x, "crop-flip", torch.Generator().manual_seed(1))
    b = augment(x, "crop-flip", torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype and 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, augment(x, "crop-flip", torch.Generator().manual_seed(2)))
    assert augment(x, "none") is x


def test_every_output_is_a_shifted_possibly_mirrored_window_of_its_input():
    x = torch.rand(32, 1, 10, 10)
    out = augment(x, "crop-flip", torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD))
    flips = 0
    for i in range(len(x)):
        windows = [
            (padded[i, :, r : r + 10, c : c + 10], flip)
            for r in range(2 * PAD + 1)
            for c in range(2 * PAD + 1)
            for flip in (False, True)
        ]
        found = [flip for w, flip in windows if torch.equal(w.flip(-1) if flip else w, out[i])]
        assert found, f"example {i} is not a crop of its padded input"
        flips += found[0]
    assert 5 < flips < 27  # about half are mirrored


def test_training_sees_the_augmented_batches():
    from conftest import TinyCNN

    data = load_dataset("synthetic", limit=128, limit_test=10).train

    def run(augment_kind):
        torch.manual_seed(0)
        model = TinyCNN()
        fit(model, data, clean(), TrainConfig(epochs=1, batch_size=32, augment=augment_kind))
        return torch.cat([p.flatten() for p in model.parameters()])

    assert not torch.equal(run("none"), run("crop-flip"))


def test_an_unknown_augmentation_is_one_line():
    with pytest.raises(AdvtuneError, match="unknown augmentation 'rotate'; valid: none, crop-flip"):
        TrainConfig(augment="rotate")
