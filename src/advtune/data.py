"""Datasets by name: find locally, else download and verify; hold uint8 tensors; seeded fast batching.

Names: `mnist`, `fashion-mnist`, `cifar10`, `synthetic`, a path to an `.npz` file
(x_train/y_train/x_test/y_test) or to an image folder (`<root>/{train,test}/<class>/*.png`).

Lookup order for the named sets: `data_dir` (CLI `--data-dir`), `$ADVTUNE_DATA`, the user cache
(`$XDG_CACHE_HOME/advtune` or `~/.cache/advtune`), a `shared/data` folder beside the checkout, then
a download from the official mirrors with md5 verification into the first writable of those.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import AdvtuneError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- in-memory splits


@dataclass
class TensorData:
    """One split held in memory: x uint8 (N,C,H,W) (or float in [0,1]), y int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise AdvtuneError(f"images must be N,C,H,W; got shape {tuple(self.x.shape)}")
        if len(self.x) != len(self.y):
            raise AdvtuneError(f"{len(self.x)} images but {len(self.y)} labels; they must match")
        self.y = self.y.long()

    def __len__(self) -> int:
        return len(self.y)

    def take(self, n: int | None) -> "TensorData":
        """The first n examples (all when n is None)."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise AdvtuneError(f"limit must be positive, got {n}")
        return TensorData(self.x[:n], self.y[:n])

    def index(self, idx: torch.Tensor) -> "TensorData":
        return TensorData(self.x[idx], self.y[idx])

    def to_float(self, x: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        x = x.to(device) if device is not None else x
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def tensors(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as float [0,1] images and labels."""
        return self.to_float(self.x, device), self.y.to(device) if device is not None else self.y

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        device: torch.device | None = None,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Float [0,1] batches on `device`. One gather per batch: no per-sample Python.

        `start` skips the first batches (resume mid-epoch with the same permutation). With
        world_size > 1 each rank gets its own equal-sized shard of the (shared) permutation.
        """
        if batch_size <= 0:
            raise AdvtuneError(f"batch size must be positive, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        if world_size > 1:
            per_rank = n // world_size
            order = (
                order[rank * per_rank : (rank + 1) * per_rank] if not shuffle else order[rank::world_size][:per_rank]
            )
        count = num_batches(len(order), batch_size, drop_last)
        for b in range(start, count):
            idx = order[b * batch_size : (b + 1) * batch_size]
            yield self.to_float(self.x[idx], device), self.y[idx].to(device) if device is not None else self.y[idx]


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


@dataclass
class Dataset:
    """A named dataset: train/test splits, class names, per-channel statistics, where it came from."""

    name: str
    train: TensorData
    test: TensorData
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""
    val: TensorData | None = None
    notes: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split_validation(self, size: int | float, seed: int = 0) -> "Dataset":
        """Hold out `size` training examples (or a fraction) as a validation split, seeded."""
        n = len(self.train)
        k = int(round(size * n)) if isinstance(size, float) and size < 1 else int(size)
        if k <= 0:
            return self
        if k >= n:
            raise AdvtuneError(f"validation size {k} leaves no training data (train has {n}); use a smaller --val")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return replace(
            self, train=self.train.index(perm[k:].sort().values), val=self.train.index(perm[:k].sort().values)
        )

    def limit(self, train: int | None = None, test: int | None = None) -> "Dataset":
        return replace(self, train=self.train.take(train), test=self.test.take(test))

    def describe(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "input_shape": list(self.input_shape),
            "classes": self.classes,
            "train": len(self.train),
            "test": len(self.test),
            "val": len(self.val) if self.val is not None else 0,
        }


# ---------------------------------------------------------------- registry of named sets


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


_IDX = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

SPECS: dict[str, Spec] = {
    "mnist": Spec(
        "mnist",
        tuple(
            RemoteFile(n, m)
            for n, m in zip(
                _IDX,
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
    "fashion-mnist": Spec(
        "fashion-mnist",
        tuple(
            RemoteFile(n, m)
            for n, m in zip(
                _IDX,
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
    "cifar10": Spec(
        "cifar10",
        (RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        ("https://www.cs.toronto.edu/~kriz/",),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
}
DATASETS = tuple(SPECS) + ("synthetic",)


def list_datasets() -> list[str]:
    return list(DATASETS) + ["<path/to/file.npz>", "<path/to/image-folder>"]


def search_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched, in order, for a dataset's subfolder."""
    roots: list[Path] = []
    if data_dir:
        roots.append(Path(data_dir).expanduser())
    if os.environ.get("ADVTUNE_DATA"):
        roots.append(Path(os.environ["ADVTUNE_DATA"]).expanduser())
    roots.append(cache_dir())
    # the checkout's neighbour (CI and this workplace keep datasets in ../shared/data)
    here = Path(__file__).resolve()
    for base in (Path.cwd(), *here.parents[2:4]):
        cand = base.parent / "shared" / "data"
        if cand not in roots and cand.is_dir():
            roots.append(cand)
    return roots


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "advtune"


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool | None = None,
    limit: int | None = None,
    limit_test: int | None = None,
    val: int | float = 0,
    seed: int = 0,
    mirrors: tuple[str, ...] | None = None,
) -> Dataset:
    """Load a dataset by name or path. `limit`/`limit_test` take the first examples of each split;
    `val` holds out that many training examples (or a fraction) as a seeded validation split.

    `download=None` means "allowed unless $ADVTUNE_NO_DOWNLOAD is set".
    """
    if download is None:
        download = not os.environ.get("ADVTUNE_NO_DOWNLOAD")
    key = name.strip().lower().replace("_", "-")
    key = {"fashion": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10"}.get(key, key)
    if key == "synthetic":
        ds = _synthetic_dataset()  # the same data for every run: only shuffles and splits use the seed
    elif key in SPECS:
        ds = _load_named(key, data_dir, download, mirrors)
    else:
        path = Path(name).expanduser()
        if path.suffix == ".npz" and path.is_file():
            ds = load_npz(path)
        elif path.is_dir() and (path / "train").is_dir():
            ds = load_image_folder(path)
        elif path.suffix == ".npz" or os.sep in name:
            raise AdvtuneError(
                f"dataset path {name!r} not found (expected an .npz file or a folder with train/ and test/)"
            )
        else:
            raise AdvtuneError(f"unknown dataset {name!r}; valid: {', '.join(list_datasets())}")
    ds = ds.limit(limit, limit_test)
    if val:
        ds = ds.split_validation(val, seed)
    return ds


def _probe_folder(key: str, folder: Path) -> tuple[Dataset | None, str | None]:
    """(the dataset, None) when `folder` holds all of it; (None, "<folder> lacks ...") when it holds only
    some of its files; (None, None) when it holds none."""
    found = _read_if_present(key, folder)
    if found is not None:
        log.info("%s: read from %s", key, folder)
        return found, None
    missing = _missing_files(key, folder)
    if missing and len(missing) < len(_required_files(key)):
        return None, f"{folder} lacks {', '.join(missing)}"
    return None, None


def _load_named(key: str, data_dir, download: bool, mirrors) -> Dataset:
    spec = SPECS[key]
    if data_dir:  # a folder the user named must hold the dataset: never fall back silently to another one
        root = Path(data_dir).expanduser()
        if not root.is_dir() and not download:
            raise AdvtuneError(f"--data-dir {root} does not exist; point it at the folder holding {spec.folder}/")
        for folder in (root / spec.folder, root) if root.is_dir() else ():
            if folder.is_dir():
                found, lacking = _probe_folder(key, folder)
                if found is not None:
                    return found
                if lacking:
                    raise AdvtuneError(f"{key} in --data-dir is incomplete: {lacking}; add the missing file(s)")
        if not download:
            raise AdvtuneError(
                f"--data-dir {root} does not hold {key} (expected {root / spec.folder}/ with "
                f"{', '.join(_required_files(key)[:2])}, ...); fix the path or allow the download"
            )
        target = _download_target(data_dir) / spec.folder  # download into the folder the user named
        download_files(spec, target, mirrors)
        found = _read_if_present(key, target)
        if found is None:
            raise AdvtuneError(f"downloaded {key} into {target} but could not read it")
        return found
    roots = search_roots(data_dir)
    looked: list[str] = []
    incomplete: list[str] = []
    for root in roots:
        for folder in (root / spec.folder, root):
            if not folder.is_dir():
                continue
            looked.append(str(folder))
            found, lacking = _probe_folder(key, folder)
            if found is not None:
                return found
            if lacking:
                incomplete.append(lacking)
    if incomplete:
        raise AdvtuneError(
            f"{key} is incomplete: {incomplete[0]}; add the missing file(s) or delete the folder to re-download"
        )
    if not download:
        raise AdvtuneError(
            f"{key} not found (looked in: {', '.join(looked) or ', '.join(map(str, roots))}); "
            f"put its files in <dir>/{spec.folder}/ and pass --data-dir <dir> or set ADVTUNE_DATA, "
            "or allow the download"
        )
    target = _download_target(data_dir) / spec.folder
    download_files(spec, target, mirrors)
    found = _read_if_present(key, target)
    if found is None:
        raise AdvtuneError(f"downloaded {key} into {target} but could not read it")
    return found


def _required_files(key: str) -> list[str]:
    return (
        list(_IDX)
        if key in ("mnist", "fashion-mnist")
        else ["cifar10.npz | cifar-10-batches-py/ | cifar-10-python.tar.gz"]
    )


def _missing_files(key: str, folder: Path) -> list[str]:
    if key in ("mnist", "fashion-mnist"):
        return [f for f in _IDX if not _idx_path(folder, f)]
    return []


def _idx_path(folder: Path, name: str) -> Path | None:
    """Accept both the .gz files and their decompressed forms."""
    for cand in (folder / name, folder / name[:-3]):
        if cand.is_file():
            return cand
    return None


def _read_if_present(key: str, folder: Path) -> Dataset | None:
    spec = SPECS[key]
    if key in ("mnist", "fashion-mnist"):
        paths = [_idx_path(folder, f) for f in _IDX]
        if not all(paths):
            return None
        xtr, ytr, xte, yte = (read_idx(p) for p in paths)  # type: ignore[arg-type]
        train = _pair(xtr, ytr, paths[0], paths[1], len(spec.classes))
        test = _pair(xte, yte, paths[2], paths[3], len(spec.classes))
        return Dataset(key, train, test, list(spec.classes), spec.mean, spec.std, str(folder))
    # cifar10: the .npz layout, the extracted python batches, or the downloaded archive
    if (folder / "cifar10.npz").is_file():
        ds = load_npz(folder / "cifar10.npz")
        return replace(ds, name=key, classes=list(spec.classes), mean=spec.mean, std=spec.std)
    batches = folder / "cifar-10-batches-py"
    if not batches.is_dir() and (folder / "cifar-10-python.tar.gz").is_file():
        _extract_cifar(folder / "cifar-10-python.tar.gz", folder)
    if batches.is_dir():
        return _load_cifar_batches(batches, spec)
    return None


def _download_target(data_dir) -> Path:
    for cand in (
        ([Path(data_dir)] if data_dir else [])
        + ([Path(os.environ["ADVTUNE_DATA"])] if os.environ.get("ADVTUNE_DATA") else [])
        + [cache_dir()]
    ):
        try:
            cand.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(cand, os.W_OK):
            return cand
    raise AdvtuneError("no writable folder to download into; pass --data-dir <writable dir> or set ADVTUNE_DATA")


# ---------------------------------------------------------------- download with verification


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_files(spec: Spec, target: Path, mirrors: tuple[str, ...] | None = None, timeout: float = 60.0) -> None:
    """Fetch each missing file from the first mirror that answers; verify its md5 before it is kept.

    A file is written to a temporary name and renamed only after its checksum matches, so a failed
    or corrupted download never leaves a file that looks complete. `$ADVTUNE_MIRROR` overrides mirrors.
    """
    from .utils import progress

    if os.environ.get("ADVTUNE_MIRROR"):
        mirrors = (os.environ["ADVTUNE_MIRROR"],)
    mirrors = mirrors or spec.mirrors
    target.mkdir(parents=True, exist_ok=True)
    for rf in spec.files:
        dest = target / rf.name
        if dest.is_file() and md5sum(dest) == rf.md5:
            continue
        errors = []
        for base in mirrors:
            url = base.rstrip("/") + "/" + rf.name
            tmp = dest.with_name(dest.name + ".part")
            try:
                log.info("downloading %s", url)
                with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                    total = int(resp.headers.get("Content-Length") or 0) or None
                    bar = progress(
                        iter(lambda: resp.read(1 << 16), b""),
                        desc=rf.name,
                        total=(total // (1 << 16) + 1) if total else None,
                    )
                    for chunk in bar:
                        out.write(chunk)
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                tmp.unlink(missing_ok=True)
                errors.append(f"{url}: {e}")
                continue
            got = md5sum(tmp)
            if got != rf.md5:
                tmp.unlink(missing_ok=True)
                raise AdvtuneError(
                    f"checksum mismatch for {url}: md5 {got}, expected {rf.md5}; the file was "
                    "refused and deleted: try another mirror (ADVTUNE_MIRROR) or download it by hand"
                )
            os.replace(tmp, dest)
            break
        else:
            raise AdvtuneError(
                f"could not download {rf.name} ({'; '.join(errors)}); without network, put the "
                f"files in <dir>/{spec.folder}/ and pass --data-dir <dir>"
            )


# ---------------------------------------------------------------- file formats


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (.gz or raw) of unsigned bytes, checking header and length."""
    try:
        raw = gzip.open(path, "rb").read() if str(path).endswith(".gz") else Path(path).read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise AdvtuneError(f"{path} is corrupt or truncated ({e}); delete it and download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise AdvtuneError(f"{path} is not an IDX file (bad magic number); delete it and download it again")
    if raw[2] != 0x08:
        raise AdvtuneError(f"{path}: only unsigned-byte IDX files are supported (type code {raw[2]:#x})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise AdvtuneError(f"{path} is truncated (header incomplete); delete it and download it again")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - header != expected:
        raise AdvtuneError(
            f"{path} is truncated or padded: header says {expected} bytes of data, file has "
            f"{len(raw) - header}; delete it and download it again"
        )
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header).reshape(dims)  # writable copy


def _pair(x: np.ndarray, y: np.ndarray, xpath, ypath, num_classes: int) -> TensorData:
    if len(x) != len(y):
        raise AdvtuneError(
            f"{xpath} has {len(x)} images but {ypath} has {len(y)} labels; the files belong to different sets"
        )
    if y.size and int(y.min()) < 0:
        raise AdvtuneError(f"{ypath} has a negative label ({int(y.min())}); labels must be 0..classes-1")
    if y.size and int(y.max()) >= num_classes:
        raise AdvtuneError(f"{ypath} has label {int(y.max())} but the dataset has {num_classes} classes")
    xt = torch.from_numpy(np.ascontiguousarray(x))
    if xt.ndim == 3:
        xt = xt.unsqueeze(1)
    return TensorData(xt, torch.from_numpy(y.astype(np.int64)))


def _to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise AdvtuneError(f"{where}: images must have 3 (N,H,W) or 4 dimensions, got shape {x.shape}")
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # NHWC -> NCHW
    return x


def _as_uint8(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        if x.size and (x.min() < 0 or x.max() > 1):
            raise AdvtuneError(
                f"{where}: float images must lie in [0,1] (found {x.min():.3g}..{x.max():.3g}); scale them or store "
                "uint8"
            )
        return np.round(x * 255).astype(np.uint8)
    raise AdvtuneError(f"{where}: images must be uint8 or float in [0,1], got {x.dtype}")


def load_npz(path: Path) -> Dataset:
    """An .npz with x_train, y_train, x_test, y_test (NHWC or NCHW or NHW; uint8 or float [0,1])."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise AdvtuneError(
                    f"{path} lacks arrays {', '.join(missing)}; an .npz dataset needs x_train, y_train, x_test, y_test"
                )
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as e:
        raise AdvtuneError(f"{path} is corrupt or truncated ({e}); re-create or re-download it") from None
    for k in ("y_train", "y_test"):
        y = arrays[k]
        if not np.issubdtype(y.dtype, np.integer):
            if not np.issubdtype(y.dtype, np.floating) or not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
                raise AdvtuneError(
                    f"{path}:{k} holds non-integer labels (dtype {y.dtype}); labels must be whole class "
                    "numbers 0..classes-1 (store them as integers)"
                )
            arrays[k] = y.astype(np.int64)
    for k in ("x_train", "x_test"):
        x = arrays[k]
        if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
            raise AdvtuneError(f"{path}:{k} contains NaN or infinite pixels; fix or drop those images")
    ytr, yte = arrays["y_train"].reshape(-1), arrays["y_test"].reshape(-1)
    classes = int(max(ytr.max(initial=0), yte.max(initial=0))) + 1
    xtr = _as_uint8(_to_nchw(arrays["x_train"], f"{path}:x_train"), f"{path}:x_train")
    xte = _as_uint8(_to_nchw(arrays["x_test"], f"{path}:x_test"), f"{path}:x_test")
    train = _pair(xtr, ytr, f"{path}:x_train", f"{path}:y_train", classes)
    test = _pair(xte, yte, f"{path}:x_test", f"{path}:y_test", classes)
    if train.x.shape[1:] != test.x.shape[1:]:
        raise AdvtuneError(
            f"{path}: train images {tuple(train.x.shape[1:])} and test images {tuple(test.x.shape[1:])} differ in shape"
        )
    mean, std = channel_stats(train.x)
    return Dataset(path.stem, train, test, [str(i) for i in range(classes)], mean, std, str(path))


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0,1] units (computed in chunks)."""
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(x), 4096):
        chunk = x[i : i + 4096].double() / 255.0
        s += chunk.sum((0, 2, 3))
        s2 += (chunk**2).sum((0, 2, 3))
    n = max(1, len(x) * x.shape[2] * x.shape[3])
    mean = s / n
    std = (s2 / n - mean**2).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles; allow only what rebuilds numpy arrays, nothing that runs code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")
        if name == "encode":
            import codecs

            return codecs.encode
        core = getattr(np, "_core", None) or np.core
        return {
            "_reconstruct": core.multiarray._reconstruct,
            "ndarray": np.ndarray,
            "dtype": np.dtype,
            "scalar": core.multiarray.scalar,
        }[name]


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as e:
        raise AdvtuneError(
            f"{path} is corrupt, truncated or not a CIFAR-10 batch ({e}); delete it and download again"
        ) from None
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise AdvtuneError(f"{path} is not a CIFAR-10 batch (no data/labels); delete it and download again")
    x = np.asarray(d["data"], dtype=np.uint8)
    if x.ndim != 2 or x.shape[1] != 3072:
        raise AdvtuneError(f"{path}: expected data of shape (N, 3072), got {x.shape}")
    return x.reshape(-1, 3, 32, 32), np.asarray(d["labels"], dtype=np.int64)


def _load_cifar_batches(folder: Path, spec: Spec) -> Dataset:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise AdvtuneError(
            f"cifar10 is incomplete: {folder} lacks {', '.join(missing)}; delete the folder to re-extract/re-download"
        )
    parts = [_read_cifar_batch(folder / n) for n in names]
    xtr = np.concatenate([p[0] for p in parts[:5]])
    ytr = np.concatenate([p[1] for p in parts[:5]])
    train = _pair(xtr, ytr, folder / "data_batch_*", folder / "data_batch_*", 10)
    test = _pair(parts[5][0], parts[5][1], folder / "test_batch", folder / "test_batch", 10)
    return Dataset("cifar10", train, test, list(spec.classes), spec.mean, spec.std, str(folder))


def _extract_cifar(archive: Path, folder: Path) -> None:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("cifar-10-batches-py/") and m.isfile()]
            tar.extractall(folder, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise AdvtuneError(f"{archive} is corrupt or truncated ({e}); delete it and download again") from None


def load_image_folder(root: Path) -> Dataset:
    """`<root>/train/<class>/*` and `<root>/test/<class>/*` images of one size (PNG/JPEG/BMP)."""
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise AdvtuneError(f"{root}/train has no class folders; expected {root}/train/<class>/<image>")
    if not (root / "test").is_dir():
        raise AdvtuneError(f"{root} has no test/ folder; expected {root}/test/<class>/<image>")
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
    splits = {}
    mode = None
    size = None
    for split in ("train", "test"):
        xs, ys = [], []
        for ci, c in enumerate(classes):
            for p in sorted((root / split / c).glob("*")) if (root / split / c).is_dir() else []:
                if p.suffix.lower() not in exts:
                    continue
                try:
                    with Image.open(p) as im:
                        if mode is None:
                            mode = "L" if im.mode in ("L", "1", "P", "I;16") and im.mode != "P" else "RGB"
                        arr = np.asarray(im.convert(mode), dtype=np.uint8)
                except (UnidentifiedImageError, OSError) as e:
                    raise AdvtuneError(f"cannot read image {p} ({e}); remove or fix it") from None
                if size is None:
                    size = arr.shape
                if arr.shape != size:
                    raise AdvtuneError(
                        f"{p} has shape {arr.shape} but earlier images have {size}; resize all images to one size"
                    )
                xs.append(arr)
                ys.append(ci)
        if not xs:
            raise AdvtuneError(f"{root}/{split} holds no images")
        x = _to_nchw(np.stack(xs), str(root))
        splits[split] = TensorData(torch.from_numpy(np.ascontiguousarray(x)), torch.tensor(ys))
    mean, std = channel_stats(splits["train"].x)
    return Dataset(root.name, splits["train"], splits["test"], classes, mean, std, str(root))


# ---------------------------------------------------------------- synthetic task


def synthetic_blobs(
    n: int,
    classes: int = 4,
    size: int = 16,
    channels: int = 1,
    generator: torch.Generator | None = None,
    noise: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A task a 2-conv CNN learns in seconds: the class is the image region holding a bright blob.

    Returns float32 images in [0,1] of shape (n, channels, size, size) and int64 labels.
    Regions are the quadrants (classes<=4) or vertical stripes (classes>4).
    """
    y = torch.randint(0, classes, (n,), generator=generator)
    x = noise * torch.rand(n, channels, size, size, generator=generator)
    half = size // 2
    blob = max(2, size // 4)
    for c in range(classes):
        idx = (y == c).nonzero().flatten()
        if len(idx) == 0:
            continue
        if classes <= 4:
            r0, c0 = (c // 2) * half, (c % 2) * half
            rr, cc = half - blob, half - blob
        else:
            width = size // classes
            r0, c0 = 0, c * width
            rr, cc = size - blob, max(width - blob, 0)
        # a random position of the blob inside the class's region
        dr = torch.randint(0, rr + 1, (len(idx),), generator=generator)
        dc = torch.randint(0, cc + 1, (len(idx),), generator=generator)
        for k, i in enumerate(idx.tolist()):
            r, q = r0 + int(dr[k]), c0 + int(dc[k])
            x[i, :, r : r + blob, q : q + blob] += 0.8
    return x.clamp_(0, 1), y


def _synthetic_dataset(seed: int = 0, n_train: int = 2000, n_test: int = 500) -> Dataset:
    """`synthetic`: 1x16x16 blobs, 4 classes, for smoke tests and the CLI's offline examples."""
    g = torch.Generator().manual_seed(10_000 + seed)
    x, y = synthetic_blobs(n_train + n_test, generator=g)
    xu = (x * 255).round().to(torch.uint8)
    train, test = TensorData(xu[:n_train], y[:n_train]), TensorData(xu[n_train:], y[n_train:])
    mean, std = channel_stats(train.x)
    return Dataset(
        "synthetic", train, test, ["top-left", "top-right", "bottom-left", "bottom-right"], mean, std, "generated"
    )
