"""Fashion-MNIST (METHOD §6): the IDX reader, where the files are looked for, stratified seeded
subsets, every bad-file case, and the real Debian files when they are installed.

Nothing here downloads: torchvision's ``FashionMNIST`` is replaced by a stub in every test, and
conftest refuses network connections anyway.
"""

from __future__ import annotations

import gzip
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from backfill_lib import data as data_mod
from backfill_lib.data import (FASHION_MNIST_CLASSES, DataNotFoundError, find_fashion_mnist, load_dataset, read_idx,
                               stratified_subset)
from fake_fashion_mnist import NAMES, fake_split, idx_bytes, write_bytes, write_fake_fashion_mnist

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


class DownloadStub:
    """Stands in for ``torchvision.datasets.FashionMNIST``; ``action`` says what a "download" does."""

    calls: list = []
    action = None  # None: the test fails (nothing may download); else a callable(root, train)

    def __init__(self, root, train=True, download=False, **kwargs):
        DownloadStub.calls.append((Path(root), train, download))
        if DownloadStub.action is None:
            raise AssertionError("a test asked torchvision to download Fashion-MNIST")
        DownloadStub.action(Path(root), train)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """``$BACKFILL_DATA`` and Debian's folder point into ``tmp_path`` (both empty); no download."""
    monkeypatch.setenv("BACKFILL_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", DownloadStub)
    monkeypatch.setattr(DownloadStub, "calls", [])
    monkeypatch.setattr(DownloadStub, "action", None)
    return tmp_path


def _standardised(raw_images, mean, std):
    return (torch.as_tensor(raw_images, dtype=torch.float32)[:, None] / 255 - mean) / std


