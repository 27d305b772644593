"""`load_dataset(name)`: find a dataset locally (in the documented order), else download it."""

from __future__ import annotations

import logging
import math
import numbers
import os
from dataclasses import replace
from pathlib import Path
from typing import Mapping

from ..distributed import is_main_process, on_each_machine, on_main
from ..errors import AdvtuneError
from ..keywords import keyword_errors
from ..provenance import checkout_root
from .download import download_files, md5sum
from .formats import (
    SHUFFLED,
    extract_cifar,
    load_cifar_batches,
    load_image_folder,
    load_npz,
    pair_split,
    read_idx,
)
from .registry import IDX_FILES, SPECS, list_datasets
from .splits import Dataset
from .synthetic import synthetic_dataset

log = logging.getLogger(__name__)


def search_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched, in order, for a dataset's subfolder."""
    roots: list[Path] = []
    if data_dir:
        roots.append(Path(data_dir).expanduser())
    if os.environ.get("ADVTUNE_DATA"):
        roots.append(Path(os.environ["ADVTUNE_DATA"]).expanduser())
    roots.append(cache_dir())
    # the checkout's neighbour (CI and this workplace keep datasets in ../shared/data); an installed copy: the working
    # folder's only (its own parents are the environment's folders)
    root = checkout_root()
    for base in (Path.cwd(), *((root, root.parent) if root is not None else ())):
        cand = base.parent / "shared" / "data"
        if cand not in roots and cand.is_dir():
            roots.append(cand)
    return roots


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "advtune"


