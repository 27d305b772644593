"""Dataset readers, lookup, download verification and batching."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import pickle
import struct
import tarfile
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from advtune import data
from advtune.data import TensorData, load_dataset
from advtune.errors import AdvtuneError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_idx(path: Path, arr: np.ndarray, compress: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_fake_mnist(folder: Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test),
    }
    for name, arr in arrays.items():
        write_idx(folder / name, arr)
    return arrays


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No user cache or ADVTUNE_DATA leaks into the lookup."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ADVTUNE_DATA", raising=False)
    return tmp_path


def test_fashion_mnist_reads_idx_files_the_test_wrote(isolated):
    arrays = write_fake_mnist(isolated / "fashion-mnist")
    ds = load_dataset("fashion-mnist", isolated)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and ds.classes[0] == "T-shirt/top"
    assert torch.equal(ds.train.x[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte.gz"].astype(np.uint8)))
    assert ds.test.y.tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()
    assert ds.train.x.dtype == torch.uint8


def test_uncompressed_idx_and_env_var_lookup(isolated, monkeypatch):
    folder = isolated / "env" / "fashion-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, arr in (
        ("train-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28))),
        ("train-labels-idx1-ubyte", rng.integers(0, 10, 5)),
        ("t10k-images-idx3-ubyte", rng.integers(0, 256, (3, 28, 28))),
        ("t10k-labels-idx1-ubyte", rng.integers(0, 10, 3)),
    ):
        write_idx(folder / name, arr, compress=False)
    monkeypatch.setenv("ADVTUNE_DATA", str(isolated / "env"))
    ds = load_dataset("fashion-mnist")
    assert len(ds.train) == 5 and len(ds.test) == 3


def test_corrupt_gz_is_refused(isolated):
    write_fake_mnist(isolated / "fashion-mnist")
    (isolated / "fashion-mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(AdvtuneError, match="corrupt or truncated"):
        load_dataset("fashion-mnist", isolated)


def test_truncated_gz_is_refused(isolated):
    write_fake_mnist(isolated / "fashion-mnist")
    p = isolated / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(AdvtuneError, match="corrupt or truncated"):
        load_dataset("fashion-mnist", isolated)


def test_idx_with_short_payload_is_refused(isolated):
    write_fake_mnist(isolated / "fashion-mnist")
    p = isolated / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[:-100]))  # a valid gzip of a truncated IDX
    with pytest.raises(AdvtuneError, match="truncated or padded"):
        load_dataset("fashion-mnist", isolated)


def test_label_count_mismatch_is_refused(isolated):
    write_fake_mnist(isolated / "fashion-mnist")
    write_idx(isolated / "fashion-mnist" / "train-labels-idx1-ubyte.gz", np.zeros(49))
    with pytest.raises(AdvtuneError, match="50 images but .* has 49 labels"):
        load_dataset("fashion-mnist", isolated)


def test_incomplete_folder_names_the_missing_file(isolated):
    write_fake_mnist(isolated / "fashion-mnist")
    (isolated / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(AdvtuneError, match="incomplete: .*fashion-mnist lacks t10k-labels-idx1-ubyte.gz"):
        load_dataset("fashion-mnist", isolated)


def test_missing_dataset_says_where_it_looked(isolated):
    with pytest.raises(AdvtuneError, match="fashion-mnist not found .*looked in.*--data-dir"):
        load_dataset("fashion-mnist", download=False)


def test_a_named_data_dir_must_hold_the_dataset(isolated, tmp_path):
    """--data-dir never falls back silently to another folder (issue 11)."""
    with pytest.raises(AdvtuneError, match="--data-dir .*nowhere does not exist"):
        load_dataset("fashion-mnist", isolated / "nowhere", download=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdvtuneError, match="--data-dir .*empty does not hold fashion-mnist"):
        load_dataset("fashion-mnist", empty, download=False)
    part = tmp_path / "part" / "fashion-mnist"
    part.mkdir(parents=True)
    (part / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(AdvtuneError, match="incomplete"):
        load_dataset("fashion-mnist", tmp_path / "part", download=False)


def test_npz_refuses_float_labels_and_nan_pixels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((8, 4, 4)).astype(np.float32)
    ok = {"x_train": x, "y_train": np.arange(8) % 2, "x_test": x, "y_test": np.arange(8) % 2}
    np.savez(tmp_path / "a.npz", **{**ok, "y_train": (np.arange(8) % 2) + 0.5})
    with pytest.raises(AdvtuneError, match="non-integer labels"):
        load_dataset(str(tmp_path / "a.npz"))
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    np.savez(tmp_path / "b.npz", **{**ok, "x_test": bad})
    with pytest.raises(AdvtuneError, match="NaN or infinite pixels"):
        load_dataset(str(tmp_path / "b.npz"))
    np.savez(tmp_path / "c.npz", **{**ok, "y_train": (np.arange(8) % 2).astype(np.float64)})  # whole floats are fine
    assert load_dataset(str(tmp_path / "c.npz")).train.y.dtype == torch.long


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(AdvtuneError, match="unknown dataset 'imagenet'; valid: mnist, fashion-mnist, cifar10"):
        load_dataset("imagenet")


def test_npz_layouts_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "mine.npz"
    np.savez(
        p,
        x_train=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8),
        y_train=rng.integers(0, 3, 12),
        x_test=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8),
        y_test=np.array([0, 1, 2, 2]),
    )
    ds = load_dataset(str(p))
    assert ds.input_shape == (3, 8, 8) and ds.num_classes == 3 and len(ds.train) == 12
    np.savez(tmp_path / "nokeys.npz", x_train=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(AdvtuneError, match="lacks arrays y_train, x_test, y_test"):
        load_dataset(str(tmp_path / "nokeys.npz"))
    (tmp_path / "broken.npz").write_bytes(p.read_bytes()[:200])
    with pytest.raises(AdvtuneError, match="corrupt or truncated"):
        load_dataset(str(tmp_path / "broken.npz"))
    np.savez(
        tmp_path / "float.npz", x_train=np.full((2, 4, 4), 3.0), y_train=[0, 1], x_test=np.zeros((1, 4, 4)), y_test=[0]
    )
    with pytest.raises(AdvtuneError, match=r"float images must lie in \[0,1\]"):
        load_dataset(str(tmp_path / "float.npz"))


def _cifar_batch(path: Path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    y = rng.integers(0, 10, n).tolist()
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"fake", b"labels": y, b"data": x, b"filenames": [b"a"] * n}, f, protocol=2)
    return x, y


def test_cifar_python_batches_and_archive(isolated):
    folder = isolated / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    made = [_cifar_batch(folder / f"data_batch_{i}", 6, i) for i in range(1, 6)]
    xt, yt = _cifar_batch(folder / "test_batch", 4, 9)
    ds = load_dataset("cifar10", isolated)
    assert len(ds.train) == 30 and ds.input_shape == (3, 32, 32) and ds.classes[0] == "airplane"
    assert torch.equal(ds.test.x, torch.from_numpy(xt.reshape(-1, 3, 32, 32)))
    assert ds.train.y[:6].tolist() == made[0][1]
    # the same batches as the downloaded archive: extracted on first use
    arch_root = isolated / "arch"
    (arch_root / "cifar10").mkdir(parents=True)
    with tarfile.open(arch_root / "cifar10" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    ds2 = load_dataset("cifar10", arch_root)
    assert torch.equal(ds2.train.x, ds.train.x)


def test_cifar_pickle_that_runs_code_is_refused(isolated):
    folder = isolated / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        _cifar_batch(folder / f"data_batch_{i}", 2, i)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2))
    with pytest.raises(AdvtuneError, match="refusing to load .*print"):
        load_dataset("cifar10", isolated)


def test_image_folder(tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("test", 2)):
        for c in ("cat", "dog"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / split / c / f"{i}.png")
    ds = load_dataset(str(tmp_path / "imgs"))
    assert ds.classes == ["cat", "dog"] and ds.input_shape == (3, 10, 12) and len(ds.train) == 6 and len(ds.test) == 4
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "imgs" / "test" / "dog" / "odd.png")
    with pytest.raises(AdvtuneError, match="resize all images to one size"):
        load_dataset(str(tmp_path / "imgs"))


# ---------------------------------------------------------------- download


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/'served' on 127.0.0.1 (a mirror for the download tests)."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _spec_for(folder: Path, base: data.Spec, corrupt: str | None = None) -> data.Spec:
    files = tuple(
        data.RemoteFile(
            f.name, "0" * 32 if f.name == corrupt else hashlib.md5((folder / f.name).read_bytes()).hexdigest()
        )
        for f in base.files
    )
    return replace(base, files=files)


def test_download_verifies_checksums(isolated, http_server, monkeypatch):
    served, url = http_server
    arrays = write_fake_mnist(served)
    monkeypatch.setitem(data.SPECS, "fashion-mnist", _spec_for(served, data.SPECS["fashion-mnist"]))
    target = isolated / "dl"
    ds = load_dataset("fashion-mnist", target, download=True, mirrors=(url,))
    assert ds.train.y.tolist() == arrays["train-labels-idx1-ubyte.gz"].tolist()
    assert sorted(p.name for p in (target / "fashion-mnist").iterdir()) == sorted(arrays)


def test_download_checksum_mismatch_is_refused_and_leaves_no_file(isolated, http_server, monkeypatch):
    served, url = http_server
    write_fake_mnist(served)
    bad = "t10k-images-idx3-ubyte.gz"
    monkeypatch.setitem(data.SPECS, "fashion-mnist", _spec_for(served, data.SPECS["fashion-mnist"], corrupt=bad))
    target = isolated / "dl"
    with pytest.raises(AdvtuneError, match="checksum mismatch .*t10k-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", target, download=True, mirrors=(url,))
    left = sorted(p.name for p in (target / "fashion-mnist").iterdir())
    assert bad not in left and not any(n.endswith(".part") for n in left)


def test_download_unreachable_mirror_gives_one_line(isolated, monkeypatch):
    with pytest.raises(AdvtuneError, match="could not download.*ADVTUNE_DATA"):
        data.download_files(data.SPECS["fashion-mnist"], isolated / "x", mirrors=("http://127.0.0.1:9/",), timeout=2)


# ---------------------------------------------------------------- batching


def test_batches_seeded_complete_and_resumable():
    td = TensorData(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1), torch.arange(100))
    a = [y for _, y in td.batches(16, shuffle=True, generator=torch.Generator().manual_seed(3))]
    b = [y for _, y in td.batches(16, shuffle=True, generator=torch.Generator().manual_seed(3))]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert sorted(torch.cat(a).tolist()) == list(range(100))
    skipped = [y for _, y in td.batches(16, shuffle=True, generator=torch.Generator().manual_seed(3), start=2)]
    assert all(torch.equal(u, v) for u, v in zip(a[2:], skipped)) and len(skipped) == len(a) - 2
    x, _ = next(iter(td.batches(4)))
    assert (
        x.dtype == torch.float32
        and float(x.max()) <= 1.0
        and torch.allclose(x.flatten(), torch.tensor([0, 1, 2, 3]) / 255)
    )


def test_batches_shard_across_ranks():
    td = TensorData(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10))
    shards = [
        torch.cat(
            [
                y
                for _, y in td.batches(
                    3, shuffle=True, generator=torch.Generator().manual_seed(0), rank=r, world_size=2
                )
            ]
        )
        for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 5 and not set(shards[0].tolist()) & set(shards[1].tolist())


def test_validation_split_and_limit():
    ds = load_dataset("synthetic", limit=300, limit_test=50, val=0.2, seed=1)
    assert len(ds.train) == 240 and len(ds.val) == 60 and len(ds.test) == 50
    ident = data.Dataset(
        "ids",
        TensorData(torch.zeros(50, 1, 1, 1, dtype=torch.uint8), torch.arange(50)),
        TensorData(torch.zeros(1, 1, 1, 1, dtype=torch.uint8), torch.zeros(1)),
        ["a"],
        (0.5,),
        (0.5,),
    )
    split = ident.split_validation(10, seed=4)
    tr, va = set(split.train.y.tolist()), set(split.val.y.tolist())
    assert len(va) == 10 and not tr & va and tr | va == set(range(50))
    assert split.val.y.tolist() == ident.split_validation(10, seed=4).val.y.tolist()
    with pytest.raises(AdvtuneError, match="leaves no training data"):
        load_dataset("synthetic", val=5000)


# ---------------------------------------------------------------- the real files beside the checkout


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="../shared/data/mnist not present")
def test_real_mnist_found_beside_checkout(isolated):
    ds = load_dataset("mnist")
    assert (len(ds.train), len(ds.test)) == (60000, 10000) and ds.input_shape == (1, 28, 28)
    assert ds.train.y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "cifar10").is_dir(), reason="../shared/data/cifar10 not present")
def test_real_cifar10_npz_layout(isolated):
    ds = load_dataset("cifar10", limit=100, limit_test=10)
    assert ds.input_shape == (3, 32, 32) and ds.train.y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert ds.test.y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


def test_a_run_fine_tuned_from_a_custom_data_folder_finds_it_again(isolated, monkeypatch):
    """train --data-dir X, then finetune (no --data-dir: the base's is used), then evaluate the fine-tuned run: its
    record has no --data-dir of its own, and the evaluation searched the default places only (and tried a
    download). It now reads the folder its dataset came from."""
    from advtune.cli import main

    monkeypatch.chdir(isolated)
    write_fake_mnist(isolated / "mine" / "fashion-mnist", n_train=64, n_test=16)
    std, ft = isolated / "std", isolated / "ft"
    train = ["train", "--dataset", "fashion-mnist", "--data-dir", str(isolated / "mine"), "--model", "small-cnn"]
    assert main([*train, "--epochs", "1", "--batch-size", "32", "--out", str(std), "--quiet"]) == 0
    finetune = ["finetune", str(std), "--eps", "0.1", "--attack", "fgsm", "--epochs", "1", "--batch-size", "32"]
    assert main([*finetune, "--monitor-test", "0", "--out", str(ft), "--quiet"]) == 0
    assert json.loads((ft / "config.json").read_text())["run"]["data_dir"] is None  # the base's folder was used
    assert main(["evaluate", str(ft), "--eps", "0.1", "--attacks", "fgsm", "--name", "e", "--quiet"]) == 0
    assert json.loads((ft / "eval-e.json").read_text())["examples"] == 16