class TestReadIdx:
    @pytest.mark.parametrize("gz", [False, True])
    @pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
    def test_round_trip(self, tmp_path, gz, dtype):
        array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
        if dtype == np.uint8:
            array = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
        path = write_bytes(tmp_path / "a-idx3", idx_bytes(array), gz)
        out = read_idx(path)
        assert out.dtype == np.dtype(dtype) and out.dtype.isnative and out.shape == (2, 3, 5)
        np.testing.assert_array_equal(out, array)

    def test_fake_files_have_the_real_header(self, tmp_path):
        written = write_fake_fashion_mnist(tmp_path, n_train=30, n_test=20, gz=True)
        raw = gzip.decompress(written["paths"]["train-images-idx3-ubyte"].read_bytes())
        assert raw[:16] == bytes.fromhex("00000803" "0000001e" "0000001c" "0000001c")  # 30 × 28 × 28
        assert len(raw) == 16 + 30 * 28 * 28
        raw = gzip.decompress(written["paths"]["t10k-labels-idx1-ubyte"].read_bytes())
        assert raw[:8] == bytes.fromhex("00000801" "00000014") and len(raw) == 8 + 20

    def test_gzip_is_recognised_by_content_not_name(self, tmp_path):
        array = np.arange(6, dtype=np.uint8)
        path = tmp_path / "labels-without-suffix"
        path.write_bytes(gzip.compress(idx_bytes(array)))
        np.testing.assert_array_equal(read_idx(path), array)

    def test_missing_file(self, tmp_path):
        with pytest.raises(DataNotFoundError, match=r"IDX file .*nothere does not exist"):
            read_idx(tmp_path / "nothere")

    @pytest.mark.parametrize("payload,match", [
        (b"", r"0 bytes, too short for an IDX header"),
        (b"\x00\x00\x08", r"3 bytes, too short for an IDX header"),
        (b"\x89PNG\r\n\x1a\n" + bytes(40), r"not an IDX file \(magic number 0x89504e47"),
        (b"\x00\x00\x07\x01" + bytes(8), r"not an IDX file \(magic number 0x00000701"),  # unknown type code
        (b"\x00\x00\x08\x00" + bytes(8), r"not an IDX file \(magic number 0x00000800"),  # no dimensions
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", r"announces 3 dimensions but the file ends after 8 bytes"),
        (idx_bytes(np.zeros((4, 3), np.uint8))[:-1], r"shape \(4, 3\) \(12 bytes of data\) but the file holds 11 "
                                                     r"bytes \(truncated file\)"),
        (idx_bytes(np.zeros((4, 3), np.uint8)) + b"\x00", r"holds 13 bytes \(extra bytes after the data\)"),
        (idx_bytes(np.zeros((2,), np.int32))[:-2], r"\(8 bytes of data\) but the file holds 6 bytes"),
    ])
    @pytest.mark.parametrize("gz", [False, True])
    def test_bad_files_are_named(self, tmp_path, payload, match, gz):
        path = write_bytes(tmp_path / "bad-idx", payload, gz)
        with pytest.raises(ValueError, match=match) as info:
            read_idx(path)
        assert str(path) in str(info.value)

    def test_truncated_gzip(self, tmp_path):
        full = gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8)))
        path = tmp_path / "cut.gz"
        path.write_bytes(full[: len(full) // 2])
        with pytest.raises(ValueError, match=r"cut.gz: the gzip stream ends early \(truncated file\)"):
            read_idx(path)

    def test_corrupt_gzip(self, tmp_path):
        path = tmp_path / "corrupt.gz"
        path.write_bytes(b"\x1f\x8b" + bytes(30))
        with pytest.raises(ValueError, match=r"corrupt.gz: not a valid gzip file"):
            read_idx(path)


class TestStratifiedSubset:
    def test_sizes_shares_and_seed(self):
        labels = np.repeat(np.arange(4), [50, 30, 15, 5])
        idx = stratified_subset(labels, 20, seed=3)
        assert len(idx) == 20 and np.all(np.diff(idx) > 0)
        np.testing.assert_array_equal(np.bincount(labels[idx], minlength=4), [10, 6, 3, 1])
        np.testing.assert_array_equal(idx, stratified_subset(labels, 20, seed=3))
        assert not np.array_equal(idx, stratified_subset(labels, 20, seed=4))

    def test_largest_remainders_get_the_extra_items(self):
        labels = np.repeat(np.arange(3), [4, 3, 3])  # shares of 5 items: 2.0, 1.5, 1.5
        counts = np.bincount(labels[stratified_subset(labels, 5, seed=0)], minlength=3)
        np.testing.assert_array_equal(counts, [2, 2, 1])  # tie between 1 and 2 goes to the lower class

    def test_all_items(self):
        labels = np.array([2, 0, 1, 1])
        np.testing.assert_array_equal(stratified_subset(labels, None), np.arange(4))
        np.testing.assert_array_equal(stratified_subset(labels, 4, seed=9), np.arange(4))

    def test_smaller_subset_lies_inside_larger(self):
        labels = np.arange(1000) % 10
        small, large = stratified_subset(labels, 100, seed=1), stratified_subset(labels, 300, seed=1)
        assert set(small) <= set(large)

    def test_bad_sizes(self):
        labels = np.arange(10) % 2
        with pytest.raises(ValueError, match=r"n must be at most the number of items \(10\), got 11"):
            stratified_subset(labels, 11)
        with pytest.raises(ValueError, match="n must be a positive integer"):
            stratified_subset(labels, 0)
        with pytest.raises(TypeError, match="n must be a positive integer"):
            stratified_subset(labels, 2.5)


class TestLoadFake:
    @pytest.mark.parametrize("gz,layout", [(True, "flat"), (False, "flat"), (True, "torchvision"),
                                           (False, "torchvision")])
    def test_happy_path(self, env, gz, layout):
        written = write_fake_fashion_mnist(env / "data", n_train=200, n_test=100, gz=gz, layout=layout)
        d = load_dataset("fashion_mnist", n_train=None, n_test=None)
        assert d.name == "fashion_mnist" and d.num_classes == 10 and d.old_classes == (0, 1, 2, 3, 4)
        assert d.input_shape == (1, 28, 28) and d.train_plain is d.train
        assert d.info["root"] == str(written["folder"])
        (xtr, ytr), (xte, yte) = written["train"], written["test"]
        np.testing.assert_array_equal(d.train_labels, ytr)
        np.testing.assert_array_equal(d.test_labels, yte)
        assert d.train_labels.dtype == np.int64
        pixels = xtr.astype(np.float64) / 255
        mean, std = pixels.mean(), pixels.std()
        torch.testing.assert_close(d.train.tensors[0], _standardised(xtr, mean, std), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d.test.tensors[0], _standardised(xte, mean, std), atol=1e-5, rtol=1e-5)
        x, y = d.test[7]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and int(y) == yte[7]
        assert d.train.classes == d.test.classes == list(FASHION_MNIST_CLASSES)
        assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"
        assert "fashion_mnist: 200 train / 100 test items, 10 classes, old model sees 0-4" == d.describe()
        assert DownloadStub.calls == []

    def test_subsets_are_stratified_and_seeded(self, env):
        write_fake_fashion_mnist(env / "data", n_train=300, n_test=200)
        a = load_dataset("fashion_mnist", n_train=50, n_test=40)
        b = load_dataset("fashion_mnist", n_train=50, n_test=40)
        c = load_dataset("fashion_mnist", n_train=50, n_test=40, split_seed=1)
        np.testing.assert_array_equal(np.bincount(a.train_labels), [5] * 10)
        np.testing.assert_array_equal(np.bincount(a.test_labels), [4] * 10)
        torch.testing.assert_close(a.train.tensors[0], b.train.tensors[0], rtol=0, atol=0)
        torch.testing.assert_close(a.test.tensors[0], b.test.tensors[0], rtol=0, atol=0)
        assert a.info == b.info
        assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
        assert not torch.equal(a.test.tensors[0], c.test.tensors[0])

    def test_test_subset_does_not_depend_on_n_train(self, env):
        write_fake_fashion_mnist(env / "data", n_train=300, n_test=200)
        a = load_dataset("fashion_mnist", n_train=50, n_test=40)
        b = load_dataset("fashion_mnist", n_train=120, n_test=40)
        np.testing.assert_array_equal(a.test_labels, b.test_labels)
        # the same images; only the standardisation (training statistics) differs, by an affine map
        z = [(t - t.mean()) / t.std() for t in (a.test.tensors[0], b.test.tensors[0])]
        torch.testing.assert_close(z[0], z[1], atol=1e-5, rtol=1e-5)
        assert not torch.equal(a.test.tensors[0], b.test.tensors[0])

    def test_standardised_with_training_statistics(self, env):
        write_fake_fashion_mnist(env / "data", n_train=300, n_test=100)
        x = load_dataset("fashion_mnist", n_train=100, n_test=50).train.tensors[0]
        assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3

    def test_info_tells_subsets_and_files_apart_but_not_folders(self, env):
        write_fake_fashion_mnist(env / "data", n_train=300, n_test=200)
        write_fake_fashion_mnist(env / "same", n_train=300, n_test=200)
        write_fake_fashion_mnist(env / "other", n_train=300, n_test=200, seed=5)
        key = lambda info: {k: v for k, v in info.items() if k != "root"}  # noqa: E731  (as context._data_key)
        infos = [load_dataset("fashion_mnist", **kw).info for kw in
                 ({"n_train": 50, "n_test": 40}, {"n_train": 60, "n_test": 40}, {"n_train": 50, "n_test": 30},
                  {"n_train": 50, "n_test": 40, "split_seed": 2},
                  {"n_train": 50, "n_test": 40, "root": env / "other"})]
        assert len({repr(sorted(key(i).items())) for i in infos}) == len(infos)
        moved = load_dataset("fashion_mnist", root=env / "same", n_train=50, n_test=40).info
        assert key(moved) == key(infos[0]) and moved["root"] != infos[0]["root"]

    def test_old_classes(self, env):
        write_fake_fashion_mnist(env / "data")
        d = load_dataset("fashion_mnist", old_classes="5-9", n_train=100, n_test=50)
        assert d.old_classes == (5, 6, 7, 8, 9)
        assert set(d.train_labels[d.train_subset().indices]) == {5, 6, 7, 8, 9}
        with pytest.raises(ValueError, match="old_classes covers every class"):
            load_dataset("fashion_mnist", old_classes="0-9")

    @pytest.mark.parametrize("kwargs,error,match", [
        ({"n_train": 201}, ValueError, r"n_train=201 is more than the 200 images of the split"),
        ({"n_train": None, "n_test": 101}, ValueError, r"n_test=101 is more than the 100 images of the split"),
        ({"n_train": 0}, ValueError, r"n_train must be a positive integer \(training images\) or None"),
        ({"n_test": "all"}, TypeError, r"n_test must be a positive integer \(test images\) or None"),
    ])
    def test_bad_sizes(self, env, kwargs, error, match):
        write_fake_fashion_mnist(env / "data", n_train=200, n_test=100)
        with pytest.raises(error, match=match):
            load_dataset("fashion_mnist", **kwargs)


class TestWhereTheFilesAre:
    def test_data_folder_before_debian(self, env):
        write_fake_fashion_mnist(env / "debian", seed=1)
        mine = write_fake_fashion_mnist(env / "data", seed=2)
        d = load_dataset("fashion_mnist", n_train=None, n_test=None)
        assert d.info["root"] == str(env / "data")
        np.testing.assert_array_equal(d.test_labels, mine["test"][1])

    def test_debian_when_the_data_folder_is_empty(self, env):
        debian = write_fake_fashion_mnist(env / "debian", seed=1)
        d = load_dataset("fashion_mnist", n_train=None, n_test=None)
        assert d.info["root"] == str(env / "debian")
        np.testing.assert_array_equal(d.train_labels, debian["train"][1])

    def test_root_argument_before_the_environment(self, env):
        write_fake_fashion_mnist(env / "data", seed=1)
        write_fake_fashion_mnist(env / "explicit", seed=2)
        assert load_dataset("fashion_mnist", root=env / "explicit", n_train=50, n_test=20).info["root"] == \
            str(env / "explicit")

    def test_torchvision_layout_before_flat_and_plain_before_gzip(self, env):
        write_fake_fashion_mnist(env / "data", layout="flat", seed=1)
        write_fake_fashion_mnist(env / "data", layout="torchvision", gz=True, seed=2)
        write_fake_fashion_mnist(env / "data", layout="torchvision", gz=False, seed=2)
        found = find_fashion_mnist()
        assert found["folder"] == env / "data" / "FashionMNIST" / "raw"
        assert found["train"] == (found["folder"] / NAMES["train"][0], found["folder"] / NAMES["train"][1])
        assert all(p.suffix != ".gz" for p in found["test"])

    def test_nothing_anywhere(self, env):
        assert find_fashion_mnist() is None

    def test_incomplete_folder_is_an_error_naming_what_is_missing(self, env):
        written = write_fake_fashion_mnist(env / "data")
        write_fake_fashion_mnist(env / "debian")  # complete, but must not hide the broken copy
        written["paths"]["t10k-labels-idx1-ubyte"].unlink()
        with pytest.raises(DataNotFoundError, match=r"Fashion-MNIST in .*data is incomplete: t10k-labels-idx1-ubyte "
                                                    r"\(or .gz\) missing"):
            load_dataset("fashion_mnist")


class TestDownload:
    def test_download_only_when_no_folder_has_the_files(self, env):
        def fake_download(root, train):
            if train:  # torchvision writes both splits' files (gzipped and extracted) into FashionMNIST/raw
                write_fake_fashion_mnist(root, n_train=100, n_test=50, layout="torchvision", gz=False)

        DownloadStub.action = staticmethod(fake_download)
        d = load_dataset("fashion_mnist", n_train=None, n_test=None)
        assert [(root, dl) for root, _, dl in DownloadStub.calls] == [(env / "data", True)] * 2
        assert d.info["root"] == str(env / "data" / "FashionMNIST" / "raw") and len(d.test_labels) == 50
        DownloadStub.calls.clear()
        load_dataset("fashion_mnist", n_train=20, n_test=10)  # second time: found, no download
        assert DownloadStub.calls == []

    def test_no_network(self, env):
        def no_network(root, train):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://example/, got:\n"
                               f"{urllib.error.URLError('no network in tests')}\n")  # torchvision's wording

        DownloadStub.action = staticmethod(no_network)
        with pytest.raises(DataNotFoundError) as info:
            load_dataset("fashion_mnist")
        message = str(info.value)
        assert "\n" not in message and "RuntimeError: Error downloading" in message and "no network" in message
        for hint in ("apt-get install dataset-fashion-mnist", "BACKFILL_DATA", "pip install torchvision",
                     str(env / "data"), str(env / "debian")):
            assert hint in message
        assert isinstance(info.value, FileNotFoundError)

    def test_no_torchvision(self, env, monkeypatch):
        def no_torchvision(root, train):
            raise ImportError("No module named 'torchvision'")

        DownloadStub.action = staticmethod(no_torchvision)
        with pytest.raises(DataNotFoundError, match=r"ImportError: No module named 'torchvision'.*apt-get install"):
            load_dataset("fashion_mnist")

    def test_download_false(self, env):
        with pytest.raises(DataNotFoundError, match=r"\(download=False\): apt-get install dataset-fashion-mnist, or "
                                                    r"set \$BACKFILL_DATA"):
            load_dataset("fashion_mnist", download=False)
        assert DownloadStub.calls == []


def _replace(written, name, payload, gz=True):
    path = written["paths"][name]
    path.unlink()
    return write_bytes(written["folder"] / name, payload, gz)


class TestBadFiles:
    """Every broken file gets an error that names it (the loader never falls back to another copy)."""

    @pytest.fixture
    def written(self, env):
        write_fake_fashion_mnist(env / "debian")  # a good copy elsewhere must not hide the bad one
        return write_fake_fashion_mnist(env / "data", n_train=100, n_test=50)

    def _fails(self, name, match, error=ValueError):
        with pytest.raises(error, match=match) as info:
            load_dataset("fashion_mnist", n_train=None, n_test=None)
        assert name in str(info.value)

    def test_truncated_gzip(self, written):
        path = written["paths"]["train-images-idx3-ubyte"]
        path.write_bytes(path.read_bytes()[:-100])
        self._fails("train-images-idx3-ubyte.gz", "the gzip stream ends early")

    def test_truncated_plain(self, written):
        images = written["test"][0]
        _replace(written, "t10k-images-idx3-ubyte", idx_bytes(images)[:-28], gz=False)
        self._fails("t10k-images-idx3-ubyte", r"shape \(50, 28, 28\) .* \(truncated file\)")

    def test_bad_magic(self, written):
        _replace(written, "train-labels-idx1-ubyte", b"<html>not found</html>")
        self._fails("train-labels-idx1-ubyte.gz", r"not an IDX file \(magic number 0x3c68746d")

    def test_header_count_larger_than_the_data(self, written):
        labels = written["train"][1]
        payload = bytearray(idx_bytes(labels))
        payload[4:8] = (len(labels) + 5).to_bytes(4, "big")
        _replace(written, "train-labels-idx1-ubyte", bytes(payload))
        self._fails("train-labels-idx1-ubyte.gz", r"announces shape \(105,\) .* \(truncated file\)")

    def test_labels_of_another_length(self, written):
        _replace(written, "t10k-labels-idx1-ubyte", idx_bytes(written["test"][1][:-1]))
        self._fails("t10k-labels-idx1-ubyte.gz", r"holds 49 labels but .*t10k-images-idx3-ubyte.gz holds 50 images")

    def test_labels_outside_0_to_9(self, written):
        labels = written["train"][1].copy()
        labels[17] = 12
        _replace(written, "train-labels-idx1-ubyte", idx_bytes(labels))
        self._fails("train-labels-idx1-ubyte.gz", r"label 12 at position 17 is outside 0..9")

    def test_images_of_another_size(self, written):
        _replace(written, "train-images-idx3-ubyte", idx_bytes(np.zeros((100, 32, 32), np.uint8)))
        self._fails("train-images-idx3-ubyte.gz", r"expected 28×28 images of bytes .* got shape \(100, 32, 32\)")

    def test_files_swapped(self, written):
        images, labels = written["test"]
        _replace(written, "t10k-images-idx3-ubyte", idx_bytes(labels))
        _replace(written, "t10k-labels-idx1-ubyte", idx_bytes(images))
        self._fails("t10k-images-idx3-ubyte.gz", r"expected 28×28 images .* got shape \(50,\)")

    def test_labels_not_bytes(self, written):
        _replace(written, "t10k-labels-idx1-ubyte", idx_bytes(written["test"][1].astype(np.int32)))
        self._fails("t10k-labels-idx1-ubyte.gz", r"expected a vector of byte labels .* got shape \(50,\) of int32")


def test_fake_split_has_every_class():
    images, labels = fake_split(30, np.random.default_rng(0))
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), [3] * 10)


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian's dataset-fashion-mnist is not installed "
                                                "(scripts/setup.sh installs it)")
