"""File formats: MNIST IDX, CIFAR-10 python batches (numpy-only unpickling), .npz, image folders."""

from __future__ import annotations

import codecs
import gzip
import logging
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import AdvtuneError
from .registry import Spec
from .splits import Dataset, TensorData, channel_stats

log = logging.getLogger(__name__)


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


def pair_split(x: np.ndarray, y: np.ndarray, xpath, ypath, num_classes: int) -> TensorData:
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


MAX_CLASSES = 100_000  # what a saved model may record (models.load_model refuses more)


def check_classes(y: np.ndarray, where: str) -> int:
    """The class count of integer labels, which must number the classes 0..K-1 (every one present in a split):
    the count was the largest label + 1, so labels 1..4 made an empty class 0 and IDs made a million classes."""
    low, high = int(y.min()), int(y.max())
    if low < 0:
        raise AdvtuneError(f"{where} has a negative label ({low}); labels must be 0..classes-1")
    if high >= MAX_CLASSES:
        raise AdvtuneError(
            f"{where} has label {high}: number the classes 0..K-1 (K <= {MAX_CLASSES:,}), e.g. "
            "_, y = np.unique(y, return_inverse=True)"
        )
    present = np.unique(y)
    if len(present) < 2:
        raise AdvtuneError(f"{where} holds one class ({low}); a classifier needs at least two")
    if len(present) < high + 1:
        absent = sorted(set(range(high + 1)) - {int(c) for c in present})
        shown = ", ".join(map(str, absent[:5])) + (", ..." if len(absent) > 5 else "")
        raise AdvtuneError(
            f"{where}: no image has class {shown} of 0..{high}; number the classes 0..K-1 without gaps, e.g. "
            "_, y = np.unique(y, return_inverse=True)"
        )
    return high + 1


def _to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise AdvtuneError(f"{where}: images must have 3 (N,H,W) or 4 dimensions, got shape {x.shape}")
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # NHWC -> NCHW
    if x.shape[1] == x.shape[2] and x.shape[3] < x.shape[1] and x.shape[1] not in (1, 3, 4):
        # an unusual channel count last, after square images: (N, 8, 8, 2) is NHWC; anything else stays NCHW
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


