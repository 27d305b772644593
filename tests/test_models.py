"""Architectures, the Normalize layer, and safetensors save/load with its refusals."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from advtune import filenames as files
from advtune.errors import AdvtuneError
from advtune.models import Normalize, build_model, list_models, load_model, load_weights, save_model


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_architecture_builds_with_normalize_first(name, shape):
    model = build_model(name, shape, 10, mean=[0.5] * shape[0], std=[0.25] * shape[0])
    assert isinstance(model.normalize, Normalize) and list(dict(model.named_children())) == ["normalize", "net"]
    out = model(torch.rand(3, *shape))
    assert out.shape == (3, 10)


def test_the_wide_resnet20_is_the_same_network_at_twice_the_width():
    """Round 31 compares the two like for like: same layers under the same names (so every selection rule and
    the probe's quotas see the same components), each conv twice as wide: ~4x the entries."""
    narrow, wide = (build_model(n, (3, 32, 32), 10) for n in ("preact-resnet20", "preact-resnet20-w2"))
    shapes = {k: v.shape for k, v in narrow.state_dict().items()}
    wide_shapes = {k: v.shape for k, v in wide.state_dict().items()}
    assert shapes.keys() == wide_shapes.keys()
    assert wide_shapes["net.conv1.weight"] == (32, 3, 3, 3) and wide_shapes["net.linear.weight"] == (10, 128)
    count = sum(p.numel() for p in wide.parameters())
    assert count == 1_084_202 and 3.9 < count / sum(p.numel() for p in narrow.parameters()) < 4.0


def test_the_model_help_names_every_zoo_model():
    """--model's help lists the zoo by hand (deriving it would import torch when the CLI starts): it must not
    fall behind the registry."""
    import dataclasses

    from advtune.runs.configs import TrainRun

    text = next(f for f in dataclasses.fields(TrainRun) if f.name == "model").metadata["help"]
    listed = text.split("(", 1)[1].split(")", 1)[0].split(", ")
    assert sorted(listed) == sorted(list_models())


def test_normalize_is_per_channel_affine():
    n = Normalize([0.1, 0.2, 0.3], [0.5, 0.5, 0.25])
    x = torch.rand(2, 3, 4, 4)
    expected = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.5, 0.25]).view(1, 3, 1, 1)
    assert torch.allclose(n(x), expected)


def test_save_load_roundtrip(tmp_path):
    model = build_model("vgg-cifar", (3, 32, 32), 10, (0.4, 0.5, 0.6), (0.2, 0.2, 0.2))
    model.eval()
    with torch.no_grad():  # give BN non-trivial running stats
        model.net.bn1_1.running_mean.uniform_()
    save_model(
        tmp_path,
        model,
        {
            "architecture": "vgg-cifar",
            "input_shape": [3, 32, 32],
            "num_classes": 10,
            "mean": [0.4, 0.5, 0.6],
            "std": [0.2, 0.2, 0.2],
        },
    )
    raw = (tmp_path / files.WEIGHTS).read_bytes()
    assert not raw.startswith(b"PK") and not raw.startswith(b"\x80")  # a safetensors header, no zip/pickle
    loaded, meta = load_model(tmp_path)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["parameters"] == sum(p.numel() for p in model.parameters())


def test_a_wrapped_model_is_saved_as_the_model_inside(tmp_path):
    """A review found the API's save_model writing DataParallel's `module.` keys (and losing the zoo's name), so
    load_model could not rebuild it; torch.compile's wrapper prefixes `_orig_mod.` the same way."""
    import advtune

    model = build_model("small-cnn", (1, 28, 28), 10).eval()
    for wrapper in (nn.DataParallel(model), torch.compile(model)):
        folder = tmp_path / type(wrapper).__name__
        advtune.save_model(wrapper, folder)
        loaded = advtune.load_model(folder)
        assert json.loads((folder / files.MODEL_META).read_text())["architecture"] == "small-cnn"
        x = torch.rand(2, 1, 28, 28)
        with torch.no_grad():
            assert torch.equal(model(x), loaded(x))


def test_checkpoint_for_another_architecture_is_refused(tmp_path):
    small = build_model("small-cnn", (1, 28, 28), 10)
    save_model(tmp_path, small, {"architecture": "small-cnn", "input_shape": [1, 28, 28], "num_classes": 10})
    with pytest.raises(AdvtuneError, match="another architecture or input shape"):
        load_weights(build_model("madry-mnist", (1, 28, 28), 10), tmp_path / files.WEIGHTS)
    with pytest.raises(AdvtuneError, match="of another shape .*another architecture or input shape"):
        load_weights(build_model("small-cnn", (1, 32, 32), 10), tmp_path / files.WEIGHTS)
    meta = json.loads((tmp_path / files.MODEL_META).read_text())
    meta["architecture"] = "lenet5"
    (tmp_path / files.MODEL_META).write_text(json.dumps(meta))
    with pytest.raises(AdvtuneError, match="another architecture"):
        load_model(tmp_path)


def test_truncated_weights_are_refused(tmp_path):
    model = build_model("small-cnn", (1, 28, 28), 10)
    save_model(tmp_path, model, {"architecture": "small-cnn", "input_shape": [1, 28, 28], "num_classes": 10})
    p = tmp_path / files.WEIGHTS
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(AdvtuneError, match="truncated or not a safetensors file"):
        load_model(tmp_path)


def test_missing_metadata_and_unknown_model(tmp_path):
    with pytest.raises(AdvtuneError, match="holds no saved model"):
        load_model(tmp_path)
    with pytest.raises(AdvtuneError, match="unknown model 'resnet50'; valid: small-cnn"):
        build_model("resnet50")
    with pytest.raises(AdvtuneError, match="normalisation has 1 channels but inputs have 3"):
        build_model("small-cnn", (3, 32, 32), 10, mean=[0.5], std=[0.5])


def test_user_module_loads_weights(tmp_path):
    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4 * 6 * 6, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    a, b = Mine(), Mine()
    save_model(tmp_path, a, {"architecture": None})
    load_weights(b, tmp_path / files.WEIGHTS)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(a(x), b(x))


def test_a_model_with_tied_weights_is_saved(tmp_path):
    """safetensors refuses two names for one tensor: advtune.save_model failed on tied weights."""
    from safetensors.torch import load_file

    import advtune

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    advtune.save_model(model, tmp_path / "tied")
    back = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    back[1].weight = back[0].weight
    back.load_state_dict(load_file(tmp_path / "tied" / "model.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_overlapping_views_of_one_storage_are_saved(tmp_path):
    """safetensors refuses tensors that overlap in memory: a buffer that views part of another failed to save."""
    from safetensors.torch import load_file

    import advtune

    model = nn.Linear(4, 4)
    whole = torch.arange(8.0)
    model.register_buffer("whole", whole)
    model.register_buffer("part", whole[2:6])
    advtune.save_model(model, tmp_path / "views")
    back = load_file(tmp_path / "views" / "model.safetensors")
    assert torch.equal(back["part"], whole[2:6]) and torch.equal(back["whole"], whole)
