"""Dataset readers, lookup, download verification and batching."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import pickle
import shutil
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
from advtune.data.splits import STD_FLOOR
from advtune.errors import AdvtuneError
from advtune.models import model_for

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
    with pytest.raises(AdvtuneError, match="fashion-mnist not found .*looked in.*data_dir"):
        load_dataset("fashion-mnist", download=False)


def test_a_named_data_dir_must_hold_the_dataset(isolated, tmp_path):
    """--data-dir never falls back silently to another folder (issue 11)."""
    with pytest.raises(AdvtuneError, match="data_dir .*nowhere does not exist"):
        load_dataset("fashion-mnist", isolated / "nowhere", download=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdvtuneError, match="data_dir .*empty does not hold fashion-mnist"):
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
    x = np.full((2, 4, 4), 0.5)
    x[0, 0, 0] = 1 + 1e-6  # a new-user walk: "(found 1e-06..1)" named no value outside the range
    np.savez(tmp_path / "over.npz", x_train=x, y_train=[0, 1], x_test=np.zeros((1, 4, 4)), y_test=[0])
    with pytest.raises(AdvtuneError, match=r"found 0.5..1.000001, 1 values outside\); scale them \(or np.clip"):
        load_dataset(str(tmp_path / "over.npz"))


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
    # unpacked whole into a private folder and renamed into place: nothing half-written, no scratch left behind
    left = sorted(p.name for p in (arch_root / "cifar10").iterdir())
    assert left == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    (arch_root / "cifar10" / "cifar-10-python.tar.gz").write_bytes(b"truncated")  # read back from the batches now
    assert torch.equal(load_dataset("cifar10", arch_root).train.x, ds.train.x)
    broken = isolated / "broken"
    (broken / "cifar10").mkdir(parents=True)
    (broken / "cifar10" / "cifar-10-python.tar.gz").write_bytes(b"truncated")
    with pytest.raises(AdvtuneError, match="corrupt or truncated"):
        load_dataset("cifar10", broken)
    assert [p.name for p in (broken / "cifar10").iterdir()] == ["cifar-10-python.tar.gz"]  # no half-made folder


def test_cifar_archive_is_unpacked_whole_or_not_at_all(isolated, monkeypatch):
    """Unpacked into a private folder and renamed into place: a failure halfway leaves nothing a reader would take
    for the batches, another process that finished first is success, and an unwritable folder is one line."""
    from advtune.data import formats

    src = isolated / "src" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    for i in range(1, 6):
        _cifar_batch(src / f"data_batch_{i}", 2, i)
    _cifar_batch(src / "test_batch", 2, 9)
    folder = isolated / "arch" / "cifar10"
    folder.mkdir(parents=True)
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    real = tarfile.TarFile.extractall

    def halfway(self, path, members=None, **kw):  # one batch written, then the disk fills
        real(self, path, members=members[:1], **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "extractall", halfway)
    with pytest.raises(AdvtuneError, match="No space left"):
        formats.extract_cifar(archive, folder)
    assert [p.name for p in folder.iterdir()] == ["cifar-10-python.tar.gz"]  # no half-written batches, no scratch

    def beaten(self, path, members=None, **kw):  # another process renames its copy into place meanwhile
        real(self, path, members=members, **kw)
        real(self, folder, members=members, **kw)

    monkeypatch.setattr(tarfile.TarFile, "extractall", beaten)
    formats.extract_cifar(archive, folder)  # the batches are there: success, not "corrupt"
    assert sorted(p.name for p in folder.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert len(load_dataset("cifar10", isolated / "arch").train) == 10
    monkeypatch.setattr(tarfile.TarFile, "extractall", real)
    (folder / "cifar-10-batches-py").rename(isolated / "moved")

    def unwritable(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(formats.tempfile, "mkdtemp", unwritable)
    with pytest.raises(AdvtuneError, match="cannot unpack .* \\(Permission denied\\); unpack it there yourself"):
        load_dataset("cifar10", isolated / "arch")


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


def test_own_npz_labels_are_class_numbers_0_to_k_minus_1(tmp_path, caplog):
    """An own-data audit: the class count was the largest label + 1 (labels 1..4 made an empty class 0, IDs a million
    classes, a label near 2^63 hung), one-hot labels were "the files belong to different sets", an empty test split
    loaded, binary uint8 images read as black, and a constant channel's std of 0 made the model's inputs infinite."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 4, 4), dtype=np.uint8)
    y = np.arange(8) % 2
    ok = {"x_train": x, "y_train": y, "x_test": x[:4], "y_test": y[:4]}

    def refused(match, **change):
        np.savez(tmp_path / "d.npz", **{**ok, **change})
        with pytest.raises(AdvtuneError, match=match):
            load_dataset(str(tmp_path / "d.npz"))

    refused(r"no image has class 0 of 0\.\.2; number the classes 0\.\.K-1", y_train=y + 1, y_test=y[:4] + 1)
    refused(r"has label 999999: number the classes", y_train=np.where(y == 1, 999_999, 0))
    refused(r"has label 92233720368547758\d\d: number the classes", y_train=np.full(8, 2**63 - 2, np.uint64))
    refused("holds one class", y_train=np.zeros(8, int), y_test=np.zeros(4, int))
    refused(r"one-hot\?\); store one class number per image: y_train = y_train.argmax\(1\)", y_train=np.eye(2)[y])
    refused(r"x_test holds no images", x_test=x[:0], y_test=y[:0])
    np.savez(tmp_path / "col.npz", **{**ok, "y_train": y[:, None]})  # a column of class numbers is read as one
    assert load_dataset(str(tmp_path / "col.npz")).train.y.tolist() == y.tolist()
    with caplog.at_level("WARNING"):
        np.savez(tmp_path / "bin.npz", **{**ok, "x_train": (x > 127).astype(np.uint8)})
        load_dataset(str(tmp_path / "bin.npz"))
    assert "every uint8 pixel is 0 or 1" in caplog.text
    rgba = rng.integers(0, 256, (8, 8, 8, 4), dtype=np.uint8)  # NHWC
    rgba[..., 3] = 255  # an opaque alpha channel: constant
    np.savez(tmp_path / "rgba.npz", **{**ok, "x_train": rgba, "x_test": rgba[:4]})
    ds = load_dataset(str(tmp_path / "rgba.npz"))
    assert ds.input_shape == (4, 8, 8) and ds.std[3] == STD_FLOOR and min(ds.std[:3]) > 0.1
    logits = model_for(ds, "small-cnn")(ds.train.to_float(ds.train.x))
    assert torch.isfinite(logits).all()