def _as_uint8(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        if x.size and (x.min() < 0 or x.max() > 1):
            out = int(((x < 0) | (x > 1)).sum())  # 1.000001 printed as "1" read as no overshoot at all
            raise AdvtuneError(
                f"{where}: float images must lie in [0,1] (found {x.min():.9g}..{x.max():.9g}, {out:,} values "
                "outside); scale them (or np.clip to [0, 1]) or store uint8"
            )
        return np.round(x * 255).astype(np.uint8)
    raise AdvtuneError(f"{where}: images must be uint8 or float in [0,1], got {x.dtype}")


def load_npz(path: Path, num_classes: int | None = None, trained: bool = False) -> Dataset:
    """An .npz with x_train, y_train, x_test, y_test (NHWC or NCHW or NHW; uint8 or float [0,1])."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise AdvtuneError(
                    f"{path} lacks arrays {', '.join(missing)}; an .npz dataset needs x_train, y_train, x_test, y_test"
                )
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except AdvtuneError:  # (a ValueError too: the missing arrays' message is the precise one)
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as e:
        raise AdvtuneError(f"{path} is corrupt or truncated ({e}); re-create or re-download it") from None
    for k in ("x_train", "x_test", "y_train", "y_test"):
        if arrays[k].ndim == 0:
            raise AdvtuneError(f"{path}:{k} is a single value, not an array of {'images' if k[0] == 'x' else 'labels'}")
    for k in ("y_train", "y_test"):
        y, n = arrays[k], len(arrays["x" + k[1:]])
        if y.ndim == 2 and (y.shape == (n, 1) or y.shape == (1, n)):
            y = arrays[k] = y.reshape(-1)  # a column (or a row) of class numbers
        elif y.ndim == 2 and y.shape[0] == n and y.shape[1] > 1:
            raise AdvtuneError(
                f"{path}:{k} holds one row of {y.shape[1]} values per image (one-hot?); store one class number per "
                f"image: {k} = {k}.argmax(1)"
            )
        elif y.ndim != 1:
            raise AdvtuneError(f"{path}:{k} must hold one class number per image (shape (N,)), got shape {y.shape}")
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
    for k in ("x_train", "x_test"):
        if len(arrays[k]) == 0:
            raise AdvtuneError(f"{path}:{k} holds no images; both splits need some")
        labels = "y" + k[1:]
        if len(arrays[labels]) != len(arrays[k]):
            raise AdvtuneError(
                f"{path}: {k} holds {len(arrays[k])} images and {labels} {len(arrays[labels])} labels; give one "
                "label per image"
            )
        if arrays[k].dtype == np.uint8 and arrays[k].max() <= 1:
            log.warning(
                "%s:%s: every uint8 pixel is 0 or 1, read as 0..1/255 (almost black); binary images are 0/255 in "
                "uint8 (or 0.0/1.0 as floats)",
                path,
                k,
            )
    ytr, yte = arrays["y_train"].reshape(-1), arrays["y_test"].reshape(-1)
    # `num_classes`: the count a trained model (or a named set) has, which the labels need only fit: a subset of
    # CIFAR-10's classes, or a run from before labels had to number the classes without gaps
    # the classes are the training split's: a class only the test split has would never be learnt, only failed
    classes = num_classes or check_classes(ytr, f"{path}:y_train")
    if not num_classes and int(yte.min()) >= 0 and int(yte.max()) >= classes:
        raise AdvtuneError(
            f"{path}:y_test has class {int(yte.max())}, which no training image has (y_train: 0..{classes - 1}); "
            "give the training split every class"
        )
    top = int(max(ytr.max(), yte.max())) + 1
    if trained and top != classes:  # `trained`: the count is a model's, whose labels ran up to it then
        raise AdvtuneError(
            f"{path} now holds labels up to {top - 1}, and the model was trained on {classes} classes; use the data "
            "it was trained on"
        )
    xtr = _as_uint8(_to_nchw(arrays["x_train"], f"{path}:x_train"), f"{path}:x_train")
    xte = _as_uint8(_to_nchw(arrays["x_test"], f"{path}:x_test"), f"{path}:x_test")
    train = pair_split(xtr, ytr, f"{path}:x_train", f"{path}:y_train", classes)
    test = pair_split(xte, yte, f"{path}:x_test", f"{path}:y_test", classes)
    if train.x.shape[1:] != test.x.shape[1:]:
        raise AdvtuneError(
            f"{path}: train images {tuple(train.x.shape[1:])} and test images {tuple(test.x.shape[1:])} differ in shape"
        )
    mean, std = channel_stats(train.x)
    return Dataset(path.stem, train, test, [str(i) for i in range(classes)], mean, std, str(path))


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
    if not isinstance(d, dict):  # a pickled list or array: not a batch (a traceback on .items() before)
        raise AdvtuneError(f"{path} holds a {type(d).__name__}, not a CIFAR-10 batch; delete it and download again")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise AdvtuneError(f"{path} is not a CIFAR-10 batch (no data/labels); delete it and download again")
    x = np.asarray(d["data"])
    if x.dtype != np.uint8:  # pixels 300 or -1 were wrapped into 0..255 without a word
        raise AdvtuneError(f"{path}: CIFAR-10 pixels are uint8, got {x.dtype}; delete it and download again")
    if x.ndim != 2 or x.shape[1] != 3072:
        raise AdvtuneError(f"{path}: expected data of shape (N, 3072), got {x.shape}")
    return x.reshape(-1, 3, 32, 32), np.asarray(d["labels"], dtype=np.int64)


def load_cifar_batches(folder: Path, spec: Spec) -> Dataset:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise AdvtuneError(
            f"cifar10 is incomplete: {folder} lacks {', '.join(missing)}; delete the folder to re-extract/re-download"
        )
    parts = [_read_cifar_batch(folder / n) for n in names]
    xtr = np.concatenate([p[0] for p in parts[:5]])
    ytr = np.concatenate([p[1] for p in parts[:5]])
    train = pair_split(xtr, ytr, folder / "data_batch_*", folder / "data_batch_*", 10)
    test = pair_split(parts[5][0], parts[5][1], folder / "test_batch", folder / "test_batch", 10)
    return Dataset("cifar10", train, test, list(spec.classes), spec.mean, spec.std, str(folder))


def extract_cifar(archive: Path, folder: Path) -> None:
    """The archive's cifar-10-batches-py/ into `folder`, whole or not at all: unpacked into a private folder beside
    it and renamed into place, so a reader (another process) never sees half-written batches. Nothing to do where
    the batches are there (another process may have unpacked them meanwhile)."""
    target = folder / "cifar-10-batches-py"
    if target.is_dir():
        return
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".cifar-extract-", dir=folder))
    except OSError as e:
        raise AdvtuneError(f"cannot unpack {archive} in {folder} ({e.strerror}); unpack it there yourself") from None
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("cifar-10-batches-py/") and m.isfile()]
            if hasattr(tarfile, "data_filter"):  # Python 3.10.12+ / 3.11.4+: the safe filter
                tar.extractall(scratch, members=members, filter="data")
            else:  # older: plain files under the batches' folder only, no path leaving it
                safe = [m for m in members if not m.name.startswith("/") and ".." not in Path(m.name).parts]
                tar.extractall(scratch, members=safe)
        try:
            os.replace(scratch / "cifar-10-batches-py", target)
        except OSError:
            if not target.is_dir():  # (a target that exists now: another process finished first)
                raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise AdvtuneError(f"{archive} is corrupt or truncated ({e}); delete it and download again") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
SHUFFLED = "shuffled"  # an image folder's order since round 37 (recorded; older runs read their folder sorted by class)


def _read_image(path: Path, legacy_mode: str | None = None) -> np.ndarray:
    """One image as uint8, (H, W) when grayscale or (H, W, 3): 16-bit grayscale scaled to 8 bits (convert("L")
    clipped it to white), a palette image with a grey palette gray. `legacy_mode`: decode as runs from before
    round 37 did (every image converted to the first image's mode)."""
    try:
        with Image.open(path) as im:
            if legacy_mode is not None:
                return np.asarray(im.convert(legacy_mode), dtype=np.uint8)
            if im.mode.startswith("I"):  # 16- or 32-bit grayscale
                wide = np.asarray(im).astype(np.float64)
                return np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8)
            if im.mode in ("L", "1"):
                return np.asarray(im.convert("L"), dtype=np.uint8)
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
            gray = im.mode == "P" and bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
            return np.ascontiguousarray(rgb[..., 0]) if gray else rgb
    except (UnidentifiedImageError, OSError) as e:
        raise AdvtuneError(f"cannot read image {path} ({e}); remove or fix it") from None


def _legacy_mode(path: Path) -> str:
    """The mode runs from before round 37 read a whole folder in: the first image's."""
    try:
        with Image.open(path) as im:
            return "L" if im.mode in ("L", "1", "I;16") else "RGB"
    except (UnidentifiedImageError, OSError) as e:
        raise AdvtuneError(f"cannot read image {path} ({e}); remove or fix it") from None


def _class_folders(split: Path) -> list[str]:
    """A split's class folders, hidden ones left out."""
    if not split.is_dir():
        return []
    return sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_image_folder(root: Path, classes: list[str] | None = None, order: str = SHUFFLED) -> Dataset:
    """`<root>/train/<class>/*` and `<root>/test/<class>/*` images of one size (PNG/JPEG/BMP/GIF; 16-bit grayscale
    scaled to 8 bits; a folder with any colour image read as RGB). Hidden folders and files are skipped; each class
    needs training images. The images are read in one fixed shuffled order, so the first N of a split (--limit) hold
    every class, not the first classes. `classes` and `order`: as a trained model read the folder (its recorded class
    names; "sorted": a run from before round 37, read as it was then), so its labels mean what they meant; a class
    folder renamed, added or removed since is refused."""
    if order not in (SHUFFLED, "sorted"):
        raise AdvtuneError(f"unknown image-folder order {order!r}; the records say shuffled or sorted")
    legacy = order == "sorted"
    on_disk = _class_folders(root / "train")
    if classes is not None:
        classes = [str(c) for c in classes]
        named = sorted(c for c in classes if not c.startswith("."))  # a hidden folder was a class before round 37
        if on_disk != named:
            raise AdvtuneError(
                f"{root}/train now holds the classes {on_disk[:8]}, and the model was trained on {named[:8]}; use the "
                "data it was trained on"
            )
    classes = classes if classes is not None else on_disk
    if not classes:
        raise AdvtuneError(f"{root}/train has no class folders; expected {root}/train/<class>/<image>")
    if len(classes) < 2:
        raise AdvtuneError(
            f"{root}/train holds one class folder ({classes[0]}); a classifier needs at least two: "
            f"{root}/train/<class>/<image>"
        )
    if not (root / "test").is_dir():
        raise AdvtuneError(f"{root} has no test/ folder; expected {root}/test/<class>/<image>")
    extra = [c for c in _class_folders(root / "test") if c not in classes]
    if extra:
        lacks = ", ".join(extra)
        raise AdvtuneError(f"{root}/test has classes train/ lacks ({lacks}); every class needs training images")
    found_at: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    for split in found_at:
        for ci, c in enumerate(classes):
            found = sorted((root / split / c).glob("*")) if (root / split / c).is_dir() else []
            found = found if legacy else [p for p in found if not p.name.startswith(".")]  # macOS's ._x.png
            images = [p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS]
            if split == "train" and not images and not c.startswith("."):
                skipped = sorted({p.suffix.lower() or p.name for p in found if p.is_file()})
                also = f" (skipped: {', '.join(skipped)})" if skipped else ""
                sub = "; subfolders are not read" if any(p.is_dir() for p in found) else ""
                raise AdvtuneError(
                    f"{root}/train/{c} holds no {'/'.join(sorted(IMAGE_EXTENSIONS))} images{also}{sub}; add some or "
                    "remove the class"
                )
            found_at[split] += [(p, ci) for p in images]
        if not found_at[split]:
            raise AdvtuneError(f"{root}/{split} holds no images")
    mode = _legacy_mode(found_at["train"][0][0]) if legacy else None
    arrays = {split: [_read_image(p, mode) for p, _ in items] for split, items in found_at.items()}  # once each
    colour = any(a.ndim == 3 for split in arrays.values() for a in split)
    size = None
    splits = {}
    for split, xs in arrays.items():
        xs = [np.repeat(a[..., None], 3, axis=-1) if colour and a.ndim == 2 else a for a in xs]
        for a, (path, _) in zip(xs, found_at[split]):
            size = size or a.shape
            if a.shape != size:
                raise AdvtuneError(
                    f"{path} has shape {a.shape} but earlier images have {size}; resize all images to one size"
                )
        x, y = np.stack(xs), np.asarray([ci for _, ci in found_at[split]])
        if not legacy:  # one fixed order: the same dataset every time
            perm = np.random.default_rng(0).permutation(len(y))
            x, y = x[perm], y[perm]
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # the layout is known here: (N,H,W) or (N,H,W,3)
        splits[split] = TensorData(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))
    mean, std = channel_stats(splits["train"].x)
    ds = Dataset(root.name, splits["train"], splits["test"], list(classes), mean, std, str(root))
    ds.notes["order"] = order
    ds.notes["images"] = len(splits["train"])  # the fixed order depends on it: a run compares it (runs.common)
    return ds
