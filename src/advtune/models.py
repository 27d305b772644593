"""Architectures by name, each starting with a `Normalize` layer (inputs are pixels in [0,1]);
your own model from a `file.py:factory` or `package.module:factory` spec; save/load as safetensors
weights + JSON metadata (loading never unpickles)."""

from __future__ import annotations

import logging
import numbers
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save
from torch import nn

from . import filenames as files
from .errors import AdvtuneError
from .factories import build_from_factory, factory_record  # noqa: F401  (re-exported)
from .registry import Registry
from .storage import atomic_write_bytes, atomic_write_json, read_json
from .weights import check_compatible, load_state, load_weights, storable_state  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


class Normalize(nn.Module):
    """(x - mean) / std per channel, as a layer, so attacks and eps live in pixel space."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


# name -> builder `(channels, height, width, classes) -> nn.Module`; `build_model` puts Normalize first
ARCHITECTURES: Registry[Callable[[int, int, int, int], nn.Module]] = Registry("model")


def _flat(c: int, h: int, w: int, pools: int) -> int:
    return c * (h >> pools) * (w >> pools)


def _two_conv(c: int, h: int, w: int, classes: int, kernel: int, hidden: int) -> nn.Module:
    """conv32-pool-conv64-pool-fc<hidden>-fc, `kernel` x `kernel` convolutions padded to keep the size."""
    pad = kernel // 2
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(c, 32, kernel, padding=pad),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(32, 64, kernel, padding=pad),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(_flat(64, h, w, 2), hidden),
            relu3=nn.ReLU(),
            fc2=nn.Linear(hidden, classes),
        )
    )


@ARCHITECTURES.register("small-cnn")
def small_cnn(c: int, h: int, w: int, classes: int) -> nn.Module:
    """Fast MNIST net: conv32-pool-conv64-pool-fc128-fc."""
    return _two_conv(c, h, w, classes, kernel=3, hidden=128)


@ARCHITECTURES.register("madry-mnist")
def madry_mnist(c: int, h: int, w: int, classes: int) -> nn.Module:
    """The MNIST-challenge architecture (Madry et al. 2018): conv32 5x5, pool, conv64 5x5, pool, fc1024, fc."""
    return _two_conv(c, h, w, classes, kernel=5, hidden=1024)


@ARCHITECTURES.register("lenet5")
def lenet5(c: int, h: int, w: int, classes: int) -> nn.Module:
    """LeNet-5 (ReLU, max-pool): conv6 5x5 (padded to keep 28x28 -> 14), pool, conv16 5x5, pool, fc120, fc84, fc."""
    pad = 2 if h < 32 else 0
    h2, w2 = (h + 2 * pad - 4) // 2, (w + 2 * pad - 4) // 2
    h3, w3 = (h2 - 4) // 2, (w2 - 4) // 2
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(c, 6, 5, padding=pad),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(6, 16, 5),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(16 * h3 * w3, 120),
            relu3=nn.ReLU(),
            fc2=nn.Linear(120, 84),
            relu4=nn.ReLU(),
            fc3=nn.Linear(84, classes),
        )
    )


@ARCHITECTURES.register("vgg-cifar")
def vgg_cifar(c: int, h: int, w: int, classes: int, widths=(32, 64, 128)) -> nn.Module:
    """Small VGG-style net: 3 stages of 2x(conv3x3-BN-ReLU) + max-pool, then fc256, fc."""
    layers: "OrderedDict[str, nn.Module]" = OrderedDict()
    cin = c
    for s, width in enumerate(widths, start=1):
        for j in (1, 2):
            layers[f"conv{s}_{j}"] = nn.Conv2d(cin, width, 3, padding=1, bias=False)
            layers[f"bn{s}_{j}"] = nn.BatchNorm2d(width)
            layers[f"relu{s}_{j}"] = nn.ReLU()
            cin = width
        layers[f"pool{s}"] = nn.MaxPool2d(2)
    layers["flatten"] = nn.Flatten()
    layers["fc1"] = nn.Linear(_flat(cin, h, w, len(widths)), 256)
    layers["relu_fc"] = nn.ReLU()
    layers["fc2"] = nn.Linear(256, classes)
    return nn.Sequential(layers)


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016), as used in fast adversarial training."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + sc


class PreActResNet(nn.Module):
    """Pre-activation ResNet (He et al. 2016): a 3x3 stem, stages of `PreActBlock`s (every stage but
    the first halves the resolution), BN-ReLU, global average pooling, a linear head. The names of its
    modules (conv1, layer<i>, bn, linear) are those of the fast-adversarial-training code."""

    def __init__(self, c: int, classes: int, widths: tuple[int, ...], blocks: tuple[int, ...]):
        super().__init__()
        self.conv1 = nn.Conv2d(c, widths[0], 3, 1, 1, bias=False)
        cin = widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks), 1):
            stage = [PreActBlock(cin, width, 1 if i == 1 else 2)] + [PreActBlock(width, width, 1) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*stage))
            cin = width
        self.stages = len(widths)
        self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, classes)

    def forward(self, x):
        out = self.conv1(x)
        for i in range(1, self.stages + 1):
            out = getattr(self, f"layer{i}")(out)
        out = torch.relu(self.bn(out))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


@ARCHITECTURES.register("preact-resnet18")
def preact_resnet18(c: int, h: int, w: int, classes: int) -> nn.Module:
    """PreAct ResNet-18 (He et al. 2016), the network of fast adversarial training: 11.2M parameters."""
    return PreActResNet(c, classes, (64, 128, 256, 512), (2, 2, 2, 2))


@ARCHITECTURES.register("preact-resnet20")
def preact_resnet20(c: int, h: int, w: int, classes: int) -> nn.Module:
    """A ResNet-20-sized pre-activation ResNet for CPU work (He et al. 2016's CIFAR depth: three stages of
    three blocks, widths 16/32/64): 0.27M parameters, batch norm and skip connections."""
    return PreActResNet(c, classes, (16, 32, 64), (3, 3, 3))


@ARCHITECTURES.register("preact-resnet20-w2")
def preact_resnet20_w2(c: int, h: int, w: int, classes: int) -> nn.Module:
    """preact-resnet20 at twice the width (32/64/128, as Zagoruyko and Komodakis widen ResNets): 1.08M parameters,
    four times the entries at ~2.1x the time a step on 2 CPU cores; the network that asks whether the share of
    entries selective fine-tuning needs falls as the network grows (docs/RESULTS.md, round 31)."""
    return PreActResNet(c, classes, (32, 64, 128), (3, 3, 3))


def list_models() -> list[str]:
    return ARCHITECTURES.names()


def build_model(name: str, input_shape=(1, 28, 28), num_classes: int = 10, mean=None, std=None) -> nn.Sequential:
    """`Sequential(normalize=Normalize(mean, std), net=<architecture>)` for inputs in [0,1]."""
    architecture = ARCHITECTURES.get(name)  # unknown: "unknown model ...; valid: ..."
    input_shape = (
        tuple(input_shape) if hasattr(input_shape, "__iter__") and not isinstance(input_shape, str) else input_shape
    )
    shape_ok = isinstance(input_shape, tuple) and len(input_shape) == 3
    if not shape_ok or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in input_shape
    ):
        raise AdvtuneError(f"input_shape must be (channels, height, width), e.g. (1, 28, 28), got {input_shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise AdvtuneError(f"num_classes must be a whole number of at least 2, got {num_classes!r}")
    c, h, w = (int(v) for v in input_shape)
    min_side = 8 if name != "lenet5" else 28
    if h < min_side or w < min_side:
        raise AdvtuneError(
            f"model {name} needs inputs of at least {min_side}x{min_side}, got {h}x{w}; pick small-cnn or resize"
        )
    mean = tuple(mean) if mean is not None else (0.5,) * c
    std = tuple(std) if std is not None else (0.5,) * c
    if len(mean) != c or len(std) != c:
        raise AdvtuneError(f"normalisation has {len(mean)} channels but inputs have {c}")
    if not all(isinstance(s, (int, float)) and s > 0 for s in std):  # a 0 divided every input by zero
        raise AdvtuneError(f"std must be positive per channel, got {std}")
    model = nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=architecture(c, h, w, num_classes)))
    model.advtune_architecture = name  # type: ignore[attr-defined]  # save_model records it
    model.advtune_build = {
        "input_shape": [c, h, w],
        "num_classes": int(num_classes),  # type: ignore[attr-defined]
        "mean": list(mean),
        "std": list(std),
    }
    return model


def model_for(dataset, name: str) -> nn.Module:
    """The named architecture (or a `file.py:factory` spec) sized for a `data.Dataset`."""
    if is_factory_spec(name):
        return build_from_factory(name, dataset.input_shape, dataset.num_classes)
    check_model_name(name)
    return build_model(name, dataset.input_shape, dataset.num_classes, dataset.mean, dataset.std)


def check_model_name(name: str) -> None:
    """A zoo name or a factory spec; anything else refused in one line that names both (`--model mynet.py` was told
    only the zoo's names)."""
    if is_factory_spec(name):
        return
    try:
        ARCHITECTURES.get(name)  # as build_model looks it up
    except AdvtuneError as e:
        raise AdvtuneError(f"{e}, or your own as path/to/file.py:factory (a function returning an nn.Module)") from None


# ---------------------------------------------------------------- your own model: file.py:factory


def is_factory_spec(spec: str) -> bool:
    """`path/to/file.py:factory` or `package.module:factory` (a zoo name has no colon)."""
    return isinstance(spec, str) and ":" in spec and spec.strip().lower() not in ARCHITECTURES


# ---------------------------------------------------------------- save / load


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DataParallel / DistributedDataParallel / torch.compile wrappers: what is saved and named
    (a wrapper's state_dict prefixes every key with `module.` or `_orig_mod.`, which the rebuilt model lacks)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def model_identity(model: nn.Module) -> dict:
    """What names a model built by advtune (the zoo's architecture, a factory spec's record): empty for another."""
    model = unwrapped(model)
    named = {"architecture": getattr(model, "advtune_architecture", None)}
    if getattr(model, "advtune_factory", None) is not None:
        named["factory"] = model.advtune_factory
    return {k: v for k, v in named.items() if v is not None}


def save_model(directory: str | Path, model: nn.Module, meta: dict, state: dict | None = None) -> Path:
    """Write `model.safetensors` (tensors only) and `model.json` (architecture, shapes, record), atomically.
    `state`: the tensors to write instead of `model.state_dict()` (e.g. with adapters merged)."""
    directory = Path(directory)
    model = unwrapped(model)
    state = storable_state(state or model.state_dict())
    atomic_write_bytes(directory / files.WEIGHTS, save(state, metadata={"format": "pt", "advtune": "1"}))
    meta = {"architecture": None, **model_identity(model), **meta}
    for k, v in (getattr(model, "advtune_build", None) or {}).items():  # what rebuilds it
        meta.setdefault(k, v)
    # a parametrized weight counts once (its original), its parametrization's own tensors not at all
    meta["parameters"] = sum(
        p.numel() for n, p in model.named_parameters() if ".parametrizations." not in n or n.endswith(".original")
    )
    meta["tensors"] = {k: list(v.shape) for k, v in state.items()}
    atomic_write_json(directory / files.MODEL_META, meta)
    return directory / files.WEIGHTS


def read_meta(directory: str | Path) -> dict:
    directory = Path(directory)
    if not (directory / files.MODEL_META).is_file():
        inside = directory.is_file() and (directory.parent / files.MODEL_META).is_file()  # the weights file itself
        raise AdvtuneError(
            f"{directory} is a file: pass its folder, {directory.parent}"
            if inside
            else f"{directory} holds no saved model ({files.MODEL_META} missing); pass a run folder written by "
            "`advtune train` (or the folder save_model wrote)"
        )
    return read_json(directory / files.MODEL_META, "model metadata")


def load_model(directory: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a saved model from its metadata and load its weights. No code is executed from the weights or
    metadata files; a model from a `file.py:factory` spec is rebuilt by importing and calling that (recorded,
    hash-checked: a record without the hash refused first) factory, as the user asked when training it."""
    directory = Path(directory)
    meta = read_meta(directory)
    arch = meta.get("architecture")
    factory = meta.get("factory")
    if factory is not None and not (
        isinstance(factory, dict) and isinstance(factory.get("spec"), str) and isinstance(factory.get("name"), str)
    ):
        raise AdvtuneError(f"{directory / files.MODEL_META}: the factory record is damaged; retrain the run")
    if factory is not None and not isinstance(factory.get("sha256"), str):  # before anything is imported or called
        raise AdvtuneError(
            f"{directory / files.MODEL_META} names a factory ({factory['spec']}) without its file's sha256, which "
            "advtune records for every factory it rebuilds: not a record advtune wrote, so nothing of it is run; "
            "build the model yourself and load model.safetensors into it"
        )
    if factory is None and arch is None:
        raise AdvtuneError(
            f"{directory}: this model was saved without a way to rebuild it (not a zoo architecture, "
            "no --model file.py:factory); load the weights into your own model: "
            "model.load_state_dict(safetensors.torch.load_file('.../model.safetensors'))"
        )
    if factory is None and arch not in ARCHITECTURES:
        raise AdvtuneError(
            f"{directory}: unknown architecture {arch!r} in {files.MODEL_META}; valid: {', '.join(ARCHITECTURES)}"
        )
    missing = [k for k in ("input_shape", "num_classes") if k not in meta]
    if missing:
        raise AdvtuneError(
            f"{directory / files.MODEL_META} lacks {', '.join(missing)}; it was not written by advtune's save_model"
        )
    shape, classes = meta["input_shape"], meta["num_classes"]
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
    ):
        raise AdvtuneError(
            f"{directory / files.MODEL_META}: input_shape must be [channels, height, width] (positive integers), "
            f"got {shape!r}; the file was edited or damaged"
        )
    if isinstance(classes, bool) or not isinstance(classes, int) or not 2 <= classes <= 100_000:
        raise AdvtuneError(
            f"{directory / files.MODEL_META}: num_classes must be an integer >= 2, got {classes!r}; "
            "the file was edited or damaged"
        )
    if factory is not None:
        now = factory_record(factory["spec"])
        model = build_from_factory(now, shape, classes, expect_sha256=factory.get("sha256"))
    else:
        model = build_model(arch, meta["input_shape"], meta["num_classes"], meta.get("mean"), meta.get("std"))
    load_weights(model, directory / files.WEIGHTS, f"{directory / files.WEIGHTS}")
    return model.to(device).eval(), meta


def describe_meta(name: str, dataset) -> dict:
    """The metadata a model needs to be rebuilt: architecture (or factory), input shape, classes,
    normalisation (the zoo's; a factory model carries its own)."""
    if is_factory_spec(name):
        return {
            "architecture": None,
            "factory": factory_record(name),
            "dataset": dataset.name,
            "input_shape": list(dataset.input_shape),
            "num_classes": dataset.num_classes,
            "classes": dataset.classes,
        }
    return {
        "architecture": name,
        "dataset": dataset.name,
        "input_shape": list(dataset.input_shape),
        "num_classes": dataset.num_classes,
        "classes": dataset.classes,
        "mean": list(dataset.mean),
        "std": list(dataset.std),
    }