@keyword_errors()  # its checks name --limit, --val, --data-dir on the command line
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
    as_trained: Mapping | None = None,
) -> Dataset:
    """Load a dataset by name or path. `limit`/`limit_test` take the first examples of each split;
    `val` holds out that many training examples (or a fraction) as a seeded validation split. `as_trained`: how a
    trained model read the user's own data ({"classes": its class names, "order": an image folder's order}), so that
    a later job reads it the same way.

    `download=None` means "allowed unless $ADVTUNE_NO_DOWNLOAD is set to anything but 0, false, no or off".
    """
    for what, n in (("--limit", limit), ("--limit-test", limit_test)):
        whole = isinstance(n, numbers.Integral) and not isinstance(n, bool)  # 2.5 and "5" crashed inside torch
        if n is not None and (not whole or n <= 0):  # named, and refused before the data is read
            raise AdvtuneError(f"{what} must be a positive number of examples, got {n!r}; leave it out to use them all")
    real = isinstance(val, numbers.Real) and not isinstance(val, bool)
    if not real or not math.isfinite(val) or val < 0 or (val >= 1 and val != int(val)):  # -1, "5": none; 2.5: two
        raise AdvtuneError(f"--val must be a count of examples or a share in (0, 1) (0: none), got {val!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise AdvtuneError(f"seed must be an integer in [0, 2^63), got {seed!r}")
    seed = int(seed)  # a numpy integer: torch's generator takes a plain int
    if download is None:
        # 0, false, no, off or empty allow downloads; any other value (1, true, yes, ...) forbids them
        download = os.environ.get("ADVTUNE_NO_DOWNLOAD", "").strip().lower() in ("", "0", "false", "no", "off")
    key = dataset_key(name) or name
    if key == "synthetic":
        ds = synthetic_dataset()  # the same data for every run: only shuffles and splits use the seed
    elif key in SPECS:
        ds = _load_named(key, data_dir, download, mirrors)
    else:
        path = Path(name).expanduser()
        if not path.exists() and data_dir and (Path(data_dir).expanduser() / path.name).exists():
            path = Path(data_dir).expanduser() / path.name  # own data moved: a run's recorded path, found in --data-dir
            log.warning("%s is not there any more; reading %s (same name, in the data folder)", name, path)
        trained = as_trained or {}  # how a trained model read this data: its classes, a folder's order
        if path.suffix == ".npz" and path.is_file():
            count = len(trained["classes"]) if trained.get("classes") else None
            ds = load_npz(path, num_classes=count, trained=count is not None)
        elif path.is_dir() and (path / "train").is_dir():
            ds = load_image_folder(path, trained.get("classes"), trained.get("order", SHUFFLED))
            then = trained.get("images")  # a resume: its checkpoint's batch order indexes the folder's order
            if then is not None and then != ds.notes.get("images", then):
                raise AdvtuneError(
                    f"{path} holds {ds.notes['images']} training images now, {then} when this run started: its "
                    "reading order changed, so the resumed batches and --val split would be other images; restore "
                    "the folder, or start a new run"
                )
        elif path.is_dir():  # it exists: "not found" sent a user looking for a typo
            hint = f"; give {path.parent} (it holds train/)" if (path.parent / "train").is_dir() else ""
            raise AdvtuneError(
                f"dataset folder {name!r} has no train/ and test/ subfolders (an image folder holds "
                f"train/<class>/*.png and test/<class>/*.png){hint}"
            )
        elif path.suffix == ".npz" or os.sep in name:
            raise AdvtuneError(
                f"dataset path {name!r} not found (expected an .npz file or a folder with train/ and test/; data "
                "that moved: --data-dir FOLDER holding it under the same name)"
            )
        else:
            raise AdvtuneError(f"unknown dataset {name!r}; valid: {', '.join(list_datasets())}")
    full = ds
    ds = ds.limit(limit, limit_test)
    own = key != "synthetic" and key not in SPECS  # the named sets come mixed; a user's file may be sorted by class
    for split, part, whole in (("training", ds.train, full.train), ("test", ds.test, full.test)) if own else ():
        held, every = len(part.y.unique()), len(whole.y.unique())
        # so many examples drawn at random would hold every class; said once, not by every torchrun process
        if held < every and len(part) >= 10 * every and is_main_process():
            log.warning(
                "%s: the first %d %s examples hold %d of its %d classes (is the file ordered by class?); shuffle it "
                "once, or take more examples",
                name,
                len(part),
                split,
                held,
                every,
            )
    if val:
        ds = ds.split_validation(val, seed)
    return ds


ALIASES = {"fashion": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10"}


def dataset_key(name: str) -> str | None:
    """The built-in dataset a name means (spelling and aliases: `Fashion_MNIST`, `fmnist`, `CIFAR-10`), or None for
    a path to the user's own data."""
    key = str(name).strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    return key if key == "synthetic" or key in SPECS else None


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
                if lacking and download:  # an interrupted download: fetch what is missing (whole files are kept)
                    return _complete(key, spec, folder, mirrors)
                if lacking:
                    raise AdvtuneError(f"{key} in --data-dir is incomplete: {lacking}; add the missing file(s)")
        if not download:
            raise AdvtuneError(
                f"--data-dir {root} does not hold {key} (expected {root / spec.folder}/ with "
                f"{', '.join(_required_files(key)[:2])}, ...); fix the path or allow the download"
            )
        target = _download_target(data_dir) / spec.folder  # download into the folder the user named
        _refuse_to_download_over(key, target)
        on_main(lambda: download_files(spec, target, mirrors))  # torchrun: one download, the others wait
        found = _read_if_present(key, target)
        if found is None:
            raise AdvtuneError(f"downloaded {key} into {target} but could not read it")
        return found
    roots = search_roots(data_dir)
    looked: list[str] = []
    incomplete: list[str] = []
    partial: list[Path] = []
    other: OtherDataset | None = None
    for root in roots:
        for folder in (root / spec.folder, root):
            if not folder.is_dir():
                continue
            looked.append(str(folder))
            try:
                found, lacking = _probe_folder(key, folder)
            except OtherDataset as e:  # not here: a later place may hold it (refused only if none does)
                other = other or e
                continue
            if found is not None:
                return found
            if lacking:
                incomplete.append(lacking)
                partial.append(folder)
    if partial and download and partial[0].name == spec.folder:  # an interrupted download: complete it there
        return _complete(key, spec, partial[0], mirrors)
    if other is not None and not download and not incomplete:
        raise other
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
    _refuse_to_download_over(key, target)
    on_main(lambda: download_files(spec, target, mirrors))  # torchrun: one download, the others wait
    found = _read_if_present(key, target)
    if found is None:
        raise AdvtuneError(f"downloaded {key} into {target} but could not read it")
    return found


def _refuse_to_download_over(key: str, target: Path) -> None:
    """A download replaces every file whose md5 is not the set's: never into a folder holding the other IDX set."""
    if key in FIRST_LABELS and target.is_dir():
        labels = _idx_path(target, IDX_FILES[1])  # a decompressed labels file is known by its first labels
        _refuse_the_other_idx_set(key, target, read_idx(labels) if labels is not None else None)


def _complete(key: str, spec, folder: Path, mirrors) -> Dataset:
    """The files `folder` lacks, downloaded into it (md5-checked; the ones it has are kept when their md5 matches)."""
    _refuse_to_download_over(key, folder)  # the files it has are the other set's: completing would replace them
    log.info("%s: %s is incomplete; downloading what is missing", key, folder)
    on_main(lambda: download_files(spec, folder, mirrors))
    found = _read_if_present(key, folder)
    if found is None:
        raise AdvtuneError(f"downloaded the missing {key} files into {folder} but could not read it")
    return found


def holds_dataset(name: str, folder: str | os.PathLike) -> bool:
    """Whether `folder` (a --data-dir) holds the built-in set `name`'s files, in `<folder>/<set>/` or in itself: a
    look at the file names, nothing read."""
    key = dataset_key(name)
    if key not in SPECS:
        return False
    for place in (Path(folder).expanduser() / SPECS[key].folder, Path(folder).expanduser()):
        if key in FIRST_LABELS and place.is_dir() and not _missing_files(key, place):
            return True
        if key == "cifar10" and any((place / f).exists() for f in CIFAR_FORMS):
            return True
    return False


CIFAR_FORMS = ("cifar10.npz", "cifar-10-batches-py", "cifar-10-python.tar.gz")  # what _read_if_present reads


def _required_files(key: str) -> list[str]:
    return (
        list(IDX_FILES)
        if key in ("mnist", "fashion-mnist")
        else ["cifar10.npz | cifar-10-batches-py/ | cifar-10-python.tar.gz"]
    )


def _missing_files(key: str, folder: Path) -> list[str]:
    if key in ("mnist", "fashion-mnist"):
        return [f for f in IDX_FILES if not _idx_path(folder, f)]
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
        paths = [_idx_path(folder, f) for f in IDX_FILES]
        if not all(paths):
            return None
        xtr, ytr, xte, yte = (read_idx(p) for p in paths)  # type: ignore[arg-type]
        _refuse_the_other_idx_set(key, folder, ytr)
        train = pair_split(xtr, ytr, paths[0], paths[1], len(spec.classes))
        test = pair_split(xte, yte, paths[2], paths[3], len(spec.classes))
        return _of_its_shape(Dataset(key, train, test, list(spec.classes), spec.mean, spec.std, str(folder)), paths[0])
    # cifar10: the .npz layout, the extracted python batches, or the downloaded archive
    if (folder / "cifar10.npz").is_file():
        ds = load_npz(folder / "cifar10.npz", num_classes=len(spec.classes))
        ds = replace(ds, name=key, classes=list(spec.classes), mean=spec.mean, std=spec.std)
        return _of_its_shape(ds, folder / "cifar10.npz")
    batches = folder / "cifar-10-batches-py"
    if (folder / "cifar-10-python.tar.gz").is_file():  # torchrun: one rank per machine unpacks, the others wait
        on_each_machine(lambda: extract_cifar(folder / "cifar-10-python.tar.gz", folder))
    if batches.is_dir():
        return load_cifar_batches(batches, spec)
    return None


SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}  # the named sets' images


def _of_its_shape(ds: Dataset, path: Path) -> Dataset:
    """A named set's file holds its images (a (40,28,28) file named cifar10.npz was read as CIFAR-10 with its
    3-channel mean and std)."""
    want = SHAPES.get(ds.name)
    if want is not None and ds.input_shape != want:
        raise AdvtuneError(
            f"{path} holds {'x'.join(map(str, ds.input_shape))} images, not {ds.name}'s {'x'.join(map(str, want))}: "
            "it is another set's file; delete it (or move it) and let advtune fetch the real one"
        )
    return ds


# the first ten training labels of each IDX set, whatever the file's form (a decompressed file has no known md5)
FIRST_LABELS = {"mnist": (5, 0, 4, 1, 9, 2, 1, 3, 1, 4), "fashion-mnist": (9, 0, 0, 3, 0, 2, 7, 2, 5, 5)}


class OtherDataset(AdvtuneError):
    """A folder holds the other IDX set's files (MNIST for Fashion-MNIST or the reverse)."""


def _other_idx_set(key: str, folder: Path, labels=None) -> str | None:
    """MNIST and Fashion-MNIST share their four file names: a folder of the one, searched for the other (a --data-dir
    that is itself a dataset folder is searched directly), would read as the other without a word. The set `folder`
    holds when it is not `key`: by the md5 of a .gz labels file, else by the first training labels."""
    for i in (1, 3):  # the label files: small, and as telling as the images
        name = IDX_FILES[i]
        if (folder / name).is_file():
            digest = md5sum(folder / name)
            held = next((k for k in FIRST_LABELS if SPECS[k].files[i].md5 == digest), None)
            if held is not None:
                return held if held != key else None
    if labels is not None:
        head = tuple(int(v) for v in labels[:10])
        return next((k for k, first in FIRST_LABELS.items() if first == head and k != key), None)
    return None


def _refuse_the_other_idx_set(key: str, folder: Path, labels=None) -> None:
    held = _other_idx_set(key, folder, labels)
    if held is not None:
        raise OtherDataset(
            f"{folder} holds {held}'s files, not {key}'s (the two use the same file names); put {key}'s files in "
            f"<dir>/{SPECS[key].folder}/ and pass --data-dir <dir>"
        )


def _download_target(data_dir) -> Path:
    for cand in (
        ([Path(data_dir).expanduser()] if data_dir else [])
        + ([Path(os.environ["ADVTUNE_DATA"]).expanduser()] if os.environ.get("ADVTUNE_DATA") else [])
        + [cache_dir()]
    ):
        try:
            cand.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(cand, os.W_OK):
            return cand
    raise AdvtuneError("no writable folder to download into; pass --data-dir <writable dir> or set ADVTUNE_DATA")