def test_npz_with_an_unusual_channel_count_finds_its_channels(tmp_path):
    """(N, 8, 8, 2) was read as 8 channels of 8x2 images without a word."""
    rng = np.random.default_rng(0)
    y = np.arange(8) % 2

    def read(x):
        np.savez(tmp_path / "c.npz", x_train=x, y_train=y, x_test=x[:4], y_test=y[:4])
        return load_dataset(str(tmp_path / "c.npz")).input_shape

    assert read(rng.integers(0, 256, (8, 6, 6, 2), dtype=np.uint8)) == (2, 6, 6)  # channels last
    assert read(rng.integers(0, 256, (8, 2, 6, 6), dtype=np.uint8)) == (2, 6, 6)  # channels first
    assert read(rng.integers(0, 256, (8, 6, 6, 3), dtype=np.uint8)) == (3, 6, 6)
    assert read(rng.integers(0, 256, (8, 2, 6, 5), dtype=np.uint8)) == (2, 6, 5)  # non-square NCHW, as before
    assert read(rng.integers(0, 256, (8, 6, 6, 10), dtype=np.uint8)) == (6, 6, 10)  # ambiguous: NCHW, as before


def test_a_limit_of_data_ordered_by_class_says_so(tmp_path, caplog):
    """The first --limit-test images of a file sorted by class are one or two classes: evaluated without a word."""
    x = np.random.default_rng(0).integers(0, 256, (400, 4, 4), dtype=np.uint8)
    y = np.repeat(np.arange(4), 100)
    np.savez(tmp_path / "sorted.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    with caplog.at_level("WARNING"):
        load_dataset(str(tmp_path / "sorted.npz"), limit=3, limit_test=40)  # 3: too few to judge (a job's peek)
    assert "the first 40 test examples hold 1 of its 4 classes (is the file ordered by class?)" in caplog.text
    assert "training examples" not in caplog.text


def test_image_folder_classes_order_and_depth(tmp_path):
    """Hidden folders were classes (labels shifted), test-only classes and unreadable-extension classes vanished,
    the first --limit images were the first class, 16-bit PNGs were clipped to white and the first image's mode
    turned colour images grey."""
    from PIL import Image

    root = tmp_path / "imgs"
    for split, n in (("train", 6), ("test", 4)):
        for ci, c in enumerate(("cat", "dog", "eel")):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((6, 6), 40 * ci + i, np.uint8)).save(root / split / c / f"{i}.png")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    ds = load_dataset(str(root), limit_test=6)
    assert ds.classes == ["cat", "dog", "eel"] and len(ds.test.y.unique()) == 3  # the first 6 hold every class
    assert load_dataset(str(root)).test.y.tolist()[:6] == ds.test.y.tolist()  # one fixed order, every time
    wide = np.full((6, 6), 32768, np.uint16)  # mid-grey in 16 bits
    Image.fromarray(wide).save(root / "train" / "cat" / "0.png")
    assert abs(int(load_dataset(str(root)).train.x.max()) - 128) <= 1 + 5  # scaled to 8 bits, not clipped to 255
    Image.fromarray(np.full((6, 6, 3), (200, 0, 0), np.uint8)).save(root / "train" / "dog" / "red.png")
    assert load_dataset(str(root)).input_shape == (3, 6, 6)  # one colour image: the folder is read as RGB
    (root / "test" / "fox").mkdir()
    with pytest.raises(AdvtuneError, match=r"test has classes train/ lacks \(fox\)"):
        load_dataset(str(root))
    (root / "test" / "fox").rmdir()
    (root / "train" / "gnu").mkdir()
    (root / "train" / "gnu" / "a.tif").write_bytes(b"")
    with pytest.raises(AdvtuneError, match=r"train/gnu holds no .* images \(skipped: \.tif\)"):
        load_dataset(str(root))


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
    # an interrupted download (a file missing): completed, where it was refused as "incomplete" before
    (target / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(AdvtuneError, match="is incomplete"):
        load_dataset("fashion-mnist", target, download=False)
    again = load_dataset("fashion-mnist", target, download=True, mirrors=(url,))
    assert again.test.y.tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()


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
        TensorData(torch.zeros(1, 1, 1, 1, dtype=torch.uint8), torch.zeros(1, dtype=torch.long)),
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
    with pytest.raises(AdvtuneError, match="val 0.001 of 200 training examples holds out none"):  # an audit: it
        load_dataset("synthetic", limit=200, val=0.001)  # trained on all 200 with no split and no word
    assert ident.split_validation(0) is ident  # none asked: none held out


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


def test_a_later_job_reads_the_data_as_the_model_was_trained_and_names_aliases():
    """A class folder added or removed after training shifted every label without a word; `--dataset fmnist` was
    recorded as a path (/cwd/fmnist), so every later job failed to find it."""
    from advtune.runs.common import dataset_of, dataset_spec

    assert dataset_spec("Fashion_MNIST") == dataset_spec("fmnist") == "fashion-mnist"
    assert dataset_spec("CIFAR-10") == "cifar10"
    config = {"run": {"dataset": "synthetic"}}
    assert dataset_of(config, {"num_classes": 4, "input_shape": [1, 16, 16]}, None, limit=8).num_classes == 4
    with pytest.raises(AdvtuneError, match=r"now reads as classes .* \(4\) of \(1, 16, 16\) images, and the model"):
        dataset_of(config, {"classes": ["a", "b", "c", "d"], "input_shape": [1, 16, 16]}, None, limit=8)
    with pytest.raises(AdvtuneError, match=r"and the model was trained on .* of \(1, 8, 8\)"):
        dataset_of(config, {"input_shape": [1, 8, 8]}, None, limit=8)
    with pytest.raises(AdvtuneError, match=r"now reads as classes .* \(4\)"):
        dataset_of(config, {"num_classes": 5}, None, limit=8)  # no class names recorded: the count


def test_moved_own_data_is_found_under_data_dir_and_api_labels_name_their_fix(tmp_path):
    """A run records its own data's absolute path: after a move, --data-dir was ignored for it and the error did not
    say how to point at the new place. The Python API told (N, 1) and one-hot labels to `pass y.long()`."""
    from advtune.inputs import as_tensor_data

    x = np.random.default_rng(0).integers(0, 256, (8, 4, 4), dtype=np.uint8)
    y = np.arange(8) % 2
    (tmp_path / "new").mkdir()
    np.savez(tmp_path / "new" / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    gone = str(tmp_path / "old" / "d.npz")
    with pytest.raises(AdvtuneError, match="data that moved: data_dir FOLDER holding it under the same name"):
        load_dataset(gone)
    assert len(load_dataset(gone, data_dir=str(tmp_path / "new")).train) == 8
    xs = torch.rand(4, 1, 4, 4)
    with pytest.raises(AdvtuneError, match=r"pass y.view\(-1\)"):
        as_tensor_data((xs, torch.zeros(4, 1, dtype=torch.long)))
    with pytest.raises(AdvtuneError, match=r"one-hot rows\? pass y.argmax\(1\)"):
        as_tensor_data((xs, torch.eye(2)[[0, 1, 0, 1]]))


def test_a_run_from_before_the_stricter_reader_reads_its_data_as_it_was_trained(tmp_path):
    """Runs trained before round 37 read a folder sorted by class with any hidden folder as a class, and an .npz
    with labels 1..K as K+1 classes: a later job reads the data as the model did (its recorded classes and order)."""
    from PIL import Image

    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for ci, c in enumerate(("cat", "dog")):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((4, 4), 60 * ci + i, np.uint8)).save(root / split / c / f"{i}.png")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    old = {"classes": [".ipynb_checkpoints", "cat", "dog"], "order": "sorted"}
    ds = load_dataset(str(root), as_trained=old)
    assert ds.classes == old["classes"] and ds.test.y.tolist() == [1, 1, 1, 2, 2, 2]
    assert sorted(load_dataset(str(root)).test.y.tolist()) == [0, 0, 0, 1, 1, 1]  # a new run: no hidden class
    x = np.random.default_rng(0).integers(0, 256, (6, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "one-based.npz", x_train=x, y_train=np.arange(6) % 2 + 1, x_test=x, y_test=np.arange(6) % 2 + 1)
    assert load_dataset(str(tmp_path / "one-based.npz"), as_trained={"classes": ["0", "1", "2"]}).num_classes == 3
    # what changed since is refused, not read under the old labels: a class renamed, added or removed
    (root / "train" / "dog").rename(root / "train" / "hound")
    with pytest.raises(AdvtuneError, match=r"now holds the classes \['cat', 'hound'\], and the model was trained on"):
        load_dataset(str(root), as_trained=old)
    np.savez(tmp_path / "fewer.npz", x_train=x, y_train=np.arange(6) % 2, x_test=x, y_test=np.arange(6) % 2)
    with pytest.raises(AdvtuneError, match="now holds labels up to 1, and the model was trained on 3 classes"):
        load_dataset(str(tmp_path / "fewer.npz"), as_trained={"classes": ["0", "1", "2"]})


def test_an_own_folder_named_like_a_builtin_set_is_not_swapped_for_it(tmp_path):
    """An alias recorded as a path (/cwd/fmnist) is read as the named set; a user's own folder that happens to be
    called mnist and has moved is not silently replaced by the real MNIST."""
    from advtune.runs.common import dataset_of

    meta = {"dataset": "mnist", "classes": [str(i) for i in range(10)], "input_shape": [1, 28, 28]}
    with pytest.raises(AdvtuneError, match="not found"):  # the moved own folder: named, not swapped
        dataset_of({"run": {"dataset": str(tmp_path / "mnist")}}, meta, None, limit=1)


def test_one_idx_set_is_never_read_as_the_other(isolated):
    """MNIST and Fashion-MNIST share their four file names: a --data-dir that is itself an MNIST folder read as
    fashion-mnist (digits with Fashion's class names, recorded as fashion-mnist). The training labels say which set
    the files are: MNIST's .gz by its md5, a decompressed copy by its first labels."""
    folder = isolated / "digits"
    write_fake_mnist(folder)
    labels = np.array([5, 0, 4, 1, 9, 2, 1, 3, 1, 4] * 5)  # MNIST's first ten training labels, decompressed
    write_idx(folder / "train-labels-idx1-ubyte", labels, compress=False)
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(AdvtuneError, match=r"holds mnist's files, not fashion-mnist's .* <dir>/fashion-mnist/"):
        load_dataset("fashion-mnist", folder)
    assert load_dataset("mnist", folder).train.y[:10].tolist() == labels[:10].tolist()
    if (SHARED / "mnist" / "train-labels-idx1-ubyte.gz").is_file():  # the real .gz, known by its md5
        with pytest.raises(AdvtuneError, match="holds mnist's files, not fashion-mnist's"):
            load_dataset("fashion-mnist", SHARED / "mnist", limit=10)
    fashion = isolated / "clothes"  # and the reverse: a decompressed Fashion-MNIST folder is no MNIST
    write_fake_mnist(fashion)
    write_idx(fashion / "train-labels-idx1-ubyte", np.array([9, 0, 0, 3, 0, 2, 7, 2, 5, 5] * 5), compress=False)
    (fashion / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(AdvtuneError, match="holds fashion-mnist's files, not mnist's"):
        load_dataset("mnist", fashion)


def test_a_folder_of_the_other_idx_set_does_not_stop_the_search(isolated, monkeypatch):
    """The identity check stopped the lookup at the first place holding the other set, before a later place (the
    cache) that held the right one; and completing an "interrupted download" would replace the other set's files."""
    flat = isolated / "flat"
    write_fake_mnist(flat)
    write_idx(flat / "train-labels-idx1-ubyte", np.array([5, 0, 4, 1, 9, 2, 1, 3, 1, 4] * 5), compress=False)
    (flat / "train-labels-idx1-ubyte.gz").unlink()  # MNIST, held directly in $ADVTUNE_DATA
    monkeypatch.setenv("ADVTUNE_DATA", str(flat))
    arrays = write_fake_mnist(isolated / "cache" / "advtune" / "fashion-mnist", seed=3)
    ds = load_dataset("fashion-mnist", download=False)
    assert ds.train.y.tolist() == arrays["train-labels-idx1-ubyte.gz"].tolist()
    (isolated / "cache" / "advtune" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(AdvtuneError, match="fashion-mnist is incomplete: .* lacks t10k-labels"):  # what to mend
        load_dataset("fashion-mnist", download=False)
    shutil.rmtree(isolated / "cache" / "advtune" / "fashion-mnist")
    with pytest.raises(AdvtuneError, match="holds mnist's files, not fashion-mnist's"):  # nothing else holds it
        load_dataset("fashion-mnist", download=False)
    # a download never goes into a folder holding the other set (it replaces every file of another md5)
    (isolated / "named" / "fashion-mnist").mkdir(parents=True)
    for f in flat.iterdir():
        (isolated / "named" / "fashion-mnist" / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(data.loading, "download_files", lambda *a: pytest.fail("downloaded over MNIST's files"))
    monkeypatch.setenv("ADVTUNE_DATA", str(isolated / "named"))
    with pytest.raises(AdvtuneError, match="holds mnist's files, not fashion-mnist's"):
        load_dataset("fashion-mnist", download=True)
    partial = isolated / "mine"  # three of MNIST's four files, the real .gz where there is one
    write_fake_mnist(partial)
    (partial / "t10k-images-idx3-ubyte.gz").unlink()
    if (SHARED / "mnist" / "train-labels-idx1-ubyte.gz").is_file():
        (partial / "train-labels-idx1-ubyte.gz").write_bytes(
            (SHARED / "mnist" / "train-labels-idx1-ubyte.gz").read_bytes()
        )
        with pytest.raises(AdvtuneError, match="holds mnist's files, not fashion-mnist's"):
            load_dataset("fashion-mnist", partial, download=True)


def test_a_recorded_data_folder_that_holds_the_set_gives_its_own_errors(isolated):
    """The fallback from a run's recorded data folder caught every error: a --val too large for the data was reported
    as "the folder does not serve", and the search (and a download) went on."""
    from advtune.runs.common import dataset_of

    write_fake_mnist(isolated / "rec" / "mnist", n_train=30)
    config = {"run": {"dataset": "mnist", "data_dir": str(isolated / "rec")}}
    with pytest.raises(AdvtuneError, match="leaves no training data"):
        dataset_of(config, {"num_classes": 10, "input_shape": [1, 28, 28]}, None, val=100)


def test_npz_classes_are_the_training_splits_and_labels_match_images(tmp_path):
    """A class only the test split had was accepted (never learnt, always failed); empty labels beside images gave a
    numpy traceback."""
    x = np.zeros((6, 8, 8), np.uint8)
    only_test = tmp_path / "only-test.npz"
    np.savez(only_test, x_train=x, y_train=np.array([0, 1] * 3), x_test=x[:3], y_test=np.array([0, 1, 2]))
    with pytest.raises(AdvtuneError, match=r"y_test has class 2, which no training image has \(y_train: 0\.\.1\)"):
        load_dataset(str(only_test))
    one_in_train = tmp_path / "one-train.npz"
    np.savez(one_in_train, x_train=x, y_train=np.zeros(6, np.int64), x_test=x[:2], y_test=np.array([0, 1]))
    with pytest.raises(AdvtuneError, match="y_train holds one class"):
        load_dataset(str(one_in_train))
    no_labels = tmp_path / "no-labels.npz"
    np.savez(no_labels, x_train=x, y_train=np.zeros(0, np.int64), x_test=x[:2], y_test=np.array([0, 1]))
    with pytest.raises(AdvtuneError, match="x_train holds 6 images and y_train 0 labels"):
        load_dataset(str(no_labels))


def test_an_image_folder_needs_two_classes_and_tiny_colour_images_keep_their_layout(tmp_path):
    from PIL import Image

    def folder(name: str, classes: tuple[str, ...], shape: tuple[int, ...]) -> Path:
        for split in ("train", "test"):
            for c in classes:
                (tmp_path / name / split / c).mkdir(parents=True)
                for i in range(2):
                    Image.fromarray(np.full(shape, 60 * i, np.uint8)).save(tmp_path / name / split / c / f"{i}.png")
        return tmp_path / name

    with pytest.raises(AdvtuneError, match=r"train holds one class folder \(cat\); a classifier needs at least two"):
        load_dataset(str(folder("one", ("cat",), (8, 8))))
    tiny = load_dataset(str(folder("tiny", ("a", "b"), (3, 5, 3))))  # 3 rows of 5 RGB pixels: H looked like channels
    assert tiny.input_shape == (3, 3, 5)


def test_downloads_are_forbidden_by_a_yes_only(isolated, monkeypatch):
    """ADVTUNE_NO_DOWNLOAD=0 forbade downloads too (any non-empty value did)."""
    tried = []
    monkeypatch.setattr(data.loading, "download_files", lambda spec, target, mirrors: tried.append(target))
    for value, allowed in (("1", False), ("true", False), ("y", False), ("0", True), ("", True), ("no", True)):
        monkeypatch.setenv("ADVTUNE_NO_DOWNLOAD", value)
        tried.clear()
        with pytest.raises(AdvtuneError):  # nothing is there, downloaded or not
            load_dataset("mnist", isolated / "empty")
        assert bool(tried) == allowed, value


def test_a_runs_recorded_data_folder_that_moved_falls_back_to_the_usual_places(isolated, monkeypatch, caplog):
    """The docs promise the recorded folder, then the usual places; a folder that was gone stopped every job on the
    run with an error naming a --data-dir the user never gave."""
    from advtune.runs.common import dataset_of

    monkeypatch.setenv("ADVTUNE_DATA", str(isolated / "elsewhere"))
    write_fake_mnist(isolated / "elsewhere" / "mnist")
    config = {"run": {"dataset": "mnist", "data_dir": str(isolated / "gone")}}
    with caplog.at_level("WARNING"):
        ds = dataset_of(config, {"num_classes": 10, "input_shape": [1, 28, 28]}, None, limit=8)
    assert len(ds.train) == 8 and "recorded data folder" in caplog.text and "no longer holds it" in caplog.text
    assert not (isolated / "gone").exists()  # nothing downloaded into (or created at) the vanished folder


def test_an_image_folder_that_gained_images_since_its_base_is_said(tmp_path, caplog):
    """An audit: a folder's fixed reading order is drawn over its image count, so one image added reshuffled it and a
    later --limit or held-out split took images the base trained on, without a word. The count is recorded and
    compared."""
    import logging

    from PIL import Image

    from advtune.runs.common import dataset_of

    root = tmp_path / "imgs"
    for split, n in (("train", 30), ("test", 2)):
        for ci, c in enumerate(("cat", "dog")):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((4, 4), 60 * ci + i, np.uint8)).save(root / split / c / f"{i}.png")
    recorded = load_dataset(str(root), limit=40).describe()
    assert recorded["images"] == 60 and recorded["train"] == 40  # the folder's count, not the limit's
    config, meta = {"run": {"dataset": str(root)}, "dataset": recorded}, {"classes": ["cat", "dog"]}
    with caplog.at_level(logging.WARNING, logger="advtune.runs.common"):
        dataset_of(config, meta, None)
        assert not caplog.records  # unchanged: nothing to say
        Image.fromarray(np.full((4, 4), 7, np.uint8)).save(root / "train" / "dog" / "new.png")
        dataset_of(config, meta, None)
    assert "holds 61 training images now, 60 when the base was trained" in caplog.text


def test_a_named_sets_file_with_another_sets_images_is_refused(isolated):
    """An audit: a (40, 28, 28) file named cifar10.npz was read as CIFAR-10 (1x28x28 images under CIFAR-10's
    3-channel mean and std); an IDX set of other sizes likewise."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), np.arange(40) % 10
    (isolated / "cifar10").mkdir()
    np.savez(isolated / "cifar10" / "cifar10.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    with pytest.raises(AdvtuneError, match=r"cifar10\.npz holds 1x28x28 images, not cifar10's 3x32x32"):
        load_dataset("cifar10", isolated)
    folder = isolated / "fashion-mnist"
    folder.mkdir()
    for name, arr in (
        ("train-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 16, 16))),
        ("train-labels-idx1-ubyte.gz", np.arange(30) % 10),
        ("t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (10, 16, 16))),
        ("t10k-labels-idx1-ubyte.gz", np.arange(10)),
    ):
        write_idx(folder / name, arr)
    with pytest.raises(AdvtuneError, match="holds 1x16x16 images, not fashion-mnist's 1x28x28"):
        load_dataset("fashion-mnist", isolated)


def test_a_foreign_cifar_batch_is_one_line(isolated):
    """An audit: a pickled list gave a raw AttributeError, and int64 pixels were wrapped into uint8 (300 -> 44)."""
    folder = isolated / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        _cifar_batch(folder / f"data_batch_{i}", 2, i)
    _cifar_batch(folder / "test_batch", 2, 9)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump([1, 2, 3], f, protocol=2)
    with pytest.raises(AdvtuneError, match="data_batch_1 holds a list, not a CIFAR-10 batch"):
        load_dataset("cifar10", isolated)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"labels": [0, 1], b"data": np.full((2, 3072), 300, np.int64)}, f, protocol=2)
    with pytest.raises(AdvtuneError, match="data_batch_1: CIFAR-10 pixels are uint8, got int64"):
        load_dataset("cifar10", isolated)


def test_train_resume_refuses_an_image_folder_that_changed(tmp_path, capsys):
    """A review: `train --resume` read a folder that gained an image since in its new order, so the checkpoint's
    batch positions and the --val split indexed other images."""
    from PIL import Image

    from advtune.cli import main

    root = tmp_path / "imgs"
    for split, n in (("train", 20), ("test", 3)):
        for ci, c in enumerate(("cat", "dog")):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((16, 16), 90 * ci + i, np.uint8)).save(root / split / c / f"{i}.png")
    argv = ["train", "--dataset", str(root), "--model", "small-cnn", "--epochs", "1", "--batch-size", "8"]
    argv += ["--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 0
    assert main([*argv, "--resume"]) == 0  # unchanged: resumes (finished: records again)
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(root / "train" / "dog" / "new.png")
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds 41 training images now, 40 when this run started" in err and len(err.strip().splitlines()) == 1


def test_a_folder_without_train_and_test_says_so(tmp_path):
    """A new-user walk: `--dataset imgs/train` (the folder exists) said "not found"."""
    (tmp_path / "imgs" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "test").mkdir()
    with pytest.raises(AdvtuneError, match=r"has no train/ and test/ subfolders .*; give .*imgs \(it holds train/\)"):
        load_dataset(str(tmp_path / "imgs" / "train"))


def test_a_dataset_prints_its_shape_not_its_pixels():
    """A new-user walk: print(ds) dumped about 5.6k characters of raw uint8 tensors."""
    ds = load_dataset("synthetic", limit=100, val=10)
    assert repr(ds) == "Dataset('synthetic', train=90, test=500, val=10, input_shape=(1, 16, 16), classes=4)"
    assert repr(ds.train) == "TensorData(90 x (1, 16, 16) uint8)"
    from dataclasses import replace

    assert "test=None" in repr(replace(ds, test=None))  # harden's in-memory dataset without test data
