"""The named datasets: where their files come from (mirrors, md5) and what they are called.

`SPECS` is the registry (`advtune.registry.Registry`) of the downloadable sets, `SPECS.register(name,
Spec(...))`; `synthetic` and paths are not in it (`load_dataset` handles them, and how each set is read)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteFile:
    name: str
    md5: str


@dataclass(frozen=True)
class Spec:
    folder: str
    files: tuple[RemoteFile, ...]
    mirrors: tuple[str, ...]
    classes: tuple[str, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


SPECS: Registry[Spec] = Registry("dataset")

SPECS.register(
    "mnist",
    Spec(
        "mnist",
        tuple(
            RemoteFile(n, m)
            for n, m in zip(
                IDX_FILES,
                (
                    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                    "d53e105ee54ea40749a09fcbcd1e9432",
                    "9fb629c4189551a2d022fa330f9573f3",
                    "ec29112dd5afa0611ce80d1b7f02629c",
                ),
            )
        ),
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        tuple(str(i) for i in range(10)),
        (0.1307,),
        (0.3081,),
    ),
)
SPECS.register(
    "fashion-mnist",
    Spec(
        "fashion-mnist",
        tuple(
            RemoteFile(n, m)
            for n, m in zip(
                IDX_FILES,
                (
                    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                    "25c81989df183df01b3e8a0aad5dffbe",
                    "bef4ecab320f06d8554ea6380940ec79",
                    "bb300cfdad3c16e7a12a480ee83cd310",
                ),
            )
        ),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        (0.2860,),
        (0.3530,),
    ),
)
SPECS.register(
    "cifar10",
    Spec(
        "cifar10",
        (RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        ("https://www.cs.toronto.edu/~kriz/",),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
)


DATASETS = tuple(SPECS) + ("synthetic",)  # the built-in names (a snapshot; `list_datasets()` is current)


def list_datasets() -> list[str]:
    return [*SPECS.names(), "synthetic", "<path/to/file.npz>", "<path/to/image-folder>"]
