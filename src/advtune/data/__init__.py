"""Datasets by name: find locally, else download and verify; hold uint8 tensors; seeded fast batching.

Names: `mnist`, `fashion-mnist`, `cifar10`, `synthetic`, a path to an `.npz` file
(x_train/y_train/x_test/y_test) or to an image folder (`<root>/{train,test}/<class>/*.png`).

Lookup order for the named sets: `data_dir` (CLI `--data-dir`), `$ADVTUNE_DATA`, the user cache
(`$XDG_CACHE_HOME/advtune` or `~/.cache/advtune`), a `shared/data` folder beside the checkout, then
a download from the official mirrors with md5 verification into the first writable of those.

Layout: splits.py (TensorData, Dataset), loading.py (load_dataset and the lookup order), registry.py
(the named sets), formats.py (IDX, CIFAR, .npz, image folders), download.py (verified downloads),
synthetic.py.
"""

from .download import download_files, md5sum
from .formats import load_image_folder, load_npz, read_idx
from .loading import cache_dir, dataset_key, holds_dataset, load_dataset, search_roots
from .registry import DATASETS, SPECS, RemoteFile, Spec, list_datasets
from .splits import Dataset, TensorData, channel_stats, num_batches
from .synthetic import synthetic_blobs

__all__ = [
    "DATASETS",
    "SPECS",
    "Dataset",
    "RemoteFile",
    "Spec",
    "TensorData",
    "cache_dir",
    "channel_stats",
    "dataset_key",
    "holds_dataset",
    "download_files",
    "list_datasets",
    "load_dataset",
    "load_image_folder",
    "load_npz",
    "md5sum",
    "num_batches",
    "read_idx",
    "search_roots",
    "synthetic_blobs",
]