class TestRealDebianFiles:
    def test_the_package_files(self):
        for split, count in (("train", 6000), ("test", 1000)):
            labels = read_idx(DEBIAN / f"{NAMES[split][1]}.gz")
            assert labels.dtype == np.uint8
            np.testing.assert_array_equal(np.bincount(labels), [count] * 10)  # balanced, 0..9

    def test_load_from_debian(self, monkeypatch, tmp_path):
        monkeypatch.setenv("BACKFILL_DATA", str(tmp_path))  # empty: falls through to Debian's folder
        monkeypatch.setattr(torchvision.datasets, "FashionMNIST", DownloadStub)
        monkeypatch.setattr(DownloadStub, "action", None)
        d = load_dataset("fashion_mnist")  # the default sizes: 20,000 training, 3,000 test images
        assert d.info["root"] == str(DEBIAN) and d.input_shape == (1, 28, 28)
        np.testing.assert_array_equal(np.bincount(d.train_labels), [2000] * 10)
        np.testing.assert_array_equal(np.bincount(d.test_labels), [300] * 10)
        x = d.train.tensors[0]
        assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
        # Class means differ: a trouser is not a bag (the labels belong to the images).
        raw_means = [float(x[torch.as_tensor(d.train_labels == c)].mean()) for c in range(10)]
        assert max(raw_means) - min(raw_means) > 0.3
        again = load_dataset("fashion_mnist")
        assert again.info == d.info
